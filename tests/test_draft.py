"""Large JPEGs decoded at reduced size (Pillow's draft mode) with boxes in the full image's pixels, and multi-frame
files through the API and the server: the output says when only the first frame was read."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferkit import Recognizer
from ferkit.images import DRAFT_MIN_SIDE, Decoded, draft_reduction, read_image
from ferkit.infer.results import label_colour
from shared_data import WILD, needs_wild

W, H = 4000, 3000


def _canvas(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    c0, c1 = rng.integers(40, 216, size=(2, 3))
    return np.broadcast_to(c0 * (1 - t) + c1 * t, (height, width, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, int, int, int]], np.ndarray]:
    """A 12-MP group photo: 12 real wild-dev portraits (faces ~100-200 px) pasted on a gradient, saved as JPEG;
    (path, pasted rectangles, the upright pixels)."""
    files = sorted(WILD.glob("*/*.jpg"))[::37][:12]
    if len(files) < 12:
        pytest.skip(f"not enough wild-dev photos at {WILD}")
    canvas = _canvas(W, H).copy()
    rects = []
    for i, f in enumerate(files):
        photo = Image.open(f).convert("RGB")
        side = 180 + 10 * i
        k = side / max(photo.size)
        photo = photo.resize((round(photo.width * k), round(photo.height * k)), Image.BILINEAR)
        x, y = 250 + (i % 4) * 950, 300 + (i // 4) * 950
        canvas[y:y + photo.height, x:x + photo.width] = np.asarray(photo)
        rects.append((x, y, photo.width, photo.height))
    path = tmp_path_factory.mktemp("draft") / "crowd.jpg"
    Image.fromarray(canvas).save(path, quality=90)
    return path, rects, canvas


@pytest.fixture(scope="module")
def rec() -> Recognizer:
    return Recognizer("fer3")


@pytest.fixture(scope="module")
def full_and_drafted(rec: Recognizer, crowd: tuple) -> tuple:
    path = crowd[0]
    full = rec.predict_arrays([rec.load(path)], [str(path)])[0]  # every pixel decoded
    return full, rec.predict(path)


def _found(boxes: list[tuple[int, int, int, int]], rects: list[tuple[int, int, int, int]]) -> int:
    """Pasted portraits with a box centred inside them."""
    return sum(any(x <= bx + bw / 2 < x + w and y <= by + bh / 2 < y + h for bx, by, bw, bh in boxes)
               for x, y, w, h in rects)


def _pair_up(a: list, b: list) -> list[tuple]:
    """Each face of ``a`` with the face of ``b`` nearest to it (by box centre)."""
    def c(face: object) -> np.ndarray:
        x, y, w, h = face.box  # type: ignore[attr-defined]
        return np.array([x + w / 2, y + h / 2])

    return [(x, min(b, key=lambda y: float(np.linalg.norm(c(x) - c(y))))) for x in a]


def test_reduction_rule() -> None:
    assert draft_reduction(4000, 3000, 1600) == 2  # 2000 px still holds the 1600-px look
    assert draft_reduction(8000, 6000, 1600) == 4
    assert draft_reduction(4000, 3000, 3000) == 1  # --detect-size 3000 needs every pixel
    assert draft_reduction(3000, 2000, 1200) == 1  # below 2 × DRAFT_MIN_SIDE: decoded in full
    assert draft_reduction(640, 480, 400) == 1 and DRAFT_MIN_SIDE == 1600


@needs_wild
def test_large_jpeg_is_decoded_at_half_size(rec: Recognizer, crowd: tuple) -> None:
    dec = rec.read(crowd[0])
    assert isinstance(dec, Decoded) and dec.reduction == 2 and dec.size == (W, H)
    assert dec.image.shape == (H // 2, W // 2, 3) and dec.frames == 1
    every = Recognizer("fer3", draft=False).read(crowd[0])
    assert every.reduction == 1 and every.image.shape == (H, W, 3) and every.size == (W, H)


@needs_wild
def test_drafted_boxes_are_in_full_pixels_and_match_a_full_decode(full_and_drafted: tuple, crowd: tuple) -> None:
    full, drafted = full_and_drafted
    rects = crowd[1]
    assert drafted.size == full.size == (W, H) and drafted.image.shape[:2] == (H // 2, W // 2)
    assert drafted.image_scale == 0.5 and full.image_scale == 1.0
    assert _found([f.box for f in full], rects) == len(rects)
    assert _found([f.box for f in drafted], rects) >= len(rects) - 1
    assert abs(len(drafted) - len(full)) <= 1
    worst = max(max(abs(p - q) for p, q in zip(a.box, b.box)) for a, b in _pair_up(list(drafted), list(full)))
    assert worst <= 6, f"a drafted box is {worst} px away from the full decode's"
    agree = sum(a.label == b.label for a, b in _pair_up(list(drafted), list(full)))
    assert agree >= len(drafted) - 2


@needs_wild
def test_plot_draws_the_boxes_on_the_decoded_image(full_and_drafted: tuple) -> None:
    _, drafted = full_and_drafted
    out = drafted.plot()
    assert out.shape == drafted.image.shape
    f = drafted[0]
    x, y, w, h = (round(v / 2) for v in f.box)  # where the face is in the half-size image
    edge = out[y + h // 2, x]  # the middle of the box's left edge carries the label's colour
    assert np.abs(edge.astype(int) - label_colour(f.label)).max() <= 40
    assert not np.array_equal(out[y + h // 2, x], drafted.image[y + h // 2, x])


def test_small_images_are_not_drafted(rec: Recognizer, tmp_path: Path) -> None:
    for size in ((640, 480), (3000, 2000)):
        p = tmp_path / f"{size[0]}.jpg"
        Image.fromarray(_canvas(*size)).save(p, quality=85)
        dec = rec.read(p)
        assert dec.reduction == 1 and dec.size == size and dec.image.shape[:2] == size[::-1]
    res = rec.predict(tmp_path / "640.jpg")
    assert res.image.shape[:2] == (480, 640) and res.size == (640, 480) and res.image_scale == 1.0


def test_png_and_arrays_are_never_drafted(rec: Recognizer, tmp_path: Path) -> None:
    p = tmp_path / "big.png"  # 3400 px: a JPEG this long would be read at half size
    Image.fromarray(_canvas(3400, 1000)).save(p, compress_level=1)
    dec = rec.read(p)
    assert dec.reduction == 1 and dec.image.shape[:2] == (1000, 3400)
    assert isinstance(rec.read(_canvas(3400, 1000)), np.ndarray)  # already decoded: nothing to reduce


@needs_wild
def test_exif_rotated_large_jpeg_is_upright_with_full_size_boxes(rec: Recognizer, crowd: tuple,
                                                                 full_and_drafted: tuple, tmp_path: Path) -> None:
    _, rects, upright = crowd
    # stored turned a quarter, with orientation 6 ("rotate 90° clockwise to display"): displays as the upright photo
    raw = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "turned.jpg"
    raw.save(p, quality=90, exif=exif)
    assert raw.size == (H, W)
    dec = read_image(p, need_side=rec.detector.working_side)
    assert dec.reduction == 2 and dec.size == (W, H) and dec.image.shape[:2] == (H // 2, W // 2)
    # upright: the decoded pixels are the upright photo's, halved
    ref = np.asarray(Image.fromarray(upright).resize((W // 2, H // 2), Image.BOX), dtype=np.int16)
    assert np.abs(dec.image.astype(np.int16) - ref).mean() < 6
    res = rec.predict(p)
    assert res.size == (W, H) and _found([f.box for f in res], rects) >= len(rects) - 1
    pairs = _pair_up(list(res), list(full_and_drafted[1]))
    worst = max(max(abs(a - b) for a, b in zip(x.box, y.box)) for x, y in pairs)
    assert worst <= 8


# -- multi-frame files -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three frames: a real face, a blank, the face again."""
    files = sorted((WILD / "happy").glob("*.jpg"))
    if not files:
        pytest.skip(f"no wild-dev photos at {WILD}")
    face = Image.open(files[0]).convert("RGB")
    face.thumbnail((320, 320))
    p = tmp_path_factory.mktemp("frames") / "anim.gif"
    face.save(p, save_all=True, append_images=[Image.new("RGB", face.size, (128, 128, 128)), face], duration=100)
    return p


