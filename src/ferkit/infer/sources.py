"""Where frames come from: input expansion (files, folders), image reading and streamed video decoding.

Every reader yields :class:`Unit` objects in order — one per image or sampled video frame, or one carrying the error
that stopped an input — so that ``ferkit predict``, ``ferkit track`` and the server share one way in. Video frames
are decoded one at a time and never all held in memory.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ferkit.errors import ImageError, ImageTooLargeError, VideoError
from ferkit.fsutil import display
from ferkit.images import IMAGE_SUFFIXES, MAX_PIXELS, file_problem

log = logging.getLogger(__name__)

__all__ = ["MAX_BATCH_PIXELS", "STDIN", "TRACK_OUTPUTS", "VIDEO_SUFFIXES", "Unit", "VideoInfo", "batches",
           "check_video_frame_size", "expand_inputs", "frames", "is_own_output", "is_video", "make_progress",
           "open_video", "progress_enabled", "read_frame_folder", "read_stdin", "read_units", "read_video",
           "read_webcam", "video_fps"]

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                            ".3gp", ".ts", ".mts", ".m2ts", ".ogv"})
#: A batch is flushed early once its images hold this many pixels (64 full-HD frames would be 400 MB as RGB).
MAX_BATCH_PIXELS = 40_000_000
#: Containers' frame counts are estimates for some formats (from duration × fps); a shortfall of this many frames
#: is not reported as truncation.
FRAME_COUNT_SLACK = 1
#: No real video has more frames per second than this (phones' slow motion records 240): with a duration limit,
#: a video is stopped after ``limit × MAX_VIDEO_FPS`` frames even when its timestamps claim less time has passed.
MAX_VIDEO_FPS = 240
#: Frames per second assumed for a folder of frames (it carries no timestamps); ``fps=`` overrides it.
DEFAULT_FOLDER_FPS = 30.0
#: Declared frame rates outside this range are taken as unknown, and so are the video's timestamps (they follow the
#: same clock): its frames are then timed at ``ASSUMED_FPS``. A header declaring 0.001 fps put frames 1000 s apart,
#: so that ByteTrack's memory (in frames) dropped every track at once and one track claimed 10,000 s visible.
PLAUSIBLE_FPS = (0.5, MAX_VIDEO_FPS)
ASSUMED_FPS = 30.0
#: A folder of images gets a progress bar from this many files on (small ones finish before it is read).
PROGRESS_MIN_FILES = 50


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
        """The start of this unit's output element: its file (printable: :func:`ferkit.fsutil.display`), frame, time."""
        d: dict[str, Any] = {"file": display(self.file)}
        if self.frame is not None:
            d["frame"] = self.frame
            d["time"] = self.time
        return d


def _problem(message: str, file: str) -> str:
    """The part of an error message after its ``PATH: `` prefix (the element already names the file)."""
    return message.removeprefix(f"{file}: ")


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


#: The input name that means "read one image from standard input" (``cat x.jpg | ferkit predict -``).
STDIN = "-"
#: Largest image read from standard input (it is held in memory whole before decoding).
MAX_STDIN_BYTES = 256 * 1024 * 1024
#: What ``ferkit track`` writes for each input (``NAME.<suffix>``) and ``ferkit explain`` for each image: files with
#: these endings are never read back as inputs (``track frames/ --out frames/`` twice read its own timeline as a
#: frame, then overwrote it), and their names are skipped in folders with one line each.
TRACK_OUTPUTS = ("frames.csv", "tracks.json", "timeline.png", "tracked.mp4")
_OWN_OUTPUT = re.compile(r"\.(timeline\.png|tracked\.mp4|explain\.png|face\d+\.png)$", re.IGNORECASE)


def is_own_output(name: str | os.PathLike) -> bool:
    """Whether a file's name is one ferkit gives its outputs (``clip.timeline.png``, ``x.face2.png`` …)."""
    return bool(_OWN_OUTPUT.search(os.fspath(name)))


