"""ONNX export: a valid graph, ferkit metadata inside, parity with PyTorch, and the Recognizer reads it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx

from ferkit.errors import DatasetError, ModelFileError
from ferkit.export import PARITY_TOLERANCE, export_onnx
from ferkit.modelfile import ModelMeta, save_model
from ferkit.models import create_model
from shared_data import FER_DIR, HAVE_FER, VALIDATION, WILD, needs_fer, needs_wild

CLASSES = ("happy", "sad", "neutral")


def make_test_model(path: Path, seed: int = 0, classes: tuple[str, ...] = CLASSES) -> Path:
    """A fastcnn with random convolutions and a head fitted in closed form (class means of standardised features
    of 150 training faces), so its predictions vary and are confident — parity and label agreement are then tested
    away from near-ties — without seconds of training."""
    from ferkit.data import find_dataset, load_split
    from ferkit.data.augment import to_float

    torch.manual_seed(seed)
    net = create_model("fastcnn", num_classes=len(classes)).eval()
    split = find_dataset(FER_DIR / "train", list(classes), require_all=False).splits["single"]
    idx = np.random.default_rng(seed).choice(len(split), 150, replace=False)
    split.files, split.labels = [split.files[i] for i in idx], split.labels[idx]
    faces = load_split(split, 48, use_cache=False)
    with torch.no_grad():
        feats = net.head[:2](net.features(to_float(torch.as_tensor(faces.images), 48, 0.5, 0.25)))
        mu, sd = feats.mean(0), feats.std(0) + 1e-6
        z = (feats - mu) / sd
        y = torch.as_tensor(faces.labels)
        centroids = torch.stack(
            [z[y == k].mean(0) if (y == k).any() else torch.zeros_like(mu) for k in range(len(classes))]
        )
        w = 3.0 * centroids / sd
        net.head[-1].weight.copy_(w)
        net.head[-1].bias.copy_(-(w * mu).sum(1))
    meta = ModelMeta(
        arch="fastcnn", classes=classes, name="test3", metrics={"accuracy": 0.5, "val_split": "validation"}
    )
    return save_model(path, net, meta)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    if not HAVE_FER:
        pytest.skip(f"no FER2013 data at {FER_DIR}")
    d = tmp_path_factory.mktemp("export")
    model = make_test_model(d / "m.safetensors")
    out = d / "m.onnx"
    result = export_onnx(str(model), str(out), data=str(VALIDATION))
    print(f"parity: max |Δp| = {result['max_abs_diff']:.3g} on {result['n']} images ({result['data']})")
    return model, out, result


def test_export_result_and_checker(exported: tuple[Path, Path, dict]) -> None:
    _, out, result = exported
    assert result["path"] == str(out) and out.is_file()
    assert result["passed"] is True and result["opset"] == 17
    assert result["n"] == 200
    assert 0 <= result["max_abs_diff"] <= PARITY_TOLERANCE
    assert result["label_agreement"] == 1.0
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind


def test_metadata_and_io(exported: tuple[Path, Path, dict]) -> None:
    _, out, _ = exported
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = ModelMeta.from_dict(json.loads(props["ferkit"]))
    assert meta.classes == CLASSES and meta.arch == "fastcnn" and meta.metrics["accuracy"] == 0.5
    assert json.loads(props["classes"]) == list(CLASSES)
    assert props["input_size"] == "48" and props["output"] == "probabilities"
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert inp.name == "input" and outp.name == "probs"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 48, 48]


def test_recognizer_onnx_matches_torch(exported: tuple[Path, Path, dict]) -> None:
    from ferkit.data import find_dataset, load_split
    from ferkit.infer.recognizer import Recognizer

    model, out, _ = exported
    split = find_dataset(VALIDATION, list(CLASSES), require_all=False).splits["single"]
    idx = np.linspace(0, len(split) - 1, 200).round().astype(int)
    split.files = [split.files[i] for i in idx]
    split.labels = split.labels[idx]
    faces = load_split(split, 48, use_cache=False).images
    assert len(faces) == 200

    rec_onnx = Recognizer(model=str(out))
    rec_torch = Recognizer(model=str(model), backend="torch")
    assert rec_onnx.backend == "onnx" and rec_torch.backend == "torch"
    assert rec_onnx.classes == rec_torch.classes == CLASSES
    p_onnx, p_torch = rec_onnx.classify(faces), rec_torch.classify(faces)
    assert np.abs(p_onnx - p_torch).max() <= PARITY_TOLERANCE
    assert (p_onnx.argmax(1) == p_torch.argmax(1)).all()
    assert len(set(p_torch.argmax(1).tolist())) > 1  # the test model really discriminates
    # the whole pipeline, on a real photo, gives the same labels too
    photo = next((WILD / "happy").glob("*.jpg"))
    a, b = rec_onnx.predict(photo), rec_torch.predict(photo)
    assert [f.label for f in a] == [f.label for f in b] and [f.box for f in a] == [f.box for f in b]


@needs_fer  # make_test_model fits its head on real training faces
@needs_wild
def test_export_other_data_and_opset(tmp_path: Path) -> None:
    model = make_test_model(tmp_path / "m.safetensors", seed=1)
    result = export_onnx(str(model), str(tmp_path / "sub" / "w"), data=str(WILD), opset=18, parity_images=20)
    assert result["path"] == str(tmp_path / "sub" / "w.onnx") and result["opset"] == 18
    assert result["n"] == 20 and result["passed"]


@needs_fer  # make_test_model fits its head on real training faces
def test_export_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError):
        export_onnx(str(tmp_path / "missing.safetensors"), str(tmp_path / "x.onnx"))
    model = make_test_model(tmp_path / "m.safetensors")
    with pytest.raises(DatasetError):
        export_onnx(str(model), str(tmp_path / "x.onnx"), data=str(tmp_path / "no-such-data"))
    assert not (tmp_path / "x.onnx").exists()


# -- ONNX siblings: the bundled models ship one; a stale one is never used -------------------------------------------

@needs_fer
def test_half_model_file_exports_a_half_size_graph(tmp_path: Path) -> None:
    """A model file saved with half=True exports to a graph whose kernels are float16 initializers cast to float32 at
    load: about half the size of the float32 graph, the same probabilities as PyTorch on real faces (parity), and
    a float32 model file exports its float32 graph as before."""
    from safetensors import safe_open

    from ferkit.modelfile import load_model

    full = make_test_model(tmp_path / "full.safetensors")
    net, meta = load_model(full)
    half = save_model(tmp_path / "half.safetensors", net, meta, half=True)
    export_onnx(str(full), str(tmp_path / "full.onnx"), data=str(VALIDATION))
    r_half = export_onnx(str(half), str(tmp_path / "half.onnx"), data=str(VALIDATION))
    assert r_half["passed"] and r_half["max_abs_diff"] <= PARITY_TOLERANCE and r_half["n"] >= 100
    g_full, g_half = onnx.load(str(tmp_path / "full.onnx")), onnx.load(str(tmp_path / "half.onnx"))
    # this test model's head has weights beyond float16's range (1/std of near-constant features): the file keeps
    # that one tensor float32, and so does the graph
    with safe_open(str(half), "pt") as f:
        in_file = {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    kernels = [i for i in g_half.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(kernels) == sum(d == torch.float16 for d in in_file.values()) >= 3
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in g_full.graph.initializer)
    casts = [sum(n.op_type == "Cast" for n in g.graph.node) for g in (g_half, g_full)]
    assert casts[0] - casts[1] == len(kernels)
    assert (tmp_path / "half.onnx").stat().st_size < 0.6 * (tmp_path / "full.onnx").stat().st_size


@needs_fer
@pytest.mark.parametrize("name", ["fer3", "fer7"])
def test_bundled_models_ship_a_current_onnx_sibling(name: str) -> None:
    """The sibling was exported from the model file as it is now (digest), carries its metadata, and gives the
    PyTorch model's probabilities on real validation faces; if a bundled model is re-bundled or recalibrated without
    `write_sibling`, this fails."""
    from ferkit.export import _parity_faces, _to_input
    from ferkit.infer.runtime import OnnxRuntime, TorchRuntime, make_runtime
    from ferkit.modelfile import SOURCE_DIGEST_KEY, bundled_models, file_digest, onnx_sibling, read_meta

    path = bundled_models()[name]
    sibling = onnx_sibling(path)
    assert sibling == path.with_suffix(".onnx")
    rt = make_runtime(name, "onnx")  # the float graph (auto may pick an int8 sibling: test_int8_sibling.py)
    assert isinstance(rt, OnnxRuntime) and not rt.int8 and rt.props[SOURCE_DIGEST_KEY] == file_digest(path)
    int8 = path.with_suffix(".int8.onnx")
    if int8.is_file():  # written after the float sibling, from the same file
        assert OnnxRuntime(int8).props[SOURCE_DIGEST_KEY] == file_digest(path)
    assert ModelMeta.from_dict(json.loads(rt.props["ferkit"])) == read_meta(path) == rt.meta
    faces, _ = _parity_faces(rt.meta, str(VALIDATION) if VALIDATION.is_dir() else None, 64)
    x = _to_input(faces, rt.meta)
    assert np.abs(rt.probs(x) - TorchRuntime(path).probs(x)).max() <= PARITY_TOLERANCE


def test_current_sibling_is_used_and_stale_one_ignored(exported: tuple[Path, Path, dict], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    from ferkit import export
    from ferkit.infer.runtime import make_runtime

    model, out, _ = exported
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path / "cache"))
    x = np.random.default_rng(0).normal(size=(16, 1, 48, 48)).astype(np.float32)
    ref = make_runtime(model, backend="torch").probs(x)

    d = tmp_path / "current"
    d.mkdir()
    shutil.copy(model, d / "model.safetensors")
    shutil.copy(out, d / "model.onnx")  # exported from these very bytes
    monkeypatch.setattr(export, "onnx_bytes", lambda *a, **k: pytest.fail("converted despite a current sibling"))
    rt = make_runtime(d)
    assert rt.name == "onnx" and np.abs(rt.probs(x) - ref).max() <= PARITY_TOLERANCE
    monkeypatch.undo()
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path / "cache"))

    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(model, stale / "model.safetensors")
    shutil.copy(Path(__file__).resolve().parents[1] / "src" / "ferkit" / "weights" / "fer3.onnx", stale / "model.onnx")
    with caplog.at_level("WARNING", logger="ferkit.infer.runtime"):
        rt = make_runtime(stale)
    assert "digest differs" in caplog.text and "ignoring it" in caplog.text
    assert rt.name == "onnx" and np.abs(rt.probs(x) - ref).max() <= PARITY_TOLERANCE  # converted from the weights


# -- int8 --------------------------------------------------------------------------------------------------------------

def test_int8_export_of_a_bundled_model(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`ferkit export --int8` on fer3: calibrated on training faces, within 0.5 points of the float model on the
    whole validation split, a quarter of the size, and it runs in the Recognizer like any ONNX model."""
    from ferkit.cli import main
    from ferkit.infer.recognizer import Recognizer

    out = tmp_path / "fer3.int8.onnx"
    assert main(["export", "--model", "fer3", "--format", "onnx", "--int8", "--data", str(data_dir),
                 "--out", str(out)]) == 0
    line = capsys.readouterr().out
    print(line)
    assert out.is_file() and "int8 validation accuracy" in line and "faces/s" in line
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["quantization"].startswith("int8 static QDQ") and json.loads(props["classes"]) == list(CLASSES)
    assert out.stat().st_size < 0.5 * (Path(__file__).parents[1] / "src/ferkit/weights/fer3.onnx").stat().st_size
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
    rec, ref = Recognizer(str(out)), Recognizer("fer3")
    assert rec.backend == "onnx" and rec.classes == CLASSES
    photo = min((WILD / "happy").glob("*.jpg"))
    a, b = rec.predict(photo), ref.predict(photo)
    assert [f.box for f in a] == [f.box for f in b] and a[0].scores == pytest.approx(b[0].scores, abs=0.1)


