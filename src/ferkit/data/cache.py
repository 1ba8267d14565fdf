"""Decode once: a split's images become one uint8 N×H×W array, cached on disk and keyed on the file list."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferkit.data.sources import SplitSource
from ferkit.errors import DatasetError, ImageError
from ferkit.images import load_image, resize_face

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: stores which of the split's faces were kept (votes follow them)


def cache_dir() -> Path:
    """Where decoded arrays live: ``$FERKIT_CACHE_DIR`` or ``~/.cache/ferkit``."""
    return Path(os.environ.get("FERKIT_CACHE_DIR") or Path.home() / ".cache" / "ferkit")


@dataclass
class LoadedSplit:
    """A decoded split: ``images`` uint8 N×S×S, ``labels`` int64 N, and the files that could not be read."""

    name: str
    classes: list[str]
    images: np.ndarray
    labels: np.ndarray
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    from_cache: bool = False
    seconds: float = 0.0
    #: index into the source split of each decoded face (unreadable files are skipped), so per-face data such as
    #: votes can follow the faces; None means all of them, in order
    kept: np.ndarray | None = None

    def take(self, per_face: np.ndarray) -> np.ndarray:
        """``per_face`` (one entry per face of the source split) for the faces that were decoded."""
        return per_face if self.kept is None else per_face[self.kept]

    def __len__(self) -> int:
        return len(self.labels)


def _key(src: SplitSource, size: int) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{size}|{','.join(src.classes)}|".encode())
    if src.pixels is not None:
        h.update(src.root.encode())
        h.update(np.ascontiguousarray(src.pixels).tobytes())
        h.update(src.labels.tobytes())
    else:
        for f, lab in zip(src.files, src.labels.tolist()):
            try:
                st = os.stat(f)
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|{lab}\n".encode())
            except OSError:
                h.update(f"{f}|missing|{lab}\n".encode())
    return h.hexdigest()[:24]


def _decode(path: str, size: int) -> np.ndarray | str:
    try:
        return resize_face(load_image(path), size)
    except ImageError as e:
        return str(e)


def load_split(src: SplitSource, size: int = 48, *, strict: bool = False, use_cache: bool = True,
               workers: int | None = None) -> LoadedSplit:
    """Decode ``src`` to a uint8 array of size×size grayscale faces, reading from the cache when it is current.

    Unreadable images are skipped and listed in ``LoadedSplit.skipped``; with ``strict`` the first one raises.

    Raises:
        ImageError: with ``strict``, the first unreadable image.
        DatasetError: not one image of the split could be read.
    """
    t0 = time.perf_counter()
    if src.pixels is not None and size == src.pixels.shape[1] and not use_cache:
        return LoadedSplit(src.name, src.classes, src.pixels, src.labels, seconds=time.perf_counter() - t0)
    key = _key(src, size)
    path = cache_dir() / f"{key}.npz"
    if use_cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                skipped = json.loads(str(z["skipped"]))
                if not (strict and skipped) and (len(z["labels"]) or not src.files):
                    return LoadedSplit(src.name, src.classes, z["images"], z["labels"], skipped, True,
                                       time.perf_counter() - t0, z["kept"])
        except Exception as e:  # a damaged cache file is rebuilt, never trusted
            log.warning("cache file %s unreadable (%s); rebuilding", path, e)
    if src.pixels is not None:
        imgs = src.pixels if size == src.pixels.shape[1] else np.stack([resize_face(a, size) for a in src.pixels])
        labels, skipped, kept = src.labels, [], np.arange(len(src.labels))
    else:
        out = np.zeros((len(src.files), size, size), np.uint8)
        keep = np.ones(len(src.files), bool)
        skipped = []
        with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 2) * 2)) as ex:
            for i, r in enumerate(ex.map(lambda f: _decode(f, size), src.files)):
                if isinstance(r, str):
                    if strict:
                        raise ImageError(r)
                    skipped.append(r)
                    keep[i] = False
                else:
                    out[i] = r
        imgs, labels, kept = out[keep], src.labels[keep], np.flatnonzero(keep)
        if len(src.files) and not len(labels):
            raise DatasetError(f"{src.root}: none of its {len(src.files)} image(s) could be read (first: {skipped[0]})")
        if skipped:
            log.warning("%s: skipped %d unreadable image(s), first: %s", src.root, len(skipped), skipped[0])
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, images=imgs, labels=labels, skipped=np.array(json.dumps(skipped)), kept=kept)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("could not write cache %s: %s", path, e)
    return LoadedSplit(src.name, src.classes, imgs, labels, skipped, False, time.perf_counter() - t0, kept)
