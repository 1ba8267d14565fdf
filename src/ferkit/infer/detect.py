"""Face detectors behind one interface: ``get_detector(name).detect(image) -> list[Detection]``.

Every detector works on a copy of the image scaled to a working size (``detect_size``: 400 px on the longest side for
ordinary photos, more for large ones, see ``Detector.working_side``; small crops are scaled up to ``min_side``) and
maps its boxes back to the caller's pixel coordinates, so detection time does not grow with camera resolution while
the faces in a 12-megapixel group photo stay large enough to find. Working images over ``tile`` pixels are cut into
overlapping tiles (run in parallel where the backend allows) and the boxes merged. When nothing is found, the image is
searched once more with a grey border around it: a face that fills the whole frame (web crops, 48×48 dataset images)
becomes small enough for the detector's anchors. No box is ever made up: every ``Detection`` carries the detector's
confidence (``det_score``), and only ``--no-detect`` (the "whole" pseudo-detector) returns the whole image. The
weights of every real detector ship inside its pip package; nothing is downloaded at run time.
``benchmarks/detectors.py`` measures them.

    >>> from ferkit.infer.detect import get_detector
    >>> faces = get_detector("yunet").detect(rgb)          # uint8 H×W×3 RGB or H×W gray
    >>> faces[0].x, faces[0].y, faces[0].w, faces[0].h, faces[0].det_score
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np

from ferkit.errors import ConfigError, ImageError, UnknownNameError

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

log = logging.getLogger(__name__)

DEFAULT_DETECTOR = "yunet"


@dataclass(frozen=True)
class Detection:
    """One face box in the input image's pixel coordinates.

    Attributes:
        x: Left edge (inclusive), ``0 <= x < image width``.
        y: Top edge (inclusive), ``0 <= y < image height``.
        w: Width in pixels, ``x + w <= image width``.
        h: Height in pixels, ``y + h <= image height``.
        det_score: Detector confidence in [0, 1] (1.0 for the whole-image pseudo-detector of ``--no-detect``).
    """

    x: int
    y: int
    w: int
    h: int
    det_score: float

    @property
    def score(self) -> float:
        """Alias of ``det_score`` (the name before ferkit 0.3)."""
        return self.det_score

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


def _tiles(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``tile`` covering ``0..length`` with at least ``overlap`` shared between
    neighbours, spread evenly (the last window ends at ``length``)."""
    if length <= tile:
        return [0]
    n = -(-(length - overlap) // (tile - overlap))  # ceil
    step = (length - tile) / (n - 1)
    return [round(i * step) for i in range(n)]


class Detector:
    """Base class: subclasses set ``name`` and implement ``_detect_raw`` on an already prepared RGB image.

    ``detect`` does the shared work: input validation, scaling, tiling, the padded second look, mapping boxes back,
    clipping, merging and sorting.

    Args:
        detect_size: Longest side of the image the network sees. ``None`` (default) chooses it from the image:
            ``max_side`` for ordinary photos and up to ``large_side`` for large ones (``working_side``). A number fixes
            it (images are never upscaled past their own size beyond ``min_side``); time grows with its square.
        max_side: The working size for ordinary photos (``None``: the detector's ``default_max_side``).
        min_side: Images whose longest side is smaller are upscaled to this (48×48 crops are below the detectors'
            comfortable face size).
        pad: Grey border added on every side of the first look, as a fraction of the longest side; ``None`` takes
            the detector's ``default_pad``.
        retry_pad: When the first look finds nothing, look again with a border of this fraction on every side
            (0 turns the second look off): it makes a face that fills the frame small enough for the detector.
        overlap: Of two boxes whose intersection exceeds this share of the smaller one, only the higher-scoring
            one is kept (1.0 keeps all); this also merges the boxes of neighbouring tiles.
        tile: Working images with a side over this many pixels are searched in overlapping tiles of this size, which
            bounds the detector's memory (YuNet: 650 MB for one 4000×3000 pass). Below it one pass is faster: tiles
            of 1024 px on a 1600×1200 working image cover 2.2× its pixels and took 1.5 s instead of 0.4 s here.
    """

    name: ClassVar[str] = ""
    default_pad: ClassVar[float] = 0.0
    default_max_side: ClassVar[int] = 640
    #: Largest automatic working size (``working_side``).
    large_side: ClassVar[int] = 1600
    #: Automatic working size = this share of the longest side, between ``max_side`` and ``large_side``.
    large_fraction: ClassVar[float] = 0.4
    default_retry_pad: ClassVar[float] = 0.1
    #: Faces at least this many pixels wide in the base look are taken from it alone (see ``detect``).
    small_face: ClassVar[int] = 48
    #: True when ``_detect_raw`` may run in several threads at once on one instance (no shared mutable state).
    thread_safe: ClassVar[bool] = False
    #: The constant grey of the padding border: a neutral value that is neither skin nor a strong edge.
    pad_value: ClassVar[int] = 127

    def __init__(
        self,
        *,
        detect_size: int | None = None,
        max_side: int | None = None,
        min_side: int = 160,
        pad: float | None = None,
        retry_pad: float | None = None,
        overlap: float = 0.5,
        tile: int = 2048,
    ) -> None:
        max_side = self.default_max_side if max_side is None else max_side
        if detect_size is not None and not 32 <= int(detect_size) <= 16384:
            raise ConfigError(f"detect size must be between 32 and 16384 pixels, got {detect_size}")
        if max_side < 32 or min_side < 1 or min_side > max_side:
            raise ConfigError(f"need 32 <= max_side and 1 <= min_side <= max_side, got {max_side=}, {min_side=}")
        pad = self.default_pad if pad is None else pad
        retry_pad = self.default_retry_pad if retry_pad is None else retry_pad
        if not (0.0 <= pad <= 2.0 and 0.0 <= retry_pad <= 2.0):
            raise ConfigError(f"pad and retry_pad must be in [0, 2], got {pad}, {retry_pad}")
        if tile < 128:
            raise ConfigError(f"tile must be at least 128 pixels, got {tile}")
        self.detect_size = None if detect_size is None else int(detect_size)
        self.max_side = max_side
        self.min_side = min_side
        self.pad = pad
        self.retry_pad = retry_pad
        self.overlap = overlap
        self.tile = tile
        # get_detector hands one instance to every caller (the server calls from several threads), and neither
        # backend promises thread safety, so calls on one instance take turns unless the backend says otherwise.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, detect_size={self.detect_size}, max_side={self.max_side}, "
            f"min_side={self.min_side}, pad={self.pad}, retry_pad={self.retry_pad}, overlap={self.overlap})"
        )

    def working_side(self, width: int, height: int) -> int:
        """The longest side of the working image for a ``width``×``height`` input (before any border).

        Automatic: ``max_side`` up to images of ``max_side / large_fraction`` (1000 px for YuNet), then
        ``large_fraction`` of the image (a 1920×1080 frame at 768, a 4000×3000 photo at the cap ``large_side``
        1600). At 400 px a face narrower than ~3% of the image (120 px in a 4000-px photo) is below YuNet's smallest
        anchor; at 1600 the 80-150 px faces of a 12-MP group photo are found (``benchmarks/detectors.py``).
        """
        longest = max(width, height)
        if self.detect_size is not None:
            side = min(longest, self.detect_size)
        else:
            side = min(longest, max(self.max_side, min(self.large_side, round(longest * self.large_fraction))))
        return max(side, self.min_side)

    def detect(self, image: np.ndarray, *, source_size: tuple[int, int] | None = None) -> list[Detection]:
        """Find faces.

        Args:
            image: uint8 array, H×W×3 RGB or H×W gray (H×W×1 and H×W×4 are accepted too).
            source_size: ``(width, height)`` of the full image when ``image`` is a reduced decode of it (a large JPEG
                read at 1/2, see ``ferkit.images.read_image``): the working size is chosen for the full image, so it
                is searched as it would be at full size. Boxes stay in ``image``'s pixels.

        Returns:
            Faces in ``image``'s pixel coordinates, clipped to the image, largest area first; ``[]`` when none.

        Raises:
            ImageError: The array is not a uint8 gray or RGB image.
        """
        rgb = _as_rgb(image)
        height, width = rgb.shape[:2]
        longest = max(height, width)
        side = self.working_side(*(source_size or (width, height)))
        if source_size is not None:  # never past the image's own size (beyond min_side), as for a full decode
            side = min(side, max(longest, self.min_side))
        base_side = max(min(longest, self.max_side), self.min_side)
        base = self._scaled(rgb, base_side)
        faces = self._look(base, width, height, self.pad)
        if side > base_side * 1.25:
            # A large photo: one more look at the higher resolution for the faces too small for the base look.
            # Large faces come from the base look only: at high resolution they outgrow the detector's anchors and
            # come back as partial boxes with low scores (wild-dev portraits of 2000+ px).
            small = self.small_face * longest / base_side  # in input pixels
            faces += [d for d in self._look(self._scaled(rgb, side), width, height, self.pad) if max(d.w, d.h) < small]
        if not faces and self.retry_pad > self.pad:
            faces = self._look(base, width, height, self.retry_pad)
            if faces:
                log.debug("%s: found %d face(s) in a %dx%d image only with a border", self.name, len(faces), width,
                          height)
        faces = _suppress_overlaps(faces, self.overlap)
        faces.sort(key=lambda d: (-d.area, -d.det_score))
        return faces

    @staticmethod
    def _scaled(rgb: np.ndarray, side: int) -> np.ndarray:
        h, w = rgb.shape[:2]
        k = side / max(h, w)
        return rgb if k == 1.0 else _resize(rgb, max(1, round(w * k)), max(1, round(h * k)))

    def _look(self, work: np.ndarray, width: int, height: int, pad: float) -> list[Detection]:
        """Detect on the working image with a ``pad`` border (the canvas rescaled to keep its longest side) or on
        tiles of it; boxes in input pixels."""
        sh, sw = work.shape[:2]
        if pad:
            # Pad, then scale the padded canvas back to the working size: the border makes a full-frame face
            # smaller relative to the canvas, which is what the anchors need, at no extra cost in pixels.
            border = round(pad * max(sh, sw))
            canvas = np.pad(work, ((border, border), (border, border), (0, 0)), constant_values=self.pad_value)
            k = max(sh, sw) / max(canvas.shape[:2])
            canvas = _resize(canvas, max(1, round(canvas.shape[1] * k)), max(1, round(canvas.shape[0] * k)))
            # canvas pixel → working pixel: (c / k) - border
            raw = self._run(canvas)
            boxes = [((x / k) - border, (y / k) - border, w / k, h / k, s) for x, y, w, h, s in raw]
        elif max(sh, sw) > self.tile:
            boxes = self._tiled(work)
        else:
            boxes = [tuple(r) for r in self._run(work)]
        out = []
        for x, y, w, h, s in boxes:
            # Working pixels → input pixels (per axis: rounding may differ by axis), clipped to the image.
            x0, y0 = max(0, round(x * width / sw)), max(0, round(y * height / sh))
            x1, y1 = min(width, round((x + w) * width / sw)), min(height, round((y + h) * height / sh))
            if x1 - x0 >= 2 and y1 - y0 >= 2:  # a box that lies (almost) all in the border is not a face here
                out.append(Detection(x0, y0, x1 - x0, y1 - y0, float(s)))
        return out

    def _tiled(self, work: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        """Boxes on overlapping ``tile``-sized windows of a large working image.

        A box touching a window's inner edge is dropped: the overlap (a quarter of a window) holds whole, in a
        neighbouring window, any face small enough to be missed by the base look (see ``detect``).
        """
        sh, sw = work.shape[:2]
        t = self.tile
        ov = t // 4
        jobs = [(x, y) for y in _tiles(sh, t, ov) for x in _tiles(sw, t, ov)]

        def one(xy: tuple[int, int]) -> list[tuple[float, float, float, float, float]]:
            x, y = xy
            win = np.ascontiguousarray(work[y : y + t, x : x + t])
            wh, ww = win.shape[:2]
            keep = []
            for bx, by, bw, bh, s in self._run(win):
                inner = ((x > 0 and bx <= 1) or (y > 0 and by <= 1) or (x + ww < sw and bx + bw >= ww - 1)
                         or (y + wh < sh and by + bh >= wh - 1))
                if not inner:
                    keep.append((bx + x, by + y, bw, bh, s))
            return keep

        boxes: list[tuple[float, float, float, float, float]] = []
        if self.thread_safe and len(jobs) > 1:
            from concurrent.futures import ThreadPoolExecutor

            from ferkit.infer.runtime import cpu_threads

            with ThreadPoolExecutor(max_workers=min(len(jobs), cpu_threads())) as pool:
                for part in pool.map(one, jobs):
                    boxes.extend(part)
        else:
            for xy in jobs:
                boxes.extend(one(xy))
        return boxes

    def _run(self, rgb: np.ndarray) -> np.ndarray:
        if self.thread_safe:
            return self._detect_raw(np.ascontiguousarray(rgb))
        with self._lock:
            return self._detect_raw(np.ascontiguousarray(rgb))

    def _detect_raw(self, rgb: np.ndarray) -> np.ndarray:
        """Detect on a prepared contiguous uint8 H×W×3 RGB image; return an N×5 float array (x, y, w, h, score)."""
        raise NotImplementedError


def _suppress_overlaps(faces: list[Detection], overlap: float) -> list[Detection]:
    """Greedy suppression by intersection over the smaller box: drops duplicate boxes on one face.

    Detectors run their own IoU-based NMS, but a face that fills the frame can still yield a full box plus a
    shifted partial one, and neighbouring tiles report one face twice; IoU stays low for such a pair while the
    smaller box lies mostly inside the larger.
    """
    kept: list[Detection] = []
    for f in sorted(faces, key=lambda d: -d.det_score):
        for k in kept:
            iw = min(f.x + f.w, k.x + k.w) - max(f.x, k.x)
            ih = min(f.y + f.h, k.y + k.h) - max(f.y, k.y)
            if iw > 0 and ih > 0 and iw * ih > overlap * min(f.area, k.area):
                break
        else:
            kept.append(f)
    return kept


_REGISTRY: dict[str, Callable[..., Detector]] = {}
_INSTANCES: dict[tuple[str, int | None], Detector] = {}
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


def get_detector(name: str = DEFAULT_DETECTOR, *, detect_size: int | None = None) -> Detector:
    """The shared instance of a detector, created on first use with its default settings.

    Args:
        name: One of ``list_detectors()`` (case-insensitive).
        detect_size: The working size (see ``Detector``); ``None`` chooses it per image. One instance is shared per
            name and size.

    Raises:
        UnknownNameError: Unknown name; the message lists the valid names and the closest match.
        ConfigError: ``detect_size`` outside 32..16384.
        ImportError: The detector's package is not installed; the message names the ``pip install`` that fixes it.
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise UnknownNameError("detector", name, list_detectors())
    with _INSTANCES_LOCK:
        if (key, detect_size) not in _INSTANCES:
            factory = _REGISTRY[key]
            _INSTANCES[key, detect_size] = factory() if detect_size is None else factory(detect_size=detect_size)
        return _INSTANCES[key, detect_size]


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
    # threshold 0.65, chosen from the curve of benchmarks/detector_threshold.py (issue 26: an espresso cup seen from
    # above came out a "happy" face at 0.62). On 511 face-less views (38 photos and noise whole, and 256-px crops of
    # them) 0.5/0.6/0.65/0.75 invent 12/4/1/0 faces (left at 0.65: a 3x-magnified crop of printed text, 0.74), while
    # recall on wild-dev stays 99.6% throughout, on FER2013 48x48 crops falls 98.3/97.7/97.0/93.3%, on multi-face
    # scenes 98.6/97.8/97.1/97.1% and on a 12-MP group photo 97.2/97.2/97.2/94.4%: 0.65 is the last point where
    # every recall stays within 1.5 points of its best. --min-det-score 0.75 removes the last one at that cost.

    def __init__(self, *, threshold: float = 0.65, threads: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        try:
            import yuface
        except ImportError as e:
            raise ImportError(f"the 'yunet' face detector needs yuface: pip install yuface ({e})") from e
        self._c_detect = _buffered_c_detect(yuface.__file__) or yuface.c_detect
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


def _buffered_c_detect(module_file: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """libfacedetection's ``facedetect_cnn`` called through ctypes with one reusable result buffer per thread.

    ``yuface.c_detect`` mallocs the library's 36,864-byte result buffer (``DETECT_BUFFER_SIZE``) on every call and
    never frees it: RSS grew 7 MB per 200 frames, 130 MB over a 10-minute video tracked every 5th frame
    (``benchmarks/video_speed.py``), and a server leaked 36 KB per request. This calls the same function in the same
    library (same results, and ctypes releases the GIL too) with a buffer that is kept. None when the library or its
    symbol is not found (then ``yuface.c_detect`` is used as it is).
    """
    import ctypes
    from pathlib import Path

    try:
        lib = ctypes.CDLL(str(Path(module_file).parent / "libfacedetection.so"))
        fn = lib._Z14facedetect_cnnPhS_iii  # int* facedetect_cnn(uchar* buf, uchar* bgr, int w, int h, int step)
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.POINTER(ctypes.c_int)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    local = threading.local()

    def c_detect(bgr: np.ndarray) -> np.ndarray:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.zeros(0x9000, np.uint8)
        bgr = np.ascontiguousarray(bgr)
        h, w = bgr.shape[:2]
        res = fn(buf.ctypes.data, bgr.ctypes.data, w, h, w * 3)
        n = res[0] if res else 0
        # the buffer holds the face count (int32), then 16 int16 per face: score, x, y, w, h, 10 landmark coordinates
        return np.frombuffer(buf, np.int16, count=16 * n, offset=4).reshape(n, 16).copy()

    return c_detect


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
    log.debug("yuface's libgomp not found; its OpenMP thread count stays at the library default")
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

    def detect(self, image: np.ndarray, *, source_size: tuple[int, int] | None = None) -> list[Detection]:
        """Return the whole image as one face (the input is validated like any detector's)."""
        height, width = _as_rgb(image).shape[:2]
        return [Detection(0, 0, width, height, 1.0)]

    def _detect_raw(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        return np.array([[0, 0, width, height, 1.0]])
