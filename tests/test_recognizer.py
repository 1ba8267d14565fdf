"""Recognizer, Face and Results on real photos (../shared/data/wild-dev) with real model files made in tmp dirs.

A randomly initialised fastcnn is enough for the contract: shapes, boxes, probabilities, input kinds, errors.
Accuracy is tested with the bundled models.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ferkit.errors import ImageError, ModelFileError
from ferkit.infer.recognizer import CROP_MARGIN, Face, Recognizer, Results, crop_box
from ferkit.modelfile import ModelMeta, save_model
from ferkit.models import create_model
from shared_data import WILD

CLASSES = ("happy", "sad", "neutral")
#: Real photos in which YuNet finds one face (tight web crops of about 200 px).
FACES = ("happy/train__istock1_10.jpg", "sad/train__119677-765849.jpg", "neutral/train__istock1_106.jpg")

needs_wild = pytest.mark.skipif(not all((WILD / f).is_file() for f in FACES), reason=f"no wild-dev photos at {WILD}")


def make_model(path: Path, seed: int = 0, classes: tuple[str, ...] = CLASSES) -> Path:
    torch.manual_seed(seed)
    net = create_model("fastcnn", num_classes=len(classes))
    return save_model(path, net, ModelMeta(arch="fastcnn", classes=classes, name="test"))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "m.safetensors")


@pytest.fixture(scope="module")
def rec(model_file: Path) -> Recognizer:
    return Recognizer(model_file, backend="torch")


@pytest.fixture(scope="module")
def face_path() -> Path:
    if not (WILD / FACES[0]).is_file():
        pytest.skip(f"no wild-dev photos at {WILD}")
    return WILD / FACES[0]


@pytest.fixture(scope="module")
def scene(face_path: Path) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A 640×480 RGB photo with the real face pasted at a known place, and that place (x, y, w, h)."""
    face = np.asarray(Image.open(face_path).convert("RGB"))
    canvas = np.full((480, 640, 3), 200, np.uint8)
    x, y = 380, 140
    canvas[y:y + face.shape[0], x:x + face.shape[1]] = face
    return canvas, (x, y, face.shape[1], face.shape[0])


def inside(box: tuple[int, int, int, int], region: tuple[int, int, int, int]) -> bool:
    x, y, w, h = box
    rx, ry, rw, rh = region
    return rx - 2 <= x and ry - 2 <= y and x + w <= rx + rw + 2 and y + h <= ry + rh + 2


# -- input kinds --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["path", "str", "rgb", "gray", "pil", "bytes"])
def test_every_input_kind_finds_the_face(rec: Recognizer, scene: tuple, tmp_path: Path, kind: str) -> None:
    rgb, region = scene
    png = tmp_path / "scene.png"
    Image.fromarray(rgb).save(png)
    inputs = {"path": png, "str": str(png), "rgb": rgb, "gray": np.asarray(Image.fromarray(rgb).convert("L")),
              "pil": Image.fromarray(rgb), "bytes": png.read_bytes()}
    res = rec.predict(inputs[kind])
    assert isinstance(res, Results)
    assert len(res) == 1, res
    face = res[0]
    assert inside(face.box, region) and face.box[2] > 80, (face.box, region)
    assert all(isinstance(v, int) for v in face.box)
    assert face.label in CLASSES and face.scores[face.label] == face.score == max(face.scores.values())
    assert res.path == (str(png) if kind in ("path", "str") else None)
    assert res.image is not None and res.image.shape[:2] == (480, 640)


def test_input_kinds_agree(rec: Recognizer, scene: tuple) -> None:
    rgb, _ = scene
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    a, b, c = rec.predict(rgb), rec.predict(Image.fromarray(rgb)), rec.predict(buf.getvalue())
    assert a[0].box == b[0].box == c[0].box
    assert a[0].scores == pytest.approx(b[0].scores, abs=1e-6) == c[0].scores


def test_exif_rotation_boxes_in_rotated_image(rec: Recognizer, scene: tuple, tmp_path: Path) -> None:
    """A camera JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise to view): boxes refer to the
    upright image."""
    rgb, (x, y, w, h) = scene
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)))  # what the camera wrote: 640 high, 480 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "sideways.jpg"
    stored.save(p, exif=exif, quality=95)
    res = rec.predict(p)
    assert res.image.shape[:2] == (480, 640)
    assert len(res) == 1 and inside(res[0].box, (x, y, w, h))


def test_no_face_gives_empty_results(rec: Recognizer) -> None:
    flat = np.full((480, 640, 3), 90, np.uint8)  # a wide, featureless image: no face, and no crop fallback
    res = rec.predict(flat)
    assert len(res) == 0 and res.faces == [] and res.to_dict() == {"file": None, "faces": []}


def test_detect_false_uses_whole_image(rec: Recognizer, scene: tuple) -> None:
    rgb, _ = scene
    res = rec.predict(rgb, detect=False)
    assert [f.box for f in res] == [(0, 0, 640, 480)]


