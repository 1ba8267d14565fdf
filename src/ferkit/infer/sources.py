"""Where frames come from: input expansion (files, folders), image reading and streamed video decoding.

Every reader yields :class:`Unit` objects in order — one per image or sampled video frame, or one carrying the error
that stopped an input — so that ``ferkit predict``, ``ferkit track`` and the server share one way in. Video frames
are decoded one at a time and never all held in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferkit.errors import ImageError
from ferkit.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

__all__ = ["MAX_BATCH_PIXELS", "VIDEO_SUFFIXES", "Unit", "batches", "expand_inputs", "is_video", "read_units",
           "read_video"]

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                            ".3gp", ".ts", ".mts", ".m2ts", ".ogv"})
#: A batch is flushed early once its images hold this many pixels (64 full-HD frames would be 400 MB as RGB).
MAX_BATCH_PIXELS = 40_000_000


@dataclass
class Unit:
    """One image or video frame on its way through the pipeline (or the error that stopped it)."""

    file: str
    save_as: Path | None = None  # the annotated file's path relative to --save-annotated
    frame: int | None = None
    time: float | None = None
    image: np.ndarray | None = None
    error: str | None = None

    def head(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file}
        if self.frame is not None:
            d["frame"] = self.frame
            d["time"] = self.time
        return d


def _problem(message: str, file: str) -> str:
    """The part of an error message after its ``PATH: `` prefix (the element already names the file)."""
    return message.removeprefix(f"{file}: ")


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def expand_inputs(inputs: list[str]) -> Iterator[tuple[str, Path, str | None]]:
    """``(file, name to save the annotated copy as, error)`` for each image or video, in order; folders recursively
    (sorted), files as given."""
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()),
                           key=lambda f: f.relative_to(p).as_posix())
            if not found:
                exts = " ".join(sorted(IMAGE_SUFFIXES))
                yield inp, Path(p.name or "folder"), f"folder holds no images (looked for {exts})"
            for f in found:
                yield str(f), f.relative_to(p), None
        elif not p.exists():
            yield inp, Path(p.name), "no such file or folder"
        else:
            yield inp, Path(p.name), None


def read_units(jobs: list[tuple[str, Path, str | None]], every: int) -> Iterator[Unit]:
    from ferkit.infer.recognizer import Recognizer

    for file, save_as, error in jobs:
        if error is not None:
            yield Unit(file, save_as, error=error)
        elif is_video(Path(file)):
            yield from read_video(file, save_as, every)
        else:
            try:
                yield Unit(file, save_as, image=Recognizer.load(file, name=file))
            except ImageError as e:
                yield Unit(file, save_as, error=_problem(str(e), file))


def read_video(file: str, save_as: Path, every: int) -> Iterator[Unit]:
    import cv2

    # A file FFmpeg cannot parse makes FFmpeg and OpenCV print their own lines on stderr (and OpenCV then tries to
    # read it as an image sequence); our one-line error says it all. FFmpeg's level is read when it initialises.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    api = cv2.CAP_FFMPEG if cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG) else cv2.CAP_ANY
    lg = cv2.utils.logging
    level = lg.getLogLevel()
    lg.setLogLevel(lg.LOG_LEVEL_ERROR)
    try:
        cap = cv2.VideoCapture(file, api)
    finally:
        lg.setLogLevel(level)
    try:
        if not cap.isOpened():
            yield Unit(file, save_as, error="cannot open video (not a video, or a codec OpenCV cannot read)")
            return
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        i = read = 0
        while True:
            if i % every:
                if not cap.grab():  # skipped frames are not decoded
                    break
            else:
                ok, frame = cap.read()
                if not ok:
                    break
                read += 1
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if frame.ndim == 3 else frame
                t = round(i / fps, 3) if fps > 0 else None
                yield Unit(file, save_as, frame=i, time=t, image=rgb)
            i += 1
        if read == 0:
            yield Unit(file, save_as, error="video holds no readable frames")
    finally:
        cap.release()


def batches(units: Iterator[Unit], batch_size: int) -> Iterator[list[Unit]]:
    batch: list[Unit] = []
    n_images = pixels = 0
    for u in units:
        batch.append(u)
        if u.image is not None:
            n_images += 1
            pixels += u.image.shape[0] * u.image.shape[1]
        if n_images >= batch_size or pixels >= MAX_BATCH_PIXELS:
            yield batch
            batch, n_images, pixels = [], 0, 0
    if batch:
        yield batch
