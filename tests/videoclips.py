"""Real test videos composed from wild-dev photos: faces pasted on a plain background and moved along scripted paths.

Used by the video tests and ``benchmarks/video_speed.py``. Every pixel of a face comes from a real photo; the
background is a flat grey-to-beige gradient so that the only faces in a frame are the ones the script placed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shared_data import WILD

#: ``../shared/data/wild-dev/{happy,sad,neutral}/*.jpg`` beside the repository.


@dataclass(frozen=True)
class Actor:
    """One face in a clip: its photo and where it is at time t (None: not in the frame)."""

    photo: np.ndarray  # RGB
    path: Callable[[float], tuple[float, float, float] | None]  # t → (centre x, centre y, side) in pixels


def load_face(label: str, index: int = 0) -> np.ndarray:
    """The ``index``-th (sorted) wild-dev photo of ``label`` as RGB, cropped square around its centre and reduced to
    at most 256 pixels a side (clips show faces at 90-170 px; resizing a 12-MP photo for every frame was slow)."""
    from PIL import Image

    files = sorted((WILD / label).glob("*.jpg"))
    im = Image.open(files[index]).convert("RGB")
    w, h = im.size
    s = min(h, w)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s > 256:
        im = im.resize((256, 256), Image.Resampling.LANCZOS)
    return np.asarray(im)


def background(width: int, height: int) -> np.ndarray:
    """A smooth grey-to-beige gradient (uint8 RGB)."""
    gx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    gy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    lo, hi = np.array([120, 120, 125], np.float32), np.array([200, 190, 170], np.float32)
    return (lo + (hi - lo) * (0.6 * gx + 0.4 * gy)).astype(np.uint8)


def render(actors: Sequence[Actor], t: float, bg: np.ndarray) -> np.ndarray:
    """One RGB frame at time ``t``; later actors are drawn over earlier ones."""
    import cv2

    frame = bg.copy()
    H, W = frame.shape[:2]
    for a in actors:
        where = a.path(t)
        if where is None:
            continue
        cx, cy, side = where
        s = max(2, int(round(side)))
        face = cv2.resize(a.photo, (s, s), interpolation=cv2.INTER_AREA)
        x0, y0 = int(round(cx - s / 2)), int(round(cy - s / 2))
        fx0, fy0 = max(0, -x0), max(0, -y0)
        x0c, y0c = max(0, x0), max(0, y0)
        x1c, y1c = min(W, x0 + s), min(H, y0 + s)
        if x1c > x0c and y1c > y0c:
            frame[y0c:y1c, x0c:x1c] = face[fy0:fy0 + (y1c - y0c), fx0:fx0 + (x1c - x0c)]
    return frame


def write_clip(path: Path, actors: Sequence[Actor], seconds: float, fps: float = 30.0, size: tuple[int, int] =
               (640, 480), fourcc: str = "mp4v") -> Path:
    """Write the clip with OpenCV (``mp4v`` in .mp4, ``MJPG`` in .avi); returns ``path``."""
    import cv2

    w, h = size
    bg = background(w, h)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    if not vw.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write {fourcc}")
    try:
        for i in range(int(round(seconds * fps))):
            vw.write(cv2.cvtColor(render(actors, i / fps, bg), cv2.COLOR_RGB2BGR))
    finally:
        vw.release()
    return path


def linear(p0: tuple[float, float, float], p1: tuple[float, float, float], seconds: float,
           visible: Callable[[float], bool] = lambda t: True) -> Callable[[float], tuple[float, float, float] | None]:
    """A path from ``p0`` to ``p1`` (centre x, centre y, side) over ``seconds``; None where ``visible(t)`` is False."""

    def at(t: float) -> tuple[float, float, float] | None:
        if not visible(t):
            return None
        u = min(max(t / seconds, 0.0), 1.0)
        return tuple(a + (b - a) * u for a, b in zip(p0, p1))  # type: ignore[return-value]

    return at


def gap_clip(path: Path, fps: float = 20.0) -> Path:
    """3 s, one happy face in the middle, away from 1.0 s to 2.0 s (back at the same place)."""
    happy = load_face("happy", 0)
    return write_clip(path, [Actor(happy, lambda t: None if 1.0 <= t < 2.0 else (320, 240, 150))], 3.0, fps)
