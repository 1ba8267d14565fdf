"""Tracking faces through a video: stable track IDs, and each track's class scores smoothed over time.

    >>> from ferkit import Recognizer
    >>> for res in Recognizer().track("clip.mp4"):          # one Results per processed frame
    ...     for f in res:
    ...         print(res.time, f.track, f.label, f.smoothed_label)

**Tracker.** ByteTrack as implemented by ``supervision`` (``sv.ByteTrack``): a Kalman filter predicts each track's
box, detections are matched to predictions by IoU (high-confidence detections first, then low ones), so IDs survive
motion, size changes and crossing paths. The boxes reported are always the detector's own (the tracker only gives
them IDs), so no face is invented. Chosen over ``norfair`` (needs numpy < 2), ``boxmot`` (needs torch) and
Roboflow's ``trackers`` (needs the GUI build ``opencv-python``, which clashes with ``opencv-python-headless``).

**Track IDs and re-identification.** IDs are 1, 2, … per video in order of appearance. The faces of the first
frame get theirs at once; a face that appears later gets its ID on its second consecutive detection (a one-frame
false detection never gets one; its face is reported with ``track=None``). The rule for a face that leaves and
comes back:

* missed for up to :data:`LOST_SECONDS` (2 s) and back where its track's motion predicts (IoU ≥ 0.2 with the
  predicted box): same ID (ByteTrack's own matching);
* missed for up to :data:`LOST_SECONDS` and back elsewhere — typically after walking behind another person, whose
  box hid it and bent its track's motion: ByteTrack starts a new track, and ferkit gives it the ID of a track lost
  within :data:`LOST_SECONDS` whose colour histogram (hue × saturation of the face box) is close (Bhattacharyya
  distance ≤ :data:`REID_MAX_DISTANCE`, and clearly closer than any other lost track);
* away longer than :data:`LOST_SECONDS`: a new ID.

There is no face embedding: two people who look alike in colour and swap places while both are hidden can swap IDs.
On the crossing test clip ByteTrack alone gave the hidden person a new ID after the cross (1 fragmentation, no swap);
with the re-identification step, none (``benchmarks/video_speed.py`` measures both).

**Smoothing.** An exponential moving average of each track's class probabilities with time constant
:data:`SMOOTH_SECONDS`, using the frames' real timestamps: a frame ``dt`` seconds after the previous one of its track
moves the average by ``1 - exp(-dt / τ)`` of the way towards its scores. The same τ therefore means the same
smoothing at 10, 30 or 60 fps, with ``--every``, and across variable frame rates; after a gap the first new frame
counts for more. A track's first frame starts the average at its raw scores.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ferkit.infer.results import Face, Results

if TYPE_CHECKING:  # pragma: no cover
    from ferkit.infer.detect import Detection
    from ferkit.infer.recognizer import Recognizer
    from ferkit.infer.sources import Unit

log = logging.getLogger(__name__)

__all__ = ["LOST_SECONDS", "REID_MAX_DISTANCE", "SMOOTH_SECONDS", "FaceTracker", "ScoreSmoother", "colour_hist",
           "track_units"]

#: Time constant τ of the score smoothing, in seconds. Expressions on the test clips change over ~1 s; τ = 0.5 s
#: keeps a change visible within half a second while averaging out frame-to-frame flicker of the classifier.
SMOOTH_SECONDS = 0.5
#: How long a track may go undetected and still keep its ID when its face reappears (seconds).
LOST_SECONDS = 2.0
#: Largest colour-histogram distance at which a new track takes over a lost one's ID. On the crossing test clip
#: (wild-dev faces) the same face after an occlusion measured 0.07-0.19 (0.19: half-hidden as it re-emerged) and
#: different faces 0.22-0.37.
REID_MAX_DISTANCE = 0.20
#: The best lost track must be closer than the second best by this much, or no ID is reused.
REID_MARGIN = 0.03
#: Weight of each new frame in a track's running colour histogram.
_HIST_RATE = 0.1
#: Frame interval assumed when a video declares no frame rate (its frames carry no times).
_FALLBACK_FPS = 30.0


class ScoreSmoother:
    """Per-track exponential moving average of class probabilities over real time (see the module docstring)."""

    def __init__(self, tau: float = SMOOTH_SECONDS) -> None:
        if not (math.isfinite(tau) and tau >= 0):  # NaN passes "tau < 0" and made every smoothed score NaN
            from ferkit.errors import ConfigError

            raise ConfigError(f"smoothing time constant must be a number of seconds ≥ 0, got {tau}")
        self.tau = tau
        self._state: dict[int, tuple[float, np.ndarray]] = {}

    def update(self, track: int, t: float, probs: np.ndarray) -> np.ndarray:
        """The smoothed probabilities of ``track`` after its scores ``probs`` at time ``t`` seconds."""
        prev = self._state.get(track)
        if prev is None or self.tau == 0:
            value = probs.astype(np.float64)
        else:
            t0, v0 = prev
            a = 1.0 - math.exp(-max(t - t0, 0.0) / self.tau)
            value = v0 + a * (probs - v0)
        self._state[track] = (t, value)
        return value


class FaceTracker:
    """Gives the detections of successive frames stable track IDs (ByteTrack, from ``supervision``).

    Args:
        fps: the rate at which frames are passed to :meth:`update` (the video's fps divided by ``every``).
        lost_seconds: how long an undetected track keeps its ID (see the module docstring).
        reid: give a new ByteTrack track the ID of a lost one that looks like it (off: ByteTrack's IDs as they are).
    """

    def __init__(self, fps: float = _FALLBACK_FPS, *, lost_seconds: float = LOST_SECONDS, reid: bool = True) -> None:
        try:
            import supervision as sv
        except ImportError as e:  # pragma: no cover - a base dependency
            raise ImportError("tracking needs supervision: pip install 'supervision>=0.30,<0.31'") from e
        self._sv = sv
        self.lost_seconds, self.reid = lost_seconds, reid
        self._ids: dict[int, int] = {}  # ByteTrack's ID → ours (several of its tracks may be one of ours)
        self._last: dict[int, float] = {}  # our ID → time last seen
        self._hist: dict[int, np.ndarray] = {}  # our ID → running colour histogram
        self._next = 1
        fps = fps if fps > 0 else _FALLBACK_FPS
        with warnings.catch_warnings():  # sv.ByteTrack's deprecation notice points to `trackers`; see module doc
            warnings.simplefilter("ignore")
            # ByteTrack counts its buffer in frames at 30 fps and rescales it by frame_rate / 30.
            self._bt = sv.ByteTrack(track_activation_threshold=0.25, lost_track_buffer=max(1, round(lost_seconds * 30)),
                                    minimum_matching_threshold=0.8, frame_rate=fps, minimum_consecutive_frames=1)

    def update(self, detections: list[Detection], image: np.ndarray | None, t: float, *,
               hists: Sequence[np.ndarray] | None = None) -> list[int | None]:
        """Track IDs for one frame's detections (same order); None for a face not yet confirmed as a track.

        Args:
            detections: the frame's faces; image: the frame (RGB), for the colour histograms; t: its time (s).
            hists: the faces' :func:`colour_hist` computed where the frame was decoded (``ferkit batch`` tracks
                from its workers' detections, without the frames); then ``image`` is not used.
        """
        if not detections:
            self._bt.update_with_tensors(np.zeros((0, 5), np.float32))  # ages the tracks: a gap is a gap
            return []
        ids = self._bytetrack(detections)
        hists = {i: (hists[i] if hists is not None else colour_hist(image, detections[i].box))
                 for i, b in enumerate(ids) if b is not None}
        present = {self._ids[b] for b in ids if b is not None and b in self._ids}
        out: list[int | None] = []
        for i, b in enumerate(ids):
            if b is None:
                out.append(None)
                continue
            if b not in self._ids:
                self._ids[b] = self._reidentify(hists[i], t, present)
                present.add(self._ids[b])
            tid = self._ids[b]
            old = self._hist.get(tid)
            self._hist[tid] = hists[i] if old is None else (1 - _HIST_RATE) * old + _HIST_RATE * hists[i]
            self._last[tid] = t
            out.append(tid)
        return out

    def _reidentify(self, hist: np.ndarray, t: float, present: set[int]) -> int:
        """Our ID for a new ByteTrack track: a recently lost track's that looks like it, else a fresh one."""
        import cv2

        if not self.reid:
            self._next += 1
            return self._next - 1
        dists = sorted((cv2.compareHist(self._hist[k], hist, cv2.HISTCMP_BHATTACHARYYA), k)
                       for k, seen in self._last.items() if k not in present and t - seen <= self.lost_seconds)
        if dists and dists[0][0] <= REID_MAX_DISTANCE and (len(dists) == 1 or dists[1][0] - dists[0][0] >= REID_MARGIN):
            log.debug("track %d re-identified at %.2fs (histogram distance %.3f)", dists[0][1], t, dists[0][0])
            return dists[0][1]
        self._next += 1
        return self._next - 1

    def _bytetrack(self, detections: list[Detection]) -> list[int | None]:
        xyxy = np.array([[d.x, d.y, d.x + d.w, d.y + d.h] for d in detections], np.float32)
        # A whole-image fallback has score 0.0; give it a low-but-valid score so a crop sequence still tracks.
        conf = np.array([d.score if d.score > 0 else 0.3 for d in detections], np.float32)
        dets = self._sv.Detections(xyxy=xyxy, confidence=conf, data={"index": np.arange(len(detections))})
        out = self._bt.update_with_detections(dets)
        ids: list[int | None] = [None] * len(detections)
        if len(out) == 0:  # no confirmed track this frame: supervision returns Detections.empty(), without our data
            return ids
        for i, tid in zip(out.data["index"], out.tracker_id):
            ids[int(i)] = int(tid)
        return ids


def colour_hist(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Normalised 16×8 hue × saturation histogram of a face box (float32; the box clipped to the image)."""
    import cv2

    x, y, w, h = box
    crop = image[max(0, y):max(0, y + h), max(0, x):max(0, x + w)]
    if crop.ndim == 2:
        crop = cv2.cvtColor(crop, cv2.COLOR_GRAY2RGB)
    if crop.size == 0:
        return np.full(128, 1 / 128, np.float32)
    hist = cv2.calcHist([cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2HSV)], [0, 1], None, [16, 8],
                        [0, 180, 0, 256]).ravel()
    return (hist / max(float(hist.sum()), 1.0)).astype(np.float32)


#: Frames whose detection runs ahead of the tracking, in a thread pool (bounds the frames held in memory).
LOOKAHEAD = 4


def _detect_ahead(rec: Recognizer, units: Iterable[Unit]) -> Iterator[tuple[Unit, list[Detection]]]:
    """``(unit, detections)`` in order, the detector working on the next frames while the caller tracks and
    classifies this one. Detection is ~80% of a tracked frame's time and YuNet releases the GIL, so on 2 cores the
    detections of two frames, decoding and classification overlap; LOOKAHEAD frames at most are in flight."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    from ferkit.infer.runtime import cpu_threads

    workers = min(2, cpu_threads()) if rec.detector.thread_safe else 1
    pending: deque[tuple[Unit, Future[list[Detection]] | None]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ferkit-detect") as pool:
        try:
            for u in units:
                pending.append((u, None if u.image is None else pool.submit(rec.detections, u.image)))
                if len(pending) > LOOKAHEAD:
                    v, fut = pending.popleft()
                    yield v, [] if fut is None else fut.result()
            while pending:
                v, fut = pending.popleft()
                yield v, [] if fut is None else fut.result()
        finally:
            for _, fut in pending:  # the consumer stopped early: do not wait for frames nobody will read
                if fut is not None:
                    fut.cancel()


def track_units(rec: Recognizer, units: Iterable[Unit], *, fps: float, every: int = 1,
                tau: float = SMOOTH_SECONDS, lost_seconds: float = LOST_SECONDS, reid: bool = True,
                keep_images: bool = False) -> Iterator[tuple[Unit, Results]]:
    """Detect, track, classify and smooth the frames of one video, in order: ``(unit, results)`` per frame.

    Units carrying an error are passed through with empty results (the caller reports them).
    """
    tracker = FaceTracker(fps / every if fps > 0 else 0.0, lost_seconds=lost_seconds, reid=reid)
    smoother = ScoreSmoother(tau)
    dt = every / (fps if fps > 0 else _FALLBACK_FPS)
    for u, dets in _detect_ahead(rec, units):
        if u.image is None:
            yield u, Results([], None, u.file, u.frame, u.time)
            continue
        t = u.time if u.time is not None else (u.frame or 0) * dt / every
        ids = tracker.update(dets, u.image, t)
        boxes = [d.box for d in dets]
        probs = rec.classify(rec.crops(u.image, boxes)) if boxes else np.zeros((0, len(rec.classes)), np.float32)
        faces = []
        for d, tid, p in zip(dets, ids, probs):
            i = int(p.argmax())
            sm = None if tid is None else smoother.update(tid, t, p)
            faces.append(Face(d.box, rec.classes[i], float(p[i]), {c: float(v) for c, v in zip(rec.classes, p)},
                              det_score=float(d.score), track=tid,
                              smoothed=None if sm is None else {c: float(v) for c, v in zip(rec.classes, sm)}))
        yield u, Results(faces, u.image if keep_images else None, u.file, u.frame, u.time)
