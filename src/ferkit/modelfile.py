"""The ferkit model file: safetensors weights with the model's metadata as JSON in the same file; no pickle."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferkit.errors import ModelFileError

if TYPE_CHECKING:  # torch is imported where weights are read or written, so reading metadata stays light
    import torch
    import torch.nn as nn

FORMAT = "ferkit-model/1"
META_KEY = "ferkit"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: The ONNX graph's input and output names and what the output holds (softmax is inside the graph).
ONNX_INPUT = "input"
ONNX_OUTPUT = "probs"
ONNX_OUTPUT_KIND = "probabilities"
#: ONNX metadata key holding the SHA-256 of the model file the graph was exported from: an ONNX sibling whose
#: digest differs from its ``.safetensors`` file is stale and never used.
SOURCE_DIGEST_KEY = "source_sha256"
#: ONNX metadata key of an int8 graph's accuracy check against its float graph (JSON: labels, n, float_accuracy,
#: int8_accuracy, loss_points), written by :func:`ferkit.export.export_int8`.
INT8_CHECK_KEY = "int8_check"


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to use a trained model, stored with its weights."""

    arch: str
    classes: tuple[str, ...]
    input_size: int = 48
    in_chans: int = 1
    mean: float = 0.5
    std: float = 0.25
    #: Calibration: probabilities are softmax(logits / T) (see :func:`calibrated_probs`); T = ``temperature``, or,
    #: with ``temperature_poly`` = (c1, c2, …), T = temperature · exp(c1·s + c2·s² + …) where s is the top softmax
    #: probability of the raw logits. 1.0 and () (uncalibrated) for files written before calibration existed.
    temperature: float = 1.0
    temperature_poly: tuple[float, ...] = ()
    name: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> ModelMeta:
        """Metadata as stored (parsed JSON) → ``ModelMeta``, every field checked against :data:`META_BOUNDS`.

        This is the one gate stored metadata passes through (model files, ONNX graphs): whatever it lets by is
        usable, so no later stage divides by a ``std`` of 0 or allocates a 100000-pixel input.

        Raises:
            ValueError: one phrase saying which field is wrong and why (callers prefix the file's name).
        """
        if not isinstance(d, dict):
            raise ValueError(f"the metadata is a JSON {_json_type(d)}, not an object")
        for key in ("arch", "classes"):
            if key not in d:
                raise ValueError(f"'{key}' is missing")
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["arch"] = _check_arch(kw["arch"])
        kw["classes"] = _check_classes(kw["classes"])
        for key, (lo, hi) in META_BOUNDS.items():
            if key in kw:
                kw[key] = _check_number(key, kw[key], lo, hi, integer=key in ("input_size", "in_chans"))
        if kw.get("in_chans", 1) not in (1, 3):
            raise ValueError(f"in_chans {kw['in_chans']}: 1 (gray) or 3 (RGB)")
        poly = kw.get("temperature_poly", ())
        if not isinstance(poly, (list, tuple)) or len(poly) > MAX_TEMPERATURE_POLY:
            raise ValueError(f"temperature_poly: a list of at most {MAX_TEMPERATURE_POLY} numbers")
        kw["temperature_poly"] = tuple(_check_number("temperature_poly", c, -1e3, 1e3) for c in poly)
        for key, kind in (("name", str), ("format", str), ("training", dict), ("metrics", dict)):
            if key in kw and not isinstance(kw[key], kind):
                raise ValueError(f"'{key}' is a JSON {_json_type(kw[key])}, expected {_json_type(kind())}")
        if not kw.get("format", FORMAT).startswith("ferkit-model/"):
            raise ValueError(f"format '{kw['format'][:40]}' is not a ferkit model format")
        return cls(**kw)


