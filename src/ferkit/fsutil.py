"""Atomic file writes: data goes to a temporary name in the same folder, is flushed to disk, then renamed.

An interrupted run (Ctrl-C, kill, full disk) therefore never leaves a half-written file under the final name, and a
reader never sees a partial file: ``os.replace`` is atomic on POSIX and Windows when both names are on one filesystem,
which is why the temporary file lives next to the target rather than in ``/tmp``.

Every writer here replaces regular files only: a target that exists as anything else (a folder, a FIFO, a character or
block device such as ``/dev/null``, a socket) is refused with :class:`~ferkit.errors.OutputError` before anything is
written, and checked again just before the rename. Renaming over a device node would replace the node itself (as root,
``/dev/null`` would become a file); writing through it instead would make ``--out /dev/null`` a silent no-op.
:func:`check_output_dir` applies the same rule to a folder before a command starts its work.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_output_dir", "check_target", "display",
           "file_kind"]


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: "a regular file", "a folder", "a FIFO (named pipe)", "a character device" …"""
    for test, words in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                        (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                        (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return words
    return "not a regular file"


def display(name: str | os.PathLike[str]) -> str:
    """A file name as it can be printed in any encoding: bytes that are not valid UTF-8 (kept by Python as lone
    surrogates, ``\\udcff``) become ``\\xff``; everything else is unchanged. Every name ferkit prints or writes into
    its outputs (table, JSON, CSV, error lines) goes through here."""
    s = os.fspath(name)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_target(path: str | os.PathLike[str]) -> None:
    """Refuse to replace ``path`` unless it is missing or a regular file (a symbolic link counts as what it points to).

    Raises:
        OutputError: ``path`` is a folder, FIFO, device, socket …, or a symbolic link loop.
    """
    from ferkit.errors import OutputError

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{display(path)}: a symbolic link loop; refusing to write there") from None
        return  # not reachable for another reason: creating the temporary file next to it says why
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{display(path)}: is {file_kind(st.st_mode)}, not a regular file; refusing to replace it "
                          "(choose another output path)")


def check_output_dir(path: str | os.PathLike[str], *, create: bool = True) -> Path:
    """Make sure ferkit can write files into the folder ``path`` before any work starts.

    ``create``: make it when missing; else a missing folder is checked through its nearest existing parent (which
    must be a folder ferkit can write in) and made when the first file is written.

    Raises:
        OutputError: ``path`` (or a parent) is a file or other non-folder, cannot be created, or a file cannot be made
            in it (read-only, full): one line naming it; the CLI exits 2.
    """
    from ferkit.errors import OutputError

    p = Path(path)
    for folder in (p, *p.parents):
        if folder.exists() or folder.is_symlink():
            break
    else:
        folder = Path(".")
    if not folder.is_dir():
        what = file_kind(os.stat(folder).st_mode) if folder.exists() else "a broken symbolic link"
        raise OutputError(f"{display(folder)}: is {what}, not a folder; choose another output folder")
    if create and folder != p:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{display(p)}: cannot create the output folder "
                              f"({(e.strerror or str(e)).lower()})") from None
        folder = p
    try:  # access() says yes to root on a read-only mount; making a file is the real test
        fd, probe = tempfile.mkstemp(prefix=".ferkit-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{display(p)}: cannot write into the output folder "
                          f"({(e.strerror or str(e)).lower()})") from None
    return p


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
    suffix. A ``path`` that exists as anything but a regular file is refused (:func:`check_target`). ``mode`` sets
    the permission bits of the result (default: those of an existing ``path``, else 0o666 minus
    the umask, like ``open``).
    """
    target = Path(path)
    check_target(target)
    tmp = _temp_name(target)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {target}")
        _fsync(tmp)
        os.chmod(tmp, mode if mode is not None else _default_mode(target))
        check_target(target)  # again: it may have been replaced by something else while we wrote
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
