"""The HTTP server as a real process on a loopback port: good images, every kind of bad input, limits, health."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ferkit.modelfile import ModelMeta, save_model
from ferkit.models import create_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WILD = DATA / "wild-dev"
CLASSES = ("happy", "sad", "neutral")
UPLOAD_MB = 1.0  # a small limit keeps the oversized-upload cases fast


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_header_bomb(w: int, h: int) -> bytes:
    """A valid 1-bit PNG of w×h black pixels: a few kB on disk, w·h pixels when decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (w + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    files = sorted(WILD.glob("*/*.jpg"))
    if not files:
        pytest.skip(f"no wild-dev photos at {WILD}")
    # one per class, small enough for the reduced upload limit
    picked = []
    for c in CLASSES:
        cands = [f for f in files if f.parent.name == c and f.stat().st_size < UPLOAD_MB * 2**20 * 0.9]
        if cands:
            picked.append(cands[0])
    return picked


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, running_server: Callable) -> Iterator[tuple[str, Path]]:
    d = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = save_model(
        d / "test3.safetensors",
        create_model("fastcnn", num_classes=3).eval(),
        ModelMeta(arch="fastcnn", classes=CLASSES, metrics={"accuracy": 0.5, "val_split": "validation"}),
    )
    log_path = d / "server.log"
    with running_server(model, log_path, max_upload_mb=UPLOAD_MB, max_concurrency=1, max_queue=0, access_log=False) \
            as (base, _):
        yield base, log_path
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log, log  # nothing a client sent made the server fail


def check_face(face: dict, width: int, height: int) -> None:
    x, y, w, h = face["box"]
    assert all(isinstance(v, int) for v in face["box"])
    assert 0 <= x < width and 0 <= y < height and w > 0 and h > 0 and x + w <= width and y + h <= height
    assert face["label"] in CLASSES
    assert set(face["scores"]) == set(CLASSES)
    assert abs(sum(face["scores"].values()) - 1) < 1e-4
    assert face["score"] == max(face["scores"].values()) == face["scores"][face["label"]]


