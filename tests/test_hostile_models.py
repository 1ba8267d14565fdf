"""Tampered and damaged model files (issue 26: 10): one line and exit 2 at load, never a traceback or NaN scores.

Every file is made here from a copy of the bundled ``fer3`` model (its safetensors file or its ONNX graph) with one
thing changed: metadata out of bounds or of the wrong JSON type, a 2000-level architecture string, truncated weights,
float weights retyped as int32, class names that do not match the outputs, an ONNX graph whose metadata input size
differs from its own. The Hypothesis tests fuzz the metadata, the safetensors header and, within the accepted bounds,
the preprocessing and calibration numbers against the real graph.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile import ASTRONAUT, check, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferkit.errors import ModelFileError
from ferkit.modelfile import META_BOUNDS, bundled_models, parse_meta, read_meta

pytestmark = pytest.mark.timeout(300)

FER3 = bundled_models()["fer3"]


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict[str, Any], data: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data


def _base_meta() -> dict[str, Any]:
    header, _ = _split(FER3)
    return json.loads(header["__metadata__"]["ferkit"])


def tampered(dst: Path, *, meta: Any = None, header: Any = None, cut: int = 0) -> Path:
    """A copy of fer3.safetensors with its ferkit metadata replaced (``meta``: a JSON value, or a callable on the
    dict), its header edited (``header``: a callable on the dict) and/or its last ``cut`` bytes removed."""
    h, data = _split(FER3)
    if meta is not None:
        m = meta(json.loads(h["__metadata__"]["ferkit"])) if callable(meta) else meta
        h["__metadata__"]["ferkit"] = m if isinstance(m, str) else json.dumps(m)
    if header is not None:
        header(h)
    blob = _join(h, data)
    dst.write_bytes(blob[:len(blob) - cut] if cut else blob)
    return dst


def _set(**kw: Any) -> Any:
    return lambda m: {**m, **kw}


def _retype_a_kernel(h: dict[str, Any]) -> None:
    name = next(k for k, v in h.items() if k != "__metadata__" and v["dtype"] == "F32" and len(v["shape"]) >= 2)
    h[name]["dtype"] = "I32"  # same size: the table still adds up


CASES = {
    "std 0": (dict(meta=_set(std=0)), "std 0: outside"),
    "std negative": (dict(meta=_set(std=-0.25)), "std -0.25: outside"),
    "input_size 0": (dict(meta=_set(input_size=0)), "input_size 0: outside"),
    "input_size negative": (dict(meta=_set(input_size=-48)), "input_size -48: outside"),
    "input_size string": (dict(meta=_set(input_size="48")), "input_size \"48\": expected an integer"),
    "input_size 100000": (dict(meta=_set(input_size=100000)), "input_size 100000: outside 8..1024"),
    "metadata a list": (dict(meta=[1, 2, 3]), "the metadata is a JSON list, not an object"),
    "metadata not JSON": (dict(meta="{not json"), "damaged ferkit metadata"),
    "arch nested 2000 deep": (dict(meta=_set(arch="ensemble(" * 2000 + "fastcnn" + ")" * 2000)),
                              "characters long"),  # was RecursionError
    "arch nested 100 deep": (dict(meta=_set(arch="flip(" * 100 + "fastcnn" + ")" * 100)), "nests 100 levels"),
    "temperature 0": (dict(meta=_set(temperature=0)), "temperature 0: outside"),
    "temperature NaN": (dict(meta=lambda m: json.dumps({**m, "temperature": float("nan")})), "temperature nan"),
    "classes empty": (dict(meta=_set(classes=[])), "classes: 0 names"),
    "classes repeated": (dict(meta=_set(classes=["happy", "happy", "sad"])), "a name appears twice"),
    "in_chans 2": (dict(meta=_set(in_chans=2)), "in_chans 2: 1 (gray) or 3 (RGB)"),
    "truncated weights": (dict(cut=1000), "weights data truncated"),
    "int32-typed float weights": (dict(header=_retype_a_kernel), "is stored as torch.int32"),
    "7 class names for 3 outputs": (dict(meta=_set(classes=["angry", "disgust", "fear", "happy", "sad", "surprise",
                                                            "neutral"])), "weights do not match"),
}


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("photo") / "face.jpg"
    p.write_bytes(ASTRONAUT.read_bytes())
    return p


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_model_file_is_refused_in_one_line(case: str, tmp_path: Path, photo: Path) -> None:
    kw, says = CASES[case]
    model = tampered(tmp_path / "bad.safetensors", **kw)
    r = run_cli(["predict", photo, "--model", "bad.safetensors", "--format", "json"], cwd=tmp_path)
    check(r, 2, says=["bad.safetensors", says], json_out=True)
    assert r.out == "" and model.exists()


def _onnx_with(tmp_path: Path, **changes: Any) -> Path:
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(FER3.with_suffix(".onnx")))
    for p in proto.metadata_props:
        if p.key == "ferkit":
            p.value = json.dumps({**json.loads(p.value), **changes})
    out = tmp_path / "bad.onnx"
    onnx.save(proto, str(out))
    return out


@pytest.mark.parametrize("changes,says", [
    ({"classes": ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]},
     "the metadata names 7 classes, the graph outputs"),  # labelled a happy face "angry"
    ({"input_size": 64}, "the metadata says the input is N×1×64×64, the graph takes"),
    ({"temperature": float("nan")}, "temperature nan"),
], ids=["7 names for 3 outputs", "input size 64 for 48", "temperature NaN"])
def test_an_onnx_graph_is_checked_against_its_metadata(changes: dict, says: str, tmp_path: Path,
                                                        photo: Path) -> None:
    _onnx_with(tmp_path, **changes)
    r = run_cli(["predict", photo, "--model", "bad.onnx"], cwd=tmp_path)
    check(r, 2, says=["bad.onnx", says])


# -- property-based: the metadata gate, the header reader, and the numbers it lets through ------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KEYS = ["arch", "classes", "input_size", "in_chans", "mean", "std", "temperature", "temperature_poly", "name",
        "training", "metrics", "format"]


@st.composite
def metadata(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)  # anything at all
    m = _base_meta()
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=4, unique=True)):
        if draw(st.booleans()):
            del m[key]
        else:
            m[key] = draw(JSON)
    return m


def _valid(meta: Any) -> None:
    assert isinstance(meta.arch, str) and 0 < len(meta.arch) <= 2000
    assert 2 <= len(meta.classes) == len(set(meta.classes)) and all(isinstance(c, str) for c in meta.classes)
    for key, (lo, hi) in META_BOUNDS.items():
        v = getattr(meta, key)
        assert not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi, (key, v)
    assert isinstance(meta.input_size, int) and meta.in_chans in (1, 3)
    assert all(math.isfinite(c) for c in meta.temperature_poly)


# health checks off: CI's slower, shared CPU once failed this test on generation speed alone (nothing reproduced
# it here in 20,000 examples); what is checked is the parser, not how fast Hypothesis draws the JSON
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(metadata())
def test_metadata_is_accepted_within_bounds_or_refused_in_one_line(m: Any) -> None:
    try:
        text = json.dumps(m)
    except (ValueError, TypeError):
        return
    try:
        meta = parse_meta(text, "m.safetensors")
    except ModelFileError as e:
        assert str(e).startswith("m.safetensors: ") and "\n" not in str(e)
        return
    _valid(meta)


def _mutate(h: dict[str, Any], which: int, value: Any) -> None:
    names = sorted(k for k in h if k != "__metadata__")
    t = h[names[which % len(names)]]
    field = ["dtype", "shape", "data_offsets"][which % 3]
    t[field] = value


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.integers(0, 10**6), JSON, st.integers(0, 5000), st.booleans())
def test_a_damaged_header_is_refused_in_one_line(which: int, value: Any, cut: int, edit: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = tampered(Path(d) / "m.safetensors", header=(lambda h: _mutate(h, which, value)) if edit else None,
                     cut=cut)
        try:
            meta = read_meta(p)
        except ModelFileError as e:
            assert "\n" not in str(e) and str(p) in str(e)
            return
        _valid(meta)
        assert not cut  # a shorter file is never accepted


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mean=st.floats(-1e3, 1e3), std=st.floats(1e-3, 1e3), temperature=st.floats(1e-3, 1e3),
       poly=st.lists(st.floats(-1e3, 1e3), max_size=3))
def test_accepted_numbers_give_probabilities_or_a_refusal(mean: float, std: float, temperature: float,
                                                          poly: list[float]) -> None:
    """Within the bounds, whatever a file says about its preprocessing and calibration: the model either loads and
    gives finite probabilities, or is refused with ModelFileError; never NaN."""
    import dataclasses

    from ferkit.infer.runtime import OnnxRuntime, check_runtime

    base = read_meta(FER3)
    meta = dataclasses.replace(base, mean=mean, std=std, temperature=temperature, temperature_poly=tuple(poly))
    rec = _recognizer()
    try:
        rt = OnnxRuntime(FER3.with_suffix(".onnx"), meta)
        check_runtime(rt, "m")
        rec.runtime, rec.meta = rt, meta
        probs = rec._classify_faces(np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8))
    except ModelFileError as e:
        assert "\n" not in str(e)
        return
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-3)


_REC: list[Any] = []


def _recognizer() -> Any:
    from ferkit import Recognizer

    if not _REC:
        _REC.append(Recognizer("fer3", detector="whole"))
    return _REC[0]


def test_header_helpers_round_trip(tmp_path: Path) -> None:
    p = tampered(tmp_path / "same.safetensors")
    assert read_meta(p) == read_meta(FER3)
    assert struct.unpack("<Q", p.read_bytes()[:8])[0] % 8 == 0
