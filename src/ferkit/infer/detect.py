"""Face detectors behind one interface: ``get_detector(name).detect(image) -> list[Detection]``.

Every detector works on a copy of the image scaled to at most ``max_side`` pixels (small crops scaled up to
``min_side``), optionally padded with a grey border, and maps its boxes back to the caller's pixel coordinates, so
detection time does not grow with camera resolution. Tight face crops (web photos, 48×48 dataset images) that no
detector finds are returned whole with score 0.0 when their shape says "face crop". The weights of every real
detector ship inside its pip package; nothing is downloaded at run time. ``benchmarks/detectors.py`` measures them.

    >>> from ferkit.infer.detect import get_detector
    >>> faces = get_detector("yunet").detect(rgb)          # uint8 H×W×3 RGB or H×W gray
    >>> faces[0].x, faces[0].y, faces[0].w, faces[0].h, faces[0].score
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np

from ferkit.errors import ImageError, UnknownNameError

__all__ = [
    "DEFAULT_DETECTOR",
    "Detection",
    "Detector",
    "MTCNNDetector",
    "WholeImageDetector",
    "YuNetDetector",
    "get_detector",
    "list_detectors",
    "register_detector",
]

logger = logging.getLogger(__name__)

DEFAULT_DETECTOR = "yunet"


@dataclass(frozen=True)
class Detection:
    """One face box in the input image's pixel coordinates.

    Attributes:
        x: Left edge (inclusive), ``0 <= x < image width``.
        y: Top edge (inclusive), ``0 <= y < image height``.
        w: Width in pixels, ``x + w <= image width``.
        h: Height in pixels, ``y + h <= image height``.
        score: Detector confidence in [0, 1]; ``0.0`` marks a whole-image fallback (no face was detected, but the
            image looks like a face crop).
    """

    x: int
    y: int
    w: int
    h: int
    score: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x, y, w, h)``."""
        return (self.x, self.y, self.w, self.h)

    @property
    def area(self) -> int:
        return self.w * self.h


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Validate a detector input and return it as a uint8 H×W×3 array (gray is repeated, alpha dropped)."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"detector input: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"detector input: expected dtype uint8, got {image.dtype} (scale to 0..255 and cast first)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise ImageError(f"detector input: expected an H×W gray or H×W×3 RGB array, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"detector input: empty image (shape {image.shape})")
    return image


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2  # a core dependency, imported here so that `import ferkit.infer.detect` stays cheap

    shrink = width < image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class Detector:
    """Base class: subclasses set ``name`` and implement ``_detect_raw`` on an already prepared RGB image.

    ``detect`` does the shared work: input validation, padding, downscaling, mapping boxes back, clipping, sorting
    and the whole-image fallback for face crops.

    Args:
        max_side: Longest side of the image the network sees; larger inputs are downscaled (time grows with pixels).
            ``None`` takes the detector's ``default_max_side``.
        min_side: Images whose longest side is smaller are upscaled to this (48×48 crops are below the detectors'
            comfortable face size).
        pad: Grey border added on every side before detecting, as a fraction of the longest side; ``None`` takes the
            detector's ``default_pad``. It helps detectors that miss faces touching the image edges (MTCNN: 98.8% →
            99.2% of wild-dev photos) but costs resolution, so YuNet, which finds such faces anyway, defaults to 0.
        crop_fallback: When nothing is found and the image looks like a face crop (small or near-square, not blank),
            return the whole image as one face with score 0.0.
        overlap: Of two boxes whose intersection exceeds this share of the smaller one, only the higher-scoring
            one is kept (1.0 keeps all).
    """

    name: ClassVar[str] = ""
    default_pad: ClassVar[float] = 0.0
    default_max_side: ClassVar[int] = 640
    #: True when ``_detect_raw`` may run in several threads at once on one instance (no shared mutable state).
    thread_safe: ClassVar[bool] = False
    #: The constant grey of the padding border: a neutral value that is neither skin nor a strong edge.
    pad_value: ClassVar[int] = 127

    def __init__(
        self,
        *,
        max_side: int | None = None,
        min_side: int = 160,
        pad: float | None = None,
        crop_fallback: bool = True,
        overlap: float = 0.5,
    ) -> None:
        max_side = self.default_max_side if max_side is None else max_side
        if max_side < 32 or min_side < 1 or min_side > max_side:
            raise ValueError(f"need 32 <= max_side and 1 <= min_side <= max_side, got {max_side=}, {min_side=}")
        pad = self.default_pad if pad is None else pad
        if not 0.0 <= pad <= 2.0:
            raise ValueError(f"pad must be in [0, 2], got {pad}")
        self.max_side = max_side
        self.min_side = min_side
        self.pad = pad
        self.crop_fallback = crop_fallback
        self.overlap = overlap
        # get_detector hands one instance to every caller (the server calls from several threads), and neither
        # backend promises thread safety, so calls on one instance take turns.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, max_side={self.max_side}, min_side={self.min_side}, "
            f"pad={self.pad}, crop_fallback={self.crop_fallback}, overlap={self.overlap})"
        )

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Find faces.

        Args:
            image: uint8 array, H×W×3 RGB or H×W gray (H×W×1 and H×W×4 are accepted too).

        Returns:
            Faces in ``image``'s pixel coordinates, clipped to the image, largest area first; ``[]`` when none.

        Raises:
            ImageError: The array is not a uint8 gray or RGB image.
        """
        rgb = _as_rgb(image)
        height, width = rgb.shape[:2]
        # Pad first, then scale the padded canvas: the border makes a full-frame face smaller relative to the
        # canvas, which is what the anchors need, and one scale factor maps everything back.
        border = round(self.pad * max(height, width))
        longest = max(height, width) + 2 * border
        scale = min(1.0, self.max_side / longest) if longest > self.min_side else self.min_side / longest
        work = rgb
        if scale != 1.0:
            work = _resize(rgb, max(1, round(width * scale)), max(1, round(height * scale)))
        scaled = work
        border_px = round(border * scale)
        if border_px:
            work = np.pad(
                scaled, ((border_px, border_px), (border_px, border_px), (0, 0)), constant_values=self.pad_value
            )
        sy = work.shape[0] - 2 * border_px
        sx = work.shape[1] - 2 * border_px
        if self.thread_safe:
            raw = self._detect_raw(np.ascontiguousarray(work))
        else:
            with self._lock:
                raw = self._detect_raw(np.ascontiguousarray(work))
        faces = []
        for x, y, w, h, score in raw:
            # Back to the unpadded working image, then to input pixels (per-axis: rounding may differ by axis).
            x0 = (x - border_px) * width / sx
            y0 = (y - border_px) * height / sy
            x1 = (x + w - border_px) * width / sx
            y1 = (y + h - border_px) * height / sy
            x0, y0 = max(0, round(x0)), max(0, round(y0))
            x1, y1 = min(width, round(x1)), min(height, round(y1))
            if x1 - x0 >= 2 and y1 - y0 >= 2:  # a box that lies (almost) all in the border is not a face here
                faces.append(Detection(x0, y0, x1 - x0, y1 - y0, float(score)))
        faces = _suppress_overlaps(faces, self.overlap)
        faces.sort(key=lambda d: (-d.area, -d.score))
        if not faces and self.crop_fallback and looks_like_face_crop(width, height) and _has_content(scaled):
            logger.debug(
                "%s: no face in %dx%d image that looks like a face crop; using the whole image",
                self.name,
                width,
                height,
            )
            faces = [Detection(0, 0, width, height, 0.0)]
        return faces

    def _detect_raw(self, rgb: np.ndarray) -> np.ndarray:
        """Detect on a prepared contiguous uint8 H×W×3 RGB image; return an N×5 float array (x, y, w, h, score)."""
        raise NotImplementedError


def _suppress_overlaps(faces: list[Detection], overlap: float) -> list[Detection]:
    """Greedy suppression by intersection over the smaller box: drops duplicate boxes on one face.

    Detectors run their own IoU-based NMS, but a face that fills the frame can still yield a full box plus a
    shifted partial one; IoU stays low for such a pair while the smaller box lies mostly inside the larger.
    """
    kept: list[Detection] = []
    for f in sorted(faces, key=lambda d: -d.score):
        for k in kept:
            iw = min(f.x + f.w, k.x + k.w) - max(f.x, k.x)
            ih = min(f.y + f.h, k.y + k.h) - max(f.y, k.y)
            if iw > 0 and ih > 0 and iw * ih > overlap * min(f.area, k.area):
                break
        else:
            kept.append(f)
    return kept


def _has_content(image: np.ndarray) -> bool:
    """False for blank or near-uniform images, which must not pass as a face crop."""
    return float(image[::4, ::4].std()) > 4.0


def looks_like_face_crop(width: int, height: int) -> bool:
    """Whether an image of this size is probably a tight face crop (dataset image or cropped web photo).

    Face crops are near-square (4:5 portrait to 5:4) at any size, or small (longest side ≤ 256) and not a strip.
    Camera frames (4:3, 16:9, 3:4) are neither, so an empty webcam frame stays empty.
    """
    aspect = width / height
    return 0.8 <= aspect <= 1.25 or (max(width, height) <= 256 and 0.5 <= aspect <= 2.0)


_REGISTRY: dict[str, Callable[[], Detector]] = {}
_INSTANCES: dict[str, Detector] = {}
_INSTANCES_LOCK = threading.Lock()

_D = TypeVar("_D", bound=type[Detector])


def register_detector(name: str) -> Callable[[_D], _D]:
    """Class decorator: make a ``Detector`` subclass available as ``get_detector(name)``.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def wrap(cls: _D) -> _D:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"detector {name!r} is already registered")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return wrap