def test_predict_multipart_and_raw(server: tuple[str, Path], photos: list[Path]) -> None:
    base, _ = server
    for photo in photos:
        data = photo.read_bytes()
        w, h = Image.open(photo).size
        r = httpx.post(base + "/v1/predict", files={"file": (photo.name, data, "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "test3.safetensors" and body["classes"] == list(CLASSES)
        assert body["image"] == {"width": w, "height": h}
        assert "file" not in body
        assert len(body["faces"]) >= 1, f"no face found in {photo}"
        for f in body["faces"]:
            check_face(f, w, h)
        raw = httpx.post(base + "/v1/predict", content=data, headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert raw.status_code == 200, raw.text
        assert [(f["box"], f["label"]) for f in raw.json()["faces"]] == [(f["box"], f["label"]) for f in body["faces"]]


def test_predict_whole_image_and_formats(server: tuple[str, Path], photos: list[Path]) -> None:
    base, _ = server
    im = Image.open(photos[0]).convert("RGB")
    w, h = im.size
    r = httpx.post(base + "/v1/predict?detect=false", content=photos[0].read_bytes(), timeout=60)
    assert r.status_code == 200, r.text
    (face,) = r.json()["faces"]
    assert face["box"] == [0, 0, w, h]
    check_face(face, w, h)
    # an RGBA PNG and a grayscale WebP of the same photo are read too
    for mode, fmt in (("RGBA", "PNG"), ("L", "WEBP")):
        buf = io.BytesIO()
        im.convert(mode).resize((w // 3, h // 3)).save(buf, fmt)
        r = httpx.post(base + "/v1/predict", files={"file": (f"x.{fmt.lower()}", buf.getvalue())}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["image"] == {"width": w // 3, "height": h // 3}
    # a readable image without faces: 200 and no faces
    buf = io.BytesIO()
    Image.new("L", (640, 360), 128).save(buf, "PNG")
    r = httpx.post(base + "/v1/predict", content=buf.getvalue(), timeout=60)
    assert r.status_code == 200 and r.json()["faces"] == []


def test_models_openapi_page(server: tuple[str, Path]) -> None:
    base, _ = server
    r = httpx.get(base + "/v1/models")
    assert r.status_code == 200
    info = r.json()
    loaded = info["loaded"]
    assert loaded["name"] == "test3.safetensors" and loaded["classes"] == list(CLASSES)
    assert loaded["input_size"] == 48 and loaded["val_accuracy"] == 0.5 and loaded["backend"] in ("onnx", "torch")
    assert isinstance(info["bundled"], list)
    for b in info["bundled"]:
        assert {"name", "classes", "input_size", "val_accuracy"} <= set(b)
    assert info["limits"]["max_upload_bytes"] == int(UPLOAD_MB * 2**20)

    spec = httpx.get(base + "/openapi.json").json()
    assert "post" in spec["paths"]["/v1/predict"] and "/healthz" in spec["paths"] and "/v1/models" in spec["paths"]
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    docs = httpx.get(base + "/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text and "cdn" not in docs.text.lower()

    page = httpx.get(base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="canvas"' in page.text and 'id="file-input"' in page.text and 'id="error"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external assets
    for asset in ("/static/app.js", "/static/style.css", "/static/docs.js"):
        r = httpx.get(base + asset)
        assert r.status_code == 200 and "https://" not in r.text, asset


def _bad_inputs(photo: Path) -> list[tuple[str, dict, int]]:
    jpeg = photo.read_bytes()
    big = os.urandom(int(UPLOAD_MB * 2**20) + 1000)
    tiny = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiny, "PNG")

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    return [
        ("raw body over the limit", {"content": big}, 413),
        ("multipart over the limit", {"files": {"file": ("big.jpg", big, "image/jpeg")}}, 413),
        ("chunked body over the limit (no Content-Length)", {"content": chunks()}, 413),
        ("text file", {"files": {"file": ("notes.txt", b"hello, not an image\n", "text/plain")}}, 415),
        ("random bytes named .jpg", {"files": {"file": ("x.jpg", os.urandom(5000), "image/jpeg")}}, 415),
        ("html", {"content": b"<html><script>alert(1)</script></html>", "headers": {"Content-Type": "text/html"}}, 415),
        ("zero bytes raw", {"content": b""}, 415),
        ("zero bytes multipart", {"files": {"file": ("empty.jpg", b"", "image/jpeg")}}, 415),
        ("truncated JPEG", {"content": jpeg[: len(jpeg) // 3]}, 415),
        ("JPEG header only", {"content": jpeg[:200]}, 415),
        ("30000x30000 PNG (decompression bomb)", {"content": png_header_bomb(30000, 30000)}, 413),
        ("9000x9000 PNG (over the pixel limit)", {"files": {"file": ("big.png", png_header_bomb(9000, 9000))}}, 413),
        ("4x4 image", {"content": tiny.getvalue()}, 422),
        (
            "malformed multipart",
            {"content": b"garbage", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
            400,
        ),
        ("multipart without a file field", {"data": {"text": "hello"}, "files": {"other": ("a.jpg", jpeg[:100])}}, 400),
        ("detect=maybe", {"content": jpeg, "params": {"detect": "maybe"}}, 422),
    ]


def test_bad_inputs(server: tuple[str, Path], photos: list[Path]) -> None:
    base, _ = server
    failures = []
    for name, kwargs, status in _bad_inputs(photos[0]):
        r = httpx.post(base + "/v1/predict", timeout=60, **kwargs)
        body = r.text
        ok = r.status_code == status and r.headers["content-type"] == "application/json"
        if ok:
            detail = r.json().get("detail")
            ok = isinstance(detail, str) and "\n" not in detail and 0 < len(detail) <= 300
        ok = ok and "Traceback" not in body and 'File "' not in body
        if not ok:
            failures.append(f"{name}: expected {status}, got {r.status_code} {body[:300]}")
        print(f"{name:<48} {r.status_code} {body[:110]}")
    assert not failures, "\n".join(failures)
    for method, path, status in (("GET", "/v1/predict", 405), ("GET", "/nope", 404), ("DELETE", "/healthz", 405)):
        r = httpx.request(method, base + path)
        assert r.status_code == status and isinstance(r.json()["detail"], str)
    assert httpx.get(base + "/healthz").status_code == 200


def test_busy_gives_503_and_recovers(server: tuple[str, Path], photos: list[Path]) -> None:
    """The server runs with one slot and no queue: a client slowly uploading holds the slot, the next gets 503."""
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    slow = socket.create_connection(("127.0.0.1", port))
    try:
        slow.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"\xff\xd8\xff" * 10
        )
        deadline = time.monotonic() + 10
        while True:
            r = httpx.post(base + "/v1/predict", content=photos[0].read_bytes(), timeout=60)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 503, r.text
        assert r.headers.get("retry-after") == "1" and "busy" in r.json()["detail"]
    finally:
        slow.close()
    deadline = time.monotonic() + 10
    while True:  # the slot is freed when the slow client goes away
        r = httpx.post(base + "/v1/predict", content=photos[0].read_bytes(), timeout=60)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    health = httpx.get(base + "/healthz").json()
    assert health["status"] == "ok" and health["in_flight"] == 0


def test_health_and_json_shape_after_everything(server: tuple[str, Path], photos: list[Path]) -> None:
    base, _ = server
    r = httpx.get(base + "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.post(base + "/v1/predict", files={"file": (photos[-1].name, photos[-1].read_bytes())}, timeout=60)
    assert r.status_code == 200
    assert json.loads(r.text)["faces"]


def test_serve_rejects_missing_model_before_starting(tmp_path: Path) -> None:
    from ferkit.errors import ModelFileError
    from ferkit.serve.app import serve

    with pytest.raises(ModelFileError):
        serve(model=str(tmp_path / "missing.safetensors"), port=free_port())
