"""From the command line's inputs to units of work: what ``ferkit batch`` runs.

Local files and folders are found exactly as ``ferkit predict`` finds them (:func:`ferkit.infer.sources.expand_inputs`:
folders recursively, sorted, hidden files skipped). On top of that: glob patterns (``photos/**/*.jpg``), manifests
(a ``.txt``, ``.csv`` or ``.parquet`` file listing paths or URLs) and ``fsspec`` URLs (``s3://bucket/photos/``,
``gs://…``, ``https://…``; the filesystem's package and credentials are the user's).

Each photo is one work item; a local video is split into frame ranges (:data:`RANGE_FRAMES` sampled frames each) that
the workers read themselves, seeking to their start.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import posixpath
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ferkit.errors import ConfigError, VideoError
from ferkit.images import IMAGE_SUFFIXES
from ferkit.infer.sources import VIDEO_SUFFIXES, expand_inputs, is_video, open_video

log = logging.getLogger(__name__)

__all__ = ["MANIFEST_SUFFIXES", "RANGE_FRAMES", "Item", "content_digest", "expand", "is_url", "plan_items"]

#: Inputs with these suffixes are manifests: lists of paths or URLs, one per line (.txt) or in a column (.csv,
#: .parquet: the column named path, file, url or uri, else the first).
MANIFEST_SUFFIXES = frozenset({".txt", ".lst", ".csv", ".parquet"})
#: Sampled frames per video work item. A frame costs about what a photo does (detection dominates); 256 keeps a
#: 10-minute 30-fps video in 71 items that spread over the workers, and Ray's cost per item (a few ms) below 0.1%.
RANGE_FRAMES = 256
_COLUMNS = ("path", "file", "url", "uri")


@dataclass
class Item:
    """One unit of work: a photo, a frame range of a video, or an input that failed before any work."""

    item: str  # the ledger key: the file, or FILE#START-STOP for a video's range
    file: str
    kind: str  # "image" | "video" | "error"
    start: int = 0
    stop: int = -1  # -1: to the end of the video
    last: bool = True  # the video's last range (checks the declared frame count)
    declared: int = 0  # frames the video's container declares
    fps: float = 0.0
    ranges: int = 1  # how many ranges the video was split into
    digest: str | None = None  # known for local videos (hashed while planning); photos are hashed by the workers
    stamp: str = ""  # size:mtime when planned
    known: list[str] = field(default_factory=list)  # digests of this item already in the output (photos)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_url(s: str) -> bool:
    """``s3://…``, ``gs://…``, ``https://…`` (but not ``file://``, and not a Windows drive ``C:\\``)."""
    head, sep, _ = s.partition("://")
    return bool(sep) and head.isidentifier() and head.lower() != "file"


def content_digest(data: bytes | None = None, path: str | os.PathLike | None = None) -> str:
    """BLAKE2b-128 (hex) of ``data`` or of the file at ``path`` (read in 1 MiB blocks)."""
    h = hashlib.blake2b(digest_size=16)
    if data is not None:
        h.update(data)
    else:
        with open(path, "rb") as fh:  # type: ignore[arg-type]
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _is_media(name: str) -> bool:
    base = posixpath.basename(name)
    suffix = os.path.splitext(base)[1].lower()
    return not base.startswith(".") and (suffix in IMAGE_SUFFIXES or suffix in VIDEO_SUFFIXES)


