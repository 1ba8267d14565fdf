"""``ferkit predict``: recognise expressions in image files, folders and videos; print a table, JSON, JSONL or CSV.

Every input is processed even when some cannot be read: an unreadable one gets an ``"error"`` element (and a line
``ferkit: error: PATH: PROBLEM`` on stderr) and the exit status is 1 at the end. Faces are classified in batches
across images (and video frames) for speed.

The stages live in the library: :mod:`ferkit.infer.sources` (inputs → frames), :class:`ferkit.Recognizer`
(detect → classify) and :mod:`ferkit.infer.sinks` (writers, annotated copies); this module, command-line code, only
wires them (exit statuses, stderr lines, stdout formats), so it sits in :mod:`ferkit.cli` beside the argument parser.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ferkit.errors import FerkitError, OutputError
from ferkit.fsutil import check_output_dir, display
from ferkit.infer.sinks import FORMATS, Writer, plan_annotated, save_annotated_image
from ferkit.infer.sources import (VIDEO_SUFFIXES, Unit, batches, expand_inputs, is_video, progress_enabled, read_units,
                                  read_video, video_fps)

if TYPE_CHECKING:  # pragma: no cover
    from ferkit.infer.recognizer import Recognizer
    from ferkit.infer.results import Results

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "VIDEO_SUFFIXES", "run_predict", "run_track"]


def run_predict(inputs: list[str], *, model: str = "fer3", fmt: str = "table", save_annotated: str | None = None,
                no_detect: bool = False, detector: str = "yunet", every: int = 1, batch_size: int = 64,
                backend: str = "auto", track: bool = False, quiet: bool = False, out: TextIO | None = None,
                err: TextIO | None = None, min_det_score: float | None = None, detect_size: int | None = None,
                min_score: float | None = None) -> int:
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
        track: give the faces of videos track IDs and smoothed scores (see :mod:`ferkit.infer.track`).
        quiet: no progress bar (there is none anyway when stderr is not a terminal).
        min_det_score: drop faces whose detector confidence is below this.
        detect_size: the face detector's working size (None: chosen per image).
        min_score: label faces whose top calibrated score is below this ``"uncertain"`` (scores kept).
        out: where results go (default stdout); err: where errors go (default stderr).

    Returns:
        The exit status: 0, or 1 if any input (or the model) could not be used.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    fail = _error_printer(err)

    # Exit 2 (refused before any work: see ferkit.cli.EXIT_CODES) for bad options, model and output folder.
    if fmt not in FORMATS:
        return fail(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})", 2)
    if every < 1:
        return fail(f"--every must be at least 1, got {every}", 2)
    if batch_size < 1:
        return fail(f"--batch-size must be at least 1, got {batch_size}", 2)
    if not inputs:
        return fail("no inputs given (image files, folders or videos)", 2)
    out_dir = Path(save_annotated) if save_annotated else None
    if out_dir is not None:
        try:
            check_output_dir(out_dir, create=False)  # a file, a read-only folder …: refused before any work
        except OutputError as e:
            return fail(str(e), e.exit_code)

    from ferkit.infer.recognizer import Recognizer

    try:
        rec = Recognizer(model, backend=backend, detector="whole" if no_detect else detector, min_score=min_score,
                         min_det_score=min_det_score, detect_size=detect_size)
    except FerkitError as e:
        return fail(str(e), e.exit_code)
    except ImportError as e:
        return fail(str(e))

    jobs = list(expand_inputs(inputs))  # listing folders up front lets the table size its file column
    if out_dir is not None:
        try:
            jobs = plan_annotated(jobs, out_dir)  # mirrored, collision-free names that never replace an input
        except OutputError as e:
            return fail(str(e), e.exit_code)
    saved = 0
    writer = Writer(fmt, out, rec.classes, [j[0] for j in jobs], track=track)
    status = 0
    try:
        for u, r in _recognise(rec, jobs, every=every, batch_size=batch_size, no_detect=no_detect,
                               keep_images=out_dir is not None, track=track, progress=progress_enabled(quiet)):
            el = u.head()
            if u.error is not None:
                status = fail(f"{u.file}: {u.error}")
                el["error"] = u.error
            else:
                el["faces"] = [f.to_dict() for f in r.faces]
                if out_dir is not None:
                    try:
                        save_annotated_image(r.plot(), u, out_dir)
                        saved += 1
                    except OutputError as e:
                        status = fail(str(e))
                    except OSError as e:
                        status = fail(f"{out_dir}: cannot write the annotated copy of {u.file} "
                                      f"({e.strerror.lower() if e.strerror else e})")
            writer.element(el)
            u.image = r.image = None  # release the pixels as soon as the element is out
    finally:
        writer.close()
    if out_dir is not None and saved:
        err.write(f"ferkit: {saved} annotated image(s) written under {out_dir}{os.sep}\n")
    return status


def _error_printer(err: TextIO) -> Callable[..., int]:
    """``fail(message, code=1)``: print ``ferkit: error: message`` on ``err`` and return ``code``."""

    def fail(message: str, code: int = 1) -> int:
        err.write(f"ferkit: error: {display(message)}\n")
        err.flush()
        return code

    return fail


def _recognise(rec: Recognizer, jobs: list[tuple[str, Path, str | None]], *, every: int, batch_size: int,
               no_detect: bool, keep_images: bool, track: bool, progress: bool) -> Iterator[tuple[Unit, Results]]:
    """``(unit, results)`` for every image and sampled frame of ``jobs``, in order (results empty for errors).

    Images and untracked frames are classified in batches across inputs; a tracked video goes frame by frame
    through :func:`ferkit.infer.track.track_units`, which needs its frames in order.
    """
    from ferkit.infer.results import Results
    from ferkit.infer.track import track_units

    def untracked(run: list[tuple[str, Path, str | None]]) -> Iterator[tuple[Unit, Results]]:
        for batch in batches(read_units(run, every, progress=progress, reader=rec.read), batch_size):
            good = [u for u in batch if u.image is not None]
            results = iter(rec.predict_arrays([u.image for u in good], [u.file for u in good], detect=not no_detect,
                                              keep_images=keep_images))
            for u in batch:
                yield u, (next(results) if u.image is not None else Results([], None, u.file))

    run: list[tuple[str, Path, str | None]] = []
    for job in jobs:
        if not (track and job[2] is None and is_video(Path(job[0]))):
            run.append(job)
            continue
        yield from untracked(run)
        run = []
        file, save_as, _ = job
        yield from track_units(rec, read_video(file, save_as, every, progress=progress), fps=video_fps(file),
                               every=every, keep_images=keep_images)
    yield from untracked(run)


def run_track(inputs: list[str], *, out_dir: str = ".", model: str = "fer3", every: int = 1, save_video: bool = False,
              detector: str = "yunet", backend: str = "auto", smooth: float | None = None, quiet: bool = False,
              min_det_score: float | None = None, detect_size: int | None = None,
              out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Track the faces of videos (or folders of frames) and write, per input, into ``out_dir``:
    ``NAME.frames.csv``, ``NAME.tracks.json``, ``NAME.timeline.png`` and, with ``save_video``, ``NAME.tracked.mp4``.

    A one-line summary per input goes to ``out``; errors to ``err`` as ``ferkit: error: PATH: PROBLEM``. A video
    that stops decoding part-way still gets its files (its summary's ``"error"`` says how many frames were read of
    how many declared), and the exit status is 1.

    Returns:
        The exit status: 0, or 1 if any input (or the model) could not be used.
    """
    from ferkit.errors import VideoError
    from ferkit.infer.recognizer import Recognizer
    from ferkit.infer.report import VideoReport
    from ferkit.infer.results import draw_faces
    from ferkit.infer.sinks import VideoSink
    from ferkit.infer.sources import DEFAULT_FOLDER_FPS, open_video, read_frame_folder
    from ferkit.infer.track import LOST_SECONDS, SMOOTH_SECONDS, track_units

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    fail = _error_printer(err)

    # Exit 2 (refused before any work: see ferkit.cli.EXIT_CODES) for bad options, model and output folder.
    tau = SMOOTH_SECONDS if smooth is None else smooth
    if every < 1:
        return fail(f"--every must be at least 1, got {every}", 2)
    if not (math.isfinite(tau) and tau >= 0):  # NaN passes a "< 0" test, and went into the CSV and JSON
        return fail(f"--smooth must be a number of seconds, 0 or more, got {tau}", 2)
    if not inputs:
        return fail("no inputs given (videos or folders of frames)", 2)
    dest = Path(out_dir)
    try:  # everything about the outputs is checked before any work: the folder, then every file each input gets
        check_output_dir(dest)
        plan = _track_outputs(inputs, dest)
    except OutputError as e:
        return fail(str(e), e.exit_code)
    try:
        rec = Recognizer(model, backend=backend, detector=detector, min_det_score=min_det_score,
                         detect_size=detect_size)
    except FerkitError as e:
        return fail(str(e), e.exit_code)
    except ImportError as e:
        return fail(str(e))

    progress = progress_enabled(quiet)
    status = 0
    for inp, name, targets in plan:
        p = Path(inp)
        try:
            if p.is_dir():
                units, fps = read_frame_folder(p, every, progress=progress), DEFAULT_FOLDER_FPS
                declared = 0
            elif not p.exists():
                raise VideoError(f"{inp}: no such file or folder")
            else:
                cap, info = open_video(inp)
                cap.release()
                units, fps, declared = read_video(inp, None, every, progress=progress), info.fps, info.frames
            report = VideoReport(rec.classes, file=display(inp), fps=fps, declared_frames=declared, every=every,
                                 model=model, smoothing_seconds=tau, lost_seconds=LOST_SECONDS)
            sink = VideoSink(targets["tracked.mp4"], fps / every if fps > 0 else 0.0) if save_video else None
            try:
                for u, res in track_units(rec, units, fps=fps, every=every, tau=tau, keep_images=save_video):
                    if u.error is not None:
                        status = fail(f"{u.file}: {u.error}")
                        if u.frame is None:  # the video as a whole (truncated): goes in its summary
                            report.error = u.error
                        continue
                    report.add(res)
                    if sink is not None and res.image is not None:
                        sink.write(draw_faces(res.image, res.faces))
                        res.image = None
            except BaseException:
                if sink is not None:
                    sink.abort()
                raise
            if report.frames_processed == 0:
                if sink is not None:
                    sink.abort()
                continue  # nothing read: the error above says why; no empty files
            if sink is not None:
                sink.close()
            report.to_csv(targets["frames.csv"])
            summary = json.loads(report.to_json(targets["tracks.json"]))
            report.plot_timeline(targets["timeline.png"])
        except (VideoError, OutputError) as e:
            status = fail(str(e))
            continue
        except OSError as e:
            status = fail(f"{out_dir}: cannot write the results for {inp} ({e.strerror or e})")
            continue
        labels = ", ".join(f"#{t['track']} {t['label']} {t['share'][t['label']]:.0%} of {t['seconds_visible']:.1f}s"
                           for t in summary["tracks"]) or "no face tracked"
        out.write(f"{display(inp)}: {summary['frames_processed']} frames, {len(summary['tracks'])} tracks ({labels}) "
                  f"-> {display(dest / name)}.*\n")
        out.flush()
    return status


def _track_outputs(inputs: list[str], dest: Path) -> list[tuple[str, str, dict[str, Path]]]:
    """``(input, NAME, {suffix: path})`` per input of ``ferkit track``: names made distinct (``a/clip.mp4`` and
    ``b/clip.mp4`` → ``clip``, ``clip-2``), every target checked before any work.

    Raises:
        OutputError: a target would replace an input, or exists as a folder, FIFO, device …
    """
    from ferkit.fsutil import check_target
    from ferkit.infer.sources import TRACK_OUTPUTS

    given = set()
    for i in inputs:
        try:
            given.add(Path(i).resolve())
        except OSError:  # a symbolic link loop: reading it says so
            pass
    used: set[str] = set()
    plan = []
    for inp in inputs:
        p = Path(inp)
        name = p.name if p.is_dir() else p.stem
        base, k = name or "video", 2
        while name in used:  # two inputs with one name (a/clip.mp4, b/clip.mp4) must not overwrite each other
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        targets = {s: dest / f"{name}.{s}" for s in TRACK_OUTPUTS}
        for t in targets.values():
            if t.resolve() in given:
                raise OutputError(f"{display(t)}: would overwrite an input; choose another --out")
            check_target(t)
        plan.append((inp, name, targets))
    return plan
