"""The HTTP server as a real process on a loopback port, with API keys and JSON logs: good images, the model and
page endpoints, overload (503), request IDs in the log, graceful shutdown. Bad input, auth tables, rate limits and
metrics are tested in-process (tests/test_serve_api.py)."""

from __future__ import annotations

import io
import json
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from shared_data import WILD

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


CLASSES = ("happy", "sad", "neutral")
UPLOAD_MB = 1.0
KEY = "smoke-test-key-42"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_and_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("serve")
    # the bundled fer3 under another name (with its ONNX sibling: no torch, no conversion): a model file the API must
    # name by its file name only, never by the server's path
    from ferkit.modelfile import bundled_models

    src = bundled_models()["fer3"]
    model = d / "test3.safetensors"
    shutil.copyfile(src, model)
    shutil.copyfile(src.with_suffix(".onnx"), model.with_suffix(".onnx"))
    keys = d / "keys.txt"
    keys.write_text(KEY + "\n")
    return model, keys


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
def server(tmp_path_factory: pytest.TempPathFactory, running_server: Callable,
           model_and_keys: tuple[Path, Path]) -> Iterator[tuple[str, Path]]:
    model, keys = model_and_keys
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    with running_server(model, log_path, max_upload_mb=UPLOAD_MB, max_concurrency=1, max_queue=0,
                        api_keys=str(keys), log_format="json") as (base, _):
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
        r = httpx.post(base + "/v1/predict", files={"file": (photo.name, data, "image/jpeg")}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "test3.safetensors" and body["classes"] == list(CLASSES)
        assert body["image"] == {"width": w, "height": h}
        assert "file" not in body
        assert len(body["faces"]) >= 1, f"no face found in {photo}"
        for f in body["faces"]:
            check_face(f, w, h)
        raw = httpx.post(base + "/v1/predict", content=data, headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=60)
        assert raw.status_code == 200, raw.text
        assert [(f["box"], f["label"]) for f in raw.json()["faces"]] == [(f["box"], f["label"]) for f in body["faces"]]


def test_predict_whole_image_and_formats(server: tuple[str, Path], photos: list[Path]) -> None:
    base, _ = server
    im = Image.open(photos[0]).convert("RGB")
    w, h = im.size
    r = httpx.post(base + "/v1/predict?detect=false", content=photos[0].read_bytes(), headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    (face,) = r.json()["faces"]
    assert face["box"] == [0, 0, w, h]
    check_face(face, w, h)
    # an RGBA PNG and a grayscale WebP of the same photo are read too
    for mode, fmt in (("RGBA", "PNG"), ("L", "WEBP")):
        buf = io.BytesIO()
        im.convert(mode).resize((w // 3, h // 3)).save(buf, fmt)
        files = {"file": (f"x.{fmt.lower()}", buf.getvalue())}
        r = httpx.post(base + "/v1/predict", files=files, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["image"] == {"width": w // 3, "height": h // 3}
    # a readable image without faces: 200 and no faces
    buf = io.BytesIO()
    Image.new("L", (640, 360), 128).save(buf, "PNG")
    r = httpx.post(base + "/v1/predict", content=buf.getvalue(), headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["faces"] == []


def test_models_openapi_page(server: tuple[str, Path]) -> None:
    base, _ = server
    r = httpx.get(base + "/v1/models", headers=AUTH)
    assert r.status_code == 200
    info = r.json()
    loaded = info["loaded"]
    assert loaded["name"] == "test3.safetensors" and loaded["classes"] == list(CLASSES)
    assert loaded["input_size"] == 48 and 0.5 < loaded["val_accuracy"] < 1 and loaded["backend"] == "onnx"
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


def test_busy_gives_503_and_recovers(server: tuple[str, Path], photos: list[Path]) -> None:
    """The server runs with one slot and no queue: of clients posting at once, those that find the slot taken get
    503, on a connection the server closes (so that a retry can reach another worker process); then it recovers.
    (A client still sending its upload holds no slot: tests/test_hostile_serve.py.)"""
    base, _ = server
    data = photos[0].read_bytes()

    def post(_: object = None) -> httpx.Response:
        return httpx.post(base + "/v1/predict", content=data, headers=AUTH, timeout=60)

    busy = None
    deadline = time.monotonic() + 20
    with ThreadPoolExecutor(6) as pool:
        while busy is None and time.monotonic() < deadline:
            for r in pool.map(post, range(6)):
                assert r.status_code in (200, 503), r.text
                busy = busy or (r if r.status_code == 503 else None)
    assert busy is not None, "six clients at once never found the one slot taken"
    assert busy.headers.get("retry-after") == "1" and "busy" in busy.json()["detail"]
    assert busy.headers.get("connection") == "close"
    assert post().status_code == 200
    health = httpx.get(base + "/healthz").json()
    assert health["status"] == "ok" and health["in_flight"] == 0


def test_key_required_and_json_log_lines_carry_request_ids(server: tuple[str, Path], photos: list[Path]) -> None:
    base, log_path = server
    assert httpx.get(base + "/v1/models").status_code == 401
    assert httpx.get(base + "/v1/models", headers={"X-API-Key": "not-the-key"}).status_code == 403
    assert httpx.get(base + "/readyz").status_code == 200  # probes need no key
    r = httpx.post(base + "/v1/predict", files={"file": (photos[-1].name, photos[-1].read_bytes())},
                   headers={**AUTH, "X-Request-ID": "smoke-req-1"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "smoke-req-1" and json.loads(r.text)["faces"]
    time.sleep(0.3)  # the access line is written after the response
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    access = [r for r in records if r["logger"] == "ferkit.access" and r["request_id"] == "smoke-req-1"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["path"] == "/v1/predict"
    assert access[0]["client"].startswith("key:") and KEY not in log_path.read_text()
    assert {r["status"] for r in records if r["logger"] == "ferkit.access"} >= {200, 401, 403}
    # the metrics come through prometheus-client's multiprocess files (what several workers share)
    assert httpx.get(base + "/metrics").status_code == 401
    metrics = httpx.get(base + "/metrics", headers=AUTH).text
    assert 'reason="unauthorized"' in metrics and 'reason="forbidden"' in metrics
    assert 'ferkit_http_requests_total{endpoint="/v1/predict",method="POST",model="test3.safetensors"' in metrics


def test_graceful_shutdown_finishes_requests_in_flight(tmp_path: Path, running_server: Callable,
                                                       model_and_keys: tuple[Path, Path], photos: list[Path]) -> None:
    """SIGTERM while a client is half-way through its upload: that request still gets its answer, then the server
    stops cleanly and refuses new connections."""
    model, _ = model_and_keys
    data = photos[0].read_bytes()
    with running_server(model, tmp_path / "server.log", graceful_timeout_s=20) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        conn.sendall(head + data[: len(data) // 2])
        time.sleep(0.5)  # the request is being read by the app
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None, "the server stopped with a request in flight"
        conn.sendall(data[len(data) // 2 :])
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < 20:
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
        conn.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
        assert b'"faces"' in reply
        # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly, so the exit is by that signal
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log = (tmp_path / "server.log").read_text()
        assert "Application shutdown complete" in log and "Traceback" not in log
        with pytest.raises(httpx.TransportError):
            httpx.get(base + "/healthz", timeout=2)


def test_serve_rejects_missing_model_before_starting(tmp_path: Path) -> None:
    from ferkit.errors import ModelFileError
    from ferkit.serve.app import serve

    with pytest.raises(ModelFileError):
        serve(model=str(tmp_path / "missing.safetensors"), port=free_port())
