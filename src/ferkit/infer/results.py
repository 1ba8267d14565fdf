"""What recognition returns: :class:`Face` and :class:`Results`, and drawing them onto images.

Plain data with no backend behind it, shared by ``Recognizer``, the CLI's writers, tracking and the server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = ["CROP_MARGIN", "Face", "Results", "caption", "crop_box", "draw_faces", "label_colour"]

#: Context added on every side of a detector box before cropping, as a fraction of the box's longer side (0.05: the
#: square crop is 1.1× the box). On wild-dev (498 photos, YuNet boxes) a fastcnn trained on FER2013 (78.2% on its
#: validation split) scored 85.7/85.7/85.5/84.9/85.3% at margins 0/0.05/0.10/0.15/0.20 against 80.9% on whole photos;
#: padding the outside by edge replication instead of shifting the square into the image scored 84.7% at 0.05 and fell
#: to 77.5% at 0.25; clipping to a non-square region scored 83.7% at 0.05.
CROP_MARGIN = 0.05

_COLOURS: dict[str, tuple[int, int, int]] = {  # RGB
    "happy": (46, 204, 64),
    "sad": (0, 116, 217),
    "neutral": (190, 190, 190),
    "angry": (255, 65, 54),
    "disgust": (61, 153, 112),
    "fear": (177, 13, 201),
    "surprise": (255, 133, 27),
}
_PALETTE = [(255, 220, 0), (57, 204, 204), (240, 18, 190), (1, 255, 112), (255, 133, 27), (127, 219, 255)]


@dataclass(frozen=True)
class Face:
    """One recognised face.

    Attributes:
        box: ``(x, y, w, h)`` in pixels of the original image (after EXIF rotation).
        label: the most probable class.
        score: its probability.
        scores: class → probability, in the model's class order.
        det_score: the face detector's confidence in [0, 1] (None when not recorded).
        track: in videos, the face's track ID (1, 2, … per video), or None when not tracked (or not yet: a new
            face gets its ID when it is seen a second time, see :mod:`ferkit.infer.track`).
        smoothed: in tracked videos, the track's class scores smoothed over time (same keys as ``scores``).
    """

    box: tuple[int, int, int, int]
    label: str
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    det_score: float | None = None
    track: int | None = None
    smoothed: dict[str, float] | None = None

    @property
    def smoothed_label(self) -> str | None:
        """The most probable class of the smoothed scores (None when not smoothed)."""
        return max(self.smoothed, key=self.smoothed.__getitem__) if self.smoothed else None

    @property
    def smoothed_score(self) -> float | None:
        """The smoothed probability of :attr:`smoothed_label` (None when not smoothed)."""
        return max(self.smoothed.values()) if self.smoothed else None

    def to_dict(self) -> dict[str, Any]:
        """``{"box": [x, y, w, h], "label": ..., "score": ..., "scores": {class: prob}}`` (JSON-ready), plus
        ``"det_score"``, ``"track"`` and ``"smoothed": {"label", "score", "scores"}`` when they are set."""
        d: dict[str, Any] = {"box": [int(v) for v in self.box], "label": self.label, "score": float(self.score),
                             "scores": {k: float(v) for k, v in self.scores.items()}}
        if self.det_score is not None:
            d["det_score"] = float(self.det_score)
        if self.track is not None:
            d["track"] = int(self.track)
        if self.smoothed is not None:
            d["smoothed"] = {"label": self.smoothed_label, "score": float(self.smoothed_score or 0.0),
                             "scores": {k: float(v) for k, v in self.smoothed.items()}}
        return d


@dataclass
class Results:
    """The faces found in one image; behaves as a list of :class:`Face`.

    Attributes:
        faces: the faces, largest first; boxes in pixels of the full image (``size``).
        image: the decoded image (uint8 H×W×3 RGB or H×W gray), or None when not kept. A large JPEG read from a
            file or bytes is decoded at reduced size (``ferkit.images.read_image``): then ``image`` is smaller than
            ``size`` (``image_scale`` < 1) and ``plot()`` draws the boxes scaled down to it.
        path: the file the image came from, or None.
        frame: in videos, the frame's index (from 0); None for photos.
        time: in videos, the frame's time in seconds; None for photos (or when the video has no frame rate).
        size: ``(width, height)`` of the full image the boxes refer to (default: the image's own size).
        frames_total: the file's frame count when it holds several (animated GIF, multi-page TIFF) and only the
            first was read (``Recognizer.predict``; ``ferkit predict`` reads them all); None otherwise.
    """

    faces: list[Face]
    image: np.ndarray | None = None
    path: str | None = None
    frame: int | None = None
    time: float | None = None
    size: tuple[int, int] | None = None
    frames_total: int | None = None

    def __post_init__(self) -> None:
        if self.size is None and self.image is not None:
            self.size = (int(self.image.shape[1]), int(self.image.shape[0]))

    @property
    def image_scale(self) -> float:
        """``image`` width / full width: 1.0, or 0.5 (0.25 …) when the image was decoded at reduced size."""
        if self.image is None or not self.size or not self.size[0]:
            return 1.0
        return self.image.shape[1] / self.size[0]

    def __len__(self) -> int:
        return len(self.faces)

    def __iter__(self) -> Iterator[Face]:
        return iter(self.faces)

    def __getitem__(self, i: int) -> Face:
        return self.faces[i]

    def __repr__(self) -> str:
        shape = None if self.image is None else tuple(self.image.shape)
        return f"Results(path={self.path!r}, image={shape}, faces={self.faces!r})"

    def to_dict(self) -> dict[str, Any]:
        """``{"file": path or None, "faces": [face.to_dict(), ...]}``, with ``"frame"`` and ``"time"`` in videos,
        and ``"frames_total"`` plus a ``"note"`` when only the first of several frames was read."""
        d: dict[str, Any] = {"file": self.path}
        if self.frame is not None:
            d["frame"] = self.frame
            d["time"] = self.time
        d["faces"] = [f.to_dict() for f in self.faces]
        if self.frames_total is not None and self.frames_total > 1:
            d["frames_total"] = int(self.frames_total)
            d["note"] = (f"only frame 1 of {self.frames_total} was read (ferkit predict reads every frame of "
                         "animations and multi-page files)")
        return d

    def to_json(self, **kwargs: Any) -> str:
        """``to_dict()`` as JSON; keyword arguments go to ``json.dumps``."""
        return json.dumps(self.to_dict(), **kwargs)

    def plot(self) -> np.ndarray:
        """A copy of the image (uint8 H×W×3 RGB) with each face's box, label and score drawn.

        The copy has the decoded image's size: for a large JPEG decoded at reduced size that is smaller than
        ``size``, and the boxes are drawn scaled to it (where the faces are in it); drawing on an upscaled copy
        would cost 4× the memory and add no detail.

        Raises:
            ValueError: the results do not hold their image.
        """
        if self.image is None:
            raise ValueError("these results do not hold their image (nothing to draw on)")
        faces = self.faces
        if self.size and (self.image.shape[1], self.image.shape[0]) != tuple(self.size):
            sx, sy = self.image.shape[1] / self.size[0], self.image.shape[0] / self.size[1]
            faces = [replace(f, box=(round(f.box[0] * sx), round(f.box[1] * sy), max(1, round(f.box[2] * sx)),
                                     max(1, round(f.box[3] * sy)))) for f in faces]
        return draw_faces(self.image, faces)


def caption(face: Face) -> str:
    """The text drawn by a face's box: ``label score``, or ``#track smoothed-label score`` for a tracked face."""
    if face.track is not None and face.smoothed:
        return f"#{face.track} {face.smoothed_label} {face.smoothed_score:.2f}"
    return f"{face.label} {face.score:.2f}"


def label_colour(label: str) -> tuple[int, int, int]:
    """The RGB colour ferkit draws ``label`` in (boxes, timelines)."""
    return _COLOURS.get(label) or _PALETTE[sum(map(ord, label)) % len(_PALETTE)]


def draw_faces(image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """Draw boxes and captions (see :func:`caption`) on an RGB copy of ``image``.

    The caption's size follows the box (at least legible on the image as a whole), sits above the box, or inside it
    when the box touches the top edge.
    """
    import cv2

    out = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image.copy()
    img_h, img_w = out.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    min_scale = max(img_h, img_w) / 1400  # ~11 px high text on a 640-px image, more on big photos
    for f in faces:
        x, y, w, h = f.box
        colour = label_colour(f.smoothed_label or f.label)
        line = max(1, round(max(w, h) / 100))
        # a dark rim under the coloured line keeps light colours (neutral's grey) visible on light backgrounds
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (0, 0, 0), line + 2, cv2.LINE_AA)
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), colour, line, cv2.LINE_AA)
        text = caption(f)
        (tw1, _), _ = cv2.getTextSize(text, font, 1.0, 1)
        scale = min(max(w * 0.9 / tw1, min_scale, 0.35), 3.0)
        thick = max(1, round(scale * 1.6))
        (tw, th), base = cv2.getTextSize(text, font, scale, thick)
        pad = max(2, th // 4)
        top = y - th - base - 2 * pad
        if top < 0:  # no room above the box: caption inside its top edge
            top = y
        tx = min(max(0, x), max(0, img_w - tw - 2 * pad))
        cv2.rectangle(out, (tx, top), (tx + tw + 2 * pad, top + th + base + 2 * pad), colour, -1)
        # dark text on light colours, white on dark ones
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        cv2.putText(out, text, (tx + pad, top + pad + th), font, scale, ink, thick, cv2.LINE_AA)
    return out


def crop_box(box: tuple[int, int, int, int], width: int, height: int,
             margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """The square region to classify for a face box in a ``width``×``height`` image.

    The square's side is the box's longer side plus ``margin`` of it on each side, shrunk to fit the image if need
    be; it is centred on the box and then shifted to lie inside the image. Shifting (rather than padding the outside
    or clipping to a non-square region) keeps the face's aspect ratio without inventing pixels, and scored best on
    wild-dev, where most photos are tight face crops.

    Returns:
        ``(x0, y0, x1, y1)`` with ``0 <= x0 < x1 <= width``, ``0 <= y0 < y1 <= height`` and ``x1 - x0 == y1 - y0``.
    """
    x, y, w, h = box
    side = max(1, min(round(max(w, h) * (1.0 + 2.0 * margin)), width, height))
    x0 = min(max(0, round(x + w / 2.0 - side / 2.0)), width - side)
    y0 = min(max(0, round(y + h / 2.0 - side / 2.0)), height - side)
    return x0, y0, x0 + side, y0 + side