#: Bounds of a calibration temperature: ends beyond these mean a fit went wrong, not a model that needs them.
TEMPERATURE_RANGE = (0.05, 20.0)
#: What stored metadata may say (inclusive bounds); anything else is refused when the file is read. input_size: 48
#: for ferkit's networks, 224-384 for timm backbones; 100000 would allocate 80 GB for a batch. std: the input is
#: divided by it (0 crashed server workers). temperature: softmax(z / T); the bundled fer3 stores 0.03 with a
#: polynomial that multiplies it back into TEMPERATURE_RANGE; 0 or NaN gave NaN scores.
META_BOUNDS: dict[str, tuple[float, float]] = {
    "input_size": (8, 1024), "in_chans": (1, 3), "mean": (-1e3, 1e3), "std": (1e-3, 1e3),
    "temperature": (1e-3, 1e3),
}
MAX_TEMPERATURE_POLY = 8
MAX_CLASSES = 1000
#: An architecture string's length and nesting (``views[..](ensemble(flip(a),b))`` nests 3): the builder recurses once
#: per level, and 2000 levels raised RecursionError.
MAX_ARCH_LENGTH, MAX_ARCH_DEPTH = 2000, 8
_ARCH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./+,()[] ")


def _json_type(v: Any) -> str:
    return {dict: "object", list: "list", tuple: "list", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _check_number(key: str, v: Any, lo: float, hi: float, *, integer: bool = False) -> Any:
    import math

    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        raise ValueError(f"{key} {json.dumps(v)[:40]}: expected {'an integer' if integer else 'a number'}")
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{key} {v!r}: outside {lo:g}..{hi:g}")
    return v if integer else float(v)


def _check_arch(arch: Any) -> str:
    if not isinstance(arch, str) or not arch.strip():
        raise ValueError(f"arch {json.dumps(arch)[:40]}: expected an architecture name")
    if len(arch) > MAX_ARCH_LENGTH:
        raise ValueError(f"arch is {len(arch):,} characters long (at most {MAX_ARCH_LENGTH:,})")
    bad = sorted(set(arch) - _ARCH_CHARS)
    if bad:
        raise ValueError(f"arch {ascii(arch[:40])} holds characters an architecture name has not ({ascii(bad[0])})")
    depth = deepest = 0
    for ch in arch:
        depth += (ch in "([") - (ch in ")]")
        deepest = max(deepest, depth)
        if depth < 0:
            break
    if depth != 0:
        raise ValueError(f"arch '{arch[:40]}': unbalanced brackets")
    if deepest > MAX_ARCH_DEPTH:
        raise ValueError(f"arch '{arch[:40]}…' nests {deepest} levels deep (at most {MAX_ARCH_DEPTH})")
    return arch


def _check_classes(classes: Any) -> tuple[str, ...]:
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) and 0 < len(c) <= 100 for c in classes):
        raise ValueError("classes: expected a list of class names (strings of 1-100 characters)")
    if not 2 <= len(classes) <= MAX_CLASSES:
        raise ValueError(f"classes: {len(classes)} names; a model has 2..{MAX_CLASSES}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes: a name appears twice ({ascii(', '.join(classes))[:80]})")
    return tuple(classes)


def calibrated_probs(logits: torch.Tensor, meta: ModelMeta) -> torch.Tensor:
    """softmax(logits / T) with the model's calibration temperature (float32; any positive T keeps the argmax).

    One function for every path that turns a model's outputs into scores: evaluation, the torch runtime and the
    exported ONNX graph (it traces to plain ops), so all of them give the same calibrated probabilities.
    """
    import math

    z = logits.float()
    if meta.temperature_poly:
        s = z.softmax(1).amax(1, keepdim=True)
        log_t = sum(c * s ** (k + 1) for k, c in enumerate(meta.temperature_poly)) + math.log(meta.temperature)
        t = log_t.clamp(math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])).exp()
        return (z / t).softmax(1)
    if meta.temperature != 1.0:
        z = z / meta.temperature
    return z.softmax(1)


def stored_state(state: dict[str, torch.Tensor], *, half: bool = False) -> dict[str, torch.Tensor]:
    """The tensors as a model file stores them: float32 (whatever the training precision was), or with ``half`` the
    kernels and weight matrices (floating tensors of 2+ dimensions) as float16.

    float16 halves the file (fer7-large: 14.0 -> 7.0 MB) and rounds each weight to 11 significant bits; biases,
    norms and running statistics stay float32, as their few values cost nothing and the variances span a range float16
    handles badly, and so does a weight tensor with a value beyond float16's range. Loading casts everything back to
    float32 (``load_state_dict`` copies into float32 parameters)."""
    import torch

    def stored(v: torch.Tensor) -> torch.Tensor:
        v = v.detach().to("cpu")
        if not v.is_floating_point():
            return v.contiguous()
        # a tensor with a value beyond float16's range (65,504) would turn into inf: it stays float32
        fits = half and v.dim() >= 2 and bool(v.abs().max() <= torch.finfo(torch.float16).max)
        return v.to(torch.float16 if fits else torch.float32).contiguous()

    return {k: stored(v) for k, v in state.items()}


