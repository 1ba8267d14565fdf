"""Hostile and careless input to the server, in-process (issue 26): settings that are not finite or out of range, a
state folder that is not ferkit's, keys files with a BOM or non-ASCII keys, one key's jobs and sessions reached with
another, wrong keys at full speed, invented HTTP methods, video bombs (huge frames, a header that lies about the
duration), HEAD and query strings on the health routes; and property-based fuzzing (Hypothesis) of the settings,
query and upload parsers. Every case checks the status or exit code and a one-line error. Slow clients and worker
failures need a real server: tests/test_hostile_serve.py."""

from __future__ import annotations

import io
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ferkit.cli import main  # noqa: E402
from ferkit.errors import ConfigError  # noqa: E402
from ferkit.serve.app import create_app  # noqa: E402
from ferkit.serve.settings import STATE_MARKER, ServeSettings, env_name  # noqa: E402

KEYS = ("k-alpha-0123456789", "k-beta-9876543210")
A, B = ({"X-API-Key": k} for k in KEYS)
RATE = 20  # requests per second per key or address (the keyed app's)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow], derandomize=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_detail(r) -> str:  # noqa: ANN001
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, r.text
    return detail


def _jpeg(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _avi(path: Path, frames: int = 100, fps: float = 10.0, size: tuple[int, int] = (320, 240),
         declare: int | None = None) -> Path:
    """An MJPEG AVI of ``frames`` grey frames; ``declare`` rewrites the frame count its headers claim."""
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for i in range(frames):
        w.write(np.full((size[1], size[0], 3), 40 + i % 100, np.uint8))
    w.release()
    if declare is not None:
        b = bytearray(path.read_bytes())
        struct.pack_into("<I", b, b.find(b"avih") + 8 + 16, declare)  # MainAVIHeader.dwTotalFrames
        struct.pack_into("<I", b, b.find(b"strh") + 8 + 32, declare)  # AVIStreamHeader.dwLength
        path.write_bytes(b)
    return path


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("keys") / "keys.txt"
    p.write_bytes(("\ufeff" + "\n".join(KEYS) + "\n").encode("utf-8"))  # as Windows Notepad saves UTF-8
    return p


@pytest.fixture(scope="module")
def keyed(keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = create_app(model="fer3", api_keys=str(keys_file), rate_limit=RATE, max_concurrency=1, access_log=False,
                     state_dir=str(tmp_path_factory.mktemp("state")))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = create_app(model="fer3", max_upload_mb=1, max_concurrency=1, access_log=False, max_pixels=50_000,
                     max_video_seconds=2, state_dir=str(tmp_path_factory.mktemp("state")))
    with TestClient(app) as c:
        yield c


# -- settings (17) -----------------------------------------------------------------------------------------------------

NOT_FINITE_OR_OUT_OF_RANGE = [
    ("max_upload_mb", "inf"), ("max_upload_mb", "nan"), ("max_upload_mb", "1e300"), ("max_video_mb", "1e400"),
    ("max_video_seconds", "inf"), ("video_job_ttl_s", "-inf"), ("graceful_timeout_s", "nan"),
    ("rate_limit", "inf"), ("min_det_score", "nan"), ("header_timeout_s", "0"), ("min_upload_rate_kb", "inf"),
    ("max_pixels", "100000000000"), ("max_queue", "10000000"), ("max_client_connections", "0"),
    ("workers", "100000"), ("max_video_jobs", "0"),
]


@pytest.mark.parametrize(("name", "raw"), NOT_FINITE_OR_OUT_OF_RANGE, ids=[f"{n}={v}" for n, v in
                                                                           NOT_FINITE_OR_OUT_OF_RANGE])
def test_numeric_settings_must_be_finite_and_in_range(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as e:
        ServeSettings.from_env({env_name(name): raw})
    assert "\n" not in str(e.value) and env_name(name) in str(e.value)


@pytest.mark.timeout(120)
def test_inf_upload_limit_is_one_line_from_the_cli(capsys: pytest.CaptureFixture, one_line_error) -> None:  # noqa: ANN001
    assert main(["serve", "--max-upload-mb", "inf", "--port", str(_free_port())]) == 2
    assert "--max-upload-mb (FERKIT_SERVE_MAX_UPLOAD_MB): must be a finite number, got inf" in one_line_error(
        capsys.readouterr().err)


NUMERIC = [f.name for f in ServeSettings.__dataclass_fields__.values() if f.metadata["bounds"] is not None]


@FUZZ
@given(name=st.sampled_from(NUMERIC), raw=st.one_of(st.text(max_size=12), st.floats().map(repr),
                                                      st.integers(-10**30, 10**30).map(str)))
def test_fuzz_numeric_settings(name: str, raw: str) -> None:
    """Whatever text a variable holds: one ConfigError line, or a finite value within the field's bounds."""
    import math

    try:
        s = ServeSettings.from_env({env_name(name): raw})
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    v = getattr(s, name)
    lo, hi = ServeSettings.__dataclass_fields__[name].metadata["bounds"]
    assert v is None or (math.isfinite(v) and lo <= v <= hi), (name, raw, v)


# -- the state folder (3) ----------------------------------------------------------------------------------------------

def test_state_dir_never_removes_files_it_did_not_make(tmp_path: Path) -> None:
    from ferkit.serve.app import _fresh_state_dir

    foreign = tmp_path / "app-data"
    foreign.mkdir()
    (foreign / "customers.db").write_text("x\n")
    (foreign / "ratelimit.sqlite").write_text("someone else's\n")
    with pytest.raises(ConfigError, match=r"holds files ferkit did not make .*give a new or empty folder"):
        _fresh_state_dir(ServeSettings(state_dir=str(foreign)))
    assert (foreign / "customers.db").read_text() == "x\n" and (foreign / "ratelimit.sqlite").exists()

    new = tmp_path / "new" / "state"  # made, marked, then cleaned of the server's own files only at the next start
    assert _fresh_state_dir(ServeSettings(state_dir=str(new))) == (str(new), False)
    (new / "counter_123.db").write_text("stale metrics")
    (new / "videos").mkdir()
    (new / "videos" / "AAAAAAAAAAAAAAAA.json").write_text('{"status": "running"}')  # its process is gone
    (new / "notes.txt").write_text("the operator's")
    _fresh_state_dir(ServeSettings(state_dir=str(new)))
    assert sorted(p.name for p in new.iterdir()) == [STATE_MARKER, "notes.txt"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        _fresh_state_dir(ServeSettings(state_dir=str(a_file)))


@pytest.mark.timeout(120)
def test_state_dir_refusal_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, one_line_error) -> None:  # noqa: ANN001
    (tmp_path / "customers.db").write_text("x\n")
    assert main(["serve", "--state-dir", str(tmp_path), "--port", str(_free_port())]) == 2
    assert "--state-dir" in one_line_error(capsys.readouterr().err)
    assert (tmp_path / "customers.db").exists()


# -- API keys (13, 15) -------------------------------------------------------------------------------------------------

def test_keys_file_with_a_bom_matches_its_first_key(keyed: TestClient) -> None:
    assert keyed.get("/v1/models", headers=A).status_code == 200


@pytest.mark.parametrize("key", ["clé-secrète-01", "ключ-доступа-1", "k-\u200b-0123456789"])
def test_non_ascii_keys_are_refused_at_start(tmp_path: Path, key: str) -> None:
    from ferkit.serve.security import APIKeys

    f = tmp_path / "keys.txt"
    f.write_text("good-key-0123456789\n" + key + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="key 2 holds characters other than printable ASCII") as e:
        APIKeys.from_file(f)
    assert "\n" not in str(e.value) and key not in str(e.value)  # the key itself is never printed


def test_wrong_keys_count_against_the_address_rate_limit(keyed: TestClient) -> None:
    codes = [keyed.get("/v1/models", headers={"X-API-Key": f"guess-{i:08d}"}).status_code for i in range(3 * RATE)]
    assert codes[:RATE] == [403] * RATE and set(codes) == {403, 429} and codes.count(429) >= RATE // 2, codes
    no_key = [keyed.get("/v1/models").status_code for _ in range(3)]  # no key at all: the same address's bucket
    assert 429 in no_key and set(no_key) <= {401, 429}, no_key
    assert keyed.get("/v1/models", headers=A).status_code == 200  # a key holder has its own


def test_video_jobs_belong_to_their_key(keyed: TestClient, tmp_path: Path) -> None:
    video = _avi(tmp_path / "clip.avi", frames=10).read_bytes()
    r = keyed.post("/v1/videos", content=video, headers={**A, "Content-Type": "video/x-msvideo"})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    assert "owner" not in r.json()
    for method in ("GET", "DELETE"):
        r = keyed.request(method, f"/v1/videos/{job}", headers=B)
        assert r.status_code == 404 and "no video job" in _one_line_detail(r)
    assert keyed.get(f"/v1/videos/{job}", headers=A).status_code == 200  # still there for its owner
    assert keyed.delete(f"/v1/videos/{job}", headers=A).status_code == 200


def test_live_sessions_belong_to_their_key(keyed: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferkit.serve import videos

    monkeypatch.setattr(videos, "MAX_SESSIONS", 2)
    frame, jpeg = {"Content-Type": "image/jpeg"}, _jpeg()

    def post(key: dict, session: str) -> float:
        r = keyed.post(f"/v1/track?session={session}", content=jpeg, headers={**key, **frame})
        assert r.status_code == 200, r.text
        return r.json()["time"]  # seconds since the session's first frame

    post(A, "shared-name")
    time.sleep(0.3)
    assert post(B, "shared-name") < 0.15  # B's own session, not A's (which is 0.3 s old)
    for i in range(3):  # more sessions than one key may keep: B's oldest go, never A's
        post(B, f"b-session-{i}")
    assert post(A, "shared-name") >= 0.3


# -- metrics (7) -------------------------------------------------------------------------------------------------------

def test_invented_methods_and_paths_make_no_new_metric_series(client: TestClient) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for i in range(30):
        client.request(f"X{i}METHOD", "/v1/predict")
        client.request(f"Y{i}", f"/random/{i}?a={i}")

    def series() -> set:
        fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        return {(s.labels["endpoint"], s.labels["method"]) for s in fams["ferkit_http_requests"].samples}

    series()
    found = series()  # (with the /metrics request itself)
    assert {m for _, m in found} <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, found
    assert ("other", "other") in found and ("/v1/predict", "other") in found
    for i in range(30):
        client.request(f"Z{i}", f"/more/{i}")
    assert series() == found


# -- HEAD and query strings (26) ---------------------------------------------------------------------------------------

def test_head_is_answered_on_every_get_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()["paths"]
    paths = [p.replace("{job_id}", "AAAAAAAAAAAAAAAA") for p, ops in spec.items() if "get" in ops]
    assert {"/healthz", "/readyz", "/metrics", "/v1/models", "/v1/videos/AAAAAAAAAAAAAAAA"} <= set(paths)
    for path in [*paths, "/", "/docs", "/openapi.json", "/static/app.js"]:
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code != 405, path
        assert head.content == b"" and head.headers.get("content-type") == get.headers.get("content-type"), path


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/", "/docs"])
def test_health_routes_and_pages_ignore_query_strings(client: TestClient, path: str) -> None:
    assert client.get(path + "?probe=1&_=1733400000").status_code == 200


def test_api_routes_still_refuse_unknown_query_parameters(client: TestClient) -> None:
    r = client.post("/v1/predict?detekt=false", content=_jpeg(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 422 and "unknown query parameter 'detekt'" in _one_line_detail(r)


# -- video bombs (2, 6) ------------------------------------------------------------------------------------------------

def test_video_frames_over_the_pixel_limit_are_refused_before_decoding(client: TestClient, tmp_path: Path) -> None:
    """320×240 = 76,800 pixels a frame against the app's 50,000: refused from the header, as an image would be."""
    r = client.post("/v1/videos", content=_avi(tmp_path / "big.avi", frames=3).read_bytes(),
                    headers={"Content-Type": "video/x-msvideo"})
    assert r.status_code == 413, r.text
    assert "video frames too large (320×240 = 76,800 pixels; the limit is 50,000)" in _one_line_detail(r)


def test_cli_video_reader_has_the_image_pixel_limit(tmp_path: Path) -> None:
    import inspect

    from ferkit.images import MAX_PIXELS
    from ferkit.infer.sources import read_video

    assert inspect.signature(read_video).parameters["max_pixels"].default == MAX_PIXELS
    units = list(read_video(str(_avi(tmp_path / "v.avi", frames=3)), None, 1, max_pixels=50_000))
    assert len(units) == 1 and units[0].image is None and "video frames too large" in units[0].error


def test_video_duration_limit_holds_when_the_header_lies(client: TestClient, tmp_path: Path) -> None:
    """10 s of frames whose AVI headers declare one frame (0.1 s): accepted, then stopped at the 2 s limit."""
    video = _avi(tmp_path / "liar.avi", frames=100, fps=10, size=(200, 150), declare=1).read_bytes()
    r = client.post("/v1/videos", content=video, headers={"Content-Type": "video/x-msvideo"})
    assert r.status_code == 202 and r.json()["progress"]["frames_total"] == 1, r.text
    job = r.json()["id"]
    deadline = time.monotonic() + 60
    while (body := client.get(f"/v1/videos/{job}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, body
        time.sleep(0.2)
    assert body["progress"]["frames_done"] <= 21, body  # 2 s at 10 fps, not the 100 frames there are
    assert "video runs past the 2 s limit: stopped at frame 21 (its header declares 1 frame)" in body["error"]


# -- fuzzing the query and upload parsers ------------------------------------------------------------------------------

QUERY_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
ROUTES = [("POST", "/v1/predict"), ("POST", "/v1/track"), ("POST", "/v1/videos"), ("GET", "/v1/models"),
          ("GET", "/healthz"), ("GET", "/v1/videos/AAAAAAAAAAAAAAAA"), ("DELETE", "/v1/videos/x")]


@FUZZ
@given(route=st.sampled_from(ROUTES), params=st.lists(st.tuples(
    st.one_of(st.sampled_from(["detect", "min_score", "every", "session", "target"]), QUERY_TEXT),
    st.one_of(st.sampled_from(["true", "false", "0", "1", "nan", "inf", "-1", "1e400", "", "sess-ion_01"]),
              QUERY_TEXT)), max_size=4))
def test_fuzz_query_strings(client: TestClient, route: tuple[str, str], params: list[tuple[str, str]]) -> None:
    method, path = route
    body = b"" if path == "/v1/videos" else _jpeg() if method == "POST" else None  # (an empty video: no job)
    r = client.request(method, path, params=params, content=body,
                       headers={"Content-Type": "image/jpeg"} if method == "POST" else {})
    assert r.status_code in (200, 400, 404, 405, 413, 415, 422), (route, params, r.status_code, r.text)
    if r.status_code >= 400:
        _one_line_detail(r)


CONTENT_TYPES = st.one_of(st.sampled_from(["image/jpeg", "image/png", "application/octet-stream", "application/json",
                                           "text/plain", "multipart/form-data", "multipart/form-data; boundary=x",
                                           "application/x-www-form-urlencoded", ""]),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode("utf-8", "replace") + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@FUZZ
@given(ctype=CONTENT_TYPES, body=st.one_of(st.binary(max_size=2048), st.just(_jpeg()),
                                            st.builds(lambda b: _jpeg()[: len(b) + 1], st.binary(max_size=600))))
def test_fuzz_raw_uploads(client: TestClient, ctype: str, body: bytes) -> None:
    r = client.post("/v1/predict", content=body, headers={"Content-Type": ctype})
    assert r.status_code in (200, 400, 413, 415, 422), (ctype, body[:40], r.status_code, r.text)
    if r.status_code != 200:
        _one_line_detail(r)


@FUZZ
@given(parts=st.lists(st.tuples(st.sampled_from(["file", "image", "x", "file\"; name=\"y"]),
                                st.one_of(st.none(), st.text(max_size=30)),
                                st.one_of(st.binary(max_size=512), st.just(_jpeg()))), max_size=4),
       boundary=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=70),
       declared=st.one_of(st.none(), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)))
def test_fuzz_multipart_uploads(client: TestClient, parts: list, boundary: str, declared: str | None) -> None:
    ctype = f"multipart/form-data; boundary={declared if declared is not None else boundary}"
    r = client.post("/v1/predict", content=_multipart(parts, boundary), headers={"Content-Type": ctype})
    assert r.status_code in (200, 400, 413, 415, 422), (parts, boundary, r.status_code, r.text)
    if r.status_code != 200:
        _one_line_detail(r)
