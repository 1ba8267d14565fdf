"""Metrics, test-time augmentation, confusion matrices and report files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ferkit.data.augment import to_float


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """Views of a normalised B×C×S×S batch: itself; plus its mirror (flip); or ten crops of a 12.5% upscale."""
    if tta == "none":
        return [x]
    if tta == "flip":
        return [x, x.flip(-1)]
    if tta == "tencrop":
        s = x.shape[-1]
        big = F.interpolate(x, size=(s + s // 8, s + s // 8), mode="bilinear", align_corners=False)
        d = big.shape[-1] - s
        offs = [(0, 0), (0, d), (d, 0), (d, d), (d // 2, d // 2)]
        crops = [big[..., i : i + s, j : j + s] for i, j in offs]
        return crops + [c.flip(-1) for c in crops]
    raise ValueError(f"unknown tta '{tta}' (none, flip, tencrop)")


@torch.inference_mode()
def predict_probs(
    net: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray | torch.Tensor,
    *,
    size: int,
    mean: float,
    std: float,
    tta: str = "none",
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Class probabilities for uint8 N×H×W face crops, averaged over the TTA views."""
    out = []
    x_all = torch.as_tensor(images)
    for i in range(0, len(x_all), batch_size):
        x = to_float(x_all[i : i + batch_size].to(device), size, mean, std)
        views = tta_views(x, tta)
        p = sum(F.softmax(net(v).float(), dim=1) for v in views) / len(views)
        out.append(p.cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(np.asarray(y_true) * n + np.asarray(y_pred), minlength=n * n).reshape(n, n)


def metrics_from_confusion(cm: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix (rows = truth)."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    prec = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    rec = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(tp), where=(prec + rec) > 0)
    n = int(cm.sum())
    present = support > 0
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
        "n": n,
    }


def evaluate_probs(probs: torch.Tensor | np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    pred = np.asarray(torch.as_tensor(probs).argmax(1))
    return metrics_from_confusion(confusion(labels, pred, len(classes)), classes)


def format_table(m: dict[str, Any]) -> str:
    """A plain-text report: headline numbers, per-class table and confusion matrix."""
    classes = m["classes"]
    w = max(9, *(len(c) for c in classes)) + 1
    lines = [
        f"accuracy {m['accuracy'] * 100:.2f}%   macro-F1 {m['macro_f1'] * 100:.2f}%   n={m['n']}",
        "",
        f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for c in classes:
        r = m["per_class"][c]
        lines.append(f"{c:<{w}}{r['precision']:>10.3f}{r['recall']:>10.3f}{r['f1']:>10.3f}{r['support']:>10d}")
    lines += [
        "",
        "confusion matrix (rows: true, columns: predicted)",
        f"{'':<{w}}" + "".join(f"{c[:8]:>9}" for c in classes),
    ]
    for c, row in zip(classes, m["confusion_matrix"]):
        lines.append(f"{c:<{w}}" + "".join(f"{v:>9d}" for v in row))
    return "\n".join(lines)


def plot_confusion(m: dict[str, Any], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(m["confusion_matrix"], float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    classes = m["classes"]
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2.5, 1.0 * len(classes) + 2))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n{norm[i, j] * 100:.0f}%",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {m['accuracy'] * 100:.2f}% (n={m['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: list[dict[str, float]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    a.plot(ep, [h["val_loss"] for h in history], label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(ep, [h["train_acc"] * 100 for h in history], label="train")
    b.plot(ep, [h["val_acc"] * 100 for h in history], label="validation")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy (%)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(m: dict[str, Any], out: str | Path, title: str = "") -> None:
    """``metrics.json`` and ``confusion_matrix.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=2) + "\n")
    plot_confusion(m, out / "confusion_matrix.png", title)
