"""Where results go: the table / JSON / JSONL / CSV writers of ``ferkit predict`` and annotated image copies."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ferkit.infer.sources import Unit

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "VideoSink", "Writer", "save_annotated_image"]

FORMATS = ("table", "json", "jsonl", "csv")


class Writer:
    """Streams one element per image/frame in the chosen format; with ``track``, CSV rows end with the face's track
    and smoothed label and score, and the table's face column shows ``#track``."""

    def __init__(self, fmt: str, out: TextIO, classes: tuple[str, ...], files: list[str], *,
                 track: bool = False) -> None:
        self.fmt, self.out, self.classes, self.track = fmt, out, classes, track
        self.n = 0
        if fmt == "csv":
            self.csv = csv.writer(out, lineterminator="\n")
            self.csv.writerow(["file", "frame", "time", "x", "y", "w", "h", "label", "score", "det_score", *classes,
                               *(("track", "smoothed_label", "smoothed_score") if track else ())])
        elif fmt == "json":
            out.write("[")
        elif fmt == "table":
            # Paths longer than the cap overflow their column (still readable) instead of widening every row.
            self.fw = min(max([len(s) for s in files] + [4]) + 1, 100)
            self.cw = max(7, *(len(c) + 1 for c in classes))
            out.write(f"{'file':<{self.fw}} {'frame':>6} {'time':>8} {'face':>4}  {'box (x,y,w,h)':<21} "
                      f"{'label':<{self.cw}} {'score':>6} {'det':>5}" + "".join(f"{c:>{self.cw}}" for c in classes)
                      + "\n")

    def element(self, el: dict[str, Any]) -> None:
        if self.fmt == "json":
            self.out.write(("\n " if self.n == 0 else ",\n ") + json.dumps(el))
        elif self.fmt == "jsonl":
            self.out.write(json.dumps(el) + "\n")
        elif self.fmt == "csv":
            for f in el.get("faces", ()):
                self.csv.writerow([el["file"], el.get("frame", ""), "" if el.get("time") is None else el["time"],
                                   *f["box"], f["label"], f"{f['score']:.4f}", _det(f, "{:.4f}", ""),
                                   *(f"{f['scores'][c]:.4f}" for c in self.classes), *self._track_cells(f)])
        else:
            self._table_rows(el)
        self.n += 1
        self.out.flush()

    def _track_cells(self, f: dict[str, Any]) -> tuple[Any, ...]:
        if not self.track:
            return ()
        sm = f.get("smoothed")
        return (f.get("track", ""), sm["label"] if sm else "", f"{sm['score']:.4f}" if sm else "")

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
            face = (f"#{f['track']}" if f.get("track") is not None else "new") if self.track else k
            self.out.write(f"{lead} {face:>4}  {box:<21} {f['label']:<{self.cw}} {f['score']:>6.3f} "
                           f"{_det(f, '{:.2f}', '-'):>5}"
                           + "".join(f"{f['scores'][c]:>{self.cw}.3f}" for c in self.classes) + "\n")

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]\n" if self.n else "]\n")
        self.out.flush()


def _det(face: dict[str, Any], fmt: str, missing: str) -> str:
    """A face's detector confidence as text (``missing`` for --no-detect faces, which have none)."""
    return missing if face.get("det_score") is None else fmt.format(face["det_score"])


#: Suffixes of the annotated copies Pillow can write in RGB as they are; other inputs' copies are saved as PNG.
_KEEP_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".avif"})


def _annotated_rel(rel: Path, is_video: bool) -> Path:
    if is_video:  # frames go next to each other as NAME_fNNNNNN.jpg (the frame number is filled in when saving)
        return rel
    return rel if rel.suffix.lower() in _KEEP_SUFFIXES else rel.with_name(rel.name + ".png")


def plan_annotated(jobs: list[tuple[str, Path, str | None]], out_dir: Path) -> list[tuple[str, Path, str | None]]:
    """``jobs`` with the annotated copies' names made safe: relative paths mirrored under ``out_dir`` (a folder's
    files keep their sub-folders), two inputs with one name told apart by a ``-2``, ``-3`` suffix, and none that
    would replace an input.

    Raises:
        OutputError: ``out_dir`` would overwrite an input (e.g. it is the input folder itself).
    """
    from ferkit.errors import OutputError
    from ferkit.fsutil import check_target
    from ferkit.infer.sources import is_video

    inputs = set()
    for file, _, error in jobs:
        if error is None:
            try:
                inputs.add(Path(file).resolve())
            except OSError:
                pass
    used: set[Path] = set()
    given: dict[Path, Path] = {}  # one input named twice (a folder and a file in it) keeps one copy
    # A video's frames are saved as NAME_fNNNNNN.jpg beside it: an image of such a name gets a -2 suffix, else one
    # of the two copies would replace the other ("2 written", one kept).
    frame_names = {(rel.parent, rel.stem.lower()) for file, rel, error in jobs
                   if error is None and is_video(Path(file))}

    def is_frame_name(p: Path) -> bool:
        m = _FRAME_NAME.fullmatch(p.name)
        return m is not None and (p.parent, m.group(1).lower()) in frame_names

    out = []
    for file, rel, error in jobs:
        try:
            key = Path(file).resolve()
        except OSError:
            key = Path(file)
        if error is None and key in given:
            out.append((file, given[key], error))
            continue
        video = is_video(Path(file))
        target = _annotated_rel(rel, video)
        stem, k = target, 2
        while target in used or (not video and is_frame_name(target)):
            target = stem.with_name(f"{stem.stem}-{k}{stem.suffix}")
            k += 1
        used.add(target)
        if error is None:
            given[key] = target
        if error is None and (out_dir / target).resolve() in inputs:
            raise OutputError(f"--save-annotated {out_dir}: would overwrite the input {file}; choose another folder")
        if error is None and not video:
            check_target(out_dir / target)  # a folder (or FIFO …) where the copy goes: refused before any work
        out.append((file, target, error))
    return out


