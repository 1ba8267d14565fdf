"""Evaluate one model or an ensemble (averaged probabilities) on a dataset split: the ``ferkit evaluate`` library.

The metric functions live in :mod:`ferkit.metrics`; their old names here (``confusion``, ``evaluate_probs``,
``format_table``, ``write_report`` …) still work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ferkit.data.augment import to_float
from ferkit.errors import UnknownNameError
from ferkit.metrics import (  # noqa: F401  (re-exported: the names this module had before metrics.py)
    confusion,
    evaluate_probs,
    format_table,
    metrics_from_confusion,
    plot_confusion,
    plot_curves,
    selective,
    write_report,
)


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """Views of a normalised B×C×S×S batch: itself; plus its mirror (flip); or ten crops of a 12.5% upscale."""
    if tta == "none":
        return [x]
    if tta == "flip":
        return [x, x.flip(-1)]
    if tta == "tencrop":
        from ferkit.models.ensemble import upscaled

        s = x.shape[-1]
        big = upscaled(x)
        d = big.shape[-1] - s
        offs = [(0, 0), (0, d), (d, 0), (d, d), (d // 2, d // 2)]
        crops = [big[..., i : i + s, j : j + s] for i, j in offs]
        return crops + [c.flip(-1) for c in crops]
    raise UnknownNameError("tta", tta, ("none", "flip", "tencrop"))


@torch.inference_mode()
def predict_logits(
    net: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray | torch.Tensor,
    *,
    size: int,
    mean: float,
    std: float,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Raw network outputs (float32 N×C, on the CPU) for uint8 N×H×W face crops: what a temperature is fitted on."""
    out = []
    x_all = torch.as_tensor(images)
    for i in range(0, len(x_all), batch_size):
        x = to_float(x_all[i : i + batch_size].to(device), size, mean, std)
        out.append(net(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


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
    calibration: Any = None,
) -> torch.Tensor:
    """Class probabilities for uint8 N×H×W face crops, averaged over the TTA views.

    ``calibration``: a ``ModelMeta`` whose temperature scales the logits (``modelfile.calibrated_probs``); None for
    the plain softmax.
    """
    from ferkit.modelfile import calibrated_probs

    out = []
    x_all = torch.as_tensor(images)
    for i in range(0, len(x_all), batch_size):
        x = to_float(x_all[i : i + batch_size].to(device), size, mean, std)
        views = tta_views(x, tta)
        p = sum((calibrated_probs(net(v), calibration) if calibration is not None else F.softmax(net(v).float(), 1))
                for v in views) / len(views)
        out.append(p.cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def ensemble_probs(models: list[tuple[torch.nn.Module, Any]], split_src, classes: list[str], *, tta: str = "none",
                   batch_size: int = 512, strict: bool = False, with_kept: bool = False) -> tuple[np.ndarray, ...]:
    """Average class probabilities of several models over one split, restricted to ``classes``.

    Each model sees the split decoded at its own input size, with its own calibration temperature; its
    probabilities are restricted to ``classes`` and renormalised, so a 7-class model can be scored on a 3-class
    dataset (argmax over those classes only). ``with_kept``: also return which faces of the split were decoded
    (``LoadedSplit.kept``), so per-face data such as votes can follow them.
    """
    from ferkit.data import load_split

    total, labels, kept = None, None, None
    for net, meta in models:
        data = load_split(split_src, meta.input_size, strict=strict)
        p = predict_probs(net, data.images, size=meta.input_size, mean=meta.mean, std=meta.std, tta=tta,
                          batch_size=batch_size, calibration=meta)
        idx = [list(meta.classes).index(c) for c in classes]
        p = p[:, idx]
        p = p / p.sum(1, keepdim=True).clamp(min=1e-12)
        total = p if total is None else total + p
        labels, kept = data.labels, data.take(np.arange(len(split_src)))
    if with_kept:
        return (total / len(models)).numpy(), labels, kept
    return (total / len(models)).numpy(), labels


def _resolve_split(ds, data: str, split: str | None, say: Callable[[str], None]) -> tuple[str, Any]:
    from ferkit.errors import DatasetError

    if split is None:
        split = next((s for s in ("test", "single", "validation") if s in ds.splits), None)
        if split is None:
            raise DatasetError(f"{data}: no test or validation split (found: {', '.join(ds.splits)})")
        if split != "test":
            say(f"note: {data} has no test split; evaluating on '{split}'")
    return split, (ds.split(split) if split != "single" else ds.splits["single"])


def evaluate_models(specs: list[str], *, data: str | None = None, split: str | None = None, classes: str | None = None,
                    tta: str = "none", batch_size: int = 512, strict: bool = False, min_score: float | None = None,
                    return_probs: bool = False, labels: str | None = None,
                    say: Callable[[str], None] = lambda s: None) -> dict[str, Any] | tuple[dict[str, Any], Any, Any]:
    """Metrics of a model (or the ensemble of ``specs``) on a dataset split; see ``ferkit evaluate``.

    Probabilities are calibrated by each model's stored temperature. With ``min_score``, the result's
    ``"selective"`` entry gives the coverage and the accuracy on the faces whose top score reaches it. With
    ``return_probs``, returns ``(metrics, probs, labels)``.

    ``labels``: crowd votes (``ferkit.data.labels.read_votes``). Then every face of the split is classified (a face
    in the "fear" folder that people call neutral counts for a happy/sad/neutral model), ``accuracy`` and the rest
    stay against the folder labels (faces whose folder is one of the classes), and ``"ferplus"`` holds the FER+
    majority accuracy, soft agreement, cross-entropy against the votes and ECE against the majority label.
    """
    from ferkit.classes import parse_classes
    from ferkit.data import find_dataset
    from ferkit.errors import DatasetError
    from ferkit.modelfile import load_model

    models = [load_model(s) for s in specs]
    metas = [m for _, m in models]
    common = [c for c in metas[0].classes if all(c in m.classes for m in metas[1:])]
    wanted = parse_classes(classes) if classes else common
    bad = [c for c in wanted if c not in common]
    if bad:
        raise DatasetError(f"the model(s) have no class(es) {', '.join(bad)} (they share: {', '.join(common)})")
    stored = None if data else metas[0].training.get("data")
    data = data or stored
    if not data:
        raise DatasetError("--data is required (the model does not say what it was trained on)")
    if stored and not Path(stored).exists():  # a path relative to wherever the model was trained
        raise DatasetError(f"the model was trained on '{stored}', which is not found from {Path.cwd()}: give the "
                           f"dataset with --data")
    if labels:
        probs, folder, m = _with_votes(models, labels, data, split, wanted, tta, batch_size, strict, say)
        split = m.pop("split")
        labels = folder
    else:
        ds = find_dataset(data, wanted, require_all=False)
        split, src = _resolve_split(ds, str(data), split, say)
        if ds.classes != list(metas[0].classes):
            say(f"note: the model knows {len(metas[0].classes)} classes; scoring restricted to the dataset's "
                f"{len(ds.classes)} ({', '.join(ds.classes)}), argmax over those")
        probs, labels = ensemble_probs(models, src, ds.classes, tta=tta, batch_size=batch_size, strict=strict)
        m = evaluate_probs(probs, labels, ds.classes)
    m.update({"split": split, "data": str(data), "models": specs, "tta": tta,
              "calibration": [_calibration_note(x, split) for x in metas]})
    if min_score is not None:
        m["selective"] = selective(probs, labels, min_score)
    return (m, probs, labels) if return_probs else m


def split_with_votes(data: str, labels: str, split: str | None, classes: list[str],
                     say: Callable[[str], None] = lambda s: None) -> tuple[str, Any, np.ndarray, np.ndarray]:
    """Every face of a split (all expression folders) with its crowd votes: ``(split, source, votes N×10, folder)``,
    ``folder`` being each face's folder label among ``classes`` (-1 for a folder outside them)."""
    from ferkit.classes import FER2013_CLASSES
    from ferkit.data import find_dataset
    from ferkit.data.labels import attach_votes, read_votes

    table = read_votes(labels)
    ds = find_dataset(data, list(FER2013_CLASSES), require_all=False)
    split, src = _resolve_split(ds, str(data), split, say)
    votes = attach_votes(table, src, ds.root)
    folder = np.array([classes.index(ds.classes[k]) if ds.classes[k] in classes else -1
                       for k in np.asarray(src.labels).tolist()], np.int64)
    return split, src, votes, folder


def _with_votes(models: list[tuple[Any, Any]], labels: str, data: str, split: str | None, classes: list[str],
                tta: str, batch_size: int, strict: bool, say: Callable[[str], None]
                ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Score every face of the split against the folder labels and the crowd votes in ``labels``: returns the
    probabilities and folder labels of the faces whose folder is one of ``classes`` (for the report's plots) and the
    metrics, with ``"ferplus"`` from :func:`ferkit.data.labels.vote_metrics`."""
    from ferkit.data.labels import vote_metrics

    split, src, votes, folder = split_with_votes(data, labels, split, classes, say)
    probs, _, kept = ensemble_probs(models, src, classes, tta=tta, batch_size=batch_size, strict=strict,
                                    with_kept=True)
    votes, folder = votes[kept], folder[kept]
    k = folder >= 0
    m = evaluate_probs(probs[k], folder[k], classes) if k.any() else {"accuracy": float("nan"), "n": 0}
    m["ferplus"] = vote_metrics(probs, votes, classes, folder=folder)
    m["ferplus"]["source"] = str(labels)
    m["split"] = split
    return probs[k], folder[k], m


def vote_logits(spec: str, *, data: str, labels: str, split: str = "validation", batch_size: int = 512
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """A model's raw outputs on every face of a split, with the faces' votes and folder labels:
    ``(logits, votes, folder, meta)`` (what a calibration against the FER+ majority label is fitted on)."""
    from ferkit.data import load_split
    from ferkit.modelfile import load_model

    net, meta = load_model(spec)
    _, src, votes, folder = split_with_votes(data, labels, split, list(meta.classes))
    loaded = load_split(src, meta.input_size)
    z = predict_logits(net, loaded.images, size=meta.input_size, mean=meta.mean, std=meta.std, batch_size=batch_size)
    return z.numpy(), loaded.take(votes), loaded.take(folder), meta


def _calibration_note(meta: Any, split: str) -> dict[str, Any]:
    """How a model's scores are calibrated, and whether ``split`` is the one its calibration was fitted on."""
    stored = (meta.metrics or {}).get("calibration") or {}
    method = ("none" if meta.temperature == 1.0 and not meta.temperature_poly
              else stored.get("method") or ("score-dependent temperature" if meta.temperature_poly else "temperature"))
    fit = stored.get("fit_split")
    return {"method": method, "temperature": float(meta.temperature), "temperature_poly": list(meta.temperature_poly),
            "fit_split": fit, "in_sample": bool(fit) and fit == split}


def model_logits(spec: str, *, data: str, split: str = "validation", batch_size: int = 512,
                 strict: bool = False) -> tuple[np.ndarray, np.ndarray, Any]:
    """A model's raw outputs on a split of ``data`` (all its classes; no temperature): ``(logits, labels, meta)``.

    Raises:
        DatasetError: the dataset lacks the split or one of the model's classes.
    """
    from ferkit.data import find_dataset, load_split
    from ferkit.modelfile import load_model

    net, meta = load_model(spec)
    ds = find_dataset(data, list(meta.classes))
    _, src = _resolve_split(ds, str(data), split, lambda s: None)
    loaded = load_split(src, meta.input_size, strict=strict)
    z = predict_logits(net, loaded.images, size=meta.input_size, mean=meta.mean, std=meta.std, batch_size=batch_size)
    return z.numpy(), np.asarray(loaded.labels), meta