def _fs(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` for a URL; a missing filesystem package is refused before any work."""
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"{url}: URLs need fsspec: pip install 'ferkit[ray]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise ConfigError(f"{url}: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # an unknown protocol
        raise ConfigError(f"{url}: {e}") from None


def _expand_url(url: str) -> Iterator[tuple[str, str | None]]:
    fs, path = _fs(url)
    try:
        if glob.has_magic(path):
            matches = sorted(fs.glob(path))
            if not matches:
                yield url, "no file matches this pattern"
            for m in matches:
                yield from _expand_url(fs.unstrip_protocol(m))
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if _is_media(p))
            if not found:
                yield url, "folder holds no images or videos"
            for p in found:
                yield fs.unstrip_protocol(p), None
        elif not fs.exists(path):
            yield url, "no such file or folder"
        else:
            yield url, None
    except (ImportError, ConfigError):
        raise
    except Exception as e:  # noqa: BLE001  (each filesystem raises its own: credentials, network, permissions)
        yield url, f"cannot list it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def manifest_entries(manifest: str) -> list[str]:
    """The paths or URLs a manifest lists (relative paths are taken from the manifest's folder).

    Raises:
        ValueError: the manifest cannot be read or lists nothing (the message says why).
    """
    suffix = os.path.splitext(manifest)[1].lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            if is_url(manifest):
                fs, path = _fs(manifest)
                with fs.open(path, "rb") as fh:
                    table = pq.read_table(fh)
            else:
                table = pq.read_table(manifest)
            names = {n.lower(): n for n in table.column_names}
            col = next((names[c] for c in _COLUMNS if c in names), table.column_names[0] if names else None)
            if col is None:
                raise ValueError("it has no columns")
            entries = [str(v) for v in table.column(col).to_pylist() if v is not None and str(v).strip()]
        else:
            if is_url(manifest):
                fs, path = _fs(manifest)
                with fs.open(path, "rb") as fh:
                    text = fh.read().decode("utf-8-sig")
            else:
                text = Path(manifest).read_text(encoding="utf-8-sig")
            if suffix == ".csv":
                import csv

                rows = list(csv.reader(text.splitlines()))
                if not rows:
                    raise ValueError("it is empty")
                head = [h.strip().lower() for h in rows[0]]
                col = next((head.index(c) for c in _COLUMNS if c in head), None)
                body = rows[1:] if col is not None else rows  # no known header: the first column, every row
                col = col or 0
                entries = [r[col].strip() for r in body if len(r) > col and r[col].strip()]
            else:
                entries = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the manifest ({getattr(e, 'strerror', None) or e})") from None
    except ImportError:
        raise
    except (ConfigError, ValueError):
        raise
    except Exception as e:  # noqa: BLE001  (pyarrow's ArrowInvalid and friends: a damaged Parquet file)
        raise ValueError(f"cannot read the manifest ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if not entries:
        raise ValueError("the manifest lists no paths")
    base = posixpath.dirname(manifest) if is_url(manifest) else os.path.dirname(manifest)
    join = posixpath.join if is_url(manifest) else os.path.join
    return [e if is_url(e) or os.path.isabs(e) else join(base, e) for e in entries]


def expand(inputs: list[str]) -> Iterator[tuple[str, str | None]]:
    """``(file, error)`` for every photo and video the inputs name, in order (errors: inputs that are not there)."""
    for inp in inputs:
        local = not is_url(inp)
        suffix = os.path.splitext(inp)[1].lower()
        if suffix in MANIFEST_SUFFIXES and (is_url(inp) or os.path.isfile(inp)):
            try:
                entries = manifest_entries(inp)
            except ValueError as e:
                yield inp, str(e)
                continue
            yield from expand(entries)
        elif not local:
            yield from _expand_url(inp)
        elif glob.has_magic(inp) and not os.path.exists(inp):
            matches = sorted(glob.glob(inp, recursive=True))
            if not matches:
                yield inp, "no file matches this pattern"
            for f, _, err in expand_inputs(matches):
                yield f, err
        else:
            for f, _, err in expand_inputs([inp]):  # predict's own discovery: folders recursively, sorted
                yield f, err


def _stamp(file: str) -> str:
    """``size:mtime`` of a file (``size:etag`` and the like for URLs); "" when it cannot be read."""
    try:
        if is_url(file):
            fs, path = _fs(file)
            info = fs.info(path)
            when = next((info[k] for k in ("mtime", "LastModified", "last_modified", "ETag", "etag", "md5Hash",
                                           "created") if info.get(k)), "")
            return f"{info.get('size', '')}:{when}"
        st = os.stat(file)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except Exception:  # noqa: BLE001  (the worker reports why it cannot be read)
        return ""


def plan_items(inputs: list[str], *, every: int, exclude: Path | None = None,
               done: Any = None, range_frames: int = RANGE_FRAMES) -> Iterator[Item]:
    """The work items for ``inputs``, minus those ``done`` (:class:`ferkit.batch.store.Ledger`) already holds.

    Each file is planned once however many inputs name it; files under ``exclude`` (the output folder) are left out.
    """
    seen: set[str] = set()
    ex = str(exclude.resolve()) + os.sep if exclude is not None else None
    for file, err in expand(inputs):
        if file in seen:
            continue
        seen.add(file)
        if ex is not None and not is_url(file) and err is None and os.path.abspath(file).startswith(ex):
            continue
        if err is not None:
            yield Item(file, file, "error", error=err)
            continue
        stamp = _stamp(file)
        if is_video(Path(file)) and not is_url(file):
            yield from _video_items(file, stamp, every, done, range_frames)
        elif is_video(Path(file)):  # a remote video: one item; the worker fetches it whole
            item = f"{file}#0-"
            if done is None or not done.has_stamp(item, stamp):
                yield Item(item, file, "video", stamp=stamp, known=done.digests(item) if done else [])
        elif done is None or not done.has_stamp(file, stamp):
            yield Item(file, file, "image", stamp=stamp, known=done.digests(file) if done else [])


def _video_items(file: str, stamp: str, every: int, done: Any, range_frames: int) -> Iterator[Item]:
    try:
        cap, info = open_video(file)
        cap.release()
    except VideoError as e:
        yield Item(file, file, "error", stamp=stamp, error=str(e).removeprefix(f"{file}: "))
        return
    try:
        digest = content_digest(path=file)
    except OSError as e:
        yield Item(file, file, "error", stamp=stamp, error=f"cannot read the file ({(e.strerror or str(e)).lower()})")
        return
    span = range_frames * every  # starts stay on multiples of every: the same frames as one pass samples
    if info.frames <= 0:  # the container does not say: one item reads it all
        bounds = [(0, -1)]
    else:
        bounds = [(s, min(s + span, info.frames)) for s in range(0, info.frames, span)]
    for k, (a, b) in enumerate(bounds):
        item = f"{file}#{a}-{'' if b < 0 else b}"
        if done is not None and done.has_digest(item, digest):
            continue
        yield Item(item, file, "video", start=a, stop=b, last=k == len(bounds) - 1, declared=info.frames,
                   fps=info.fps, ranges=len(bounds), digest=digest, stamp=stamp)