def expand_inputs(inputs: list[str]) -> Iterator[tuple[str, Path, str | None]]:
    """``(file, name to save the annotated copy as, error)`` for each image or video, in order; folders recursively
    (sorted), files as given; ``-`` is standard input. Anything but a regular file (a FIFO, a device) is refused
    here, before anything opens it (:func:`ferkit.images.file_problem`); ferkit's own outputs in folders are skipped
    (:func:`is_own_output`)."""
    for inp in inputs:
        if inp == STDIN:
            yield inp, Path("stdin.png"), None
            continue
        p = Path(inp)
        try:
            is_dir, exists = p.is_dir(), p.exists()
        except PermissionError:  # a path inside a folder we may not enter
            yield inp, Path(p.name), "permission denied"
            continue
        if is_dir:
            found, unreadable = _walk(p)
            for f, why in unreadable:  # reported in order with the rest: one line each, "error" in the output
                yield str(f), f.relative_to(p), why
            if not found and not unreadable:
                exts = " ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
                yield inp, Path(p.name or "folder"), f"folder holds no images or videos (looked for {exts})"
            for f in found:
                yield str(f), f.relative_to(p), None
        elif not exists and not os.path.islink(inp):
            yield inp, Path(p.name), "no such file or folder"
        else:
            yield inp, Path(p.name), file_problem(inp)


def _frames(file: str) -> int:
    """How many frames an image file holds (1 for stills and for anything Pillow cannot open: load reports it)."""
    from ferkit.images import MULTI_FRAME_SUFFIXES, frame_count

    if Path(file).suffix.lower() not in MULTI_FRAME_SUFFIXES:
        return 1
    from PIL import Image

    try:
        with Image.open(file) as im:
            return frame_count(im)
    except Exception:  # unreadable: Recognizer.load names the problem
        return 1


