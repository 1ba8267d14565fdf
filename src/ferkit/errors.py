"""ferkit's exception classes: every user mistake maps to one of these and one readable line."""

from __future__ import annotations


class FerkitError(Exception):
    """Base class of the errors ferkit raises for bad input; the CLI prints ``ferkit: error: <message>``."""


class ImageError(FerkitError, ValueError):
    """An image that cannot be read: not an image, corrupt, truncated, empty or too large."""


class DatasetError(FerkitError, ValueError):
    """A dataset folder or CSV file that cannot be used as given."""


class ModelFileError(FerkitError, ValueError):
    """A path or name that is not a usable ferkit model."""


class ConfigError(FerkitError, ValueError):
    """A training configuration with unknown keys or bad values."""
