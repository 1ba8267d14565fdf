"""Hostile clients against a real server process on 127.0.0.1 (issue 26): slow uploads and request heads, too many
connections from one address, forged X-Forwarded-For, a worker that cannot be replaced. Every test is bounded in
time, talks to loopback only (other 127.0.0.x addresses stand for other clients) and stops what it starts.
In-process cases (bad settings, keys files, ownership, metrics, fuzzing) are in tests/test_hostile_serve_api.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from shared_data import WILD

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

HEADER_TIMEOUT_S = 2.0
PER_CLIENT = 8
RATE = 10  # requests per second per address


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled fer3 copied (with its ONNX sibling) to a folder a test may move it out of."""
    from ferkit.modelfile import bundled_models

    src = bundled_models()["fer3"]
    dst = tmp_path_factory.mktemp("model") / "fer3.safetensors"
    shutil.copyfile(src, dst)
    shutil.copyfile(src.with_suffix(".onnx"), dst.with_suffix(".onnx"))
    return dst


@pytest.fixture(scope="module")
def photo() -> bytes:
    files = [f for f in sorted((WILD / "happy").glob("*.jpg")) if f.stat().st_size < 2**20]
    if not files:
        pytest.skip(f"no wild-dev photos at {WILD}")
    return files[0].read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, running_server: Callable, model: Path) -> Iterator[tuple]:
    """One worker with the defaults of a 2-core machine (2 slots, 16 queued): what 18 slow clients used to fill."""
    log = tmp_path_factory.mktemp("hostile-log") / "server.log"
    with running_server(model, log, max_concurrency=2, max_queue=16, header_timeout_s=HEADER_TIMEOUT_S,
                        max_client_connections=PER_CLIENT, rate_limit=RATE) as (base, _):
        yield base, int(base.rsplit(":", 1)[1]), log
    assert "Traceback" not in log.read_text(errors="replace")


class Attacker:
    """A raw connection from ``source`` that sends ``first`` at once, then ``drip`` one byte per :meth:`step`."""

    def __init__(self, port: int, source: str, first: bytes, drip: bytes = b"") -> None:
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        if first:
            self.sock.sendall(first)
        self.sock.setblocking(False)
        self.drip, self.reply, self.ended = drip, b"", None  # ended: seconds since t0 when the server hung up

    def step(self, t: float) -> None:
        if self.ended is not None:
            return
        try:
            while chunk := self.sock.recv(4096):
                self.reply += chunk
            self.ended = t  # EOF: the server closed the connection
            return
        except BlockingIOError:
            pass
        except OSError:
            self.ended = t
            return
        if self.drip:
            try:
                self.sock.send(self.drip[:1])
                self.drip = self.drip[1:]
            except OSError:
                self.ended = t

    def close(self) -> None:
        self.sock.close()