def test_api_says_only_the_first_frame_was_read(rec: Recognizer, gif: Path) -> None:
    for src in (gif, gif.read_bytes()):
        res = rec.predict(src)
        assert res.frames_total == 3 and len(res) == 1
        d = res.to_dict()
        assert d["frames_total"] == 3 and "only frame 1 of 3" in d["note"]
    one = rec.predict(rec.load(gif))  # an array: one frame, nothing to say
    assert one.frames_total is None and "note" not in one.to_dict()


# -- the server ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ferkit.serve.app import create_app

    # the pixel limit at exactly 12 MP: the 4000×3000 upload passes, one pixel column more is refused
    with TestClient(create_app(model="fer3", max_upload_mb=16, max_pixels=W * H, max_concurrency=1)) as c:
        yield c


@needs_wild
def test_server_reports_full_size_boxes_of_a_drafted_upload(client, crowd: tuple, full_and_drafted: tuple) -> None:
    r = client.post("/v1/predict", files={"file": ("crowd.jpg", crowd[0].read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": W, "height": H} and "frames_total" not in body
    assert [f["box"] for f in body["faces"]] == [list(f.box) for f in full_and_drafted[1]]


def test_server_checks_the_pixel_limit_on_the_declared_size(client) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (W + 1, H), (90, 90, 90)).save(buf, "JPEG", quality=50)  # would decode at half size
    r = client.post("/v1/predict", content=buf.getvalue(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413 and "12,003,000 pixels" in r.json()["detail"]


def test_server_says_only_the_first_frame_was_read(client, gif: Path) -> None:
    r = client.post("/v1/predict", files={"file": ("anim.gif", gif.read_bytes(), "image/gif")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["frames_total"] == 3 and "only frame 1 of 3" in body["note"] and len(body["faces"]) == 1


@needs_wild
def test_cli_predict_decodes_large_jpegs_at_reduced_size(crowd: tuple, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`ferkit predict` reads stills like the API: a drafted decode, boxes in the full photo's pixels, and an
    annotated copy drawn on the decoded image (half size)."""
    import json

    from ferkit.cli import main

    out = tmp_path / "ann"
    assert main(["predict", str(crowd[0]), "--format", "json", "--save-annotated", str(out)]) == 0
    el = json.loads(capsys.readouterr().out)
    el = el[0] if isinstance(el, list) else el
    assert _found([tuple(f["box"]) for f in el["faces"]], crowd[1]) >= len(crowd[1]) - 1
    saved = next(out.rglob("*.jpg"))
    assert Image.open(saved).size == (W // 2, H // 2)
