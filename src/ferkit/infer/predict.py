"""``ferkit predict``: recognise expressions in image files, folders and videos; print a table, JSON, JSONL or CSV.

Every input is processed even when some cannot be read: an unreadable one gets an ``"error"`` element (and a line
``ferkit: error: PATH: PROBLEM`` on stderr) and the exit status is 1 at the end. Faces are classified in batches
across images (and video frames) for speed.

The stages live in their own modules: :mod:`ferkit.infer.sources` (inputs → frames), :class:`ferkit.Recognizer`
(detect → classify) and :mod:`ferkit.infer.sinks` (writers, annotated copies); this module only wires them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

from ferkit.errors import FerkitError
from ferkit.infer.sinks import FORMATS, Writer, save_annotated_image
from ferkit.infer.sources import VIDEO_SUFFIXES, batches, expand_inputs, read_units

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "VIDEO_SUFFIXES", "run_predict"]


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
    jobs = list(expand_inputs(inputs))  # listing folders up front lets the table size its file column
    writer = Writer(fmt, out, rec.classes, [j[0] for j in jobs])
    status = 0
    try:
        for batch in batches(read_units(jobs, every), batch_size):
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
                            save_annotated_image(r.plot(), u, out_dir)
                        except OSError as e:
                            status = fail(f"{out_dir}: cannot write the annotated copy of {u.file} ({e})")
                writer.element(el)
                u.image = None  # release the pixels as soon as the element is out
    finally:
        writer.close()
    return status
