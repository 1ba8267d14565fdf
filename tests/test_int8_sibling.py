"""The int8 sibling of a model file (``NAME.int8.onnx``): picked by ``backend="auto"`` only when it was exported from
this very file, lost at most 0.3 points of accuracy and is faster on this CPU (timed once, the verdict kept)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from ferkit.infer.runtime import make_runtime  # noqa: E402
from ferkit.modelfile import INT8_CHECK_KEY, SOURCE_DIGEST_KEY, bundled_models  # noqa: E402


@pytest.fixture(scope="module")
def model_with_int8(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fer3 copied to m.safetensors (+ its float ONNX sibling) with a real int8 sibling exported from it."""
    from ferkit.export import export_int8

    d = tmp_path_factory.mktemp("int8")
    src = bundled_models()["fer3"]
    shutil.copy(src, d / "m.safetensors")
    shutil.copy(src.with_suffix(".onnx"), d / "m.onnx")
    r = export_int8(str(d / "m.safetensors"), str(d / "m.int8.onnx"), data=str(data_dir), calibration_images=200,
                    max_loss_points=100)
    assert r["written"] and r["labels"] == "FER+ majority" and r["n_validation"] == 2398
    check = json.loads(_props(d / "m.int8.onnx")[INT8_CHECK_KEY])
    assert check["loss_points"] == pytest.approx(r["loss_points"], abs=1e-3) and check["n"] == 2398
    return d / "m.safetensors"


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _set_props(path: Path, **changes: str) -> None:
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key in changes:
            p.value = changes[p.key]
    onnx.save(proto, str(path))


def _with_loss(model: Path, loss: float) -> None:
    sib = model.with_suffix(".int8.onnx")
    check = json.loads(_props(sib)[INT8_CHECK_KEY])
    _set_props(sib, **{INT8_CHECK_KEY: json.dumps({**check, "loss_points": loss})})


def test_forced_on_and_off_and_explicit_onnx_is_float(model_with_int8: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path / "cache"))
    _with_loss(model_with_int8, 0.1)
    monkeypatch.setenv("FERKIT_INT8", "1")
    q = make_runtime(model_with_int8)
    assert q.int8 and "quantization" in q.props
    f = make_runtime(model_with_int8, "onnx")  # an explicit backend runs the float graph
    assert not f.int8
    monkeypatch.setenv("FERKIT_INT8", "0")
    assert not make_runtime(model_with_int8).int8
    # the int8 graph answers like the float one (the same labels on real faces, scores close)
    from ferkit.data import find_dataset, load_split
    from ferkit.preprocess import Preprocess

    from shared_data import FER_DIR

    ds = find_dataset(FER_DIR, list(q.meta.classes), require_all=False)
    faces = load_split(ds.split("validation"), 48).images[::7]  # ~300 faces of every class
    x = Preprocess.of(q.meta).numpy(faces)
    pq, pf = q.probs(x), f.probs(x)
    assert (pq.argmax(1) == pf.argmax(1)).mean() > 0.97 and np.abs(pq - pf).mean() < 0.02


def test_auto_times_both_once_and_keeps_the_verdict(model_with_int8: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(cache))
    monkeypatch.delenv("FERKIT_INT8", raising=False)
    _with_loss(model_with_int8, 0.1)
    rt = make_runtime(model_with_int8)
    book = json.loads((cache / "onnx" / "int8-choice.json").read_text())
    (key, entry), = book.items()
    assert entry["float_ms"] > 0 and entry["int8_ms"] > 0
    assert entry["int8"] == (entry["int8_ms"] < 0.95 * entry["float_ms"]) == rt.int8
    # the kept verdict is what decides next time (flipped by hand here: no second timing overrides it)
    first = entry["int8"]
    book[key]["int8"] = not first
    (cache / "onnx" / "int8-choice.json").write_text(json.dumps(book))
    assert make_runtime(model_with_int8).int8 == (not first)


def test_a_lossy_or_stale_sibling_is_never_used(model_with_int8: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FERKIT_INT8", "1")
    _with_loss(model_with_int8, 0.5)  # more than 0.3 points lost: not even when forced
    assert not make_runtime(model_with_int8).int8
    _with_loss(model_with_int8, 0.1)
    sib = model_with_int8.with_suffix(".int8.onnx")
    digest = _props(sib)[SOURCE_DIGEST_KEY]
    _set_props(sib, **{SOURCE_DIGEST_KEY: "0" * 64})  # exported from other weights
    try:
        assert not make_runtime(model_with_int8).int8
        assert "was not exported from" in caplog.text
    finally:
        _set_props(sib, **{SOURCE_DIGEST_KEY: digest})
    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in (".safetensors", ".onnx"):
        shutil.copy(model_with_int8.with_suffix(suffix), copy / f"m{suffix}")
    (copy / "m.int8.onnx").write_bytes(b"not onnx")  # a damaged sibling: a warning, the float graph
    assert not make_runtime(copy / "m.safetensors").int8
    assert "not a usable int8 sibling" in caplog.text
