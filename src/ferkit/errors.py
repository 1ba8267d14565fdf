"""ferkit's exception classes, all of them: every user mistake maps to one of these and one readable line.

Each class says how the CLI ends when it escapes a command (``exit_code``): 2 when the command was refused before it
did any work (a bad argument, an unknown name, a model, data set or config that cannot be used), 1 when it failed
while working. ``ferkit --help`` documents the rule (see ``ferkit.cli.EXIT_CODES``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ConfigError",
    "DatasetError",
    "DeviceError",
    "DownloadError",
    "ExportError",
    "FerkitError",
    "ImageError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "ModelFileError",
    "OutputError",
    "PretrainedUnavailableError",
    "UnknownClassError",
    "UnknownNameError",
    "VideoError",
    "closest",
]


class FerkitError(Exception):
    """Base class of the errors ferkit raises for bad input; the CLI prints ``ferkit: error: <message>``."""

    #: The CLI's exit status when this error ends a command (see the module docstring).
    exit_code: int = 1


class ImageError(FerkitError, ValueError):
    """An image that cannot be read: not an image, corrupt, truncated, empty, too large or not permitted."""


class VideoError(FerkitError, ValueError):
    """A video, webcam or folder of frames that cannot be read, or that stopped decoding part-way."""


class ImageTooLargeError(ImageError):
    """An image over a size limit (bytes or pixels); the server answers 413."""


class ImageTooSmallError(ImageError):
    """An image too small to hold a face; the server answers 422."""


class DatasetError(FerkitError, ValueError):
    """A dataset folder or CSV file that cannot be used as given."""

    exit_code = 2


class ModelFileError(FerkitError, ValueError):
    """A path or name that is not a usable ferkit model."""

    exit_code = 2


class ConfigError(FerkitError, ValueError):
    """A configuration or option with unknown keys or bad values."""

    exit_code = 2


class DeviceError(FerkitError, RuntimeError):
    """A compute device that was asked for is not there (``device="cuda"`` without a GPU)."""

    exit_code = 2


class OutputError(FerkitError, OSError):
    """An output path that ferkit refuses to write (it would replace an input) or cannot write."""

    exit_code = 2


class UnknownClassError(FerkitError, ValueError):
    """A class name that is neither a FER2013 expression nor one of its synonyms."""

    exit_code = 2


class ExportError(FerkitError, RuntimeError):
    """The ONNX export failed, or the exported model does not match the PyTorch model."""


class PretrainedUnavailableError(FerkitError, RuntimeError):
    """ImageNet weights could not be fetched (typically: no network)."""

    exit_code = 2


class DownloadError(FerkitError):
    """A dataset could not be downloaded."""


def closest(name: str, valid: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The entry of ``valid`` that ``name`` most probably misspells (case-insensitive), or None."""
    options = list(valid)
    low = {v.lower(): v for v in options}
    hit = difflib.get_close_matches(str(name).lower(), list(low), n=1, cutoff=cutoff)
    return low[hit[0]] if hit else None


class UnknownNameError(FerkitError, ValueError):
    """A name that is not in a registry: model architecture, detector, backend, TTA mode, format, recipe ….

    The message lists the valid names and the closest match:
    ``unknown detector 'yunett' (valid: yunet, mtcnn, whole); did you mean 'yunet'?``

    Attributes:
        kind: what was being named (``"detector"``).
        name: what was given.
        valid: the accepted names.
        suggestion: the closest valid name, or None.
    """

    exit_code = 2

    def __init__(self, kind: str, name: object, valid: Iterable[str], *, note: str = "", prefix: str = "") -> None:
        """``note`` is added inside the parentheses; ``prefix`` goes before the suggestion (``timm/``). Lists of
        more than 30 names (timm's) are not spelt out: the note should say where to find them."""
        self.kind, self.name, self.valid = kind, str(name), tuple(valid)
        self.suggestion = closest(self.name, self.valid)
        hint = f"; did you mean '{prefix}{self.suggestion}'?" if self.suggestion else ""
        listed = [f"valid: {', '.join(self.valid)}"] if len(self.valid) <= 30 else []
        inside = "; ".join(listed + ([note] if note else []))
        super().__init__(f"unknown {kind} '{self.name}'" + (f" ({inside})" if inside else "") + hint)

    def __reduce__(self) -> tuple:  # picklable across processes (server workers, DDP)
        return (_rebuild_unknown_name, (self.kind, self.name, self.valid, str(self)))


def _rebuild_unknown_name(kind: str, name: str, valid: tuple[str, ...], message: str) -> UnknownNameError:
    e = UnknownNameError.__new__(UnknownNameError)
    Exception.__init__(e, message)
    e.kind, e.name, e.valid, e.suggestion = kind, name, valid, closest(name, valid)
    return e
