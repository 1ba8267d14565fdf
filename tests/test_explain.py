"""Explanations (Grad-CAM through captum) on real faces: the map follows the face, randomised weights change it
(Adebayo et al. 2018's sanity check), one- and two-face photos, the CLI with bad input, the server's PNG route."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("captum")

from ferkit import Recognizer  # noqa: E402
from ferkit.cli import main  # noqa: E402
from ferkit.images import load_image  # noqa: E402
from shared_data import VALIDATION, WILD, needs_wild

PHOTO = WILD / "happy" / "train__066_y_m_h_a.jpg"


def _gray(img: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img


def _centroid(h: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[: h.shape[0], : h.shape[1]]
    w = h / h.sum()
    return float((xs * w).sum()), float((ys * w).sum())


def _scene(photo: np.ndarray, offsets: list[tuple[int, int]], side: int = 260, size: tuple[int, int] = (1000, 520),
           ) -> np.ndarray:
    """A plain grey canvas with the photo, resized to ``side``, pasted at each (x, y)."""
    import cv2

    canvas = np.full((size[1], size[0], 3), 120, np.uint8)
    small = cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA)
    for x, y in offsets:
        canvas[y : y + side, x : x + side] = small
    return canvas


@pytest.fixture(scope="module")
def rec() -> Recognizer:
    return Recognizer("fer3")


@pytest.fixture(scope="module")
def whole() -> Recognizer:
    return Recognizer("fer3", detector="whole")


@needs_wild
def test_one_face_photo(rec: Recognizer) -> None:
    ex = rec.explain(str(PHOTO))
    img = load_image(PHOTO)
    assert len(ex.faces) == 1 and ex.overlay.shape == (*img.shape[:2], 3) and ex.overlay.dtype == np.uint8
    fx = ex.faces[0]
    assert fx.heatmap.shape == (48, 48) and fx.heatmap.min() >= 0 and fx.heatmap.max() == pytest.approx(1.0)
    assert fx.face_overlay.shape == (192, 192, 3) and fx.target == fx.face.label == "happy"
    x0, y0, x1, y1 = fx.region
    assert not np.array_equal(ex.overlay[y0:y1, x0:x1], img[y0:y1, x0:x1])  # the map is drawn over the face
    d = ex.to_dict()["faces"][0]
    assert d["explained"] == "happy" and x0 <= d["hottest"][0] < x1 and y0 <= d["hottest"][1] < y1


@needs_wild
def test_the_map_moves_with_the_face_in_a_photo(rec: Recognizer) -> None:
    """The same face at two places in a photo: the hot point moves by the same offset, the map itself stays."""
    photo = load_image(PHOTO)
    a = rec.explain(_scene(photo, [(60, 130)]))
    b = rec.explain(_scene(photo, [(640, 90)]))
    assert len(a.faces) == len(b.faces) == 1
    (ax, ay), (bx, by) = a.to_dict()["faces"][0]["hottest"], b.to_dict()["faces"][0]["hottest"]
    assert abs((bx - ax) - 580) <= 12 and abs((by - ay) + 40) <= 12, ((ax, ay), (bx, by))
    assert np.corrcoef(a.faces[0].heatmap.ravel(), b.faces[0].heatmap.ravel())[0, 1] > 0.9


@needs_wild
def test_the_map_moves_with_the_face_inside_the_crop(whole: Recognizer) -> None:
    """Within what the classifier sees (no detector to re-centre it), a face moved right by 36 of 96 pixels moves
    the map's centre of mass right by about 18 of the model's 48 (measured: 17.0 on average)."""
    import cv2

    files = sorted((VALIDATION / "happy").glob("*.jpg"))[:8]
    shifts = []
    for f in files:
        face = cv2.resize(_gray(load_image(f)), (48, 48))
        maps = []
        for ox in (6, 42):
            canvas = np.full((96, 96), 128, np.uint8)
            canvas[24:72, ox : ox + 48] = face
            maps.append(whole.explain(canvas, detect=False).faces[0].heatmap)
        (x0, y0), (x1, y1) = _centroid(maps[0]), _centroid(maps[1])
        shifts.append((x1 - x0, y1 - y0))
    dx, dy = np.mean(shifts, axis=0)
    assert 12 <= dx <= 24 and abs(dy) <= 4, shifts


@needs_wild
def test_randomised_weights_give_a_different_map(whole: Recognizer) -> None:
    """Model-parameter randomisation: a trained network's maps are not what an untrained one of the same
    architecture draws (if they were, the method would show the image, not the model)."""
    import torch

    from ferkit.infer.explain import GradCam
    from ferkit.models import create_model
    from ferkit.preprocess import Preprocess

    trained, meta = __import__("ferkit.modelfile", fromlist=["load_model"]).load_model("fer3")
    torch.manual_seed(0)
    random = create_model(meta.arch, num_classes=len(meta.classes), in_chans=1).eval()
    files = sorted((VALIDATION / "sad").glob("*.jpg"))[:16]
    faces = np.stack([_gray(load_image(f)) for f in files])
    x = torch.from_numpy(Preprocess.of(meta).numpy(faces))
    target = [1] * len(faces)
    a, b = GradCam(trained)(x, target), GradCam(random)(x, target)
    again = GradCam(trained)(x, target)
    assert np.allclose(a, again, atol=1e-5)  # deterministic
    corr = [np.corrcoef(p.ravel(), q.ravel())[0, 1] for p, q in zip(a, b) if p.std() > 0 and q.std() > 0]
    assert np.nanmean(corr) < 0.5, corr


@needs_wild
def test_two_face_photo(rec: Recognizer) -> None:
    sad = load_image(sorted((WILD / "sad").glob("*.jpg"))[0])
    happy = load_image(PHOTO)
    import cv2

    scene = _scene(happy, [(60, 130)])
    scene[130:390, 640:900] = cv2.resize(sad, (260, 260), interpolation=cv2.INTER_AREA)
    ex = rec.explain(scene)
    assert len(ex.faces) == 2
    regions = [fx.region for fx in ex.faces]
    assert regions[0][2] <= regions[1][0] or regions[1][2] <= regions[0][0]  # side by side, not overlapping
    for fx, d in zip(ex.faces, ex.to_dict()["faces"]):
        x0, y0, x1, y1 = fx.region
        assert x0 <= d["hottest"][0] < x1 and y0 <= d["hottest"][1] < y1  # each map on its own face
    only_sad = rec.explain(scene, target="sad")
    assert [fx.target for fx in only_sad.faces] == ["sad", "sad"]


@needs_wild
def test_cli_writes_overlays_and_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   one_line_error: Callable[[str], str]) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = tmp_path / "out"
    rc = main(["explain", str(PHOTO), str(bad), str(tmp_path / "missing.png"), "--out", str(out)])
    o, e = capsys.readouterr()
    assert rc == 1
    lines = e.strip().splitlines()
    assert len(lines) == 2 and str(bad) in lines[0] and "missing.png" in lines[1]
    for line in lines:
        one_line_error(line)
    assert (out / "train__066_y_m_h_a.explain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "train__066_y_m_h_a.face1.png").is_file() and not (out / "notes.explain.png").exists()
    assert "face 1" in o and "explained happy" in o
    assert bad.read_text() == "not an image"  # inputs are never touched
    assert main(["explain", str(PHOTO), "--out", str(out), "--target", "angry"]) == 2
    assert "unknown class 'angry'" in one_line_error(capsys.readouterr().err)


def test_without_torch_it_says_which_install(tmp_path: Path) -> None:
    img = Path(__file__).resolve().parents[1] / "src" / "ferkit" / "assets" / "astronaut.jpg"
    code = ("import sys; sys.modules['torch'] = None; from ferkit.cli import main; "
            f"sys.exit(main(['explain', {str(img)!r}, '--out', {str(tmp_path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "pip install 'ferkit[train]'" in err[0] and err[0].startswith("ferkit: error:")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def client() -> Iterator:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ferkit.serve.app import create_app

    with TestClient(create_app(model="fer3", max_concurrency=1)) as c:
        yield c


@needs_wild
def test_server_returns_the_overlay_png(client) -> None:  # noqa: ANN001
    data = PHOTO.read_bytes()
    r = client.post("/v1/explain", files={"file": ("face.jpg", data, "image/jpeg")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    assert r.headers["x-faces"] == "1" and json.loads(r.headers["x-explanation"])[0]["explained"] == "happy"
    from PIL import Image
    import io

    assert Image.open(io.BytesIO(r.content)).size == Image.open(PHOTO).size
    assert client.post("/v1/explain", content=b"not an image", headers={"content-type": "image/jpeg"}
                       ).status_code == 415
    assert client.post("/v1/explain?colour=red", content=data, headers={"content-type": "image/jpeg"}
                       ).status_code == 422
    assert client.post("/v1/explain?target=angry", content=data, headers={"content-type": "image/jpeg"}
                       ).status_code == 422
