"""The model file: safetensors weights + JSON metadata, loaded without pickle."""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ferkit.errors import ModelFileError
from ferkit.modelfile import (
    FORMAT,
    META_KEY,
    ModelMeta,
    load_model,
    read_meta,
    resolve_model_path,
    save_model,
    stores_half,
)
from ferkit.models import create_model

META = ModelMeta(arch="fastcnn", classes=("happy", "sad", "neutral"), input_size=48, in_chans=1, mean=0.5, std=0.25,
                 name="unit", training={"recipe": "quick", "epochs": 3, "teacher": None},
                 metrics={"accuracy": 0.75, "n": 10})


def trained_net(arch: str = "fastcnn", n: int = 3) -> torch.nn.Module:
    """A network whose weights and BatchNorm statistics are not the fresh defaults."""
    torch.manual_seed(0)
    net = create_model(arch, num_classes=n)
    net.train()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        net(torch.randn(8, 1, 48, 48))  # moves the running statistics
    return net.eval()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    net = trained_net()
    return save_model(tmp_path / "run" / "model.safetensors", net, META), net


def test_round_trip_gives_identical_outputs(saved: tuple[Path, torch.nn.Module]) -> None:
    path, net = saved
    loaded, meta = load_model(path)
    assert not loaded.training
    x = torch.randn(4, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert meta == META


def test_metadata(saved: tuple[Path, torch.nn.Module]) -> None:
    path, _ = saved
    meta = read_meta(path)
    assert meta.classes == ("happy", "sad", "neutral") and isinstance(meta.classes, tuple)
    assert (meta.arch, meta.input_size, meta.in_chans, meta.mean, meta.std) == ("fastcnn", 48, 1, 0.5, 0.25)
    assert meta.training["epochs"] == 3 and meta.metrics["accuracy"] == 0.75 and meta.format == FORMAT
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["classes"] == ["happy", "sad", "neutral"] and sidecar["arch"] == "fastcnn"
    with pytest.raises(AttributeError):
        meta.arch = "vgg"  # type: ignore[misc]  # frozen
    assert not list(path.parent.glob("*.tmp"))


def test_the_file_is_plain_safetensors(saved: tuple[Path, torch.nn.Module]) -> None:
    """8-byte little-endian header length, a JSON header with the metadata, then raw tensor bytes — no pickle."""
    path, net = saved
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["format"] == FORMAT
    assert json.loads(header["__metadata__"][META_KEY])["arch"] == "fastcnn"
    assert set(header) - {"__metadata__"} == set(net.state_dict())
    assert all(header[k]["dtype"] in ("F32", "I64") for k in net.state_dict())
    assert b"\x80\x04\x95" not in raw[:8 + n]  # no pickle protocol-4 frame in the header


def test_loading_never_unpickles(saved: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = saved

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    net, meta = load_model(path)
    assert meta.arch == "fastcnn" and isinstance(net, torch.nn.Module)
    assert load_model(path.parent)[1] == meta  # a run directory
    assert read_meta(path).classes == META.classes


def test_run_directory_and_names_resolve(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, _ = saved
    assert resolve_model_path(path.parent) == path
    assert resolve_model_path(str(path)) == path
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ModelFileError, match="holds no model.safetensors"):
        resolve_model_path(empty)


@pytest.mark.parametrize("arch", ["fastcnn_wide"])
def test_other_architectures_round_trip(tmp_path: Path, arch: str) -> None:
    net = trained_net(arch, 7)
    meta = ModelMeta(arch=arch, classes=("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"))
    loaded, m = load_model(save_model(tmp_path / "m.safetensors", net, meta, json_sidecar=False))
    assert not (tmp_path / "m.json").exists()
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert m.classes == meta.classes


def test_half_precision_weights_are_saved_as_float32(tmp_path: Path) -> None:
    net = trained_net().to(torch.bfloat16)
    loaded, _ = load_model(save_model(tmp_path / "m.safetensors", net, META))
    assert all(v.dtype in (torch.float32, torch.int64) for v in loaded.state_dict().values())


def test_half_storage_halves_the_file_and_loads_as_float32(tmp_path: Path) -> None:
    """half=True: kernels and weight matrices stored as float16 (what the header says), biases, norms and their
    running statistics float32; the file about half the size; loading gives float32 weights equal to the float16
    rounding of the originals, and the same predictions."""
    from safetensors import safe_open

    net = trained_net("fastcnn_wide", 7)
    meta = dataclasses.replace(META, arch="fastcnn_wide", classes=("angry", "disgust", "fear", "happy", "sad",
                                                                    "surprise", "neutral"))
    full = save_model(tmp_path / "full.safetensors", net, meta, json_sidecar=False)
    half = save_model(tmp_path / "half.safetensors", net, meta, json_sidecar=False, half=True)
    assert not stores_half(full) and stores_half(half)
    assert read_meta(half) == read_meta(full) == meta
    state = net.state_dict()
    with safe_open(str(half), "pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            want = (torch.float16 if state[k].dim() >= 2 else torch.float32) if state[k].is_floating_point() \
                else state[k].dtype
            assert f.get_tensor(k).dtype == want, k
    assert half.stat().st_size < 0.55 * full.stat().st_size
    loaded, _ = load_model(half)
    for k, v in loaded.state_dict().items():
        assert v.dtype == state[k].dtype, k
        expect = state[k].half().float() if state[k].is_floating_point() and state[k].dim() >= 2 else state[k]
        assert torch.equal(v, expect), k
    x = torch.randn(64, 1, 48, 48)
    with torch.no_grad():
        a, b = net(x), loaded(x)
    assert not torch.equal(a, b) and (a - b).abs().max() < 1e-2 and torch.equal(a.argmax(1), b.argmax(1))
    with torch.no_grad():  # a weight beyond float16's range would become inf: that tensor stays float32
        net.head[-1].weight[0, 0] = 1e5
    big = save_model(tmp_path / "big.safetensors", net, meta, json_sidecar=False, half=True)
    with safe_open(str(big), "pt") as f:
        assert f.get_tensor("head.3.weight").dtype == torch.float32 and f.get_tensor("head.3.weight")[0, 0] == 1e5
        assert f.get_tensor("features.0.0.weight").dtype == torch.float16


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-models")
    files = {"text": d / "notes.safetensors", "jpeg": d / "face.jpg", "plain_safetensors": d / "plain.safetensors",
             "bad_meta": d / "badmeta.safetensors", "unknown_arch": d / "arch.safetensors",
             "wrong_weights": d / "wrong.safetensors", "empty": d / "empty.safetensors"}
    files["text"].write_text("hello")
    files["jpeg"].write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)
    files["empty"].write_bytes(b"")
    save_file({"w": torch.zeros(2)}, str(files["plain_safetensors"]))
    save_file({"w": torch.zeros(2)}, str(files["bad_meta"]), metadata={META_KEY: "{not json"})
    save_model(files["unknown_arch"], trained_net(), ModelMeta(arch="nosuchnet", classes=("a", "b")))
    save_model(files["wrong_weights"], trained_net(), ModelMeta(arch="resnet18", classes=("a", "b", "c")))
    return files


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such model file, run directory or bundled model"),
        ("text", "not a ferkit model file"),
        ("jpeg", "not a ferkit model file"),
        ("empty", "not a ferkit model file"),
        ("plain_safetensors", "without ferkit metadata"),
        ("bad_meta", "damaged ferkit metadata"),
        ("unknown_arch", "cannot build architecture 'nosuchnet'"),
        ("wrong_weights", "weights do not match architecture 'resnet18'"),
    ],
)
def test_unusable_files_raise_model_file_error(bad_files: dict[str, Path], tmp_path: Path, kind: str,
                                               message: str) -> None:
    path = bad_files.get(kind, tmp_path / "missing.safetensors")
    with pytest.raises(ModelFileError, match=message) as info:
        load_model(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_digest_and_onnx_sibling(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    """The digest covers weights and metadata (a recalibrated or re-bundled file is a new file); the sibling is the
    .onnx beside a .safetensors file, and only that."""
    import dataclasses
    import hashlib

    from ferkit.modelfile import file_digest, onnx_sibling

    path, net = saved
    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    other = save_model(tmp_path / "other.safetensors", net, dataclasses.replace(META, name="renamed"))
    assert file_digest(other) != file_digest(path)  # same weights, other metadata
    assert onnx_sibling(path) is None
    path.with_suffix(".onnx").write_bytes(b"x")
    assert onnx_sibling(path) == path.with_suffix(".onnx") and onnx_sibling(path.with_suffix(".onnx")) is None
    with pytest.raises(ModelFileError, match="cannot read the model file"):
        file_digest(tmp_path / "missing.safetensors")


def test_load_model_with_known_meta_skips_the_header(saved: tuple[Path, torch.nn.Module],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from ferkit import modelfile

    path, _ = saved
    monkeypatch.setattr(modelfile, "read_meta", lambda *a: pytest.fail("read the header again"))
    net, meta = load_model(path, meta=META)
    assert meta is META and not net.training
