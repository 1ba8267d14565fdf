"""ferkit: facial expression recognition — train, recognise, serve and export.

The public API is loaded lazily so that ``import ferkit`` stays light (no training stack, no server stack).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Face", "Recognizer", "Results", "__version__", "list_bundled_models", "load_model"]

_LAZY = {
    "Recognizer": ("ferkit.infer.recognizer", "Recognizer"),
    "Face": ("ferkit.infer.recognizer", "Face"),
    "Results": ("ferkit.infer.recognizer", "Results"),
    "load_model": ("ferkit.modelfile", "load_model"),
    "list_bundled_models": ("ferkit.modelfile", "bundled_models"),
}

if TYPE_CHECKING:  # pragma: no cover
    from ferkit.infer.recognizer import Face, Recognizer, Results
    from ferkit.modelfile import bundled_models as list_bundled_models
    from ferkit.modelfile import load_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ferkit' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
