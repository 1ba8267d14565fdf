"""The HTTP API in-process (``TestClient`` with the app's lifespan, the bundled fer3 on onnxruntime): bad input,
API keys, rate limits, metrics, request IDs, health/readiness, CORS, the OpenAPI description and the settings."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ferkit.cli import main
from ferkit.errors import ConfigError
from ferkit.serve.app import create_app
from ferkit.serve.settings import ServeSettings
from shared_data import WILD

UPLOAD_MB = 1.0  # a small limit keeps the oversized-upload cases fast
KEYS = ("k-alpha-0123456789", "k-beta-9876543210")


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
def jpeg() -> bytes:
    """A real wild-dev portrait, under the reduced upload limit."""
    files = [f for f in sorted((WILD / "happy").glob("*.jpg")) if f.stat().st_size < 0.9 * 2**20]
    if not files:
        pytest.skip(f"no wild-dev photos at {WILD}")
    return files[0].read_bytes()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("keys") / "keys.txt"
    p.write_text("# the test's keys\n\n" + "\n".join(KEYS) + "\n")
    return p


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """No keys, no rate limit: the bad-input table runs here."""
    with TestClient(create_app(model="fer3", max_upload_mb=UPLOAD_MB, max_concurrency=1)) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(keys_file: Path) -> Iterator[TestClient]:
    with TestClient(create_app(model="fer3", api_keys=str(keys_file), max_concurrency=1)) as c:
        yield c


def _bad_inputs(jpeg: bytes) -> list[tuple[str, dict, int, str]]:
    big = os.urandom(int(UPLOAD_MB * 2**20) + 1000)
    tiny = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiny, "PNG")

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    two = {"files": [("file", ("a.jpg", jpeg, "image/jpeg")), ("other", ("b.jpg", jpeg, "image/jpeg"))]}
    return [
        ("raw body over the limit", {"content": big}, 413, "upload too large"),
        ("multipart over the limit", {"files": {"file": ("big.jpg", big, "image/jpeg")}}, 413, "upload too large"),
        ("chunked body over the limit (no Content-Length)", {"content": chunks()}, 413, "upload too large"),
        ("text file", {"files": {"file": ("notes.txt", b"hello, not an image\n", "text/plain")}}, 415,
         "notes.txt: cannot identify image file"),
        ("random bytes named .jpg", {"files": {"file": ("x.jpg", os.urandom(5000), "image/jpeg")}}, 415,
         "x.jpg: cannot identify image file"),
        ("html", {"content": b"<html></html>", "headers": {"Content-Type": "text/html"}}, 415, "is not an image"),
        ("JSON body", {"json": {"image": "photo.jpg"}}, 415, "multipart field 'file'"),
        ("form body", {"data": {"file": "photo.jpg"}}, 415, "multipart field 'file'"),
        ("zero bytes raw", {"content": b""}, 415, "empty"),
        ("zero bytes multipart", {"files": {"file": ("empty.jpg", b"", "image/jpeg")}}, 415, "empty"),
        ("truncated JPEG", {"content": jpeg[: len(jpeg) // 3]}, 415, "truncated"),
        ("JPEG header only", {"content": jpeg[:200]}, 415, "upload"),
        ("30000x30000 PNG (decompression bomb)", {"content": png_header_bomb(30000, 30000)}, 413, "too large"),
        # under the library's 64 MP limit, over the server's 25 MP one
        ("6000x5000 PNG (over --max-pixels)", {"files": {"file": ("big.png", png_header_bomb(6000, 5000))}}, 413,
         "30,000,000 pixels"),
        ("4x4 image", {"content": tiny.getvalue()}, 422, "too small"),
        ("malformed multipart",
         {"content": b"garbage", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400, "multipart"),
        ("multipart without a file field", {"data": {"text": "hello"}, "files": {"other": ("a.jpg", jpeg[:100])}},
         400, "field 'file'"),
        ("two files in one upload", two, 400, "2 files in one upload"),
        ("detect=maybe", {"content": jpeg, "params": {"detect": "maybe"}}, 422, "detect"),
        ("unknown query parameter", {"content": jpeg, "params": {"detct": "false"}}, 422,
         "unknown query parameter 'detct' (valid: detect"),
    ]


def test_bad_inputs(client: TestClient, jpeg: bytes) -> None:
    failures = []
    for name, kwargs, status, words in _bad_inputs(jpeg):
        r = client.post("/v1/predict", **kwargs)
        ok = r.status_code == status and r.headers["content-type"] == "application/json"
        detail = r.json().get("detail") if ok else None
        ok = ok and isinstance(detail, str) and "\n" not in detail and 0 < len(detail) <= 300 and words in detail
        if not ok or "Traceback" in r.text:
            failures.append(f"{name}: expected {status} with {words!r}, got {r.status_code} {r.text[:300]}")
    assert not failures, "\n".join(failures)
    for method, path, status in (("GET", "/v1/predict", 405), ("GET", "/nope", 404), ("DELETE", "/healthz", 405)):
        r = client.request(method, path)
        assert r.status_code == status and isinstance(r.json()["detail"], str)
    assert client.get("/readyz").status_code == 200


def test_predict_and_request_id(client: TestClient, jpeg: bytes) -> None:
    r = client.post("/v1/predict", files={"file": ("p.jpg", jpeg, "image/jpeg")}, headers={"X-Request-ID": "abc-123"})
    assert r.status_code == 200, r.text
    body = r.json()
    w, h = Image.open(io.BytesIO(jpeg)).size
    assert body["model"] == "fer3" and body["image"] == {"width": w, "height": h} and body["faces"]
    assert r.headers["x-request-id"] == "abc-123"  # the client's own ID, when sane, comes back
    ids = {client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
           for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 16 and i.isalnum() for i in ids)  # otherwise a fresh one each time


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "model_loaded": True, "in_flight": 0}
    assert client.get("/readyz").json() == {"status": "ready", "model": "fer3", "classes": ["happy", "sad", "neutral"]}
    app = create_app(model="fer3")
    with TestClient(app) as c:  # after shutdown began, readiness is withdrawn
        assert c.get("/readyz").status_code == 200
    assert app.state.ready is False and app.state.recognizer is None


AUTH_CASES = [
    # (what, method, path, headers, status)
    ("no key", "POST", "/v1/predict", {}, 401),
    ("wrong key (X-API-Key)", "POST", "/v1/predict", {"X-API-Key": "k-alpha-0123456780"}, 403),
    ("wrong key (Bearer)", "POST", "/v1/predict", {"Authorization": "Bearer nope-nope-nope"}, 403),
    ("Basic auth is not a key", "POST", "/v1/predict", {"Authorization": "Basic dXNlcjpwYXNz"}, 401),
    ("key as Bearer", "POST", "/v1/predict", {"Authorization": f"Bearer {KEYS[0]}"}, 200),
    ("key as X-API-Key", "POST", "/v1/predict", {"X-API-Key": KEYS[1]}, 200),
    ("scheme in lower case", "POST", "/v1/predict", {"Authorization": f"bearer {KEYS[1]}"}, 200),
    ("models without a key", "GET", "/v1/models", {}, 401),
    ("metrics without a key", "GET", "/metrics", {}, 401),
    ("metrics with a key", "GET", "/metrics", {"X-API-Key": KEYS[0]}, 200),
    ("healthz stays open", "GET", "/healthz", {}, 200),
    ("readyz stays open", "GET", "/readyz", {}, 200),
    ("the web page stays open", "GET", "/", {}, 200),
    ("the docs page stays open", "GET", "/docs", {}, 200),
    ("the OpenAPI schema stays open", "GET", "/openapi.json", {}, 200),
    ("static files stay open", "GET", "/static/app.js", {}, 200),
]


@pytest.mark.parametrize(("what", "method", "path", "headers", "status"), AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
def test_api_keys(keyed: TestClient, jpeg: bytes, what: str, method: str, path: str, headers: dict,
                  status: int) -> None:
    kwargs = {"files": {"file": ("p.jpg", jpeg, "image/jpeg")}} if method == "POST" else {}
    r = keyed.request(method, path, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer") and "API key required" in r.json()["detail"]
    if status == 403:
        assert r.json() == {"detail": "API key not accepted"}


def test_keys_are_not_logged_and_limits_say_auth(keyed: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="ferkit.access"):
        assert keyed.get("/v1/models", headers={"X-API-Key": KEYS[0]}).json()["limits"]["auth"] is True
    assert caplog.records and all(KEYS[0] not in r.getMessage() for r in caplog.records)
    assert "key:" in caplog.records[-1].getMessage()  # the client is named by its key's digest


def test_rate_limit(keys_file: Path) -> None:
    with TestClient(create_app(model="fer3", api_keys=str(keys_file), rate_limit=2)) as c:
        a, b = ({"X-API-Key": k} for k in KEYS)
        statuses = [c.get("/v1/models", headers=a).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]  # a burst of N, then refused
        r = c.get("/v1/models", headers=a)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "rate limit" in r.json()["detail"]
        assert c.get("/v1/models", headers=b).status_code == 200  # per key: the other key is not affected
        assert c.get("/healthz").status_code == 200  # health checks are never limited
        text = c.get("/metrics", headers=b).text
    assert 'reason="rate_limited"' in text


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and labels.items() <= dict(lab).items())


def test_metrics(client: TestClient, jpeg: bytes) -> None:
    before = _samples(client.get("/metrics").text)
    assert client.post("/v1/predict", content=jpeg).status_code == 200
    assert client.post("/v1/predict", content=b"not an image").status_code == 415
    assert client.post("/v1/predict", content=jpeg, params={"x": "1"}).status_code == 422
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = _samples(r.text)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    version = client.get("/v1/models").json()["loaded"]["version"]
    common = {"model": "fer3", "model_version": version}
    assert delta("ferkit_http_requests_total", endpoint="/v1/predict", status="200", **common) == 1
    assert delta("ferkit_http_requests_total", endpoint="/v1/predict", status="415", **common) == 1
    assert delta("ferkit_rejections_total", reason="unsupported", **common) == 1
    assert delta("ferkit_rejections_total", reason="invalid", **common) == 1
    assert delta("ferkit_http_request_duration_seconds_count", endpoint="/v1/predict", **common) == 3
    assert delta("ferkit_faces_per_image_count", **common) == 1
    assert delta("ferkit_faces_per_image_sum", **common) >= 1
    assert _value(after, "ferkit_queue_depth") == 0
    assert _value(after, "ferkit_model_info", model="fer3", model_version=version) == 1
    # unknown paths share one label value: a scanner cannot create series
    client.get("/random-1")
    client.get("/random-2")
    text = client.get("/metrics").text
    assert "/random-1" not in text and 'endpoint="other"' in text


def test_cors_is_opt_in(client: TestClient) -> None:
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/predict", headers=pre).headers
    with TestClient(create_app(model="fer3", cors_origins=("http://app.example",))) as c:
        r = c.options("/v1/predict", headers={**pre, "Access-Control-Request-Headers": "x-api-key"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = c.get("/healthz", headers={"Origin": "http://other.example"})
        assert "access-control-allow-origin" not in r.headers


def test_openapi_describes_responses(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/predict"]["post"]
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Prediction"}
    schemas = spec["components"]["schemas"]
    assert {"model", "classes", "image", "faces"} <= set(schemas["Prediction"]["properties"])
    assert schemas["FaceOut"]["properties"]["box"]["type"] == "array"
    for code in ("400", "401", "403", "413", "415", "422", "429", "503"):
        assert post["responses"][code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"}, code
    assert "multipart/form-data" in post["requestBody"]["content"]
    for path, model in (("/v1/models", "Models"), ("/healthz", "Health"), ("/readyz", "Ready")):
        get = spec["paths"][path]["get"]
        assert get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
    assert "/metrics" in spec["paths"]
    # both ways of sending a key are declared, on the protected routes only
    assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])
    assert post["security"] and "security" in spec["paths"]["/metrics"]["get"]
    assert "security" not in spec["paths"]["/healthz"]["get"] and "security" not in spec["paths"]["/readyz"]["get"]


BAD_SETTINGS = [
    (["--port", "99999"], "--port (FERKIT_SERVE_PORT): must be from 1 to 65535, got 99999"),
    (["--port", "0"], "must be from 1 to 65535, got 0"),
    (["--max-upload-mb", "-5"], "--max-upload-mb (FERKIT_SERVE_MAX_UPLOAD_MB): must be more than 0 and at most 1024, "
                                "got -5"),
    (["--max-pixels", "0"], "--max-pixels (FERKIT_SERVE_MAX_PIXELS): must be from 1 to"),
    (["--workers", "0"], "--workers (FERKIT_SERVE_WORKERS): must be from 1 to 64, got 0"),
    (["--rate-limit", "-1"], "--rate-limit (FERKIT_SERVE_RATE_LIMIT): must be more than 0"),
    (["--max-queue", "-1"], "must be from 0 to 10000, got -1"),
    (["--detect-size", "8"], "--detect-size (FERKIT_SERVE_DETECT_SIZE): must be from 32 to 16384, got 8"),
    (["--min-det-score", "1.5"], "--min-det-score (FERKIT_SERVE_MIN_DET_SCORE): must be from 0 to 1, got 1.5"),
    (["--detector", "yunett"], "unknown detector 'yunett' (valid: yunet"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_bad_settings_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture,
                                   one_line_error: object) -> None:
    assert main(["serve", *argv]) == 2
    assert message in one_line_error(capsys.readouterr().err)  # type: ignore[operator]


def test_bad_environment_and_files(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                   one_line_error: object) -> None:
    check = one_line_error  # type: ignore[assignment]
    not_a_model = tmp_path / "weights.safetensors"
    not_a_model.write_text("not a model\n")
    assert main(["serve", "--model", str(not_a_model)]) == 2  # refused before any worker starts
    assert str(not_a_model) in check(capsys.readouterr().err)
    empty = tmp_path / "keys.txt"
    empty.write_text("# nothing yet\n\n")
    assert main(["serve", "--api-keys", str(empty)]) == 2
    assert "no API keys in the file" in check(capsys.readouterr().err)
    import socket

    with socket.socket() as busy:  # a port another process listens on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
        assert f"--port {port}: cannot listen on 127.0.0.1:{port} (address already in use)" in check(
            capsys.readouterr().err)
    monkeypatch.setenv("FERKIT_SERVE_PORTT", "8001")
    assert main(["serve"]) == 2
    assert "unknown environment variable FERKIT_SERVE_PORTT; did you mean FERKIT_SERVE_PORT?" in check(
        capsys.readouterr().err)
    monkeypatch.delenv("FERKIT_SERVE_PORTT")
    monkeypatch.setenv("FERKIT_SERVE_MAX_PIXELS", "lots")
    with pytest.raises(ConfigError, match="FERKIT_SERVE_MAX_PIXELS: cannot read 'lots'"):
        ServeSettings.from_env()


def test_settings_round_trip_through_the_environment() -> None:
    s = ServeSettings(port=9001, workers=3, max_pixels=1000, cors_origins=("http://a", "http://b"), rate_limit=2.5,
                      api_keys="/k", access_log=False)
    assert ServeSettings.from_env(s.to_env()) == s
    assert ServeSettings.from_env({"FERKIT_API_KEYS": "/run/secrets/keys"}).api_keys == "/run/secrets/keys"
    with pytest.raises(ConfigError, match="unknown server option 'max_upload'"):
        create_app(max_upload=3)


def test_detector_options_reach_the_recognizer(jpeg: bytes) -> None:
    with TestClient(create_app(model="fer3", detect_size=320, min_det_score=0.99)) as c:
        rec = c.app.state.recognizer
        assert rec.detector.detect_size == 320 and rec.min_det_score == 0.99
        r = c.post("/v1/predict", content=jpeg)
        assert r.status_code == 200 and all(f["det_score"] >= 0.99 for f in r.json()["faces"])


def test_rate_limit_is_shared_by_worker_processes(tmp_path: Path) -> None:
    """Two limiters on one state file (as two worker processes have) spend the same buckets; time refills them."""
    from ferkit.serve.security import RateLimiter

    a, b = RateLimiter(3, tmp_path / "ratelimit.sqlite"), RateLimiter(3, tmp_path / "ratelimit.sqlite")
    waits = [lim.take("key:x") for lim in (a, b, a, b)]
    assert waits[:3] == [0, 0, 0] and 0 < waits[3] <= 1 / 3 + 0.05  # the burst of 3 is shared, the 4th waits
    assert b.take("key:y") == 0  # another client has its own bucket
    import time

    time.sleep(waits[3] + 0.05)
    assert a.take("key:x") == 0


@pytest.mark.parametrize(("host", "keys", "warned"), [("0.0.0.0", None, True), ("0.0.0.0", "/k", False),
                                                       ("127.0.0.1", None, False), ("::1", None, False)])
def test_reachable_without_keys_is_warned(host: str, keys: str | None, warned: bool) -> None:
    from ferkit.serve.app import startup_warnings

    found = [w for w in startup_warnings(ServeSettings(host=host, api_keys=keys)) if "without API keys" in w]
    assert bool(found) == warned


def test_the_key_is_checked_before_anything_else(keyed: TestClient) -> None:
    # an unknown parameter or a bad value from a client without a key: 401, so nothing is learnt about the API
    assert keyed.post("/v1/predict?detct=1", content=b"x").status_code == 401
    assert keyed.post("/v1/predict?detect=maybe", json={}).status_code == 401


def test_serving_never_imports_torch(jpeg: bytes, tmp_path: Path) -> None:
    """The whole request path (app, lifespan, predict, metrics) stays torch-free: ferkit[serve] has no torch."""
    import subprocess
    import sys

    photo = tmp_path / "p.jpg"
    photo.write_bytes(jpeg)
    code = (
        "import sys\nfrom fastapi.testclient import TestClient\nfrom ferkit.serve.app import create_app\n"
        "with TestClient(create_app(model='fer3')) as c:\n"
        f"    assert c.post('/v1/predict', content=open({str(photo)!r}, 'rb').read()).status_code == 200\n"
        "    assert c.get('/metrics').status_code == 200\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
