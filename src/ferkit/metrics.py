"""Metrics and their plots: accuracy, F1, confusion matrices, calibration (ECE, NLL, Brier), selective prediction.

Everything here works on plain arrays (numpy; CPU torch tensors are accepted) and imports neither torch nor
matplotlib at module level, so evaluation reports and model cards can be built without the training stack.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Equal-width confidence bins of the expected calibration error: 15, as Guo et al. (2017) and torchmetrics' default.
ECE_BINS = 15


def _np(a: Any) -> np.ndarray:
    """A numpy view of an array or a (CPU) torch tensor."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """n×n counts, rows = truth, columns = prediction."""
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


def evaluate_probs(probs: Any, labels: Any, classes: list[str], *, bins: int = ECE_BINS) -> dict[str, Any]:
    """Classification metrics (:func:`metrics_from_confusion`) plus calibration (:func:`calibration`) of N×C probs."""
    p = _np(probs).astype(np.float64)
    y = _np(labels).astype(np.int64)
    m = metrics_from_confusion(confusion(y, p.argmax(1) if len(p) else np.zeros(0, np.int64), len(classes)), classes)
    if len(p):
        m.update(calibration(p, y, bins=bins))
    return m


# -- calibration --------------------------------------------------------------------------------------------------


def ece(probs: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top score: Σ_b |B_b|/N · |accuracy(B_b) − mean confidence(B_b)|.

    Equal-width bins over [0, 1], a score on an edge falls in the bin below it (as torchmetrics'
    ``multiclass_calibration_error(norm="l1")``).
    """
    return float(reliability(probs, labels, bins)["ece"])


def reliability(probs: Any, labels: Any, bins: int = ECE_BINS) -> dict[str, Any]:
    """Per-bin counts, accuracy and mean confidence of the top score (the reliability diagram's data) and the ECE."""
    p = _np(probs).astype(np.float64)
    y = _np(labels).astype(np.int64)
    conf = p.max(1)
    ok = (p.argmax(1) == y).astype(np.float64)
    # bin b holds (b/B, (b+1)/B]; a score of exactly 0 joins the first bin
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    acc = np.divide(np.bincount(idx, ok, bins), count, out=np.zeros(bins), where=count > 0)
    mean_conf = np.divide(np.bincount(idx, conf, bins), count, out=np.zeros(bins), where=count > 0)
    n = max(len(y), 1)
    return {
        "edges": np.linspace(0, 1, bins + 1).tolist(),
        "count": count.astype(int).tolist(),
        "accuracy": acc.tolist(),
        "confidence": mean_conf.tolist(),
        "ece": float((count / n * np.abs(acc - mean_conf)).sum()),
    }


def nll(probs: Any, labels: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    p = _np(probs).astype(np.float64)
    y = _np(labels).astype(np.int64)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], eps, None)).mean()) if len(y) else 0.0


def brier(probs: Any, labels: Any) -> float:
    """Multi-class Brier score: mean over faces of Σ_c (p_c − [c = y])² (0 is perfect, 2 the worst)."""
    p = _np(probs).astype(np.float64)
    y = _np(labels).astype(np.int64)
    if not len(y):
        return 0.0
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(1).mean())


def calibration(probs: Any, labels: Any, bins: int = ECE_BINS) -> dict[str, float]:
    """``{"ece", "nll", "brier", "mean_confidence"}`` of N×C probabilities (ECE over ``bins`` equal-width bins)."""
    p = _np(probs).astype(np.float64)
    return {"ece": ece(p, labels, bins), "nll": nll(p, labels), "brier": brier(p, labels),
            "mean_confidence": float(p.max(1).mean()) if len(p) else 0.0, "ece_bins": bins}


# -- selective prediction ("uncertain" below a minimum score) ---------------------------------------------------


def ece_noise_floor(probs: Any, draws: int = 200, seed: int = 0, bins: int = ECE_BINS) -> float:
    """Mean ECE over labels drawn from ``probs`` themselves: what a perfectly calibrated model scores at this n.

    The ECE of a finite sample is never 0; for scores spread over the bins it is about ``sqrt(bins / n)`` times a
    constant, so an ECE near this floor is as good as that number of faces can show."""
    p = _np(probs).astype(np.float64)
    rng = np.random.default_rng(seed)
    cum = p.cumsum(1)
    return float(np.mean([ece(p, (cum < rng.random(len(p))[:, None]).sum(1).clip(0, p.shape[1] - 1), bins)
                          for _ in range(draws)]))


def selective(probs: Any, labels: Any, min_score: float) -> dict[str, float]:
    """Coverage (share of faces whose top score ≥ ``min_score``) and the accuracy on the faces kept."""
    p = _np(probs).astype(np.float64)
    y = _np(labels).astype(np.int64)
    keep = p.max(1) >= min_score
    ok = p.argmax(1) == y
    return {"min_score": float(min_score), "coverage": float(keep.mean()) if len(y) else 0.0,
            "kept": int(keep.sum()), "accuracy_kept": float(ok[keep].mean()) if keep.any() else 0.0}


def coverage_curve(probs: Any, labels: Any, points: int = 101) -> dict[str, list[float]]:
    """Accuracy on the most confident X% of faces, for X from 1/points to 100%, and the score threshold at each X."""
    p = _np(probs).astype(np.float64)
    y = _np(labels).astype(np.int64)
    conf = p.max(1)
    order = np.argsort(-conf, kind="stable")
    ok = (p.argmax(1) == y)[order].astype(np.float64)
    cum = np.cumsum(ok)
    n = len(y)
    cov = np.linspace(0, 1, points)[1:]
    k = np.maximum(1, np.round(cov * n).astype(int)) if n else np.zeros(0, int)
    return {"coverage": cov.tolist(), "accuracy": (cum[k - 1] / k).tolist() if n else [],
            "threshold": conf[order][k - 1].tolist() if n else []}