def test_int8_is_refused_when_it_loses_accuracy(data_dir: Path, tmp_path: Path) -> None:
    """The refusal path: with a limit no quantised model can meet, nothing is written and the error says why."""
    from ferkit.errors import ExportError
    from ferkit.export import export_int8

    out = tmp_path / "m.int8.onnx"
    with pytest.raises(ExportError, match=r"int8 loses -?\d+\.\d+ points of validation accuracy .* not written"):
        export_int8("fer3", str(out), data=str(data_dir), calibration_images=64, max_loss_points=-100)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_int8_needs_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ferkit.cli import main

    assert main(["export", "--model", "fer3", "--int8", "--out", str(tmp_path / "x.onnx")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--int8 needs --data" in err


def test_model_without_sibling_and_without_torch_says_what_to_do(exported: tuple[Path, Path, dict], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """In the torch-free install a user's .safetensors model with no ONNX beside it cannot be converted: one line
    that says how to get the ONNX file."""
    import shutil
    import sys

    from ferkit.infer.runtime import make_runtime

    model, _, _ = exported
    shutil.copy(model, tmp_path / "model.safetensors")
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setitem(sys.modules, "ferkit.export", None)  # `from ferkit import export` fails as without torch
    with pytest.raises(ImportError, match="no current ONNX file beside it.*ferkit export --model") as info:
        make_runtime(tmp_path)
    assert "\n" not in str(info.value)
