"""Evaluate one model or an ensemble (averaged probabilities) on a dataset split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ferkit.classes import parse_classes
from ferkit.data import find_dataset, load_split
from ferkit.errors import DatasetError
from ferkit.evaluate import evaluate_probs, predict_probs
from ferkit.modelfile import load_model


def ensemble_probs(models: list[tuple[torch.nn.Module, Any]], split_src, classes: list[str], *, tta: str = "none",
                   batch_size: int = 512, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Average class probabilities of several models over one split, restricted to ``classes``.

    Each model sees the split decoded at its own input size; its probabilities are restricted to ``classes`` and
    renormalised, so a 7-class model can be scored on a 3-class dataset (argmax over those classes only).
    """
    total, labels = None, None
    for net, meta in models:
        data = load_split(split_src, meta.input_size, strict=strict)
        p = predict_probs(net, data.images, size=meta.input_size, mean=meta.mean, std=meta.std, tta=tta,
                          batch_size=batch_size)
        idx = [list(meta.classes).index(c) for c in classes]
        p = p[:, idx]
        p = p / p.sum(1, keepdim=True).clamp(min=1e-12)
        total = p if total is None else total + p
        labels = data.labels
    return (total / len(models)).numpy(), labels


def evaluate_models(specs: list[str], *, data: str | None = None, split: str | None = None, classes: str | None = None,
                    tta: str = "none", batch_size: int = 512, strict: bool = False,
                    say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Metrics of a model (or the ensemble of ``specs``) on a dataset split; see ``ferkit evaluate``."""
    models = [load_model(s) for s in specs]
    metas = [m for _, m in models]
    common = [c for c in metas[0].classes if all(c in m.classes for m in metas[1:])]
    wanted = parse_classes(classes) if classes else common
    bad = [c for c in wanted if c not in common]
    if bad:
        raise DatasetError(f"the model(s) have no class(es) {', '.join(bad)} (they share: {', '.join(common)})")
    data = data or metas[0].training.get("data")
    if not data:
        raise DatasetError("--data is required (the model does not say what it was trained on)")
    ds = find_dataset(data, wanted, require_all=False)
    if split is None:
        split = next((s for s in ("test", "single", "validation") if s in ds.splits), None)
        if split is None:
            raise DatasetError(f"{data}: no test or validation split (found: {', '.join(ds.splits)})")
        if split != "test":
            say(f"note: {data} has no test split; evaluating on '{split}'")
    src = ds.split(split) if split != "single" else ds.splits["single"]
    if ds.classes != list(metas[0].classes):
        say(f"note: the model knows {len(metas[0].classes)} classes; scoring restricted to the dataset's "
            f"{len(ds.classes)} ({', '.join(ds.classes)}), argmax over those")
    probs, labels = ensemble_probs(models, src, ds.classes, tta=tta, batch_size=batch_size, strict=strict)
    m = evaluate_probs(probs, labels, ds.classes)
    m.update({"split": split, "data": str(data), "models": specs, "tta": tta})
    return m


def pack_ensemble(specs: list[str], out: str, *, data: str | None = None, split: str = "validation",
                  say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Write the ensemble of ``specs`` as one ferkit model file (see :mod:`ferkit.models.ensemble`).

    The members must agree on classes (same order), input size, channels and normalisation. The packed model is then
    scored on ``split`` of ``data`` (default: the first member's training data, when it is there) and the metrics
    are stored in its metadata, as a training run stores its own.

    Raises:
        ModelFileError: fewer than two members, or members that disagree.
    """
    import dataclasses
    from pathlib import Path

    from ferkit.errors import ModelFileError
    from ferkit.modelfile import save_model
    from ferkit.models.ensemble import Ensemble, ensemble_arch

    if len(specs) < 2:
        raise ModelFileError("an ensemble needs at least two models (--model a,b)")
    models = [load_model(s) for s in specs]
    first = models[0][1]
    for spec, (_, meta) in zip(specs[1:], models[1:]):
        for field in ("classes", "input_size", "in_chans", "mean", "std"):
            mine, theirs = getattr(meta, field), getattr(first, field)
            if mine != theirs:
                show = (lambda v: ", ".join(v)) if field == "classes" else str
                raise ModelFileError(
                    f"{spec}: {field} {show(mine)} differ from {specs[0]}'s ({show(theirs)}); the members of an "
                    "ensemble must agree"
                )
    members: list[torch.nn.Module] = []
    for net, _ in models:
        members += list(net.members) if isinstance(net, Ensemble) else [net]
    ens = Ensemble(members).eval()
    meta = dataclasses.replace(
        first,
        arch=ensemble_arch([m.arch for _, m in models]),
        name=Path(out).stem,
        training={
            "recipe": "ensemble",
            "ensemble_of": list(specs),
            "data": first.training.get("data"),
            "train_images": first.training.get("train_images"),
        },
        metrics={},
    )
    path = save_model(out, ens, meta, json_sidecar=False)
    data = data or first.training.get("data")
    if data and Path(data).exists():
        m = evaluate_models([str(path)], data=data, split=split, say=say)
        flip = evaluate_models([str(path)], data=data, split=split, tta="flip")
        meta = dataclasses.replace(meta, metrics={
            "val_split": m["split"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "accuracy_tta_flip": flip["accuracy"], "n": m["n"]})
        save_model(path, ens, meta, json_sidecar=False)
    return {"path": str(path), "arch": meta.arch, "metrics": meta.metrics}
