"""Old home of ensemble packing and evaluation, kept so that old imports work: :func:`pack_ensemble` is an export
and lives in :mod:`ferkit.export`; :func:`evaluate_models` and :func:`ensemble_probs` live in :mod:`ferkit.evaluate`."""

from __future__ import annotations

from typing import Any

from ferkit.evaluate import ensemble_probs, evaluate_models  # noqa: F401  (re-exported under their old home)


def __getattr__(name: str) -> Any:
    if name == "pack_ensemble":  # lazily: ferkit.export needs torch
        from ferkit.export import pack_ensemble

        return pack_ensemble
    raise AttributeError(f"module 'ferkit.ensemble' has no attribute {name!r}")