def save_model(path: str | os.PathLike, net: nn.Module, meta: ModelMeta, *, json_sidecar: bool = True,
               half: bool = False) -> Path:
    """Write ``net``'s weights and ``meta`` as one safetensors file (atomically); optionally a readable .json beside.
    ``half``: store the weight tensors as float16 (:func:`stored_state`)."""
    from safetensors.torch import save_file

    from ferkit.fsutil import atomic_path, atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = stored_state(net.state_dict(), half=half)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={META_KEY: meta.to_json(), "format": FORMAT})
    if json_sidecar:
        atomic_write_text(path.with_suffix(".json"), json.dumps(json.loads(meta.to_json()), indent=2) + "\n")
    return path


def bundled_models() -> dict[str, Path]:
    """The models shipped inside the package: name → file."""
    return {p.stem: p for p in sorted(WEIGHTS_DIR.glob("*.safetensors"))}


def model_specs(text: str) -> list[str]:
    """A comma-separated ``--model``/``--teacher`` value → the model specs it names (blanks dropped)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A bundled model's name, a run directory or a model file → the model file's path.

    Raises:
        ModelFileError: nothing usable at ``spec``.
    """
    s = str(spec)
    bundled = bundled_models()
    if s in bundled:
        return bundled[s]
    p = Path(s)
    if p.is_dir():
        for cand in ("model.safetensors", "model.onnx"):
            if (p / cand).exists():
                return p / cand
        raise ModelFileError(f"{s}: folder holds no model.safetensors (is it a ferkit run directory?)")
    if p.exists():
        return p
    names = ", ".join(bundled) or "none"
    raise ModelFileError(f"{s}: no such model file, run directory or bundled model (bundled: {names})")


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a model file's bytes: weights and metadata, so a sibling made before either changed is stale.

    Raises:
        ModelFileError: the file cannot be read.
    """
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the model file ({e.strerror or e})") from None
    return h.hexdigest()


def onnx_sibling(path: str | os.PathLike) -> Path | None:
    """The ``.onnx`` file beside a ``.safetensors`` model file (``weights/fer3.onnx`` for ``fer3``), if there is one.

    Whether it matches the weights is for the caller to check against :data:`SOURCE_DIGEST_KEY`.
    """
    p = Path(path)
    sib = p.with_suffix(".onnx")
    return sib if p.suffix.lower() == ".safetensors" and sib.is_file() else None


def int8_sibling(path: str | os.PathLike) -> Path | None:
    """The int8 ``.int8.onnx`` file beside a ``.safetensors`` model file (``weights/fer3.int8.onnx``), if there is one
    (``ferkit export --int8``); :func:`ferkit.infer.runtime.make_runtime` decides whether to use it."""
    p = Path(path)
    sib = p.with_suffix(".int8.onnx")
    return sib if p.suffix.lower() == ".safetensors" and sib.is_file() else None


def _header(path: str | os.PathLike) -> dict[str, Any]:
    """The safetensors header (JSON) of a model file: tensor names → dtype/shape/offsets, and ``__metadata__``."""
    p = resolve_model_path(path)
    try:
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a mapping")
    except (OSError, ValueError):
        raise ModelFileError(f"{path}: not a ferkit model file (cannot read it as safetensors)") from None
    return header


def stores_half(path: str | os.PathLike) -> bool:
    """Whether a model file stores (some of) its weights as float16 (see :func:`stored_state`); reads the header only.

    Raises:
        ModelFileError: not a safetensors file.
    """
    return any(isinstance(v, dict) and v.get("dtype") == "F16" for k, v in _header(path).items()
               if k != "__metadata__")


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """Read only the metadata of a model file (parses the safetensors header; imports no torch).

    Raises:
        ModelFileError: not a safetensors file, or one without ferkit metadata.
    """
    header = _header(path)
    md = header.get("__metadata__") or {}
    if not isinstance(md, dict):
        raise ModelFileError(f"{path}: not a ferkit model file (cannot read it as safetensors)")
    if META_KEY not in md:
        raise ModelFileError(f"{path}: safetensors file without ferkit metadata (not a ferkit model file)")
    meta = parse_meta(md[META_KEY], path)
    _check_tensor_table(header, path)
    return meta


def parse_meta(text: Any, label: str | os.PathLike) -> ModelMeta:
    """Stored metadata (the JSON text of a model file or an ONNX graph) → a checked ``ModelMeta``.

    Raises:
        ModelFileError: not JSON, or a field out of bounds (see :meth:`ModelMeta.from_dict`): one line.
    """
    try:
        return ModelMeta.from_dict(json.loads(text))
    except RecursionError:  # json.loads of "[[[[…" thousands deep
        raise ModelFileError(f"{label}: damaged ferkit metadata (nested too deeply)") from None
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{label}: damaged ferkit metadata ({str(e)[:200]})") from None


#: Bytes per element of the safetensors dtypes.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def _check_tensor_table(header: dict[str, Any], path: str | os.PathLike) -> None:
    """The header's tensors against the file: known dtypes, sizes that match their shapes, data inside the file.

    Raises:
        ModelFileError: a truncated or inconsistent file (safetensors itself would raise a bare error on load).
    """
    p = resolve_model_path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the model file ({e.strerror or e})") from None
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = t["dtype"], t["shape"], t["data_offsets"]
            count = 1
            for k in shape:
                if not isinstance(k, int) or k < 0:
                    raise ValueError
                count *= k
            ok = dtype in _DTYPE_BYTES and 0 <= lo <= hi and hi - lo == count * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelFileError(f"{path}: damaged weights table (tensor '{str(name)[:60]}' is described "
                                 "inconsistently)")
        end = max(end, hi)
    if 8 + n + end > size:
        raise ModelFileError(f"{path}: weights data truncated (the file holds {size:,} bytes; its header describes "
                             f"{8 + n + end:,})")


def tensor_dtypes(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name → stored dtype (``F32``, ``F16``, ``I64`` …), from the header."""
    return {k: v["dtype"] for k, v in _header(path).items() if k != "__metadata__" and isinstance(v, dict)}