def _walk(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every image and video under ``root`` (sorted by relative path) and the sub-folders that could not be listed.

    Hidden files and folders (``.thumbnails/``, macOS ``._x.jpg`` AppleDouble files) are skipped: they are not
    photos, and the AppleDouble ones look like JPEGs by name only. So are ferkit's own outputs (a line each). A
    name that is not a regular file (a FIFO called ``x.png``) comes back among the unreadable, with the reason.
    """
    found: list[Path] = []
    unreadable: list[tuple[Path, str]] = []

    def onerror(e: OSError) -> None:
        why = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e)).lower()
        unreadable.append((Path(e.filename), f"cannot read the folder ({why})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            suffix = Path(name).suffix.lower()
            if name.startswith(".") or not (suffix in IMAGE_SUFFIXES or suffix in VIDEO_SUFFIXES):
                continue
            f = Path(dirpath) / name
            if is_own_output(name):
                log.warning("%s: skipped (a file ferkit wrote, not an input)", display(f))
                continue
            try:
                regular = stat.S_ISREG(f.stat().st_mode)
            except OSError:
                regular = False
            if regular:
                found.append(f)
            else:
                unreadable.append((f, file_problem(f) or "not a regular file; skipped"))
    found.sort(key=lambda f: f.relative_to(root).as_posix())
    return found, sorted(unreadable)


def read_units(jobs: list[tuple[str, Path, str | None]], every: int, *, progress: bool = False,
               reader: Callable[..., Any] | None = None) -> Iterator[Unit]:
    """One :class:`Unit` per image and per sampled video frame of ``jobs`` (from :func:`expand_inputs`), in order.

    ``reader(file, name=...)`` reads a still image (default ``Recognizer.load``); ``Recognizer.read`` decodes large
    JPEGs at reduced size (its result goes to ``predict_arrays`` as it is).
    """
    from ferkit.infer.recognizer import Recognizer

    read = reader or Recognizer.load

    n_images = sum(1 for f, _, e in jobs if e is None and not is_video(Path(f)))
    bar = make_progress(n_images, "images", enabled=progress and n_images >= PROGRESS_MIN_FILES)
    try:
        for file, save_as, error in jobs:
            if error is not None:
                yield Unit(file, save_as, error=error)
            elif file == STDIN:
                try:
                    yield Unit(file, save_as, image=read(read_stdin(), name="standard input"))
                except ImageError as e:
                    yield Unit(file, save_as, error=_problem(str(e), "standard input"))
            elif is_video(Path(file)):
                yield from read_video(file, save_as, every, progress=progress)
            else:
                try:
                    if _frames(file) > 1:  # an animation or multi-page file: every frame, numbered like a video's
                        from ferkit.images import iter_frames

                        for i, arr in iter_frames(file, name=file):
                            yield Unit(file, save_as, frame=i, image=arr)
                    else:
                        yield Unit(file, save_as, image=read(file, name=file))
                except ImageError as e:
                    yield Unit(file, save_as, error=_problem(str(e), file))
                finally:
                    bar.update(1)
    finally:
        bar.close()


def read_stdin(limit: int = MAX_STDIN_BYTES) -> bytes:
    """The bytes of standard input, up to ``limit``.

    Raises:
        ImageError: nothing on standard input, or a terminal; ImageTooLargeError: more than ``limit`` bytes.
    """
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None or sys.stdin.isatty():
        raise ImageError("standard input is a terminal, not an image; pipe one in (cat photo.jpg | ferkit predict -)")
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ImageTooLargeError(f"standard input holds more than {limit:,} bytes")
    if not data:
        raise ImageError("standard input is empty (0 bytes)")
    return data


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container declares: frames per second (0 when unknown), frame count (0 when unknown), size."""

    fps: float
    frames: int
    width: int
    height: int
    #: The rate the container declared, when ``fps`` is 0 because it was outside ``PLAUSIBLE_FPS`` (else ``fps``).
    declared_fps: float = 0.0

    @property
    def implausible_fps(self) -> bool:
        """The header declared a frame rate outside ``PLAUSIBLE_FPS``: its timestamps are not used either."""
        return self.fps == 0 and self.declared_fps != 0


def open_video(source: str | int) -> tuple[Any, VideoInfo]:
    """Open a video file (or a webcam by index) with OpenCV; ``(cv2.VideoCapture, VideoInfo)``.

    Frames come out upright: OpenCV's FFmpeg backend applies a phone video's rotation metadata by default
    (``CAP_PROP_ORIENTATION_AUTO``); it is set explicitly here so that a change of default cannot turn them.

    Raises:
        VideoError: the file or camera cannot be opened.
    """
    import cv2

    if not isinstance(source, int):
        why = file_problem(source)  # a FIFO would block OpenCV for ever; OpenCV would only say "cannot open video"
        if why:
            raise VideoError(f"{source}: {why}")
    # A file FFmpeg cannot parse makes FFmpeg and OpenCV print their own lines on stderr (and OpenCV then tries to
    # read it as an image sequence); our one-line error says it all. FFmpeg's level is read when it initialises.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    lg = cv2.utils.logging
    level = lg.getLogLevel()
    lg.setLogLevel(lg.LOG_LEVEL_ERROR)
    try:
        if isinstance(source, int):
            cap = cv2.VideoCapture(source)
        else:
            api = cv2.CAP_FFMPEG if cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG) else cv2.CAP_ANY
            cap = cv2.VideoCapture(source, api)
    finally:
        lg.setLogLevel(level)
    if not cap.isOpened():
        cap.release()
        if isinstance(source, int):
            raise VideoError(f"webcam {source}: cannot open it (no such camera, or it is in use)")
        raise VideoError(f"{source}: cannot open video (not a video, or a codec OpenCV cannot read)")
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    declared = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    fps = declared if PLAUSIBLE_FPS[0] <= declared <= PLAUSIBLE_FPS[1] else 0.0  # NaN fails the test too
    frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if not isinstance(source, int) else 0
    info = VideoInfo(fps, max(frames, 0), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                     int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), declared_fps=declared if declared > 0 else 0.0)
    return cap, info


def check_video_frame_size(info: VideoInfo, max_pixels: int, name: str) -> None:
    """Refuse a video whose frames hold more than ``max_pixels`` pixels (the image limit), before any frame is decoded.

    Raises:
        ImageTooLargeError: the frame size the video declares is over the limit.
    """
    if info.width * info.height > max_pixels:
        raise ImageTooLargeError(f"{name}: video frames too large ({info.width}×{info.height} = "
                                 f"{info.width * info.height:,} pixels; the limit is {max_pixels:,})")


def video_fps(file: str) -> float:
    """The frame rate a video declares (0.0 when unknown or unreadable: the reader then reports the problem)."""
    try:
        cap, info = open_video(file)
    except VideoError:
        return 0.0
    cap.release()
    return info.fps


