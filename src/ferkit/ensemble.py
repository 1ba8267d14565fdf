"""Ensemble packing (``ferkit export --format ferkit --model a,b``); the evaluation functions that lived here are in
:mod:`ferkit.evaluate` (still importable from here under their old names)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ferkit.evaluate import ensemble_probs, evaluate_models  # noqa: F401  (re-exported under their old home)
from ferkit.modelfile import load_model


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
        from ferkit.evaluate import model_logits
        from ferkit.train.calibrate import calibrate

        # Averaging members changes how confident the ensemble is: calibrate the packed model itself, on the split
        # it is scored on (ECE quoted by cross-fitting, see train.calibrate).
        z, y, _ = model_logits(str(path), data=data, split=split)
        cal = calibrate(z, y, split=split)
        meta = dataclasses.replace(meta, temperature=cal["temperature"],
                                   temperature_poly=tuple(cal["temperature_poly"]))
        save_model(path, ens, meta, json_sidecar=False)
        m = evaluate_models([str(path)], data=data, split=split, say=say)
        flip = evaluate_models([str(path)], data=data, split=split, tta="flip")
        meta = dataclasses.replace(meta, metrics={
            "val_split": m["split"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "accuracy_tta_flip": flip["accuracy"], "n": m["n"], "calibration": cal})
        save_model(path, ens, meta, json_sidecar=False)
    return {"path": str(path), "arch": meta.arch, "metrics": meta.metrics}