def list_detectors() -> list[str]:
    """Names accepted by ``get_detector``, default first."""
    return sorted(_REGISTRY, key=lambda n: (n != DEFAULT_DETECTOR, n))


def get_detector(name: str = DEFAULT_DETECTOR) -> Detector:
    """The shared instance of a detector, created on first use with its default settings.

    Args:
        name: One of ``list_detectors()`` (case-insensitive).

    Raises:
        UnknownNameError: Unknown name; the message lists the valid names and the closest match.
        ImportError: The detector's package is not installed; the message names the ``pip install`` that fixes it.
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise UnknownNameError("detector", name, list_detectors())
    with _INSTANCES_LOCK:
        if key not in _INSTANCES:
            _INSTANCES[key] = _REGISTRY[key]()
        return _INSTANCES[key]


@register_detector("yunet")
class YuNetDetector(Detector):
    """YuNet from libfacedetection (Shiqi Yu), compiled into the ``yuface`` package: fast on CPU, no torch.

    Args:
        threshold: Minimum confidence in [0, 1].
        threads: OpenMP threads for one call. The default 1 is deliberate: libfacedetection's OpenMP workers spin,
            and on a busy machine (training running, several server requests) 2 threads took 3-8× longer per image
            than 1; at ≤640 px one thread is already fast, and servers get parallelism from concurrent requests.
        **kwargs: See ``Detector``.
    """

    # 400 px: wild-dev recall unchanged from 640 (99.6% before the crop fallback), 2.6x less CPU on a 640×480 photo
    # (16 vs 41 ms here, busy machine); multi-face recall on composed scenes 98.6% at 640 vs 97.8% at 320.
    default_max_side: ClassVar[int] = 400
    # c_detect releases the GIL and keeps no state between calls: concurrent server requests detect in parallel.
    thread_safe: ClassVar[bool] = True

    def __init__(self, *, threshold: float = 0.5, threads: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        try:
            import yuface
        except ImportError as e:
            raise ImportError(f"the 'yunet' face detector needs yuface: pip install yuface ({e})") from e
        self._c_detect = yuface.c_detect
        self.threshold = threshold
        self.threads = threads
        self._omp_set_num_threads = _find_omp_set_num_threads(yuface.__file__)

    def _detect_raw(self, rgb: np.ndarray) -> np.ndarray:
        if self._omp_set_num_threads is not None:
            # libgomp keeps this per calling thread, so it is set on every call (cheap) rather than once.
            self._omp_set_num_threads(self.threads)
        # c_detect wants BGR; rows are (score 0..100, x, y, w, h, 10 landmark coordinates, 0).
        out = self._c_detect(np.ascontiguousarray(rgb[:, :, ::-1]))
        out = out[out[:, 0] >= self.threshold * 100]
        res = out[:, [1, 2, 3, 4, 0]].astype(np.float64)
        res[:, 4] /= 100.0
        return res


def _find_omp_set_num_threads(module_file: str) -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the libgomp that the yuface wheel bundles (auditwheel puts it in ``yuface.libs``).

    That copy is private to yuface, so setting it leaves torch's own thread pool alone.
    """
    import ctypes
    from pathlib import Path

    libs = sorted((Path(module_file).parent.parent / "yuface.libs").glob("libgomp*.so*"))
    for lib in libs:
        try:
            return ctypes.CDLL(str(lib)).omp_set_num_threads  # already loaded by yuface: dlopen returns that copy
        except (OSError, AttributeError):
            continue
    logger.debug("yuface's libgomp not found; its OpenMP thread count stays at the library default")
    return None


