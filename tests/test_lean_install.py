"""The torch-free install: the built wheel, in a fresh virtualenv without torch, predicts on a real photo and serves.

One wheel and one venv per test session (building and installing take about a minute; pip fetches onnxruntime,
OpenCV and the rest from the package index, or its cache). The project's own suite keeps the full install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shared_data import WILD

ROOT = Path(__file__).resolve().parents[1]
#: The issue's ceiling for the wheel with every bundled model.
MAX_WHEEL_MB = 100
#: No bytecode compilation at install: it was most of the install's CPU time (scipy, OpenCV, onnxruntime, ...), and
#: the few modules these tests import compile when first imported.
PIP_INSTALL = ["-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]


def _run(cmd: list[str], timeout: float = 600, **kw: object) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        cmd_line = " ".join(map(str, cmd))
        raise AssertionError(f"{cmd_line} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build --wheel`` of this checkout (no build isolation: setuptools is in the test install)."""
    out = tmp_path_factory.mktemp("wheel")
    t = time.perf_counter()
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)])
    (whl,) = out.glob("ferkit-*.whl")
    print(f"built {whl.name} ({whl.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
    return whl


@pytest.fixture(scope="session")
def lean_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install ferkit.whl`` (no extras): the inference install."""
    venv = tmp_path_factory.mktemp("lean-venv")
    t = time.perf_counter()
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "python"), *PIP_INSTALL, str(wheel)])
    print(f"installed the lean wheel in {time.perf_counter() - t:.1f} s")
    return venv


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _importable(venv: Path, module: str) -> bool:
    return subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True,
                          env=_env()).returncode == 0


def test_wheel_ships_the_models_and_stays_small(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for m in ("fer3", "fer7"):
        assert {f"ferkit/weights/{m}.safetensors", f"ferkit/weights/{m}.onnx"} <= names
    assert wheel.stat().st_size < MAX_WHEEL_MB * 1e6
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    plain = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [r for r in plain if "torch" in r], plain  # torch and torchvision only come with extras
    assert any("onnxruntime" in r for r in plain)


def test_lean_install_predicts_a_real_photo_without_torch(lean_venv: Path) -> None:
    photo = min((WILD / "happy").glob("*.jpg"), default=None)
    if photo is None:
        pytest.skip(f"wild-dev photos not found under {WILD}")
    assert not _importable(lean_venv, "torch") and not _importable(lean_venv, "torchvision")
    r = _run([str(lean_venv / "bin" / "ferkit"), "predict", str(photo), "--format", "json"], env=_env(), cwd="/")
    (row,) = json.loads(r.stdout)
    assert row["file"] == str(photo) and len(row["faces"]) >= 1, r.stdout
    face = row["faces"][0]
    assert face["label"] in ("happy", "sad", "neutral") and face["box"][2] > 20
    assert abs(sum(face["scores"].values()) - 1) < 1e-4
    # the bundled model ran from its shipped ONNX sibling: nothing was converted or cached
    r = _run([str(lean_venv / "bin" / "python"), "-c", "import sys; from ferkit import Recognizer; "
              "r = Recognizer('fer7'); print(r.backend, 'torch' in sys.modules)"], env=_env(), cwd="/")
    assert r.stdout.split() == ["onnx", "False"]


def test_lean_install_lists_models_and_tracks_a_real_clip(lean_venv: Path, tmp_path: Path) -> None:
    """`ferkit models` and `ferkit track` (a clip made of a wild-dev photo: tests/videoclips.py) need no torch."""
    from videoclips import gap_clip

    if not WILD.is_dir():
        pytest.skip(f"wild-dev photos not found under {WILD}")
    ferkit = str(lean_venv / "bin" / "ferkit")
    models = json.loads(_run([ferkit, "models", "--json"], env=_env(), cwd="/").stdout)
    assert {m["name"] for m in models} >= {"fer3", "fer7"}
    clip = gap_clip(tmp_path / "gap.mp4")
    _run([ferkit, "track", str(clip), "--out", str(tmp_path / "out")], env=_env(), cwd="/")
    rows = (tmp_path / "out" / "gap.frames.csv").read_text().splitlines()
    assert len(rows) > 1 and all(r.split(",")[2] == "1" for r in rows[1:])  # one person, one track id


def test_lean_install_says_which_extra_a_command_needs(lean_venv: Path, tmp_path: Path) -> None:
    r = subprocess.run([str(lean_venv / "bin" / "ferkit"), "train", "--data", str(tmp_path)], capture_output=True,
                       text=True, env=_env(), cwd="/")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'ferkit[train]'" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_serve_extra_stays_torch_free_and_serves(lean_venv: Path, wheel: Path, tmp_path: Path,
                                                  running_server) -> None:
    import httpx

    photo = min((WILD / "happy").glob("*.jpg"), default=None)
    if photo is None:
        pytest.skip(f"wild-dev photos not found under {WILD}")
    _run([str(lean_venv / "bin" / "python"), *PIP_INSTALL, f"{wheel}[serve]"], env=_env())
    assert not _importable(lean_venv, "torch")
    with running_server("fer3", tmp_path / "serve.log", python=lean_venv / "bin" / "python",
                        env={"VIRTUAL_ENV": ""}) as (url, _proc):
        r = httpx.post(url + "/v1/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
                       timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["classes"] == ["happy", "sad", "neutral"] and body["faces"][0]["label"] in body["classes"]
