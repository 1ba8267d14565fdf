"""End to end through the real CLI on small slices of FER2013: train, evaluate, ensembles, distillation, recipes,
bad input, an interrupted run, reproducibility."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ferkit.cli import main
from ferkit.config import make_config
from ferkit.evaluate import ensemble_probs
from ferkit.evaluate import evaluate_probs
from ferkit.modelfile import ModelMeta, load_model, read_meta, save_model
from ferkit.models import create_model

RUN_FILES = (
    "model.safetensors",
    "model.json",
    "last.ckpt",
    "config.yaml",
    "metrics.json",
    "curves.png",
    "confusion_matrix.png",
    "reliability.png",
    "coverage.png",
)
H3 = ["happy", "sad", "neutral"]


def train(*args: str | Path) -> int:
    return main(["train", *map(str, args)])


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoint, written by this test


@pytest.fixture(scope="module")
def micro(make_tiny_dataset: Callable[..., Path]) -> Path:
    """10 train + 4 validation images per class: for the runs that only need to go through the motions."""
    return make_tiny_dataset(10, 4)


@pytest.fixture(scope="module")
def run1(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run1"
    assert train("--data", tiny_dataset, "--epochs", 1, "--batch-size", 16, "--out", out) == 0
    return out


def untrained_model_file(folder: Path, arch: str, classes: tuple[str, ...], data: Path, seed: int) -> Path:
    """A model file with untrained weights: for tests of evaluation and packing, not of the model."""
    torch.manual_seed(seed)
    net = create_model(arch, num_classes=len(classes)).eval()
    meta = ModelMeta(arch=arch, classes=classes, name=f"{arch}-{len(classes)}", training={"data": str(data)})
    return save_model(folder / f"{arch}-{len(classes)}.safetensors", net, meta)


@pytest.fixture(scope="module")
def model7(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 7-class fastcnn model file."""
    seven = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    return untrained_model_file(tmp_path_factory.mktemp("m7"), "fastcnn", seven, tiny_dataset, 7)


def test_train_writes_the_run_directory(run1: Path, tiny_dataset: Path) -> None:
    for name in RUN_FILES:
        assert (run1 / name).is_file() and (run1 / name).stat().st_size > 0, name
    assert not list(run1.glob("*.tmp"))
    m = json.loads((run1 / "metrics.json").read_text())
    assert m["status"] == "done" and len(m["history"]) == 1 and m["history"][0]["epoch"] == 1
    assert m["final"]["n"] == 90 and m["final"]["classes"] == H3 and m["val_split"] == "validation"
    assert m["images_per_second"] > 0 and m["skipped"] == 0
    cfg = yaml.safe_load((run1 / "config.yaml").read_text())
    assert cfg["data"] == str(tiny_dataset) and cfg["epochs"] == 1 and cfg["batch_size"] == 16
    assert make_config("quick", cfg).out == str(run1)  # the saved config is a valid config
    meta = read_meta(run1)
    assert meta.classes == tuple(H3) and meta.arch == "fastcnn" and meta.training["data"] == str(tiny_dataset)
    assert meta.metrics["accuracy"] == m["plain_accuracy"]
    assert json.loads((run1 / "model.json").read_text())["classes"] == H3
    ck = load_ckpt(run1 / "last.ckpt")
    assert ck["epoch"] == 0 and ck["step"] == 90 // 16 and ck["config"]["data"] == str(tiny_dataset)


def test_evaluate_json(run1: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["evaluate", "--model", str(run1), "--json", "--out", str(tmp_path / "ev")]) == 0
    out, err = capsys.readouterr()
    m = json.loads(out)
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix", "classes", "n"} <= set(m)
    assert m["classes"] == H3 and m["n"] == 90 and m["split"] == "validation"
    assert "no test split" in err  # it says which split it fell back to
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 90 and m["accuracy"] == pytest.approx(np.trace(cm) / 90)
    assert sum(r["support"] for r in m["per_class"].values()) == 90
    # the model file gives exactly what training measured on the same images
    assert m["accuracy"] == json.loads((run1 / "metrics.json").read_text())["plain_accuracy"]
    assert (tmp_path / "ev" / "metrics.json").is_file() and (tmp_path / "ev" / "confusion_matrix.png").is_file()
    assert main(["evaluate", "--model", str(run1), "--split", "train", "--tta", "flip"]) == 0
    out, _ = capsys.readouterr()
    assert "[train]" in out and "accuracy" in out and "confusion matrix" in out


