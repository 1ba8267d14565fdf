"""Shared fixtures: where the real data lives, tiny copies of it, a fer2013.csv made from real images.

Every test session gets its own decoded-image cache (``FERKIT_CACHE_DIR``), no progress bars and, unless
``OMP_NUM_THREADS`` is set, one CPU thread for torch.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shared_data import FER_DIR

# One torch/OpenMP thread unless the environment says otherwise. Set before any test module imports torch (it reads
# this once). On a machine with more runnable processes than cores, two threads waiting for each other at every
# operator made these tests 4× slower than one thread (EfficientNet-B0 steps: 25×). Child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning

TINY_CLASSES = ("happy", "sad", "neutral")
FER2013_ORDER = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")



@pytest.fixture(scope="session", autouse=True)
def _ferkit_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A private cache directory and no progress bars for the whole session (subprocesses inherit both)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FERKIT_CACHE_DIR", str(tmp_path_factory.mktemp("ferkit-cache")))
    mp.setenv("FERKIT_PROGRESS", "0")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The FER2013 folder dataset (``train/`` and ``validation/``); skips the test when it is absent."""
    if not (FER_DIR / "train").is_dir():
        pytest.skip(f"no FER2013 data at {FER_DIR}")
    return FER_DIR


def copy_split_slice(dst: Path, n_train: int, n_val: int, classes: tuple[str, ...] = TINY_CLASSES) -> Path:
    """Copy the first ``n_train``/``n_val`` images per class of the real train/validation splits into ``dst``."""
    for split, n in (("train", n_train), ("validation", n_val)):
        for c in classes:
            src = FER_DIR / split / c
            out = dst / split / c
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(src.iterdir())[:n]:
                shutil.copy2(f, out / f.name)
    return dst


@pytest.fixture(scope="session")
def make_tiny_dataset(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Callable[..., Path]:
    """Factory: ``make_tiny_dataset(n_train, n_val, classes=...)`` → a fresh dataset root of real images."""

    def make(n_train: int = 30, n_val: int = 30, classes: tuple[str, ...] = TINY_CLASSES) -> Path:
        return copy_split_slice(tmp_path_factory.mktemp("tiny"), n_train, n_val, classes)

    return make


@pytest.fixture(scope="session")
def tiny_dataset(make_tiny_dataset: Callable[..., Path]) -> Path:
    """30 train + 30 validation images per class of happy/sad/neutral. Shared by the session: do not modify."""
    return make_tiny_dataset(30, 30)


def write_fer_csv(
    path: Path, rows: list[tuple[int, np.ndarray | str, str]], header: str = "emotion,pixels,Usage"
) -> Path:
    """Write a fer2013-style CSV; ``pixels`` may be a 48×48 array or a raw string (for malformed rows)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header.split(","))
        for emo, pix, usage in rows:
            text = pix if isinstance(pix, str) else " ".join(str(int(v)) for v in np.asarray(pix).ravel())
            w.writerow([emo, text, usage])
    return path


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A ``fer2013.csv`` of real images: per class of the tiny set, 6 Training, 3 PublicTest, 2 PrivateTest rows."""
    rows = []
    for c in TINY_CLASSES:
        emo = FER2013_ORDER.index(c)
        files = sorted((data_dir / "train" / c).iterdir())[:8] + sorted((data_dir / "validation" / c).iterdir())[:3]
        for i, f in enumerate(files):
            usage = "Training" if i < 6 else ("PublicTest" if i < 9 else "PrivateTest")
            rows.append((emo, np.asarray(Image.open(f).convert("L")), usage))
    return write_fer_csv(tmp_path_factory.mktemp("csv") / "fer2013.csv", rows)


def one_line_error(err: str) -> str:
    """Assert that ``err`` is exactly one ``ferkit: error:`` line with no traceback, and return it."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("ferkit: error: "), err
    return lines[0]


@pytest.fixture(name="one_line_error")
def _one_line_error() -> Callable[[str], str]:
    """The :func:`one_line_error` check, as a fixture (test modules do not import conftest)."""
    return one_line_error


@pytest.fixture(name="write_fer_csv")
def _write_fer_csv() -> Callable[..., Path]:
    """The :func:`write_fer_csv` writer, as a fixture."""
    return write_fer_csv


@pytest.fixture(scope="session")
def offline_hub() -> None:
    """Skip when the Hugging Face hub is reachable: a --pretrained test would then download weights instead of
    testing the offline error."""
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            pytest.skip("the Hugging Face hub is reachable: this would download weights, not test the offline error")
    except OSError:
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _running_server(model: str | Path, log_path: Path, timeout: float = 120, env: dict[str, str] | None = None,
                    python: str | os.PathLike | None = None,
                    **options: object) -> Iterator[tuple[str, subprocess.Popen]]:
    """``ferkit.serve.app.serve(**options)`` in its own process on a free loopback port, until the block ends.

    Yields ``(base_url, process)`` once ``/readyz`` answers 200; the server's output goes to ``log_path``.
    ``python`` runs it in another interpreter (a fresh install's venv) instead of this one.
    """
    import httpx

    port = _free_port()
    opts = {"host": "127.0.0.1", "port": port, "model": str(model), "workers": 1, **options}
    code = "from ferkit.serve.app import serve; serve(" + ", ".join(f"{k}={v!r}" for k, v in opts.items()) + ")"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(python or sys.executable), "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy within {timeout:.0f} s:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def running_server() -> Callable[..., contextlib.AbstractContextManager[tuple[str, subprocess.Popen]]]:
    """The one start-and-poll helper for real server processes: ``with running_server(model, log) as (url, proc):``
    (keyword arguments are :class:`ferkit.serve.settings.ServeSettings` fields)."""
    return _running_server