def read_video(file: str, save_as: Path | None, every: int, *, progress: bool = False, max_pixels: int = MAX_PIXELS,
               max_seconds: float | None = None) -> Iterator[Unit]:
    """Decode a video as a stream: one :class:`Unit` per ``every``-th frame, then an error unit if it stopped early.

    Frame times come from the decoder's timestamps (so variable-frame-rate videos get their real times), falling
    back to ``frame / fps``. A video whose frames stop decoding before the count its container declares ends with
    an error unit saying how many frames were read of how many declared. A video whose frames hold more than
    ``max_pixels`` is refused before decoding (:func:`check_video_frame_size`), and decoding stops at a frame that
    does; with ``max_seconds`` it stops, with an error unit, at the first frame past that time (or past
    ``max_seconds × MAX_VIDEO_FPS`` frames), whatever duration the header declared.
    """
    import cv2

    try:
        cap, info = open_video(file)
    except VideoError as e:
        yield Unit(file, save_as, error=_problem(str(e), file))
        return
    if info.implausible_fps:
        log.warning("%s: the declared frame rate (%g fps) is implausible; its frames are timed at %g fps",
                    display(file), info.declared_fps, ASSUMED_FPS)
    bar = make_progress(info.frames or None, "frames", enabled=progress, desc=Path(file).name)
    try:
        try:
            check_video_frame_size(info, max_pixels, file)
        except ImageTooLargeError as e:
            yield Unit(file, save_as, error=_problem(str(e), file))
            return
        i = read = 0
        while True:
            if max_seconds is not None and _past_limit(cap, i, info.fps, max_seconds):
                yield Unit(file, save_as, error=f"video runs past the {max_seconds:g} s limit: stopped at frame {i} "
                                                f"(its header declares {info.frames} frame{'s' * (info.frames != 1)})")
                return
            if i % every:
                if not cap.grab():  # skipped frames are not decoded
                    break
            else:
                ok, frame = cap.read()
                if not ok:
                    break
                if frame.shape[0] * frame.shape[1] > max_pixels:  # the header understated the size
                    yield Unit(file, save_as, error=f"frame {i} too large ({frame.shape[1]}×{frame.shape[0]}; the "
                                                    f"limit is {max_pixels:,} pixels)")
                    return
                read += 1
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if frame.ndim == 3 else frame
                t = round(i / ASSUMED_FPS, 3) if info.implausible_fps else _frame_time(cap, i, info.fps)
                yield Unit(file, save_as, frame=i, time=t, image=rgb)
            i += 1
            bar.update(1)
        if read == 0:
            yield Unit(file, save_as, error="video holds no readable frames")
        elif info.frames and i < info.frames - FRAME_COUNT_SLACK:
            yield Unit(file, save_as, error=f"video stopped decoding after {i} of {info.frames} declared frames "
                                            f"(truncated or corrupt)")
    finally:
        bar.close()
        cap.release()


def _past_limit(cap: Any, i: int, fps: float, max_seconds: float) -> bool:
    """Whether frame ``i`` (about to be decoded) lies past ``max_seconds``: by the last frame's timestamp, by
    ``i / fps``, or by :data:`MAX_VIDEO_FPS` when the header's rate or timestamps claim less time than that."""
    import cv2

    if i >= max_seconds * MAX_VIDEO_FPS:
        return True
    ms = cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0
    return ms / 1000.0 > max_seconds or (fps > 0 and i / fps > max_seconds)


def _frame_time(cap: Any, i: int, fps: float) -> float | None:
    import cv2

    ms = cap.get(cv2.CAP_PROP_POS_MSEC)
    # POS_MSEC is the *decoded* frame's presentation time with FFmpeg; 0 for every frame with some backends.
    if ms and ms > 0 or (i == 0 and fps > 0):
        return round(ms / 1000.0, 3)
    return round(i / fps, 3) if fps > 0 else None


def read_webcam(index: int, every: int = 1, *, max_frames: int | None = None) -> Iterator[Unit]:
    """Frames from webcam ``index`` until it stops (or ``max_frames``); times are seconds since the first frame.

    Raises:
        VideoError: the camera cannot be opened.
    """
    import time

    import cv2

    cap, _ = open_video(index)
    name = f"webcam {index}"
    try:
        t0, i = time.monotonic(), 0
        while max_frames is None or i < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            if i % every == 0:
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if frame.ndim == 3 else frame
                yield Unit(name, frame=i, time=round(time.monotonic() - t0, 3), image=rgb)
            i += 1
    finally:
        cap.release()