# -- Results ------------------------------------------------------------------------------------------------------

def test_results_to_dict_json_and_plot(rec: Recognizer, face_path: Path) -> None:
    res = rec.predict(face_path)
    d = res.to_dict()
    assert d["file"] == str(face_path)
    assert len(d["faces"]) == 1
    f = d["faces"][0]
    assert set(f) == {"box", "label", "score", "scores", "det_score"} and 0.6 <= f["det_score"] <= 1.0
    assert isinstance(f["box"], list) and len(f["box"]) == 4
    assert list(f["scores"]) == list(CLASSES)
    assert sum(f["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert json.loads(res.to_json()) == d
    assert list(res) == res.faces and res[0] is res.faces[0]

    img = res.plot()
    assert img.dtype == np.uint8 and img.shape == res.image.shape
    assert not np.array_equal(img, res.image), "nothing drawn"
    x, y, w, h = res[0].box
    colour_pixels = (img != res.image).any(axis=2)
    assert colour_pixels[y:y + h, x].any() or colour_pixels[y:y + h, x + w - 1].any(), "no box edge drawn"
    assert np.array_equal(np.asarray(Image.open(face_path).convert("RGB")), res.image), "plot changed the input"


def test_plot_gray_input_returns_rgb(rec: Recognizer, scene: tuple) -> None:
    gray = np.asarray(Image.fromarray(scene[0]).convert("L"))
    res = rec.predict(gray)
    out = res.plot()
    assert out.shape == (480, 640, 3) and out.dtype == np.uint8


def test_plot_without_image_raises() -> None:
    with pytest.raises(ValueError, match="image"):
        Results([Face((0, 0, 5, 5), "happy", 0.9, {"happy": 0.9})]).plot()


def test_face_to_dict_is_json_ready() -> None:
    f = Face((np.int64(1), 2, 3, 4), "sad", np.float32(0.5), {"sad": np.float32(0.5), "happy": 0.5})  # type: ignore
    assert json.loads(json.dumps(f.to_dict())) == {"box": [1, 2, 3, 4], "label": "sad", "score": 0.5,
                                                   "scores": {"sad": 0.5, "happy": 0.5}}


# -- classify -----------------------------------------------------------------------------------------------------

@needs_wild
def test_classify_shapes_and_probabilities(rec: Recognizer) -> None:
    photos = [np.asarray(Image.open(WILD / f).convert("RGB")) for f in FACES]
    faces48 = np.stack([np.asarray(Image.fromarray(p).convert("L").resize((48, 48))) for p in photos])
    rgb64 = np.stack([np.asarray(Image.fromarray(p).resize((64, 64))) for p in photos])
    for crops in (faces48, rgb64, photos, [faces48[0], rgb64[1], photos[2]]):
        p = rec.classify(crops)
        assert p.shape == (3, len(CLASSES)) and p.dtype == np.float32
        assert np.all(p >= 0) and np.allclose(p.sum(1), 1.0, atol=1e-5)
    assert np.allclose(rec.classify(faces48), rec.classify(list(faces48)), atol=1e-6)
    assert rec.classify(np.zeros((0, 48, 48), np.uint8)).shape == (0, len(CLASSES))


def test_classify_rejects_bad_shape(rec: Recognizer) -> None:
    with pytest.raises(ImageError):
        rec.classify(np.zeros((48, 48), np.uint8))


@needs_wild
def test_predict_batch_classifies_all_faces_in_one_call(rec: Recognizer, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [WILD / f for f in FACES]
    single = [rec.predict(p) for p in paths]
    calls = []
    real = rec.runtime.probs
    monkeypatch.setattr(rec.runtime, "probs", lambda x: calls.append(len(x)) or real(x))
    batch = rec.predict_batch(paths)
    assert calls == [3]
    assert [r.path for r in batch] == [str(p) for p in paths]
    for a, b in zip(single, batch):
        assert [f.box for f in a] == [f.box for f in b]
        assert a[0].scores == pytest.approx(b[0].scores, abs=1e-5)


@pytest.mark.parametrize("box,size", [
    ((100, 50, 80, 120), (640, 480)),  # room all round: centred
    ((0, 0, 80, 120), (640, 480)),  # at the corner: shifted inside
    ((600, 400, 40, 80), (640, 480)),  # at the far corner
    ((3, 0, 200, 199), (208, 199)),  # a tight face crop: the square shrinks to the image
])
def test_crop_box_is_square_and_inside(box: tuple, size: tuple) -> None:
    w, h = size
    x0, y0, x1, y1 = crop_box(box, w, h, 0.1)
    assert x1 - x0 == y1 - y0 == min(round(max(box[2:]) * 1.2), w, h)
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    if box == (100, 50, 80, 120):
        assert (x0 + x1) / 2 == pytest.approx(140, abs=1) and (y0 + y1) / 2 == pytest.approx(110, abs=1)
    assert 0 <= CROP_MARGIN <= 0.3


def test_face_at_image_corner_is_cropped(rec: Recognizer, face_path: Path) -> None:
    """A face touching the image edges: the enlarged crop reaches outside the image and must still work."""
    face = np.asarray(Image.open(face_path).convert("RGB"))
    res = rec.predict(face)
    assert len(res) == 1
    x, y, w, h = res[0].box
    assert 0 <= x and 0 <= y and x + w <= face.shape[1] and y + h <= face.shape[0]


# -- backends -----------------------------------------------------------------------------------------------------

def test_onnx_backend_matches_torch(model_file: Path, rec: Recognizer, scene: tuple) -> None:
    pytest.importorskip("onnxruntime")
    onnx_rec = Recognizer(model_file, backend="onnx")
    assert onnx_rec.backend == "onnx" and rec.backend == "torch"
    assert onnx_rec.classes == rec.classes == CLASSES
    a, b = rec.predict(scene[0]), onnx_rec.predict(scene[0])
    assert [f.box for f in a] == [f.box for f in b]
    assert a[0].scores == pytest.approx(b[0].scores, abs=1e-4)


def test_exported_onnx_file_loads(model_file: Path, rec: Recognizer, scene: tuple, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from ferkit.export import export_onnx

    out = export_onnx(str(model_file), str(tmp_path / "m.onnx"), parity_images=8)["path"]
    onnx_rec = Recognizer(out)
    assert onnx_rec.backend == "onnx" and onnx_rec.classes == CLASSES and onnx_rec.meta.arch == "fastcnn"
    a, b = rec.predict(scene[0]), onnx_rec.predict(scene[0])
    assert a[0].scores == pytest.approx(b[0].scores, abs=1e-4)
    with pytest.raises(ValueError, match="onnx"):
        Recognizer(out, backend="torch")


def test_converted_onnx_is_cached_by_content(model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             scene: tuple) -> None:
    pytest.importorskip("onnxruntime")
    from ferkit import export

    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path))
    first = Recognizer(model_file, backend="onnx")
    cached = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(cached) == 1
    monkeypatch.setattr(export, "onnx_bytes", lambda *a, **k: pytest.fail("converted again despite the cache"))
    again = Recognizer(model_file, backend="onnx")
    assert again.predict(scene[0])[0].scores == pytest.approx(first.predict(scene[0])[0].scores, abs=1e-6)
    monkeypatch.undo()
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path))
    cached[0].write_bytes(b"damaged")  # a damaged cache entry is replaced, not fatal
    assert Recognizer(model_file, backend="onnx").backend == "onnx"
    assert cached[0].stat().st_size > 1000