def test_seven_class_model_on_a_three_class_folder(
    model7: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--model", str(model7), "--data", str(tiny_dataset / "validation"), "--json"]) == 0
    out, err = capsys.readouterr()
    m = json.loads(out)
    assert m["classes"] == H3 and len(m["confusion_matrix"]) == 3 and m["n"] == 90
    assert "restricted" in err and "7 classes" in err


def test_ensemble_averages_the_models(
    run1: Path, model7: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--model", f"{run1},{model7}", "--data", str(tiny_dataset), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["models"] == [str(run1), str(model7)] and m["classes"] == H3 and m["n"] == 90
    from ferkit.data import find_dataset

    src = find_dataset(tiny_dataset, H3).splits["validation"]
    a, b = load_model(run1), load_model(model7)
    pa, labels = ensemble_probs([a], src, H3)
    pb, _ = ensemble_probs([b], src, H3)
    pab, _ = ensemble_probs([a, b], src, H3)
    assert np.allclose(pab, (pa + pb) / 2, atol=1e-6)
    assert np.allclose(pb.sum(1), 1, atol=1e-5)  # the 7-class model renormalised over the three
    assert m["accuracy"] == evaluate_probs(pab, labels, H3)["accuracy"]


def test_distill_with_unlabelled_other_expressions(
    run1: Path, make_tiny_dataset: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """distill_unlabeled: angry/fear faces join the transfer set with the teachers' soft labels, no hard label."""
    data = make_tiny_dataset(8, 4, classes=("happy", "sad", "neutral", "angry", "fear"))
    out = tmp_path / "student"
    argv = ["distill", "--teacher", str(run1), "--data", str(data), "--epochs", "2", "--batch-size", "8",
            "--out", str(out), "--set", "distill_unlabeled=true"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "24 train / 12 validation images" in printed and "plus 16 unlabelled for distillation" in printed
    meta = read_meta(out)
    assert meta.training["train_images"] == 24 and meta.training["unlabelled_images"] == 16
    assert load_ckpt(out / "last.ckpt")["step"] == 2 * (40 // 8)  # every epoch covers all 40 images
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["train_acc"] <= 1 for h in hist)
    assert meta.classes == tuple(H3) and meta.metrics["n"] == 12

    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--set", "distill_unlabeled=true"]) == 2
    assert "needs teachers" in capsys.readouterr().err


@pytest.fixture(scope="module")
def wide3(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class fastcnn_wide model file: a second, different member for ensembles."""
    return untrained_model_file(tmp_path_factory.mktemp("w3"), "fastcnn_wide", tuple(H3), tiny_dataset, 3)


def test_packed_ensemble_is_one_model_file(
    run1: Path,
    wide3: Path,
    model7: Path,
    tiny_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    one_line_error: Callable[[str], str],
) -> None:
    packed = tmp_path / "ens.safetensors"
    assert main(["export", "--format", "ferkit", "--model", f"{run1},{wide3}", "--out", str(packed)]) == 0
    meta = read_meta(packed)
    assert meta.arch == "ensemble(fastcnn,fastcnn_wide)" and meta.classes == tuple(H3)
    assert meta.training["ensemble_of"] == [str(run1), str(wide3)] and meta.metrics["n"] == 90
    from ferkit.data import find_dataset

    src = find_dataset(tiny_dataset, H3).splits["validation"]
    def raw(spec: Path) -> tuple:  # the model with its calibration switched off
        net, m = load_model(spec)
        return net, dataclasses.replace(m, temperature=1.0, temperature_poly=())

    p_members, labels = ensemble_probs([raw(run1), raw(wide3)], src, H3)
    p_raw, _ = ensemble_probs([raw(packed)], src, H3)
    assert np.allclose(p_raw, p_members, atol=1e-5)  # one file, the same averaged probabilities
    # packing calibrates the ensemble itself: other scores, the same labels
    cal = meta.metrics["calibration"]
    assert cal["fit_split"] == "validation" and meta.temperature == cal["temperature"] and meta.temperature != 1.0
    p_packed, _ = ensemble_probs([load_model(packed)], src, H3)
    assert np.array_equal(p_packed.argmax(1), p_raw.argmax(1)) and not np.allclose(p_packed, p_raw, atol=1e-3)
    assert meta.metrics["accuracy"] == evaluate_probs(p_packed, labels, H3)["accuracy"]

    nested = tmp_path / "nested.safetensors"
    assert main(["export", "--format", "ferkit", "--model", f"{packed},{run1}", "--out", str(nested)]) == 0
    assert read_meta(nested).arch == "ensemble(fastcnn,fastcnn_wide,fastcnn)"  # flattened, members weigh the same

    onnx_out = tmp_path / "ens.onnx"
    rc = main(["export", "--model", str(packed), "--out", str(onnx_out), "--data", str(tiny_dataset / "validation")])
    assert rc == 0 and onnx_out.stat().st_size > 0  # the ONNX parity check passed
    capsys.readouterr()

    bad = tmp_path / "bad.safetensors"
    assert main(["export", "--format", "ferkit", "--model", f"{run1},{model7}", "--out", str(bad)]) == 2
    assert "classes" in one_line_error(capsys.readouterr().err) and not bad.exists()
    assert main(["export", "--format", "ferkit", "--model", str(run1), "--out", str(bad)]) == 2
    assert "at least two" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_distill(run1: Path, tiny_dataset: Path, tmp_path: Path, precision: str) -> None:
    """bf16 runs the student and the teachers under autocast, also on CPU."""
    out = tmp_path / "student"
    rc = main(
        [
            "distill",
            "--teacher",
            str(run1),
            "--student",
            "fastcnn",
            "--data",
            str(tiny_dataset),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--max-steps",
            "2",
            "--out",
            str(out),
            "--temperature",
            "2",
            "--set",
            f"precision={precision}",
        ]
    )
    assert rc == 0
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    meta = read_meta(out)
    assert meta.training["teacher"] == str(run1) and meta.arch == "fastcnn"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["teacher"] == str(run1) and cfg["distill_temp"] == 2.0 and cfg["precision"] == precision
    assert load_ckpt(out / "last.ckpt")["step"] == 2
    assert json.loads((out / "metrics.json").read_text())["plain_accuracy"] > 0


@pytest.mark.slow
def test_seed_recipe_runs_without_pretrained(make_tiny_dataset: Callable[..., Path], tmp_path: Path) -> None:
    """EfficientNet-B0 at 160×160 is slow on two CPU cores: 4+2 images per class, two steps of four."""
    pytest.importorskip("timm")
    nano = make_tiny_dataset(4, 2)
    out = tmp_path / "seed"
    assert (
        train(
            "--recipe",
            "seed",
            "--no-pretrained",
            "--data",
            nano,
            "--epochs",
            1,
            "--max-steps",
            2,
            "--batch-size",
            4,
            "--device",
            "cpu",
            "--out",
            out,
        )
        == 0
    )
    meta = read_meta(out)
    assert meta.arch == "timm/efficientnet_b0" and meta.input_size == 160
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["recipe"] == "seed" and cfg["pretrained"] is False and cfg["schedule"] == "plateau"
    net, _ = load_model(out)
    assert load_ckpt(out / "last.ckpt")["step"] == 2
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 160, 160)).shape == (1, 3)


@pytest.mark.slow
def test_accurate_recipe_runs(micro: Path, tmp_path: Path) -> None:
    # 30 images at batch 6: 5 steps an epoch, so the one-cycle warm-up (0.2) is exactly one step long
    out = tmp_path / "accurate"
    assert (
        train(
            "--recipe",
            "accurate",
            "--data",
            micro,
            "--epochs",
            1,
            "--batch-size",
            6,
            "--max-steps",
            2,
            "--device",
            "cpu",
            "--out",
            out,
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["tta"] == "tencrop" and m["final"]["n"] == 12
    assert read_meta(out).arch == "vgg"
    assert load_ckpt(out / "last.ckpt")["step"] == 2


def test_train_on_a_csv_file(tiny_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "csv"
    assert train("--data", tiny_csv, "--epochs", 1, "--batch-size", 6, "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["val_split"] == "validation" and m["final"]["n"] == 9  # PublicTest rows
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--json"]) == 0  # data from the model file; test = PrivateTest
    ev = json.loads(capsys.readouterr().out)
    assert ev["split"] == "test" and ev["n"] == 6


def test_train_on_a_single_folder_holds_out_a_tenth(micro: Path, tmp_path: Path) -> None:
    out = tmp_path / "single"
    assert train("--data", micro / "train", "--epochs", 1, "--batch-size", 8, "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["val_split"] == "train[10% held out]" and m["final"]["n"] == 3
    assert read_meta(out).training["train_images"] == 27


@pytest.fixture(scope="module")
def all_bad_validation(micro: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro training set with a validation split of three broken files."""
    root = tmp_path_factory.mktemp("allbad")
    shutil.copytree(micro / "train", root / "train")
    for c in H3:
        (root / "validation" / c).mkdir(parents=True)
        (root / "validation" / c / "a.jpg").write_text("junk")
    return root


BAD_INPUTS: list[tuple[str, list[str], str]] = [
    ("missing data", ["train", "--out", "{tmp}/x"], "--data is required"),
    ("empty folder", ["train", "--data", "{empty}", "--out", "{tmp}/x"], "empty folder"),
    ("missing folder", ["train", "--data", "{tmp}/nowhere", "--out", "{tmp}/x"], "no such file or folder"),
    (
        "unknown class",
        ["train", "--data", "{tiny}", "--classes", "hapy,sad", "--out", "{tmp}/x"],
        "unknown class 'hapy'.*did you mean 'happy'",
    ),
    (
        "class without images",
        ["train", "--data", "{tiny}", "--classes", "happy,angry", "--out", "{tmp}/x"],
        "no images for class.*angry",
    ),
    (
        "unknown recipe",
        ["train", "--data", "{tiny}", "--recipe", "quik", "--out", "{tmp}/x"],
        "unknown recipe 'quik'.*did you mean 'quick'",
    ),
    (
        "unknown --set key",
        ["train", "--data", "{tiny}", "--set", "label_smothing=0.2", "--out", "{tmp}/x"],
        "unknown config key 'label_smothing'; did you mean 'label_smoothing'",
    ),
    (
        "bad --set value",
        ["train", "--data", "{tiny}", "--set", "epochs=many", "--out", "{tmp}/x"],
        "config field 'epochs'",
    ),
    ("--set without =", ["train", "--data", "{tiny}", "--set", "epochs", "--out", "{tmp}/x"], "expected KEY=VALUE"),
    (
        "unknown model",
        ["train", "--data", "{tiny}", "--model", "fastcn", "--out", "{tmp}/x"],
        "unknown model 'fastcn'.*did you mean 'fastcnn'",
    ),
    ("no readable image", ["train", "--data", "{allbad}", "--out", "{tmp}/x"], "none of its 3 image.*could be read"),
    ("missing config file", ["train", "--data", "{tiny}", "--config", "{tmp}/nope.yaml"], "no such config file"),
    ("nothing to resume", ["train", "--resume", "--out", "{tmp}/fresh"], "nothing to resume"),
    (
        "unknown teacher",
        ["distill", "--teacher", "{tmp}/nope", "--data", "{tiny}", "--out", "{tmp}/x"],
        "no such model file",
    ),
    ("cuda without a GPU", ["train", "--data", "{tiny}", "--device", "cuda", "--out", "{tmp}/x"], "no CUDA device"),
    ("evaluate a missing model", ["evaluate", "--model", "{tmp}/nope.safetensors"], "no such model file"),
    (
        "evaluate on a missing folder",
        ["evaluate", "--model", "{run1}", "--data", "{tmp}/nowhere"],
        "no such file or folder",
    ),
    ("evaluate a missing split", ["evaluate", "--model", "{run1}", "--split", "test"], "no 'test' split"),
]


@pytest.mark.parametrize(("argv", "message"), [pytest.param(a, m, id=i) for i, a, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str],
    message: str,
    tiny_dataset: Path,
    run1: Path,
    all_bad_validation: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    one_line_error: Callable[[str], str],
) -> None:
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    (tmp_path / "empty").mkdir()
    subs = {
        "tmp": str(tmp_path),
        "empty": str(tmp_path / "empty"),
        "tiny": str(tiny_dataset),
        "run1": str(run1),
        "allbad": str(all_bad_validation),
    }
    rc = main([a.format(**subs) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert re.search(message, one_line_error(err)), err
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_resume_cannot_stretch_the_schedule(
    run1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_line_error: Callable[[str], str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run1, run)
    assert train("--resume", "--out", run, "--epochs", 3) == 2
    assert "planned for 5 steps (onecycle schedule), the settings now give 15" in one_line_error(
        capsys.readouterr().err
    )
    assert load_ckpt(run / "last.ckpt")["epoch"] == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 1  # the refused resume changed nothing


def test_pretrained_offline_is_one_line(
    micro: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_line_error: Callable[[str], str],
    offline_hub: None,
) -> None:
    pytest.importorskip("timm")
    monkeypatch.setenv("FERKIT_DOWNLOAD_TIMEOUT", "2")
    t0 = time.perf_counter()
    rc = train("--recipe", "seed", "--data", micro, "--max-steps", 1, "--device", "cpu", "--out", tmp_path / "x")
    _, err = capsys.readouterr()
    if rc == 0:
        pytest.skip("ImageNet weights were already in the local hub cache")
    assert rc == 2 and "offline" in one_line_error(err) and "without --pretrained" in err
    assert time.perf_counter() - t0 < 30


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_same_seed_same_weights(micro: Path, tmp_path: Path) -> None:
    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        assert (
            train(
                "--data",
                micro,
                "--epochs",
                1,
                "--batch-size",
                8,
                "--max-steps",
                3,
                "--seed",
                seed,
                "--device",
                "cpu",
                "--out",
                out,
            )
            == 0
        )
        assert load_ckpt(out / "last.ckpt")["step"] == 3
        return _weights(out / "model.safetensors")

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_lightning_lines_print_once(micro: Path, tmp_path: Path) -> None:
    """The CLI configures logging before Lightning is imported: its info lines must not print twice; bf16 on a CPU
    that would emulate it is warned about once."""
    cmd = [sys.executable, "-m", "ferkit", "train", "--data", str(micro), "--out", str(tmp_path / "r"), "--epochs", "1",
           "--max-steps", "1", "--batch-size", "8", "--set", "precision=bf16"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "FERKIT_PROGRESS": "0"})
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("Automatic Mixed Precision") == 1, r.stderr
    # bf16 on a CPU without bf16 units is emulated (12x slower on an AVX2 EPYC): said once, only there
    emulated = not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (r.stdout + r.stderr).count("bf16 is emulated") == int(emulated), r.stderr


def test_resumed_run_is_bit_identical(micro: Path, tmp_path: Path) -> None:
    """Stop after epoch 1 (max_steps), resume to epoch 2: the same weights as one uninterrupted run."""
    common = ("--data", micro, "--epochs", 2, "--batch-size", 8, "--device", "cpu", "--seed", 3)
    assert train(*common, "--out", tmp_path / "whole") == 0
    per_epoch = load_ckpt(tmp_path / "whole" / "last.ckpt")["step"] // 2
    assert train(*common, "--out", tmp_path / "split", "--max-steps", per_epoch) == 0
    assert load_ckpt(tmp_path / "split" / "last.ckpt")["epoch"] == 0
    assert train("--resume", "--out", tmp_path / "split", "--max-steps", 0) == 0
    a = load_ckpt(tmp_path / "whole" / "last.ckpt")
    b = load_ckpt(tmp_path / "split" / "last.ckpt")
    assert a["step"] == b["step"] == 2 * per_epoch
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "resumed weights differ"


def test_weight_ema_is_kept_and_resumed(micro: Path, tmp_path: Path) -> None:
    """--set ema=D: every step updates the average, each epoch validates it, the averaged weights are the ones kept,
    and a resumed run carries on the same average (bit-identical to an uninterrupted one)."""
    common = ("--data", micro, "--epochs", 2, "--batch-size", 8, "--device", "cpu", "--seed", 5, "--set", "ema=0.5")
    assert train(*common, "--out", tmp_path / "whole") == 0
    a = load_ckpt(tmp_path / "whole" / "last.ckpt")
    assert int(a["ema"]["n_averaged"]) == a["step"] > 0
    rows = json.loads((tmp_path / "whole" / "metrics.json").read_text())["history"]
    assert all(0 <= r["val_acc_ema"] <= 1 and "val_acc" in r for r in rows)
    per_epoch = a["step"] // 2
    assert train(*common, "--out", tmp_path / "split", "--max-steps", per_epoch) == 0
    assert train("--resume", "--out", tmp_path / "split", "--max-steps", 0) == 0
    b = load_ckpt(tmp_path / "split" / "last.ckpt")
    assert a["ema"].keys() == b["ema"].keys()
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"]), "the resumed average differs"
    # one epoch: the model file holds the average, not the trained weights
    assert train(*common[:2], "--epochs", 1, *common[4:], "--out", tmp_path / "one") == 0
    c = load_ckpt(tmp_path / "one" / "last.ckpt")
    kept = _weights(tmp_path / "one" / "model.safetensors")
    avg = {k: c["ema"][f"module.{k}"] for k in kept}
    assert all(torch.equal(kept[k], avg[k].float()) for k in kept if kept[k].is_floating_point())
    assert not all(torch.equal(kept[k], c["model"][k].float()) for k in kept if kept[k].is_floating_point())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_interrupted_run_resumes(tiny_dataset: Path, tmp_path: Path) -> None:
    """SIGKILL a real training process after its first checkpoint; --resume finishes the run with every epoch."""
    out = tmp_path / "killed"
    epochs = 4
    cmd = [
        sys.executable,
        "-m",
        "ferkit",
        "train",
        "--data",
        str(tiny_dataset),
        "--epochs",
        str(epochs),
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    ckpt = out / "last.ckpt"
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists():
            assert proc.poll() is None, f"training ended before its first checkpoint: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = load_ckpt(ckpt)  # complete, never half-written
    assert first["epoch"] < epochs - 1, "the run finished before it could be interrupted"
    assert not (out / "model.safetensors").exists()

    assert train("--resume", "--out", out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "done"
    assert [h["epoch"] for h in m["history"]] == list(range(1, epochs + 1))
    assert m["history"][: first["epoch"] + 1] == first["history"]  # the epochs before the kill are kept as they were
    last = load_ckpt(ckpt)
    assert last["epoch"] == epochs - 1 and last["step"] == epochs * (90 // 16)
    assert not list(out.glob("*.tmp"))
    assert read_meta(out).training["epochs"] == epochs


def test_bundle_script_calibrates_and_writes_the_card(run1: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """scripts/bundle_model.py on a fresh run: the same weights, a stored calibration, a full card, an ONNX sibling."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bundle_model.py"
    to, cards = tmp_path / "weights", tmp_path / "cards"
    r = subprocess.run([sys.executable, str(script), str(run1), "tiny3", "--data", str(tiny_dataset), "--to", str(to),
                        "--cards", str(cards), "--command", "ferkit train --epochs 1"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    model = to / "tiny3.safetensors"
    a, b = load_file(str(run1 / "model.safetensors")), load_file(str(model))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # weights untouched
    meta = read_meta(model)
    cal = meta.metrics["calibration"]
    assert meta.name == "tiny3" and meta.temperature == cal["temperature"] and cal["n"] == 90
    assert meta.metrics["suggested_min_score"] == 0.5 and meta.training["command"] == "ferkit train --epochs 1"
    card = (to / "tiny3.md").read_text()
    for part in ("## Data and its terms", "commercial", "## Calibration", "cross-fitted", "## Abstaining",
                 "## Known limitations", "rotated 30°", "faces/s", "Confusion matrix", "ferkit train --epochs 1"):
        assert part in card, part
    assert f"**{meta.metrics['accuracy'] * 100:.2f}%**" in card
    assert (to / "tiny3.onnx").is_file() and (cards / "tiny3-reliability.png").is_file()
    assert json.loads((cards / "tiny3.json").read_text())["calibration"] == cal