def suggest_min_score(probs: Any, labels: Any, candidates: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                      ) -> dict[str, Any]:
    """The suggested ``min_score`` and a small table of (P, coverage, accuracy on kept faces).

    With calibrated scores a face whose top score is below 0.5 is more likely wrong than right, so 0.5 is the
    suggestion: it abstains only where the label is a worse-than-even guess.
    """
    table = [selective(probs, labels, c) for c in candidates]
    return {"min_score": 0.5, "table": table}


# -- text and plots -----------------------------------------------------------------------------------------------


def format_table(m: dict[str, Any]) -> str:
    """A plain-text report: headline numbers, calibration, per-class table and confusion matrix."""
    classes = m["classes"]
    w = max(9, *(len(c) for c in classes)) + 1
    lines = [f"accuracy {m['accuracy'] * 100:.2f}%   macro-F1 {m['macro_f1'] * 100:.2f}%   n={m['n']}"]
    if "ece" in m:
        lines.append(f"ECE {m['ece']:.4f} ({m.get('ece_bins', ECE_BINS)} bins)   NLL {m['nll']:.4f}   "
                     f"Brier {m['brier']:.4f}   mean top score {m['mean_confidence']:.3f}")
        for c in m.get("calibration") or []:
            t = "" if c["temperature_poly"] else f" T={c['temperature']:.3f}"
            lines.append(f"calibration: {c['method']}{t}" + (
                " (fitted on this split: these calibration numbers are in-sample; the model card gives cross-fitted "
                "ones)" if c.get("in_sample") else ""))
    sel = m.get("selective")
    if sel:
        lines.append(f"min-score {sel['min_score']:g}: coverage {sel['coverage'] * 100:.2f}% ({sel['kept']} faces), "
                     f"accuracy on kept faces {sel['accuracy_kept'] * 100:.2f}%")
    lines += ["", f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
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


def _pyplot():  # noqa: ANN202 - matplotlib is imported lazily
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    from ferkit.fsutil import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)


def plot_confusion(m: dict[str, Any], path: str | Path, title: str = "") -> None:
    """The confusion matrix as a PNG: counts and row-normalised percentages."""
    plt = _pyplot()
    cm = np.asarray(m["confusion_matrix"], float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    classes = m["classes"]
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2.5, 1.0 * len(classes) + 2))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}\n{norm[i, j] * 100:.0f}%", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {m['accuracy'] * 100:.2f}% (n={m['n']})")
    fig.tight_layout()
    _save(fig, path)


def plot_reliability(rel: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the bins' share of faces."""
    plt = _pyplot()
    edges = np.asarray(rel["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    count = np.asarray(rel["count"], float)
    used = count > 0
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    few = count < 10  # a bin of a face or two says nothing: drawn pale so it does not dominate the picture
    acc = np.asarray(rel["accuracy"])
    ax.bar(centres[used & ~few], acc[used & ~few], width=width * 0.9, color="#4c78a8", alpha=0.85,
           label="accuracy in bin")
    if (used & few).any():
        ax.bar(centres[used & few], acc[used & few], width=width * 0.9, color="#4c78a8", alpha=0.25,
               label="bin with < 10 faces")
    ax.plot(np.asarray(rel["confidence"])[used], np.asarray(rel["accuracy"])[used], "o-", color="#e45756", ms=3,
            label="(mean score, accuracy)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"reliability: ECE {rel['ece']:.4f} ({len(count)} bins)", fontsize=10)
    hx.bar(centres, count / max(count.sum(), 1), width=width * 0.9, color="grey")
    hx.set_xlabel("top score")
    hx.set_ylabel("share of faces")
    fig.tight_layout()
    _save(fig, path)


def plot_coverage(curve: dict[str, list[float]], path: str | Path, title: str = "",
                  marks: list[dict[str, float]] | None = None) -> None:
    """Accuracy on the most confident X% of faces against X, with optional ``min_score`` operating points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(np.asarray(curve["coverage"]) * 100, np.asarray(curve["accuracy"]) * 100, color="#4c78a8")
    for mk in marks or []:
        ax.plot(mk["coverage"] * 100, mk["accuracy_kept"] * 100, "o", color="#e45756", ms=4)
        ax.annotate(f"P={mk['min_score']:g}", (mk["coverage"] * 100, mk["accuracy_kept"] * 100), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("coverage: most confident X% of faces kept")
    ax.set_ylabel("accuracy on kept faces (%)")
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title or "accuracy vs coverage", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_curves(history: list[dict[str, float]], path: str | Path) -> None:
    """Training curves: loss and accuracy per epoch, train and validation."""
    plt = _pyplot()
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
    _save(fig, path)


def write_report(m: dict[str, Any], out: str | Path, title: str = "", probs: Any = None, labels: Any = None,
                 min_scores: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) -> None:
    """``metrics.json`` and ``confusion_matrix.png`` in ``out``; with ``probs`` and ``labels`` also
    ``reliability.png`` and ``coverage.png``."""
    from ferkit.fsutil import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(m, indent=2) + "\n")
    plot_confusion(m, out / "confusion_matrix.png", title)
    if probs is not None and labels is not None and len(_np(labels)):
        rel = reliability(probs, labels)
        plot_reliability(rel, out / "reliability.png", f"{title}\nECE {rel['ece']:.4f} ({len(rel['count'])} bins)"
                         if title else "")
        plot_coverage(coverage_curve(probs, labels), out / "coverage.png", title,
                      marks=[selective(probs, labels, s) for s in min_scores])