def load_model(path_or_name: str | os.PathLike, *, device: str = "cpu",
               meta: ModelMeta | None = None) -> tuple[nn.Module, ModelMeta]:
    """Load a ferkit model file (or bundled model, or run directory) without unpickling anything.

    Args:
        path_or_name: what to load.
        device: where the weights go.
        meta: the file's metadata when the caller has already read it (saves reading the header again).

    Returns:
        (network in eval mode, its metadata)

    Raises:
        ModelFileError: the path is missing, not a ferkit model, or its weights do not fit its architecture.
    """
    from ferkit._extras import require

    torch = require("torch", what="loading a model into PyTorch")
    from safetensors.torch import load_file

    from ferkit.models import create_model

    p = resolve_model_path(path_or_name)
    if p.suffix.lower() == ".onnx":
        raise ModelFileError(f"{path_or_name}: an ONNX file; load it with Recognizer(model=...) or backend='onnx'")
    meta = meta or read_meta(p)
    try:
        net = create_model(meta.arch, num_classes=len(meta.classes), in_chans=meta.in_chans)
    except (ValueError, ImportError) as e:
        raise ModelFileError(f"{path_or_name}: cannot build architecture '{meta.arch}': {e}") from None
    try:
        state = load_file(str(p), device=device)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own SafetensorError on damaged data)
        raise ModelFileError(f"{path_or_name}: damaged weights ({str(e).strip()[:200]})") from None
    expected = net.state_dict()
    for k, v in state.items():  # integer data in a float parameter would be cast, not refused: garbage scores
        if k in expected and expected[k].is_floating_point() and not v.is_floating_point():
            raise ModelFileError(f"{path_or_name}: tensor '{k}' is stored as {v.dtype} where the network has "
                                 "floating-point weights (damaged or tampered file)")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ModelFileError(f"{path_or_name}: tensor '{k}' holds NaN or infinite values")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelFileError(f"{path_or_name}: weights do not match architecture '{meta.arch}' ({first})") from None
    return net.to(device).eval(), meta
