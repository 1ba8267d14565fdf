"""Explanations: for each face, a Grad-CAM heat map of the regions that drove its predicted expression.

Grad-CAM (Selvaraju et al. 2017) weights the last convolutional feature maps by the gradient of the class score and
keeps the positive part; captum's ``LayerGradCam`` computes it (a maintained implementation rather than our own;
``grad-cam`` would have worked too, captum needs nothing beyond torch). An ensemble's map is the sum over its
members' last convolutions. The map is computed on the face crop the classifier saw and pasted back over the crop's
region of the photo, so it moves with the face.

Needs torch (``pip install 'ferkit[train]'``): gradients are not available in onnxruntime.

    >>> rec = Recognizer()
    >>> ex = rec.explain("photo.jpg")
    >>> ex.overlay                    # RGB photo with every face's heat map, boxes and labels
    >>> ex.faces[0].heatmap          # float32 S×S in [0, 1] over the model's input crop
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from ferkit.errors import ConfigError, FerkitError

if TYPE_CHECKING:
    from ferkit.images import ImageInput
    from ferkit.infer.recognizer import Recognizer
    from ferkit.infer.results import Face, Results

log = logging.getLogger(__name__)

#: Weight of the heat map's colours over the image (0.45: the face stays readable under the colours).
ALPHA = 0.45
#: Side of the face overlay image (the 48-pixel crop enlarged so a person can see it).
FACE_SIDE = 192


@dataclass
class FaceExplanation:
    """One face's explanation.

    Attributes:
        face: the recognised face (box, label, scores).
        target: the class explained (the predicted one unless asked otherwise).
        heatmap: float32 S×S in [0, 1] over the model's input crop (S = the model's input size).
        region: ``(x0, y0, x1, y1)``: where that crop lies in the photo.
        face_overlay: uint8 RGB FACE_SIDE×FACE_SIDE: the crop with the heat map over it.
    """

    face: Face
    target: str
    heatmap: np.ndarray
    region: tuple[int, int, int, int]
    face_overlay: np.ndarray


@dataclass
class Explanation:
    """The explanations of the faces in one photo, and the photo with all heat maps drawn over it."""

    results: Results
    faces: list[FaceExplanation] = field(default_factory=list)
    overlay: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """Per face: box, label, score, the explained class and the hottest point of the map in photo pixels."""
        out = []
        for fx in self.faces:
            d = fx.face.to_dict()
            d["explained"] = fx.target
            d["hottest"] = list(hottest_point(fx.heatmap, fx.region))
            out.append(d)
        return {"file": self.results.path, "faces": out}


def _torch() -> Any:
    from ferkit._extras import require

    return require("torch", "train", what="explanations (Grad-CAM)")


def last_feature_layer(net: Any) -> Any:
    """The module whose output Grad-CAM weighs: the last convolution, or the BatchNorm/ReLU right after it in the
    same block (``conv_bn``), so the map is taken from the activations the head reads."""
    import torch.nn as nn

    modules = list(net.modules())
    convs = [i for i, mod in enumerate(modules) if isinstance(mod, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"{type(net).__name__}: no convolution to explain (Grad-CAM needs one)")
    i = convs[-1]
    while i + 1 < len(modules) and isinstance(modules[i + 1], (nn.BatchNorm2d, nn.ReLU)):
        i += 1
    return modules[i]


class GradCam:
    """Grad-CAM for a ferkit network, through captum's ``LayerGradCam`` on each member's last feature layer."""

    def __init__(self, net: Any) -> None:
        _torch()
        from ferkit._extras import require

        require("captum", "train", what="explanations (Grad-CAM)")
        from captum.attr import LayerGradCam

        members = list(getattr(net, "members", [net]))  # an Ensemble: every member's evidence counts
        self.net = net.eval()
        self.cams = [LayerGradCam(self.net, last_feature_layer(m)) for m in members]

    def __call__(self, x: Any, target: Sequence[int]) -> np.ndarray:
        """float32 N×S×S maps in [0, 1] for a normalised N×C×S×S batch and one target class per face."""
        torch = _torch()
        from captum.attr import LayerAttribution

        s = x.shape[-1]
        total = None
        with torch.enable_grad():
            for cam in self.cams:
                a = cam.attribute(x, target=list(target), relu_attributions=True)
                a = LayerAttribution.interpolate(a, (s, s), interpolate_mode="bilinear")
                total = a if total is None else total + a
        maps = total.detach().float().sum(1).clamp_min(0).cpu().numpy()
        peak = maps.reshape(len(maps), -1).max(1).reshape(-1, 1, 1)
        return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0).astype(np.float32)


def _network(rec: Recognizer) -> tuple[Any, Any]:
    """The recognizer's model as a torch network (loaded once and kept on the recognizer)."""
    cached = getattr(rec, "_explain_net", None)
    if cached is None:
        _torch()
        from ferkit.modelfile import load_model, resolve_model_path

        path = resolve_model_path(rec.model)
        if path.suffix.lower() == ".onnx":
            sib = path.with_suffix(".safetensors")
            if not sib.is_file():
                raise ConfigError(f"{rec.model}: an ONNX file has no gradients to explain; use its .safetensors "
                                  "model file")
            path = sib
        net, meta = load_model(path)
        cached = (GradCam(net), meta)
        rec._explain_net = cached
    return cached


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """uint8 RGB colours of a [0, 1] map (OpenCV's JET: blue cold, red hot)."""
    import cv2

    return cv2.cvtColor(cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET),
                        cv2.COLOR_BGR2RGB)


