"""Training that outlives a sitting: a warm restart from a model file continues its architecture and weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from ferkit.cli import main
from ferkit.modelfile import load_model, read_meta


@pytest.fixture(scope="module")
def micro(make_tiny_dataset: Callable[..., Path]) -> Path:
    return make_tiny_dataset(10, 4)


def test_init_without_model_keeps_the_architecture_and_starts_from_its_weights(micro: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert main(["train", "--data", str(micro), "--model", "fastcnn_wide", "--epochs", "1", "--batch-size", "8",
                 "--out", str(first)]) == 0
    second = tmp_path / "second"
    # lr tiny and one step: the restarted weights stay next to the file they came from, not a fresh initialisation
    assert main(["train", "--data", str(micro), "--init", str(first), "--epochs", "1", "--batch-size", "8",
                 "--lr", "1e-9", "--set", "max_steps=1", "--out", str(second)]) == 0
    cfg = yaml.safe_load((second / "config.yaml").read_text())
    assert cfg["model"] == "fastcnn_wide" and cfg["init"] == str(first)
    assert read_meta(second / "model.safetensors").arch == "fastcnn_wide"
    a, _ = load_model(first)
    b, _ = load_model(second)
    wa = dict(a.named_parameters())
    for name, p in b.named_parameters():
        assert torch.allclose(p, wa[name], atol=1e-4), name


def test_init_with_another_architecture_is_refused(micro: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "first"
    assert main(["train", "--data", str(micro), "--epochs", "1", "--batch-size", "8", "--set", "max_steps=1",
                 "--out", str(first)]) == 0
    code = main(["train", "--data", str(micro), "--init", str(first), "--model", "fastcnn_wide", "--epochs", "1",
                 "--out", str(tmp_path / "x")])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "fastcnn" in err and "--model fastcnn" in err


def test_warm_restart_from_a_flip_tta_model_trains_the_network_inside(micro: Path, tmp_path: Path) -> None:
    """fer7-large carries flip TTA (flip(fastcnn_xl)); --init of such a file continues the bare network."""
    import subprocess
    import sys

    first = tmp_path / "first"
    assert main(["train", "--data", str(micro), "--epochs", "1", "--batch-size", "8", "--set", "max_steps=1",
                 "--out", str(first)]) == 0
    flipped = tmp_path / "flipped.safetensors"
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "scripts" / "wrap_flip.py"), str(first), str(flipped)], check=True,
                   capture_output=True)
    assert read_meta(flipped).arch == "flip(fastcnn)"
    second = tmp_path / "second"
    assert main(["train", "--data", str(micro), "--init", str(flipped), "--epochs", "1", "--batch-size", "8",
                 "--lr", "1e-9", "--set", "max_steps=1", "--out", str(second)]) == 0
    assert yaml.safe_load((second / "config.yaml").read_text())["model"] == "fastcnn"
    a, _ = load_model(first)
    b, _ = load_model(second)
    wa = dict(a.named_parameters())
    for name, p in b.named_parameters():
        assert torch.allclose(p, wa[name], atol=1e-4), name
