"""Distributed data-parallel training: two CPU processes (gloo) through Lightning Fabric end with the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("lightning")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_cpu_processes_end_with_identical_weights(make_tiny_dataset: Callable[..., Path], tmp_path: Path) -> None:
    data = make_tiny_dataset(10, 4)
    out, dump = tmp_path / "run", tmp_path / "ranks"
    # on FER+ crowd votes (soft targets): the ranks shard the targets with the faces
    votes = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013" / "ferplus"
    # Fabric's launcher starts rank 1 by re-running this very command (python -m ferkit …).
    cmd = [sys.executable, "-m", "ferkit", "train", "--data", str(data), "--devices", "2", "--device", "cpu",
           "--max-steps", "3", "--epochs", "1", "--batch-size", "4", "--out", str(out),
           "--set", f"rank_weights={dump}", "--labels", str(votes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=360, env=env, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert sorted(p.name for p in dump.iterdir()) == ["rank0.safetensors", "rank1.safetensors"]
    w0, w1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert w0.keys() == w1.keys()
    differ = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert not differ, f"ranks disagree on {differ[:5]}"
    # the two ranks trained on different halves of the data, so agreement means the gradients were averaged;
    # and they did train: the weights moved away from the seeded initialisation
    torch.manual_seed(0)
    from ferkit.models import create_model

    init = create_model("fastcnn", num_classes=3).state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in w0 if w0[k].is_floating_point())
    # one run directory, written by rank 0, holding the same weights
    model = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(model[k], w0[k]) for k in w0)
    assert r.stdout.count("done: ") == 1  # rank-zero printing only
    assert r.stdout.count("labels: soft targets") == 1