def blend(rgb: np.ndarray, heat: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """``rgb`` with the heat map's colours over it, weighted by ``alpha`` × the map (cold regions stay clear)."""
    w = (alpha * np.clip(heat, 0, 1))[..., None]
    return (rgb.astype(np.float32) * (1 - w) + heat_colours(heat).astype(np.float32) * w).round().astype(np.uint8)


def hottest_point(heat: np.ndarray, region: tuple[int, int, int, int]) -> tuple[int, int]:
    """The map's maximum in photo pixels ``(x, y)``."""
    iy, ix = np.unravel_index(int(np.argmax(heat)), heat.shape)
    x0, y0, x1, y1 = region
    s = heat.shape[0]
    return int(x0 + (ix + 0.5) * (x1 - x0) / s), int(y0 + (iy + 0.5) * (y1 - y0) / s)


def explain(rec: Recognizer, image: ImageInput, *, detect: bool = True, target: str | None = None) -> Explanation:
    """Recognise the faces in ``image`` and explain each prediction (see :meth:`Recognizer.explain`).

    Raises:
        ImageError: the image cannot be read.
        ConfigError: ``target`` is not one of the model's classes.
        ImportError: torch or captum is missing, naming the ``pip install`` that fixes it.
    """
    import cv2

    from ferkit.infer.results import crop_box, draw_faces
    from ferkit.preprocess import Preprocess

    cam, meta = _network(rec)
    if target is not None and target not in rec.classes:
        from ferkit.errors import UnknownNameError

        raise UnknownNameError("class", target, rec.classes)
    path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    arr = rec.load(image, name=path)
    res = rec.predict_arrays([arr], [path], detect=detect)[0]
    if not res.faces:
        return Explanation(res, [], draw_faces(arr, []))
    boxes = [f.box for f in res.faces]
    crops = rec.crops(arr, boxes)
    torch = _torch()
    x = torch.from_numpy(Preprocess.of(meta).numpy(crops))
    wanted = [rec.classes.index(target) if target else int(np.argmax([f.scores[c] for c in rec.classes]))
              for f in res.faces]
    maps = cam(x, wanted)
    rgb = cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB) if arr.ndim == 2 else arr.copy()
    h, w = rgb.shape[:2]
    photo = rgb.copy()
    faces = []
    for f, crop, heat, k in zip(res.faces, crops, maps, wanted):
        region = crop_box(f.box, w, h, rec.crop_margin)  # the square the classifier saw
        x0, y0, x1, y1 = region
        big = cv2.resize(heat, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        photo[y0:y1, x0:x1] = blend(photo[y0:y1, x0:x1], big)
        face_rgb = cv2.cvtColor(cv2.resize(crop, (FACE_SIDE, FACE_SIDE), interpolation=cv2.INTER_CUBIC),
                                cv2.COLOR_GRAY2RGB)
        face_img = blend(face_rgb, cv2.resize(heat, (FACE_SIDE, FACE_SIDE), interpolation=cv2.INTER_LINEAR))
        faces.append(FaceExplanation(f, rec.classes[k], heat, region, face_img))
    return Explanation(res, faces, draw_faces(photo, res.faces))


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of a uint8 RGB image."""
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB array
        raise FerkitError("could not encode the overlay as PNG")
    return buf.tobytes()


def run_explain(inputs: list[str], out_dir: str, *, model: str = "fer3", detector: str = "yunet",
                backend: str = "auto", no_detect: bool = False, target: str | None = None,
                out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``ferkit explain``: for each image, ``NAME.explain.png`` (the photo with heat maps) and
    ``NAME.faceN.png`` (each face with its map) in ``out_dir``; one line per face on ``out``.

    Returns:
        0, 1 if an input could not be used (the others are still explained), 2 if nothing could start.
    """
    import sys

    from ferkit.fsutil import atomic_write_bytes, check_output_dir, display
    from ferkit.infer.recognizer import Recognizer
    from ferkit.infer.sources import expand_inputs

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr

    def fail(message: str, code: int = 1) -> int:
        err.write(f"ferkit: error: {display(message)}\n")
        err.flush()
        return code

    try:
        check_output_dir(out_dir, create=False)  # a file, a read-only folder …: refused before any work
        _torch()
        rec = Recognizer(model, backend=backend, detector="whole" if no_detect else detector)
        if target is not None and target not in rec.classes:
            from ferkit.errors import UnknownNameError

            raise UnknownNameError("class", target, rec.classes)
        _network(rec)
    except FerkitError as e:
        return fail(str(e), e.exit_code)
    except ImportError as e:
        return fail(str(e).splitlines()[0], 1)
    dest = Path(out_dir)
    jobs = list(expand_inputs(inputs))
    given = {Path(f).resolve() for f, _, _ in jobs}
    status = 0
    for file, save_as, error in jobs:
        if error is not None:
            status = fail(f"{file}: {error}")
            continue
        try:
            ex = explain(rec, file, detect=not no_detect, target=target)
        except FerkitError as e:
            status = fail(str(e) if file in str(e) else f"{file}: {e}")
            continue
        stem = save_as.with_suffix("")
        targets = [dest / f"{stem}.explain.png"] + [dest / f"{stem}.face{i + 1}.png" for i in range(len(ex.faces))]
        if any(t.resolve() in given for t in targets):  # never write over an input
            status = fail(f"{file}: an output would replace an input; choose another --out")
            continue
        try:
            targets[0].parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(targets[0], encode_png(ex.overlay))
            for t, fx in zip(targets[1:], ex.faces):
                atomic_write_bytes(t, encode_png(fx.face_overlay))
        except OSError as e:
            status = fail(f"{dest}: cannot write the explanation of {file} ({e.strerror or e})")
            continue
        if not ex.faces:
            out.write(f"{file}\tno face\t{targets[0]}\n")
        for i, fx in enumerate(ex.faces):
            f = fx.face
            hx, hy = hottest_point(fx.heatmap, fx.region)
            out.write(f"{file}\tface {i + 1}\tbox {','.join(map(str, f.box))}\t{f.label} {f.score:.3f}\t"
                      f"explained {fx.target}, hottest at ({hx},{hy})\t{targets[i + 1]}\n")
    out.flush()
    return status


__all__ = ["Explanation", "FaceExplanation", "GradCam", "blend", "encode_png", "explain", "hottest_point",
           "run_explain"]