#: The name a video's annotated frame is saved under: ``NAME_fNNNNNN.jpg`` (see :func:`save_annotated_image`).
_FRAME_NAME = re.compile(r"(.+)_f\d{6}\.jpg", re.IGNORECASE)


def save_annotated_image(plot: np.ndarray, unit: Unit, out_dir: Path) -> Path:
    """Write one annotated copy under ``out_dir`` (atomically: a temporary name, then renamed); returns its path."""
    from PIL import Image

    from ferkit.fsutil import atomic_path

    rel = unit.save_as or Path(Path(unit.file).name)
    if unit.frame is not None:
        rel = rel.with_name(f"{rel.stem}_f{unit.frame:06d}.jpg")
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(plot)
    try:
        with atomic_path(path) as tmp:
            im.save(tmp)
    except (ValueError, KeyError):  # a format Pillow reads but cannot write in RGB: a PNG next to it
        path = path.with_name(path.name + ".png")
        with atomic_path(path) as tmp:
            im.save(tmp)
    return path


class VideoSink:
    """Writes annotated frames to an MP4 (``mp4v``) under a temporary name; :meth:`close` checks the file and renames
    it into place, :meth:`abort` removes it.

    OpenCV's writer reports no failed write (on a full disk it went on, printed 146 warning lines and left a truncated,
    unplayable file, which was then renamed over a good one): :meth:`close` therefore opens the finished file again
    and renames it only when it holds every frame written; OpenCV's own messages are silenced while it writes.
    """

    def __init__(self, path: str | Path, fps: float) -> None:
        import contextlib

        from ferkit.fsutil import atomic_path

        self.path, self.fps = Path(path), fps if fps > 0 else 30.0
        self._ctx: contextlib.AbstractContextManager[Path] = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._vw: Any = None
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        """Append one RGB frame (the first one fixes the video's size)."""
        import cv2

        with _quiet_opencv():
            if self._vw is None:
                h, w = rgb.shape[:2]
                self._vw = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
                if not self._vw.isOpened():
                    raise OSError(errno.EIO, f"{self.path}: OpenCV cannot write an MP4 video here")
            self._vw.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3
                           else cv2.cvtColor(rgb, cv2.COLOR_GRAY2BGR))
        self.frames += 1

    def close(self) -> None:
        """Finish the file, check it (:meth:`check`) and rename it into place.

        Raises:
            OSError: the file is incomplete (one line; the temporary file is removed, ``path`` left as it was).
        """
        try:
            self._release()
            self.check()
        except BaseException:
            self.abort()
            raise
        self._ctx.__exit__(None, None, None)

    def check(self) -> None:
        """The written file holds every frame: it is not empty and OpenCV reads back as many frames as were written.

        Raises:
            OSError: it does not (disk full, file size limit, I/O error).
        """
        import cv2

        size = self._tmp.stat().st_size if self._tmp.exists() else 0
        held = 0
        if size and self.frames:
            with _quiet_opencv():
                cap = cv2.VideoCapture(str(self._tmp))
                try:
                    held = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if cap.isOpened() and cap.read()[0] else 0
                finally:
                    cap.release()
        if held != self.frames:
            raise OSError(errno.EIO, f"{self.path.name} came out incomplete ({self.frames} frames written, "
                                     f"{held} readable in {size:,} bytes; is the disk full?); not replaced")

    def _release(self) -> None:
        if self._vw is not None:
            with _quiet_opencv():
                self._vw.release()
            self._vw = None

    def abort(self) -> None:
        """Stop and remove the temporary file; ``path`` is left as it was."""
        import contextlib

        with contextlib.suppress(Exception):
            self._release()
        err = OSError("aborted")
        try:
            self._ctx.__exit__(OSError, err, None)
        except OSError:
            pass


def _quiet_opencv() -> Any:
    """OpenCV's and FFmpeg's own log lines off while a video is written or probed (ferkit reports what matters)."""
    import contextlib

    import cv2

    @contextlib.contextmanager
    def quiet() -> Any:
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        lg = cv2.utils.logging
        level = lg.getLogLevel()
        lg.setLogLevel(lg.LOG_LEVEL_SILENT)
        try:
            yield
        finally:
            lg.setLogLevel(level)

    return quiet()