def test_torch_backend_fuses_conv_bn(rec: Recognizer) -> None:
    assert rec.runtime.fused
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in rec.runtime.net.modules())


def test_missing_onnxruntime_names_the_extra(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match=r"pip install 'ferkit\[onnx\]'"):
        Recognizer(model_file, backend="onnx")
    assert Recognizer(model_file).backend == "torch"  # auto falls back


def test_unknown_backend_and_detector(model_file: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        Recognizer(model_file, backend="tensorrt")
    with pytest.raises(ValueError, match="yunet"):
        Recognizer(model_file, detector="yunett")


# -- errors -------------------------------------------------------------------------------------------------------

def _not_ferkit_safetensors(p: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(p))
    return p


@pytest.mark.parametrize("make", [
    lambda d: d / "missing.safetensors",
    lambda d: (d / "notes.safetensors").write_text("hello") and d / "notes.safetensors",
    lambda d: _not_ferkit_safetensors(d / "plain.safetensors"),
    lambda d: (d / "bad.onnx").write_bytes(b"\x08\x01garbage") and d / "bad.onnx",
    lambda d: d,  # a folder without a model
], ids=["missing", "text", "no-metadata", "bad-onnx", "empty-folder"])
def test_bad_model_raises_model_file_error(tmp_path: Path, make) -> None:
    path = make(tmp_path)
    with pytest.raises(ModelFileError) as e:
        Recognizer(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter's notice
def test_onnx_without_ferkit_metadata(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    net = create_model("fastcnn", num_classes=3).eval()
    p = tmp_path / "plain.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 48, 48),), str(p), dynamo=False)
    with pytest.raises(ModelFileError, match="ferkit metadata"):
        Recognizer(p)


@pytest.mark.parametrize("source,match", [
    (np.zeros((1, 1, 3), np.uint8), "too small"),
    (b"", "empty"),
    (b"not an image at all", "cannot identify"),
    (np.zeros((5, 5, 5), np.uint8), "shape"),
])
def test_bad_images_raise_image_error(rec: Recognizer, source: object, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        rec.predict(source)


def test_predict_batch_names_the_bad_image(rec: Recognizer, tmp_path: Path, scene: tuple) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="bad.jpg"):
        rec.predict_batch([scene[0], bad])


def test_import_is_light() -> None:
    code = ("import sys, ferkit.infer.recognizer\n"
            "print(' '.join(m for m in ('lightning', 'fastapi', 'onnx', 'matplotlib', 'torchmetrics', 'onnxruntime')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
