"""Library warnings (Pillow's, numpy's, torch's …) as ferkit log records rather than raw lines on stderr.

Python prints a warning as two lines (``path/to/module.py:123: UserWarning: text`` and the source line) straight to
stderr, past every logging set-up: the CLI's ``ferkit: ...`` lines and the server's JSON logs with request IDs.
:func:`route_warnings` sends each one to the ``py.warnings`` logger as one record instead (``UserWarning: text``), so
it is formatted, filtered and tagged like any other; ``ferkit`` (the CLI) and the server's workers both call it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["route_warnings"]

log = logging.getLogger("py.warnings")


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
    log.warning("%s: %s", category.__name__, " ".join(str(message).split()))


def route_warnings() -> Callable[[], None]:
    """Route every Python warning to the ``py.warnings`` logger, one record each; returns the undo."""
    shown = warnings.showwarning
    warnings.showwarning = _log_warning

    def undo() -> None:
        warnings.showwarning = shown

    return undo
