"""What runs in a Ray actor: :class:`ItemRecogniser` loads the model once and turns batches of work items
(:class:`ferkit.batch.plan.Item` rows) into result rows (:mod:`ferkit.batch.rows`).

Photos are read and decoded here, in the worker, by ``ferkit predict``'s own readers (:func:`read_units` with
``Recognizer.read``: EXIF, reduced-size JPEG decoding, animations frame by frame) and recognised with
``Recognizer.predict_arrays``, so a row holds what ``ferkit predict --format json`` prints for the same input.
A video's frame range is read by seeking to its start. With tracking, the worker detects and classifies each frame
and computes each face's colour histogram; the driver gives the track IDs per video (:func:`track_video`), with the
same ``FaceTracker`` and smoother as ``ferkit predict --track``.

Every row carries its item, the item's row count for this attempt and an attempt ID: Ray may run an item twice (a
worker died, a task was retried), and the driver keeps exactly one complete attempt per item.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ferkit.batch.plan import content_digest, is_url
from ferkit.batch.rows import ERROR, FACE, NO_FACE, face_row, status_row

log = logging.getLogger(__name__)

__all__ = ["FRAME", "UNCHANGED", "ItemRecogniser", "read_range", "track_video"]

#: Internal row statuses, never written: a tracked frame without faces (the tracker must see the gap) and an input
#: whose content is already in the output under a new modification time.
FRAME, UNCHANGED = "_frame", "_unchanged"
#: Images (or frames) classified in one call, as ``ferkit predict --batch-size``'s default.
CLASSIFY_BATCH = 64


def read_range(file: str, start: int, stop: int, every: int, *, last: bool, declared: int,
               name: str | None = None) -> Iterator[Any]:
    """The sampled frames ``start <= i < stop`` (``stop`` -1: to the end) of a video as ``ferkit.infer.sources.Unit``s,
    then an error unit if it stopped before the frames its container declares. ``name``: the file to report."""
    import cv2

    from ferkit.errors import ImageTooLargeError, VideoError
    from ferkit.images import MAX_PIXELS
    from ferkit.infer.sources import FRAME_COUNT_SLACK, Unit, _frame_time, check_video_frame_size, open_video

    name = name or file
    try:
        cap, info = open_video(file)
    except VideoError as e:
        yield Unit(name, error=str(e).removeprefix(f"{file}: "))
        return
    try:
        try:
            check_video_frame_size(info, MAX_PIXELS, file)
        except ImageTooLargeError as e:
            yield Unit(name, error=str(e).removeprefix(f"{file}: "))
            return
        if start > 0:
            cap.set(cv2.CAP_PROP_POS_FRAMES, start)
            if int(cap.get(cv2.CAP_PROP_POS_FRAMES)) != start:  # a container FFmpeg cannot seek in: read up to it
                cap.release()
                cap, info = open_video(file)
                for _ in range(start):
                    if not cap.grab():
                        break
        i, read = start, 0
        while stop < 0 or i < stop:
            if i % every:
                if not cap.grab():
                    break
            else:
                ok, frame = cap.read()
                if not ok:
                    break
                if frame.shape[0] * frame.shape[1] > MAX_PIXELS:  # the header understated the size
                    yield Unit(name, frame=i, error=f"frame {i} too large ({frame.shape[1]}×{frame.shape[0]}; the "
                                                    f"limit is {MAX_PIXELS:,} pixels)")
                    return
                read += 1
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if frame.ndim == 3 else frame
                yield Unit(name, frame=i, time=_frame_time(cap, i, info.fps), image=rgb)
            i += 1
        if read == 0 and start == 0:
            yield Unit(name, error="video holds no readable frames")
        elif (stop >= 0 and i < stop) or (last and declared and i < declared - FRAME_COUNT_SLACK):
            yield Unit(name, frame=i, error=f"video stopped decoding after {i} of {declared} declared frames "
                                            f"(truncated or corrupt)")
    finally:
        cap.release()


class ItemRecogniser:
    """The callable class ``ferkit batch`` gives ``Dataset.map_batches``: one per Ray actor, the model loaded once.

    Args:
        model: a bundled model's name or a model file the workers can read.
        options: ``Recognizer`` keywords (``detector``, ``min_det_score``, ``min_score``, ``detect_size``) and
            ``every``, ``track``, ``no_detect``.
        model_digest: written into every row.
        threads: CPU threads for the detector and the classifier (one per CPU the actor holds).
    """

    def __init__(self, model: str, options: dict[str, Any], model_digest: str, threads: int = 1) -> None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by onnxruntime's session and OpenMP when they load
        import cv2

        cv2.setNumThreads(threads)
        from ferkit.infer.recognizer import Recognizer

        opts = dict(options)
        self.every = int(opts.pop("every", 1))
        self.track = bool(opts.pop("track", False))
        self.no_detect = bool(opts.pop("no_detect", False))
        if self.no_detect:
            opts["detector"] = "whole"
        self.rec = Recognizer(model, **opts)
        self.extra = {"model": model, "model_digest": model_digest}
        self._frames: dict[str, int] = {}  # item → images or frames recognised in this call

    def __call__(self, batch: Any) -> Any:
        """A batch of items (an Arrow table of :class:`ferkit.batch.plan.Item` rows) → their result rows."""
        import pyarrow as pa

        from ferkit.batch.rows import schema

        rows: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="ferkit-batch-") as tmp:
            images: list[tuple[dict[str, Any], str]] = []
            for t in batch.to_pylist():
                if t["kind"] == "error":
                    rows.append(self._status(t, ERROR, t["error"]))
                    continue
                local, why = self._fetch(t, tmp)
                if why is not None:
                    rows.append(self._status(t, ERROR, why))
                elif t["kind"] == "image":
                    if t["digest"] in t["known"]:
                        rows.append(self._status(t, UNCHANGED, "already in the output"))
                    else:
                        images.append((t, local))
                elif t["digest"] in t["known"]:
                    rows.append(self._status(t, UNCHANGED, "already in the output"))
                else:
                    rows.extend(self._video(t, local))
            rows.extend(self._images(images))
        attempt = uuid.uuid4().hex
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["item"]] = counts.get(r["item"], 0) + 1
        for r in rows:
            r["attempt"], r["item_rows"] = attempt, counts[r["item"]]
            r["item_frames"] = self._frames.get(r["item"], 0)
        self._frames = {}
        sch = schema(self.rec.classes)
        sch = sch.append(pa.field("attempt", pa.string())).append(pa.field("item_rows", pa.int32()))
        sch = sch.append(pa.field("item_frames", pa.int64()))
        sch = sch.append(pa.field("hist", pa.list_(pa.float32())))
        return pa.Table.from_pylist([{k: r.get(k) for k in sch.names} for r in rows], schema=sch)

    # -- pieces --------------------------------------------------------------------------------------------------

    def _ledger(self, t: dict[str, Any]) -> dict[str, Any]:
        return {**self.extra, "item": t["item"], "stamp": t["stamp"], "digest": t["digest"]}

    def _status(self, t: dict[str, Any], status: str, reason: str, frame: int | None = None) -> dict[str, Any]:
        return status_row(t["file"], status, reason, frame=frame, **self._ledger(t))

    def _fetch(self, t: dict[str, Any], tmp: str) -> tuple[str, str | None]:
        """``(local path, error)``: a URL is copied into ``tmp``; a photo's digest is taken here (into ``t``)."""
        file = t["file"]
        try:
            if is_url(file):
                from ferkit.batch.plan import _fs

                fs, path = _fs(file)
                with fs.open(path, "rb") as fh:
                    data = fh.read()
                local = os.path.join(tmp, f"{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
                with open(local, "wb") as out:
                    out.write(data)
                t["digest"] = content_digest(data)
                return local, None
            if t["kind"] == "image":
                t["digest"] = content_digest(path=file)
            return file, None
        except FileNotFoundError:
            return file, "no such file or folder"
        except PermissionError:
            return file, "permission denied"
        except IsADirectoryError:
            return file, "is a folder"
        except OSError as e:
            return file, f"cannot read the file ({(e.strerror or str(e)).lower()})"
        except Exception as e:  # noqa: BLE001  (remote filesystems raise their own classes)
            return file, f"cannot read it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"

    def _images(self, images: list[tuple[dict[str, Any], str]]) -> list[dict[str, Any]]:
        """``ferkit predict``'s reading and recognition, item by item in order."""
        from ferkit.infer.results import Results
        from ferkit.infer.sources import batches, read_units

        if not images:
            return []
        by_local = {local: t for t, local in images}
        rows: dict[str, list[dict[str, Any]]] = {t["item"]: [] for t, _ in images}
        jobs = [(local, Path(os.path.basename(local)), None) for _, local in images]
        for b in batches(read_units(jobs, self.every, reader=self.rec.read), CLASSIFY_BATCH):
            good = [u for u in b if u.image is not None]
            results = iter(self.rec.predict_arrays([u.image for u in good], [u.file for u in good],
                                                   detect=not self.no_detect, keep_images=False))
            for u in b:
                t = by_local[u.file]
                if u.image is not None:
                    self._frames[t["item"]] = self._frames.get(t["item"], 0) + 1
                res = next(results) if u.image is not None else Results([], None, u.file)
                if u.error is not None:
                    reason = u.error.replace(u.file, t["file"])  # a fetched URL's temporary name → the URL
                    rows[t["item"]].append(self._status(t, ERROR, reason, frame=u.frame))
                for k, f in enumerate(res.faces):
                    rows[t["item"]].append(face_row(t["file"], f, k, frame=u.frame, time=u.time, **self._ledger(t)))
                u.image = None
        out: list[dict[str, Any]] = []
        for t, _ in images:
            got = rows[t["item"]]
            out.extend(got or [self._status(t, NO_FACE, "no face found")])
        return out

    def _video(self, t: dict[str, Any], local: str) -> list[dict[str, Any]]:
        """One frame range: every sampled frame's faces (with colour histograms when tracking)."""
        from ferkit.infer.sources import batches
        from ferkit.infer.track import colour_hist

        units = read_range(local, t["start"], t["stop"], self.every, last=t["last"], declared=t["declared"],
                           name=t["file"])
        rows: list[dict[str, Any]] = []
        faces = 0
        for b in batches(units, CLASSIFY_BATCH):
            bad = [u for u in b if u.image is None]
            for u in bad:
                rows.append(self._status(t, ERROR, u.error or "unreadable frame", frame=u.frame))
            good = [u for u in b if u.image is not None]
            self._frames[t["item"]] = self._frames.get(t["item"], 0) + len(good)
            if self.track:  # track_units' per-frame recognition; the IDs are given per video by the driver
                for u in good:
                    dets = self.rec.detections(u.image)
                    boxes = [d.box for d in dets]
                    probs = (self.rec.classify(self.rec.crops(u.image, boxes)) if boxes
                             else np.zeros((0, len(self.rec.classes)), np.float32))
                    if not dets:
                        rows.append(status_row(t["file"], FRAME, "", frame=u.frame, time=u.time, **self._ledger(t)))
                    for k, (d, p) in enumerate(zip(dets, probs)):
                        i = int(p.argmax())
                        rows.append({"file": t["file"], "frame": u.frame, "time": u.time, "face": k,
                                     "box": list(d.box), "det_score": float(d.det_score),
                                     "label": self.rec.classes[i], "score": float(p[i]), "status": FACE,
                                     **{f"score_{c}": float(v) for c, v in zip(self.rec.classes, p)},
                                     "hist": colour_hist(u.image, d.box).tolist(), **self._ledger(t)})
                        faces += 1
            else:
                results = self.rec.predict_arrays([u.image for u in good], [t["file"]] * len(good),
                                                  detect=not self.no_detect, keep_images=False)
                for u, res in zip(good, results):
                    for k, f in enumerate(res.faces):
                        rows.append(face_row(t["file"], f, k, frame=u.frame, time=u.time, **self._ledger(t)))
                        faces += 1
            for u in good:
                u.image = None
        if faces == 0 and not any(r["status"] == ERROR for r in rows):
            stop = "the end" if t["stop"] < 0 else str(t["stop"] - 1)
            rows.append(self._status(t, NO_FACE, f"no face in frames {t['start']}-{stop}", frame=t["start"]))
        return rows


def track_video(rows: list[dict[str, Any]], classes: tuple[str, ...], *, fps: float, every: int) -> list[dict]:
    """Give the face rows of one video (all its ranges, any order) track IDs and smoothed scores, as
    :func:`ferkit.infer.track.track_units` does frame by frame; returns the rows to write (frame rows dropped)."""
    from ferkit.infer.detect import Detection
    from ferkit.infer.track import _FALLBACK_FPS, FaceTracker, ScoreSmoother

    tracker = FaceTracker(fps / every if fps > 0 else 0.0)
    smoother = ScoreSmoother()
    dt = every / (fps if fps > 0 else _FALLBACK_FPS)
    frames: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] in (FACE, FRAME):
            frames.setdefault(r["frame"], []).append(r)
    for frame in sorted(frames):
        group = sorted((r for r in frames[frame] if r["status"] == FACE), key=lambda r: r["face"])
        first = frames[frame][0]
        t = first["time"] if first["time"] is not None else frame * dt / every
        dets = [Detection(*r["box"], r["det_score"]) for r in group]
        ids = tracker.update(dets, None, t, hists=[np.asarray(r["hist"], np.float32) for r in group])
        for r, tid in zip(group, ids):
            r["track"] = tid
            if tid is not None:
                p = np.array([r[f"score_{c}"] for c in classes], np.float64)
                sm = smoother.update(tid, t, p)
                j = int(sm.argmax())
                r["smoothed_label"], r["smoothed_score"] = classes[j], float(sm[j])
    return [r for r in rows if r["status"] != FRAME]
