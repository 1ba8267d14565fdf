"""Atomic file writes: data goes to a temporary name in the same folder, is flushed to disk, then renamed.

An interrupted run (Ctrl-C, kill, full disk) therefore never leaves a half-written file under the final name, and a
reader never sees a partial file: ``os.replace`` is atomic on POSIX and Windows when both names are on one filesystem,
which is why the temporary file lives next to the target rather than in ``/tmp``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _fsync(path: Path) -> None:
    """Flush a file, or a folder (which makes a rename in it durable on POSIX), to disk; best effort: Windows cannot
    open folders, and some filesystems (network mounts) refuse fsync on them, while the write itself happened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    """A fresh, unused name next to ``path`` that keeps its suffix (``.x.jpg.tmp-ab12.jpg`` style) so libraries that
    pick the format from the extension (cv2.imwrite, savefig, VideoWriter) still do."""
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write to; on normal exit it is fsynced and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. The temporary name keeps the real
    suffix. ``mode`` sets the permission bits of the result (default: those of an existing ``path``, else 0o666 minus
    the umask, like ``open``).
    """
    target = Path(path)
    tmp = _temp_name(target)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {target}")
        _fsync(tmp)
        os.chmod(tmp, mode if mode is not None else _default_mode(target))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync(target.parent)


def _default_mode(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask(0) briefly races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path`` as a Path."""
    target = Path(path)
    with atomic_path(target, mode=mode) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8",
                      mode: int | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (``newline`` translation off: what you pass is what lands)."""
    return atomic_write_bytes(path, text.encode(encoding), mode=mode)
