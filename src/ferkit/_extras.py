"""Optional dependencies: import one, or say in one line which ``pip install`` brings it.

``pip install ferkit`` is the torch-free inference install (onnxruntime, numpy, Pillow, OpenCV, YuNet); the extras
add the rest: ``[serve]`` the HTTP server, ``[train]`` PyTorch, Lightning and ONNX export, ``[all]`` everything.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Which extra brings each optional top-level module (import name → extra).
EXTRA_OF = {
    "torch": "train", "lightning": "train", "torchmetrics": "train", "yaml": "train", "matplotlib": "train",
    "tqdm": "train", "onnx": "train", "timm": "train", "captum": "train",
    "fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "prometheus_client": "serve",
    "kagglehub": "download",
}


def install_hint(extra: str) -> str:
    """The command that installs an extra, e.g. ``pip install 'ferkit[train]'``."""
    return f"pip install 'ferkit[{extra}]'"


def require(module: str, extra: str | None = None, *, what: str = "") -> ModuleType:
    """Import ``module`` or raise a one-line ``ImportError`` naming the ``pip install`` that fixes it.

    Args:
        module: the import name (``"torch"``, ``"fastapi"``).
        extra: the ferkit extra that brings it (default: looked up in :data:`EXTRA_OF`).
        what: what needs it, for the message (``"ferkit train"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = extra or EXTRA_OF.get(module.split(".")[0], "all")
        need = f"{what} needs {module}" if what else f"{module} is not installed"
        raise ImportError(f"{need}: {install_hint(extra)} ({e})") from None


def explain(e: ImportError, what: str = "") -> str:
    """One line for an ``ImportError`` that reached a command: its own text when it already names a ``pip install``,
    else which extra brings the missing module (``ferkit train needs torch: pip install 'ferkit[train]'``)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "pip install" in text:
        return text
    top = (e.name or "").split(".")[0]
    if top in EXTRA_OF:
        return f"{what or 'this'} needs {top}: {install_hint(EXTRA_OF[top])}"
    return text


__all__ = ["EXTRA_OF", "explain", "install_hint", "require"]