def read_frame_folder(folder: str | os.PathLike, every: int = 1, fps: float = DEFAULT_FOLDER_FPS, *,
                      progress: bool = False) -> Iterator[Unit]:
    """A folder of frames as a video: its images in name order (not recursive; numbers in names compared as numbers,
    so ``f2.png`` comes before ``f10.png``), frame ``i`` at ``i / fps``.

    An unreadable image gives an error unit and the sequence goes on.

    Raises:
        VideoError: the folder holds no images.
    """
    from ferkit.infer.recognizer import Recognizer

    p = Path(folder)
    files = []
    for f in p.iterdir():
        if f.suffix.lower() not in IMAGE_SUFFIXES or f.name.startswith("."):
            continue
        if is_own_output(f.name):
            log.warning("%s: skipped (a file ferkit wrote, not a frame)", display(f))
        elif f.is_file():
            files.append(f)
        elif not f.is_dir():  # a FIFO called x.png would block the read forever
            log.warning("%s: %s", display(f), file_problem(f) or "not a regular file; skipped")
    files.sort(key=_natural)
    if not files:
        exts = " ".join(sorted(IMAGE_SUFFIXES))
        raise VideoError(f"{folder}: folder holds no frames (looked for {exts})")
    bar = make_progress(len(files), "frames", enabled=progress and len(files) >= PROGRESS_MIN_FILES, desc=p.name)
    try:
        for i, f in enumerate(files):
            if i % every == 0:
                try:
                    yield Unit(str(f), frame=i, time=round(i / fps, 3), image=Recognizer.load(f, name=str(f)))
                except ImageError as e:
                    yield Unit(str(f), frame=i, time=round(i / fps, 3), error=_problem(str(e), str(f)))
            bar.update(1)
    finally:
        bar.close()


def _natural(path: Path) -> tuple:
    """Sort key: the name split into text and numbers (``frame10`` after ``frame9``), then the name itself."""
    import re

    parts = re.split(r"(\d+)", path.name.lower())
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in parts), path.name


def frames(source: str | os.PathLike | int, every: int = 1, *, fps: float = DEFAULT_FOLDER_FPS,
           progress: bool = False) -> Iterator[Unit]:
    """The frames of a video file, a webcam (an ``int`` index) or a folder of frames, as :class:`Unit` objects.

    Raises:
        VideoError: the source cannot be opened, or a video stopped decoding part-way (after its frames so far
            were yielded); ImageError: a frame in a folder cannot be read.
    """
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    if isinstance(source, int):
        yield from read_webcam(source, every)
        return
    p = Path(source)
    if p.is_dir():
        units: Iterator[Unit] = read_frame_folder(p, every, fps, progress=progress)
    elif not p.exists():
        raise VideoError(f"{source}: no such file or folder")
    else:
        units = read_video(os.fspath(source), None, every, progress=progress)
    for u in units:
        if u.error is not None:
            cls = ImageError if p.is_dir() else VideoError
            raise cls(f"{u.file}: {u.error}")
        yield u


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_enabled(quiet: bool = False) -> bool:
    """Progress bars are shown on a terminal only, and never with ``--quiet`` or ``FERKIT_PROGRESS=0``."""
    return not quiet and os.environ.get("FERKIT_PROGRESS", "1") != "0" and sys.stderr.isatty()


def make_progress(total: int | None, unit: str, *, enabled: bool, desc: str | None = None) -> Any:
    """A tqdm bar on stderr (count, rate, ETA) when ``enabled`` and tqdm is installed, else a no-op bar."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # the lean install may lack tqdm: no bar rather than a failure
        return _NoBar()
    try:
        cols, rows = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        cols = rows = 0
    # a terminal that reports no size (a bare pty, some CI consoles): tqdm would hide the bar (0 rows) or draw it
    # 0 characters wide
    return tqdm(total=total, unit=unit[:-1] if unit.endswith("s") else unit, desc=desc, file=sys.stderr,
                dynamic_ncols=cols > 0, ncols=None if cols > 0 else 80, nrows=None if rows > 0 else 24, leave=False)


def batches(units: Iterator[Unit], batch_size: int) -> Iterator[list[Unit]]:
    batch: list[Unit] = []
    n_images = pixels = 0
    for u in units:
        batch.append(u)
        if u.image is not None:
            n_images += 1
            img = getattr(u.image, "image", u.image)  # a reduced-size Decoded holds its pixels in .image
            pixels += img.shape[0] * img.shape[1]
        if n_images >= batch_size or pixels >= MAX_BATCH_PIXELS:
            yield batch
            batch, n_images, pixels = [], 0, 0
    if batch:
        yield batch
