"""A tracked video's report: per-face rows, per-track summary, CSV / JSON files and a timeline plot.

    >>> from ferkit import Recognizer
    >>> from ferkit.infer.report import VideoReport
    >>> rec = Recognizer()
    >>> report = VideoReport(rec.classes, file="clip.mp4")
    >>> for res in rec.track("clip.mp4"):
    ...     report.add(res)
    >>> report.summary()["tracks"][0]["share"]             # share of visible time per smoothed label
    {'happy': 0.92, 'sad': 0.0, 'neutral': 0.08}
    >>> report.to_csv("clip.frames.csv"); report.to_json("clip.tracks.json"); report.plot_timeline("clip.png")

Rows are kept as compact float arrays (about 100 bytes per face per frame), not as objects, so a long video's report
stays small; every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ferkit.fsutil import atomic_path, atomic_write_text
from ferkit.infer.results import Results, label_colour

log = logging.getLogger(__name__)

__all__ = ["VideoReport"]

#: Strongest moments listed per track and class, at least this many seconds apart.
TOP_MOMENTS, MOMENT_SEPARATION = 3, 1.0
_BLOCK = 4096  # rows gathered before they are packed into one array


class VideoReport:
    """Collects the tracked faces of one video and summarises them per track.

    Args:
        classes: the model's class names (column order of the scores).
        file: the video's name, for the outputs.
        fps, declared_frames: what the container says (for the summary).
        every: the sampling step used (for the summary).
    """

    def __init__(self, classes: Sequence[str], *, file: str | None = None, fps: float = 0.0,
                 declared_frames: int = 0, every: int = 1, **info: Any) -> None:
        self.classes = tuple(classes)
        self.file, self.fps, self.declared_frames, self.every = file, fps, declared_frames, every
        self.info: dict[str, Any] = dict(info)
        self.frames_processed = 0
        self.last_time: float | None = None
        self.error: str | None = None
        c = len(self.classes)
        self._width = 8 + 2 * c  # frame, time, track (-1: none), x, y, w, h, det_score, raw scores, smoothed scores
        self._pending: list[list[float]] = []
        self._blocks: list[np.ndarray] = []

    # -- collecting ----------------------------------------------------------------------------------------------------

    def add(self, res: Results) -> None:
        """Add one processed frame's results (from :meth:`Recognizer.track`)."""
        self.frames_processed += 1
        t = res.time if res.time is not None else (res.frame or 0) / (self.fps or 30.0)
        self.last_time = t
        for f in res.faces:
            sm = f.smoothed or f.scores
            self._pending.append([res.frame if res.frame is not None else self.frames_processed - 1, t,
                                  -1 if f.track is None else f.track, *f.box,
                                  np.nan if f.det_score is None else f.det_score,
                                  *(f.scores[c] for c in self.classes), *(sm[c] for c in self.classes)])
        if len(self._pending) >= _BLOCK:
            self._pack()

    def _pack(self) -> None:
        if self._pending:
            self._blocks.append(np.asarray(self._pending, np.float64))
            self._pending = []

    @property
    def rows(self) -> np.ndarray:
        """All face rows so far, N × (8 + 2C): frame, time, track (-1 none), x, y, w, h, det_score, raw, smoothed."""
        self._pack()
        if not self._blocks:
            return np.zeros((0, self._width))
        if len(self._blocks) > 1:
            self._blocks = [np.concatenate(self._blocks)]
        return self._blocks[0]

    # -- summary -------------------------------------------------------------------------------------------------------

    def _durations(self, times: np.ndarray) -> np.ndarray:
        """Seconds each of a track's observations stands for: the time to its next one, capped at the typical
        frame interval (so a gap while the face was away does not count as visible)."""
        step = self.every / self.fps if self.fps > 0 else None
        if len(times) == 1:
            return np.array([step or 0.0])
        gaps = np.diff(times)
        typical = step if step else float(np.median(gaps))
        return np.append(np.minimum(gaps, 1.5 * typical), typical)

    def summary(self) -> dict[str, Any]:
        """Per track: first/last time, seconds visible, share of visible time per smoothed label, mean raw scores,
        the strongest moments per class; plus the video's facts (frames declared and processed, any error)."""
        rows, c = self.rows, len(self.classes)
        tracks = []
        for tid in sorted(int(v) for v in np.unique(rows[:, 2]) if v >= 0):
            r = rows[rows[:, 2] == tid]
            r = r[np.argsort(r[:, 1], kind="stable")]
            times, raw, smooth = r[:, 1], r[:, 8:8 + c], r[:, 8 + c:]
            dur = self._durations(times)
            visible = float(dur.sum())
            lab = smooth.argmax(1)
            share = {k: round(float(dur[lab == i].sum() / visible), 4) if visible > 0 else 0.0
                     for i, k in enumerate(self.classes)}
            mean = {k: round(float(np.average(raw[:, i], weights=dur if visible > 0 else None)), 4)
                    for i, k in enumerate(self.classes)}
            top = max(share, key=share.__getitem__)
            tracks.append({"track": tid, "first": round(float(times[0]), 3), "last": round(float(times[-1]), 3),
                           "seconds_visible": round(visible, 3), "frames": int(len(r)), "label": top,
                           "share": share, "mean_scores": mean, "strongest": self._moments(times, smooth)})
        return {"file": self.file, "fps": self.fps, "frames_declared": self.declared_frames,
                "frames_processed": self.frames_processed, "every": self.every,
                "duration": None if self.last_time is None else round(self.last_time, 3),
                "faces_without_track": int((rows[:, 2] < 0).sum()), **self.info,
                **({"error": self.error} if self.error else {}), "tracks": tracks}

    def _moments(self, times: np.ndarray, smooth: np.ndarray) -> dict[str, list[dict[str, float]]]:
        """For each class, up to TOP_MOMENTS peaks of its smoothed score, at least MOMENT_SEPARATION s apart."""
        out = {}
        for i, k in enumerate(self.classes):
            picked: list[dict[str, float]] = []
            for j in np.argsort(-smooth[:, i], kind="stable"):
                if len(picked) == TOP_MOMENTS:
                    break
                if all(abs(times[j] - p["time"]) >= MOMENT_SEPARATION for p in picked):
                    picked.append({"time": round(float(times[j]), 3), "score": round(float(smooth[j, i]), 4)})
            out[k] = picked
        return out

    # -- files ---------------------------------------------------------------------------------------------------------

    def csv_text(self) -> str:
        """The rows as CSV: one per face per processed frame, raw and smoothed label and scores."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["frame", "time", "track", "x", "y", "w", "h", "det_score", "label", "score",
                    "smoothed_label", "smoothed_score", *self.classes, *(f"smoothed_{k}" for k in self.classes)])
        c = len(self.classes)
        for r in self.rows:
            raw, sm = r[8:8 + c], r[8 + c:]
            w.writerow([int(r[0]), f"{r[1]:.3f}", "" if r[2] < 0 else int(r[2]), *(int(v) for v in r[3:7]),
                        "" if np.isnan(r[7]) else f"{r[7]:.4f}", self.classes[int(raw.argmax())],
                        f"{raw.max():.4f}", "" if r[2] < 0 else self.classes[int(sm.argmax())],
                        "" if r[2] < 0 else f"{sm.max():.4f}", *(f"{v:.4f}" for v in raw),
                        *("" if r[2] < 0 else f"{v:.4f}" for v in sm)])
        return buf.getvalue()

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write :meth:`csv_text` to ``path`` (atomically)."""
        atomic_write_text(path, self.csv_text())

    def to_json(self, path: str | os.PathLike | None = None, **kwargs: Any) -> str:
        """:meth:`summary` as JSON; also written to ``path`` (atomically) when given."""
        text = json.dumps(self.summary(), indent=kwargs.pop("indent", 2), **kwargs) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    def plot_timeline(self, path: str | os.PathLike) -> None:
        """One panel per track of its smoothed scores over time (PNG, written atomically)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        summ = self.summary()
        tracks = summ["tracks"]
        rows, c = self.rows, len(self.classes)
        n = max(1, len(tracks))
        fig = Figure(figsize=(9, 1.2 + 1.6 * n), dpi=100, layout="constrained")
        axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
        end = summ["duration"] or 1.0
        if not tracks:
            axes[0].text(0.5, 0.5, "no face tracked", ha="center", va="center", transform=axes[0].transAxes)
            axes[0].set_yticks([])
        for ax, tr in zip(axes, tracks):
            r = rows[rows[:, 2] == tr["track"]]
            r = r[np.argsort(r[:, 1], kind="stable")]
            t = r[:, 1].copy()
            sm = r[:, 8 + c:].copy()
            # break the lines where the face was away (a gap longer than 3 frame steps) rather than join across it
            step = (self.every / self.fps) if self.fps > 0 else (float(np.median(np.diff(t))) if len(t) > 1 else 1)
            breaks = np.nonzero(np.diff(t) > 3 * step)[0] + 1
            t = np.insert(t, breaks, np.nan)
            sm = np.insert(sm, breaks, np.nan, axis=0)
            for i, k in enumerate(self.classes):
                ax.plot(t, sm[:, i], color=np.array(label_colour(k)) / 255, lw=1.8, label=k)
            ax.set_ylim(0, 1.02)
            ax.set_xlim(0, end)
            ax.set_ylabel("score")
            share = tr["share"][tr["label"]]
            ax.set_title(f"track {tr['track']}: {tr['label']} {share:.0%} of {tr['seconds_visible']:.1f} s visible "
                         f"({tr['first']:.1f}–{tr['last']:.1f} s)", loc="left", fontsize=10)
            ax.grid(alpha=0.3)
        if tracks:
            axes[0].legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(self.classes), fontsize=8,
                           frameon=False)
        axes[-1].set_xlabel("time (s)")
        fig.suptitle(f"{os.path.basename(self.file or 'video')}: smoothed expression scores per track", fontsize=11)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
