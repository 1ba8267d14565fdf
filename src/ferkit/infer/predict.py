"""``ferkit predict``: recognise expressions in image files, folders and videos; print a table, JSON, JSONL or CSV.

Every input is processed even when some cannot be read: an unreadable one gets an ``"error"`` element (and a line
``ferkit: error: PATH: PROBLEM`` on stderr) and the exit status is 1 at the end. Faces are classified in batches
across images (and video frames) for speed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ferkit.errors import FerkitError, ImageError
from ferkit.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

FORMATS = ("table", "json", "jsonl", "csv")
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                            ".3gp", ".ts", ".mts", ".m2ts", ".ogv"})
#: A batch is flushed early once its images hold this many pixels (64 full-HD frames would be 400 MB as RGB).
MAX_BATCH_PIXELS = 40_000_000


@dataclass
class _Unit:
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


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _expand(inputs: list[str]) -> Iterator[tuple[str, Path, str | None]]:
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


def _read_images(jobs: list[tuple[str, Path, str | None]], every: int) -> Iterator[_Unit]:
    from ferkit.infer.recognizer import Recognizer

    for file, save_as, error in jobs:
        if error is not None:
            yield _Unit(file, save_as, error=error)
        elif _is_video(Path(file)):
            yield from _read_video(file, save_as, every)
        else:
            try:
                yield _Unit(file, save_as, image=Recognizer.load(file, name=file))
            except ImageError as e:
                yield _Unit(file, save_as, error=_problem(str(e), file))


def _read_video(file: str, save_as: Path, every: int) -> Iterator[_Unit]:
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
            yield _Unit(file, save_as, error="cannot open video (not a video, or a codec OpenCV cannot read)")
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
                yield _Unit(file, save_as, frame=i, time=t, image=rgb)
            i += 1
        if read == 0:
            yield _Unit(file, save_as, error="video holds no readable frames")
    finally:
        cap.release()


def _batches(units: Iterator[_Unit], batch_size: int) -> Iterator[list[_Unit]]:
    batch: list[_Unit] = []
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


class _Writer:
    """Streams one element per image/frame in the chosen format."""

    def __init__(self, fmt: str, out: TextIO, classes: tuple[str, ...], files: list[str]) -> None:
        self.fmt, self.out, self.classes = fmt, out, classes
        self.n = 0
        if fmt == "csv":
            self.csv = csv.writer(out, lineterminator="\n")
            self.csv.writerow(["file", "frame", "time", "x", "y", "w", "h", "label", "score", *classes])
        elif fmt == "json":
            out.write("[")
        elif fmt == "table":
            # Paths longer than the cap overflow their column (still readable) instead of widening every row.
            self.fw = min(max([len(s) for s in files] + [4]) + 1, 100)
            self.cw = max(7, *(len(c) + 1 for c in classes))
            out.write(f"{'file':<{self.fw}} {'frame':>6} {'time':>8} {'face':>4}  {'box (x,y,w,h)':<21} "
                      f"{'label':<{self.cw}} {'score':>6}" + "".join(f"{c:>{self.cw}}" for c in classes) + "\n")

    def element(self, el: dict[str, Any]) -> None:
        if self.fmt == "json":
            self.out.write(("\n " if self.n == 0 else ",\n ") + json.dumps(el))
        elif self.fmt == "jsonl":
            self.out.write(json.dumps(el) + "\n")
        elif self.fmt == "csv":
            for f in el.get("faces", ()):
                self.csv.writerow([el["file"], el.get("frame", ""), "" if el.get("time") is None else el["time"],
                                   *f["box"], f["label"], f"{f['score']:.4f}",
                                   *(f"{f['scores'][c]:.4f}" for c in self.classes)])
        else:
            self._table_rows(el)
        self.n += 1
        self.out.flush()

    def _table_rows(self, el: dict[str, Any]) -> None:
        frame = "" if el.get("frame") is None else str(el["frame"])
        t = "" if el.get("time") is None else f"{el['time']:.2f}s"
        lead = f"{el['file']:<{self.fw}} {frame:>6} {t:>8}"
        if "error" in el:
            self.out.write(f"{lead} {'-':>4}  error: {el['error']}\n")
        elif not el["faces"]:
            self.out.write(f"{lead} {'-':>4}  no face\n")
        for k, f in enumerate(el.get("faces", ()), 1):
            box = ",".join(str(v) for v in f["box"])
            self.out.write(f"{lead} {k:>4}  {box:<21} {f['label']:<{self.cw}} {f['score']:>6.3f}"
                           + "".join(f"{f['scores'][c]:>{self.cw}.3f}" for c in self.classes) + "\n")

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]\n" if self.n else "]\n")
        self.out.flush()


def _save_annotated(plot: np.ndarray, unit: _Unit, out_dir: Path) -> None:
    from PIL import Image

    rel = unit.save_as or Path(Path(unit.file).name)
    if unit.frame is not None:
        rel = rel.with_name(f"{rel.stem}_f{unit.frame:06d}.jpg")
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(plot)
    try:
        im.save(path)
    except (ValueError, OSError, KeyError):  # a format Pillow reads but cannot write in RGB (or unknown suffix)
        im.save(path.with_suffix(".png"))


def run_predict(inputs: list[str], *, model: str = "fer3", fmt: str = "table", save_annotated: str | None = None,
                no_detect: bool = False, detector: str = "yunet", every: int = 1, batch_size: int = 64,
                backend: str = "auto", out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Recognise expressions in images, folders (recursively) and videos and print the results.

    Args:
        inputs: image files, folders and video files.
        model: a bundled model's name, a run directory, a ``.safetensors`` or ``.onnx`` model file.
        fmt: ``table``, ``json`` (one array), ``jsonl`` (one object per line) or ``csv`` (one row per face).
        save_annotated: a folder to write each input with boxes and labels drawn into (video frames as
            ``NAME_fNNNNNN.jpg``).
        no_detect: classify every whole image as one face.
        detector: the face detector's name.
        every: for videos, use every Nth frame.
        batch_size: images (or frames) whose faces are classified together.
        backend: ``auto``, ``onnx`` or ``torch``.
        out: where results go (default stdout); err: where errors go (default stderr).

    Returns:
        The exit status: 0, or 1 if any input (or the model) could not be used.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr

    def fail(message: str) -> int:
        err.write(f"ferkit: error: {message}\n")
        err.flush()
        return 1

    if fmt not in FORMATS:
        return fail(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    if every < 1:
        return fail(f"--every must be at least 1, got {every}")
    if batch_size < 1:
        return fail(f"--batch-size must be at least 1, got {batch_size}")
    if not inputs:
        return fail("no inputs given (image files, folders or videos)")

    from ferkit.infer.recognizer import Recognizer

    try:
        rec = Recognizer(model, backend=backend, detector="whole" if no_detect else detector)
    except (FerkitError, ValueError, ImportError) as e:
        return fail(str(e))

    out_dir = Path(save_annotated) if save_annotated else None
    jobs = list(_expand(inputs))  # listing folders up front lets the table size its file column
    writer = _Writer(fmt, out, rec.classes, [j[0] for j in jobs])
    status = 0
    try:
        for batch in _batches(_read_images(jobs, every), batch_size):
            good = [u for u in batch if u.image is not None]
            results = rec.predict_arrays([u.image for u in good], [u.file for u in good], detect=not no_detect,
                                         keep_images=out_dir is not None)
            by_id = {id(u): r for u, r in zip(good, results)}
            for u in batch:
                el = u.head()
                if u.error is not None:
                    status = fail(f"{u.file}: {u.error}")
                    el["error"] = u.error
                else:
                    r = by_id[id(u)]
                    el["faces"] = [f.to_dict() for f in r.faces]
                    if out_dir is not None:
                        try:
                            _save_annotated(r.plot(), u, out_dir)
                        except OSError as e:
                            status = fail(f"{out_dir}: cannot write the annotated copy of {u.file} ({e})")
                writer.element(el)
                u.image = None  # release the pixels as soon as the element is out
    finally:
        writer.close()
    return status
