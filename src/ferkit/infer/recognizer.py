"""Recognise facial expressions in photos: detect faces, crop and normalise them, classify them in one batch.

    >>> from ferkit import Recognizer
    >>> rec = Recognizer()                       # bundled "fer3": happy, sad, neutral
    >>> res = rec.predict("photo.jpg")
    >>> [(f.label, round(f.score, 2), f.box) for f in res]
    [('happy', 0.93, (212, 80, 141, 141))]
    >>> res.to_json()
    >>> annotated = res.plot()                   # RGB array with boxes and labels

This module imports neither torch nor the training or server stacks; the backend loads on ``Recognizer(...)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ferkit.errors import ConfigError, ImageError, ImageTooSmallError
from ferkit.images import Decoded, ImageInput, load_image, read_image, resize_face
from ferkit.infer.detect import DEFAULT_DETECTOR, Detection, Detector, WholeImageDetector, get_detector
from ferkit.infer.results import CROP_MARGIN, Face, Results, crop_box, draw_faces
from ferkit.infer.runtime import Runtime, make_runtime, prefer_passive_openmp

if TYPE_CHECKING:  # pragma: no cover
    from ferkit.modelfile import ModelMeta

log = logging.getLogger(__name__)
#: The label of a face whose top calibrated score is below ``Recognizer(min_score=...)``.
UNCERTAIN = "uncertain"

# Face, Results, crop_box and draw_faces live in ferkit.infer.results; re-exported here for existing imports.
__all__ = ["CROP_MARGIN", "MIN_IMAGE_SIDE", "Face", "Recognizer", "Results", "crop_box", "draw_faces"]

#: Images with a shorter side than this cannot hold a recognisable face and are refused.
MIN_IMAGE_SIDE = 8
#: Largest number of faces sent to the backend in one call (bounds memory on huge batches).
MAX_CLASSIFY_BATCH = 512
#: The most context ``crop_margin`` may add on each side of a face box: 1.0 makes the crop three times the box,
#: where the face is a ninth of what the classifier sees (wild-dev accuracy already falls from 0.05 to 0.25).
MAX_CROP_MARGIN = 1.0


class Recognizer:
    """Facial expression recognition: face detector + expression classifier.

    Args:
        model: a bundled model's name (``"fer3"``, ``"fer7"``), a run directory, a ``.safetensors`` model file or an
            exported ``.onnx`` file.
        backend: ``"auto"`` (onnxruntime when installed, else PyTorch), ``"onnx"`` or ``"torch"``.
        detector: a detector name (see ``ferkit.infer.detect.list_detectors()``) or a ``Detector`` instance.
        device: ``"cpu"`` or a CUDA device (PyTorch backend).
        crop_margin: context added on each side of a detector box before classifying (fraction of its longer side).
        min_det_score: drop faces whose detector confidence (``Face.det_score``) is below this, on top of the
            detector's own threshold (YuNet: 0.65).
        min_score: label a face ``"uncertain"`` when its top calibrated score is below this (its ``score`` and
            ``scores`` are kept); None never abstains. The model card suggests a value.
        detect_size: longest side of the image the detector sees; None (default) chooses it per image: 400 px for
            ordinary photos, up to 1600 for large ones (see ``ferkit.infer.detect.Detector.working_side``).
        draft: decode a large JPEG (path or bytes) at reduced size when the detector does not need every pixel
            (Pillow's draft mode, see :meth:`read`: a 12-MP photo at half size, a quarter of the memory); False
            decodes every pixel.

    Raises:
        ModelFileError: ``model`` is missing or not a ferkit model.
        UnknownNameError: an unknown detector or backend name.
        ConfigError: ``min_det_score`` outside [0, 1], ``detect_size`` outside 32..16384, ``crop_margin`` not a
            number from 0 to ``MAX_CROP_MARGIN``.
        DeviceError: ``device`` is not on this machine.
        ImportError: a backend or detector whose package is not installed, naming the ``pip install`` that fixes it.
    """

    def __init__(self, model: str | os.PathLike = "fer3", backend: str = "auto", detector: str | Detector =
                 DEFAULT_DETECTOR, device: str = "cpu", *, crop_margin: float = CROP_MARGIN,
                 min_det_score: float | None = None, detect_size: int | None = None,
                 min_score: float | None = None, draft: bool = True) -> None:
        prefer_passive_openmp()  # before the detector loads its OpenMP runtime; see ferkit.infer.runtime
        if min_score is not None and not 0.0 <= min_score <= 1.0:
            raise ConfigError(f"min_score must be between 0 and 1, got {min_score}")
        self.min_score = min_score
        if min_det_score is not None and not 0.0 <= min_det_score <= 1.0:
            raise ConfigError(f"min_det_score must be between 0 and 1, got {min_det_score}")
        self.min_det_score = min_det_score
        if not (isinstance(crop_margin, (int, float)) and 0.0 <= crop_margin <= MAX_CROP_MARGIN):  # NaN fails too
            raise ConfigError(f"crop_margin must be a number from 0 to {MAX_CROP_MARGIN:g} (a fraction of the face "
                              f"box's longer side added on each side), got {crop_margin!r}")
        # The detector next: a wrong name should fail before seconds are spent loading the model; and YuNet runs
        # 2-20× slower when torch's OpenMP runtime was loaded before its own.
        self.detector: Detector = (get_detector(detector, detect_size=detect_size) if isinstance(detector, str)
                                   else detector)
        self.runtime: Runtime = make_runtime(model, backend, device=device)
        self.meta: ModelMeta = self.runtime.meta
        self.classes: tuple[str, ...] = tuple(self.meta.classes)
        self.crop_margin = crop_margin
        self.draft = draft
        self.model = str(model)

    @property
    def backend(self) -> str:
        """The backend in use: ``"onnx"`` or ``"torch"``."""
        return self.runtime.name

    def __repr__(self) -> str:
        return (f"Recognizer(model={self.model!r}, classes={list(self.classes)}, backend={self.backend!r}, "
                f"detector={self.detector.name!r})")

    # -- public API ------------------------------------------------------------------------------------------------

    def predict(self, image: ImageInput, detect: bool = True) -> Results:
        """Find the faces in one image and recognise their expressions.

        A large JPEG given as a path or bytes is decoded at reduced size when the detector does not need every
        pixel (see :meth:`read`); boxes are always in the full image's pixels (``Results.size``). An animation or
        multi-page file gives its first frame, and ``Results.frames_total`` says how many there were.

        Args:
            image: a path, encoded bytes, a PIL image, or a uint8 array (H×W gray or H×W×3 **RGB**).
            detect: False to classify the whole image as one face (for inputs that are already face crops).

        Raises:
            ImageError: the image cannot be read, or is too small or too large.
        """
        return self.predict_batch([image], detect=detect)[0]

    def predict_batch(self, images: Sequence[ImageInput], detect: bool = True) -> list[Results]:
        """Like :meth:`predict` for several images; all their faces are classified in one batch.

        Raises:
            ImageError: one of the images cannot be read (nothing is returned for the others).
        """
        arrays: list[np.ndarray | Decoded] = []
        paths = []
        for i, src in enumerate(images):
            path = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None
            arrays.append(self.read(src, name=path or (f"image {i}" if len(images) > 1 else None)))
            paths.append(path)
        return self.predict_arrays(arrays, paths, detect=detect)

    def classify(self, crops: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities for face crops (no detection).

        Args:
            crops: uint8 N×H×W (gray) or N×H×W×3 (RGB), or a list of H×W / H×W×3 arrays of any sizes; each is
                converted to gray and resized to the model's input size.

        Returns:
            float32 N×C, columns in ``self.classes`` order; rows sum to 1.
        """
        s = self.meta.input_size
        if isinstance(crops, np.ndarray) and crops.dtype == np.uint8 and crops.ndim == 3 and crops.shape[1:] == (s, s):
            faces = crops
        else:
            if isinstance(crops, np.ndarray) and crops.ndim not in (3, 4):
                raise ImageError(f"crops: expected N×H×W or N×H×W×3, got shape {crops.shape}")
            items = [load_image(c, name=f"crop {i}") for i, c in enumerate(crops)]
            faces = np.stack([resize_face(c, s) for c in items]) if items else np.zeros((0, s, s), np.uint8)
        return self._classify_faces(faces)

    def track(self, source: str | os.PathLike | int, every: int = 1, *, keep_images: bool = False,
              **kwargs: Any) -> Iterator[Results]:
        """Follow the faces of a video file, a webcam (``int`` index) or a folder of frames (sorted by name).

        Yields one :class:`Results` per processed frame (``frame``, ``time`` set); each face carries ``track`` (its
        ID, stable through the video) and ``smoothed`` scores. Frames are decoded as a stream. ``kwargs`` go to
        :func:`ferkit.infer.track.track_units` (``tau``, ``lost_seconds``). See :mod:`ferkit.infer.track`.

        Raises:
            VideoError: the source cannot be opened, or stops decoding part-way (after its frames so far).
        """
        from ferkit.infer.sources import DEFAULT_FOLDER_FPS, frames, video_fps
        from ferkit.infer.track import track_units

        if isinstance(source, int) or not os.path.isfile(source):  # webcam, folder, or missing (frames() says so)
            fps = 0.0 if isinstance(source, int) else DEFAULT_FOLDER_FPS
        else:
            fps = video_fps(os.fspath(source))
        for _, res in track_units(self, frames(source, every), fps=fps, every=every, keep_images=keep_images,
                                  **kwargs):
            yield res

    def explain(self, image: ImageInput, detect: bool = True, target: str | None = None) -> Any:
        """Recognise the faces in one image and explain each prediction with a Grad-CAM heat map.

        Args:
            image: as for :meth:`predict`.
            detect: False to explain the whole image as one face.
            target: the class to explain (default: each face's predicted class).

        Returns:
            A :class:`ferkit.infer.explain.Explanation`: ``.faces[i].heatmap`` (S×S in [0, 1]),
            ``.faces[i].face_overlay`` (the face with its map) and ``.overlay`` (the photo with all maps).

        Raises:
            ImageError: the image cannot be read.
            ImportError: torch is not installed (``pip install 'ferkit[train]'``).
        """
        from ferkit.infer.explain import explain

        return explain(self, image, detect=detect, target=target)

    # -- building blocks (used by ``ferkit predict`` and the server) ------------------------------------------------

    @staticmethod
    def load(source: ImageInput, name: str | None = None, *, max_pixels: int | None = None) -> np.ndarray:
        """``load_image`` plus the minimum-size check: uint8 H×W or H×W×3 RGB.

        Args:
            max_pixels: refuse larger images before decoding them (default: ``ferkit.images.MAX_PIXELS``).

        Raises:
            ImageTooLargeError: over ``max_pixels``.
            ImageTooSmallError: smaller than ``MIN_IMAGE_SIDE`` on a side.
            ImageError: unreadable.
        """
        arr = load_image(source, name=name) if max_pixels is None else load_image(source, name=name,
                                                                                    max_pixels=max_pixels)
        h, w = arr.shape[:2]
        Recognizer._check_size(w, h, name, source)
        return arr

    @staticmethod
    def _check_size(w: int, h: int, name: str | None, source: object) -> None:
        if min(h, w) < MIN_IMAGE_SIDE:
            label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "image")
            raise ImageTooSmallError(f"{label}: image too small ({w}×{h} pixels; a face needs at least "
                             f"{MIN_IMAGE_SIDE}×{MIN_IMAGE_SIDE})")

    def read(self, source: ImageInput, name: str | None = None, *,
             max_pixels: int | None = None) -> np.ndarray | Decoded:
        """Like :meth:`load`, but a file or bytes holding a large JPEG is decoded at the largest reduction (1/2,
        1/4, 1/8) that keeps the size this recognizer's detector works at (a 4000×3000 photo at 2000×1500: a
        quarter of the memory); also says how many frames the file holds. :meth:`predict_arrays` takes the result
        and reports boxes in the full image's pixels. Arrays and PIL images come back as :meth:`load` gives them.

        Raises:
            ImageTooLargeError: over ``max_pixels`` (the full size the header declares, checked before decoding).
            ImageTooSmallError, ImageError: as for :meth:`load`.
        """
        if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
            return self.load(source, name, max_pixels=max_pixels)
        # a detector without working_side (or draft=False): every pixel decoded
        need = getattr(self.detector, "working_side", None) if self.draft else None
        kw = {} if max_pixels is None else {"max_pixels": max_pixels}
        dec = read_image(source, name=name, need_side=need, **kw)  # type: ignore[arg-type]
        self._check_size(dec.size[0], dec.size[1], name, source)
        return dec

    def detect(self, image: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes ``(x, y, w, h)`` in a loaded image, largest first."""
        return [d.box for d in self.detections(image)]

    def detections(self, image: np.ndarray, source_size: tuple[int, int] | None = None) -> list[Detection]:
        """The detector's faces in a loaded image (box and ``det_score``), largest first, ``min_det_score`` applied.

        ``source_size``: the full image's ``(width, height)`` when ``image`` is a reduced decode of it (boxes stay
        in ``image``'s pixels).
        """
        found = (self.detector.detect(image) if source_size is None
                 else self.detector.detect(image, source_size=source_size))
        if self.min_det_score is not None:
            found = [d for d in found if d.det_score >= self.min_det_score]
        return found

    def crops(self, image: np.ndarray, boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
        """uint8 N×S×S gray face crops for ``boxes`` (margin added, squared, kept inside the image, resized)."""
        import cv2

        s = self.meta.input_size
        if not boxes:
            return np.zeros((0, s, s), np.uint8)
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        h, w = gray.shape
        out = np.empty((len(boxes), s, s), np.uint8)
        for i, b in enumerate(boxes):
            x0, y0, x1, y1 = crop_box(b, w, h, self.crop_margin)
            out[i] = resize_face(gray[y0:y1, x0:x1], s)
        return out

    def predict_arrays(self, images: Sequence[np.ndarray | Decoded], paths: Sequence[str | None] | None = None, *,
                       detect: bool = True, keep_images: bool = True) -> list[Results]:
        """Recognise faces in already loaded images (uint8 H×W or H×W×3 RGB, or :meth:`read`'s results), one
        classifier call for all faces. Boxes are in the full image's pixels (a reduced decode's are scaled up)."""
        paths = list(paths) if paths is not None else [None] * len(images)
        decoded = [d if isinstance(d, Decoded) else Decoded(d, (int(d.shape[1]), int(d.shape[0]))) for d in images]
        all_boxes: list[list[tuple[int, int, int, int]]] = []
        all_crops = []
        all_scores: list[list[float | None]] = []
        # No detector ran (--no-detect, the "whole" pseudo-detector): no confidence to report.
        whole = not detect or isinstance(self.detector, WholeImageDetector)
        for dec in decoded:
            img = dec.image
            found = (self.detections(img, dec.size if dec.reduction > 1 else None) if detect
                     else [Detection(0, 0, img.shape[1], img.shape[0], 1.0)])
            boxes = [d.box for d in found]
            # crops come from the decoded pixels, boxes are reported in the full image's
            all_crops.append(self.crops(img, boxes))
            all_boxes.append([_full_box(b, dec) for b in boxes] if dec.reduction > 1 else boxes)
            all_scores.append([None if whole else d.det_score for d in found])
        probs = self._classify_faces(np.concatenate(all_crops) if all_crops else
                                     np.zeros((0, self.meta.input_size, self.meta.input_size), np.uint8))
        out, k = [], 0
        for dec, path, boxes, dets in zip(decoded, paths, all_boxes, all_scores):
            faces = [self._face(b, probs[k + j], dets[j]) for j, b in enumerate(boxes)]
            k += len(boxes)
            out.append(Results(faces, dec.image if keep_images else None, path, size=dec.size,
                               frames_total=dec.frames if dec.frames > 1 else None))
        return out

    # -- internals ---------------------------------------------------------------------------------------------------

    def _face(self, box: tuple[int, int, int, int], p: np.ndarray, det_score: float | None = None) -> Face:
        i = int(p.argmax())
        # Abstain when the calibrated top score is below min_score: the label says so, the scores stay as they are.
        label = UNCERTAIN if self.min_score is not None and p[i] < self.min_score else self.classes[i]
        return Face(tuple(int(v) for v in box), label, float(p[i]),  # type: ignore[arg-type]
                    {c: float(v) for c, v in zip(self.classes, p)}, det_score=det_score)

    def _classify_faces(self, faces: np.ndarray) -> np.ndarray:
        """uint8 N×S×S → probabilities, normalised as in training: ``(x/255 - mean) / std``."""
        from ferkit.preprocess import Preprocess

        if len(faces) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        pre, out = Preprocess.of(self.meta), []
        for i in range(0, len(faces), MAX_CLASSIFY_BATCH):
            out.append(self.runtime.probs(pre.numpy(faces[i:i + MAX_CLASSIFY_BATCH])))
        probs = np.concatenate(out).astype(np.float32, copy=False)
        if not np.isfinite(probs).all():  # never NaN in any output: the load-time check (check_runtime) missed it
            from ferkit.errors import ModelFileError

            raise ModelFileError(f"{self.model}: the model gave NaN or infinite scores (damaged weights?)")
        return probs


def _full_box(box: tuple[int, int, int, int], dec: Decoded) -> tuple[int, int, int, int]:
    """A box in a reduced decode's pixels → the full image's (pixel ``x`` covers ``x·k … x·k + k-1``), clipped."""
    k = dec.reduction
    W, H = dec.size
    x0, y0 = min(box[0] * k, W - 1), min(box[1] * k, H - 1)
    x1, y1 = min((box[0] + box[2]) * k, W), min((box[1] + box[3]) * k, H)
    return (x0, y0, max(1, x1 - x0), max(1, y1 - y0))