def _upload_head(length: int, path: str = "/v1/predict") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 10-frame MJPEG AVI (no faces: the job's result does not matter here)."""
    import cv2
    import numpy as np

    path = tmp_path_factory.mktemp("video") / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    for i in range(10):
        w.write(np.full((64, 96, 3), 20 * i, np.uint8))
    w.release()
    return path.read_bytes()


def _timed_post(base: str, data: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/predict", content=data, headers={"Content-Type": "image/jpeg"}, timeout=30)
    return r.status_code, time.perf_counter() - t0


def test_trickling_clients_do_not_lock_out_a_normal_one(server: tuple, photo: bytes, video: bytes) -> None:
    """18 slow uploads (the 2 slots + 16 queue places they used to fill, so that everyone else got 503): 12 trickle
    a byte at a time, 6 declare more than they send and stall; 6 more connections trickle their request head; and
    2 video uploads stall (the 2 video job slots they used to hold). A normal client keeps getting 200 within its
    usual latency and can start a video job; every attacker is answered 408 and closed soon after --header-timeout."""
    base, port, _ = server
    usual = max(_timed_post(base, photo)[1] for _ in range(3))
    attackers = (
        [Attacker(port, src, _upload_head(100_000), b"\xff" * 100) for src in ("127.0.0.2", "127.0.0.7")
         for _ in range(6)]
        + [Attacker(port, "127.0.0.3", _upload_head(100_000) + photo[:1000]) for _ in range(6)]
        + [Attacker(port, "127.0.0.4", b"", _upload_head(100_000)) for _ in range(6)]
        + [Attacker(port, "127.0.0.8", _upload_head(len(video), "/v1/videos") + video[:500]) for _ in range(2)]
    )
    t0 = time.monotonic()
    stop = threading.Event()

    def drip() -> None:
        while not stop.is_set():
            for a in attackers:
                a.step(time.monotonic() - t0)
            stop.wait(0.25)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        time.sleep(0.3)
        job = httpx.post(base + "/v1/videos", content=video, timeout=30)
        results = []
        while time.monotonic() - t0 < HEADER_TIMEOUT_S + 1.5:  # before, during and after the attackers are cut off
            results.append(_timed_post(base, photo))
            time.sleep(0.15)  # within the rate limit
        deadline = t0 + HEADER_TIMEOUT_S + 5
        while any(a.ended is None for a in attackers) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        dripper.join(5)
        for a in attackers:
            a.close()
    assert job.status_code == 202, job.text
    httpx.delete(base + f"/v1/videos/{job.json()['id']}")
    assert all(status == 200 for status, _ in results), results
    assert max(s for _, s in results) < 3 * usual + 1.0, (usual, results)
    assert all(a.ended is not None for a in attackers), [a.reply[:60] for a in attackers]
    assert all(a.ended < HEADER_TIMEOUT_S + 3 for a in attackers), [a.ended for a in attackers]
    assert all(a.reply.startswith(b"HTTP/1.1 408") for a in attackers), [a.reply[:60] for a in attackers]
    slow_heads = [a for a in attackers if b"request headers not received" in a.reply]
    assert len(slow_heads) == 6 and all(b"upload too slow" in a.reply for a in attackers if a not in slow_heads)


def test_connections_per_client_address_are_capped(server: tuple) -> None:
    base, port, _ = server
    conns = [Attacker(port, "127.0.0.5", b"") for _ in range(PER_CLIENT + 2)]
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            for c in conns:
                c.step(time.monotonic() - t0)
            time.sleep(0.05)
        refused = [c for c in conns if c.reply.startswith(b"HTTP/1.1 429")]
        assert len(refused) == 2 and all(c.ended is not None for c in refused)  # at once, before any timeout
        assert b"too many open connections from 127.0.0.5" in refused[0].reply
        assert httpx.get(base + "/healthz").status_code == 200  # other addresses are not affected
    finally:
        for c in conns:
            c.close()
    time.sleep(0.3)  # the closed connections are counted off
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.5")) as again:
        assert again.get(base + "/healthz").status_code == 200


def test_forwarded_for_is_not_trusted_by_default(server: tuple) -> None:
    """uvicorn used to trust X-Forwarded-For from 127.0.0.1: every forged address got a fresh rate-limit bucket."""
    base, _, log = server
    with httpx.Client() as c:
        codes = [c.get(base + "/v1/models", headers={"X-Forwarded-For": f"10.9.0.{i}"}).status_code for i in range(60)]
    assert codes.count(429) >= 10 and set(codes) == {200, 429}, codes
    time.sleep(0.3)
    text = log.read_text()
    assert "10.9.0." not in text and re.search(r"GET /v1/models 429 .* 127\.0\.0\.1", text)
    time.sleep(1.0)  # the address's bucket refills


def _worker_pids(log: Path) -> list[int]:
    return [int(p) for p in re.findall(r"worker (\d+): model \S+ \(\w+\) loaded", log.read_text())]


def test_a_worker_that_cannot_be_replaced_does_not_stop_the_others(tmp_path: Path, running_server: Callable,
                                                                    model: Path, photo: bytes) -> None:
    """Two workers; the model file is moved away (a deploy) and one worker dies: its replacement cannot start. The
    other keeps serving and ready, the supervisor retries with back-off, and once the file is back a new worker runs.
    uvicorn's own supervisor stopped the whole server at the first failed start."""
    log = tmp_path / "server.log"
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    with running_server(model, log, workers=2) as (base, proc):
        deadline = time.monotonic() + 60
        while len(_worker_pids(log)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = _worker_pids(log)
        assert len(pids) == 2, log.read_text()
        for f in (model, model.with_suffix(".onnx")):
            f.rename(moved / f.name)
        try:
            os.kill(pids[0], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while "failed to start" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
            assert "still serving; next try in" in log.read_text(), log.read_text()
            for _ in range(5):
                assert proc.poll() is None, log.read_text()
                assert httpx.get(base + "/readyz", timeout=10).status_code == 200
                assert _timed_post(base, photo)[0] == 200
                time.sleep(0.2)
        finally:
            for f in (model, model.with_suffix(".onnx")):
                (moved / f.name).rename(f)
        deadline = time.monotonic() + 60
        while len(_worker_pids(log)) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert len(_worker_pids(log)) == 3, log.read_text()  # the retry, once the file was back
