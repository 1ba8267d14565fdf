"""The server's video endpoints in-process (TestClient, the bundled fer3 model): a real clip uploaded, polled to
its per-track summary (the same as ``ferkit track``'s), limits on size, duration and jobs, cancelling, expiry, bad
videos, and live tracking of webcam frames by session."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from videoclips import WILD, Actor, gap_clip, load_face, write_clip

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytestmark = pytest.mark.skipif(not WILD.is_dir(), reason=f"no wild-dev photos at {WILD}")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vclips")
    long = write_clip(d / "long.mp4", [Actor(load_face("sad", 0), lambda t: (300, 240, 140))], 8.0, 20)
    bad = d / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    return {"gap": gap_clip(d / "gap.mp4"), "long": long, "bad": bad}


def _client(tmp_path: Path, **settings):
    from fastapi.testclient import TestClient

    from ferkit.serve.app import create_app

    return TestClient(create_app(model="fer3", state_dir=str(tmp_path), access_log=False, **settings))


def _wait(c, job_id: str, timeout: float = 60.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = c.get(f"/v1/videos/{job_id}")
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] not in ("queued", "running"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {body['status']} after {timeout} s")


def test_upload_poll_result_matches_the_cli(tmp_path: Path, clips: dict[str, Path]) -> None:
    from ferkit.cli.predict import run_track

    with _client(tmp_path / "state") as c:
        r = c.post("/v1/videos", files={"file": ("gap.mp4", clips["gap"].read_bytes(), "video/mp4")})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "queued" and job["progress"] == {"frames_done": 0, "frames_total": 60}
        assert r.headers["location"] == f"/v1/videos/{job['id']}"
        done = _wait(c, job["id"])
    assert done["status"] == "done", done
    assert done["progress"]["frames_done"] == 60
    tracks = done["result"]["tracks"]
    assert [t["track"] for t in tracks] == [1] and tracks[0]["label"] == "happy"
    assert tracks[0]["seconds_visible"] == pytest.approx(2.0, abs=0.06)
    out = tmp_path / "cli"
    assert run_track([str(clips["gap"])], out_dir=str(out), out=io.StringIO(), err=io.StringIO()) == 0
    cli = json.loads((out / "gap.tracks.json").read_text())
    assert [{k: v for k, v in t.items()} for t in cli["tracks"]] == tracks  # the same summary, number for number


def test_limits_bad_video_cancel_and_expiry(tmp_path: Path, clips: dict[str, Path]) -> None:
    with _client(tmp_path / "state", max_video_jobs=1, max_video_seconds=5, max_video_mb=0.05,
                 video_job_ttl_s=1.5) as c:
        r = c.post("/v1/videos", content=clips["long"].read_bytes(), headers={"Content-Type": "video/mp4"})
        assert r.status_code in (413,), r.text  # over 0.05 MB or over 5 s: either way refused before any work
        c.app.state.settings = c.app.state.settings.replace(max_video_mb=10)
        r = c.post("/v1/videos", content=clips["long"].read_bytes(), headers={"Content-Type": "video/mp4"})
        assert r.status_code == 413 and "too long (8.0 s; the limit is 5 s)" in r.json()["detail"], r.text
        r = c.post("/v1/videos", content=clips["bad"].read_bytes(), headers={"Content-Type": "video/mp4"})
        assert r.status_code == 415 and "not a video" in r.json()["detail"]
        r = c.post("/v1/videos?every=1", content=clips["gap"].read_bytes(), headers={"Content-Type": "video/mp4"})
        assert r.status_code == 202
        first = r.json()["id"]
        r = c.post("/v1/videos", content=clips["gap"].read_bytes(), headers={"Content-Type": "video/mp4"})
        assert r.status_code == 503 and r.headers["retry-after"] == "10"  # one job at a time
        r = c.delete(f"/v1/videos/{first}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert c.get(f"/v1/videos/{first}").status_code == 404
        time.sleep(0.8)
        assert not list((tmp_path / "state" / "videos").glob(f"{first}.video"))  # the upload is gone too
        r = c.post("/v1/videos", content=clips["gap"].read_bytes(), headers={"Content-Type": "video/mp4"})
        assert r.status_code == 202, r.text  # the slot is free again
        job = r.json()["id"]
        assert _wait(c, job)["status"] == "done"
        time.sleep(1.6)
        assert c.get(f"/v1/videos/{job}").status_code == 404  # expired
        assert c.get("/v1/videos/..%2F..%2Fetc").status_code == 404
        assert c.get("/v1/videos/nope?x=1").status_code == 422


def test_live_tracking_session(tmp_path: Path, clips: dict[str, Path]) -> None:
    import cv2

    cap = cv2.VideoCapture(str(clips["gap"]))
    frames = []
    for _ in range(6):
        ok, fr = cap.read()
        frames.append(cv2.imencode(".jpg", fr)[1].tobytes())
    cap.release()
    with _client(tmp_path / "state") as c:
        got = []
        for jpg in frames:
            r = c.post("/v1/track?session=test-session-1", content=jpg, headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200, r.text
            got.append(r.json()["faces"])
        assert all(len(f) == 1 for f in got)
        assert [f[0].get("track") for f in got] == [1] * 6
        assert got[-1][0]["smoothed"]["label"] == "happy"
        r = c.post("/v1/track?session=other-session", content=frames[0], headers={"Content-Type": "image/jpeg"})
        assert r.json()["faces"][0].get("track") == 1  # a new session numbers its own tracks from 1
        assert c.post("/v1/track", content=frames[0], headers={"Content-Type": "image/jpeg"}).status_code == 422
        r = c.post("/v1/track?session=test-session-1", content=b"not an image",
                   headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 415