@register_detector("mtcnn")
class MTCNNDetector(Detector):
    """MTCNN (Zhang et al. 2016) from facenet-pytorch, weights inside the wheel; slower than YuNet, needs torch.

    Args:
        threshold: Minimum final-stage (O-Net) probability in [0, 1].
        min_face: Smallest face side, in pixels of the working (downscaled) image.
        **kwargs: See ``Detector``.
    """

    default_pad = 0.25

    def __init__(self, *, threshold: float = 0.9, min_face: int = 20, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        try:
            # facenet-pytorch pins torch<2.3 in its metadata but works with newer torch, hence --no-deps.
            from facenet_pytorch import MTCNN
        except ImportError as e:
            raise ImportError(
                f"the 'mtcnn' face detector needs facenet-pytorch: pip install requests && "
                f"pip install --no-deps facenet-pytorch ({e})"
            ) from e
        self._mtcnn = MTCNN(keep_all=True, min_face_size=min_face, device="cpu", post_process=False)
        self.threshold = threshold

    def _detect_raw(self, rgb: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            boxes, probs = self._mtcnn.detect(rgb)
        if boxes is None:
            return np.zeros((0, 5))
        boxes = np.asarray(boxes, dtype=np.float64)
        probs = np.asarray(probs, dtype=np.float64)
        keep = probs >= self.threshold
        boxes, probs = boxes[keep], probs[keep]
        return np.column_stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], probs])


@register_detector("whole")
class WholeImageDetector(Detector):
    """Pseudo-detector for inputs that are already face crops (``--no-detect``): the whole image, score 1.0."""

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Return the whole image as one face (the input is validated like any detector's)."""
        height, width = _as_rgb(image).shape[:2]
        return [Detection(0, 0, width, height, 1.0)]

    def _detect_raw(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        return np.array([[0, 0, width, height, 1.0]])
