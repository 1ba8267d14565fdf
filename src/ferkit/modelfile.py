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
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["classes"] = tuple(kw.get("classes", ()))
        kw["temperature_poly"] = tuple(float(c) for c in kw.get("temperature_poly", ()))
        return cls(**kw)


#: Bounds of a calibration temperature: ends beyond these mean a fit went wrong, not a model that needs them.
TEMPERATURE_RANGE = (0.05, 20.0)


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

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = stored_state(net.state_dict(), half=half)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={META_KEY: meta.to_json(), "format": FORMAT})
    os.replace(tmp, path)
    if json_sidecar:
        from ferkit.fsutil import atomic_write_text

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
    md = _header(path).get("__metadata__") or {}
    if not isinstance(md, dict):
        raise ModelFileError(f"{path}: not a ferkit model file (cannot read it as safetensors)")
    if META_KEY not in md:
        raise ModelFileError(f"{path}: safetensors file without ferkit metadata (not a ferkit model file)")
    try:
        return ModelMeta.from_dict(json.loads(md[META_KEY]))
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"{path}: damaged ferkit metadata ({e})") from None


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

    require("torch", what="loading a model into PyTorch")
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
    state = load_file(str(p), device=device)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelFileError(f"{path_or_name}: weights do not match architecture '{meta.arch}' ({first})") from None
    return net.to(device).eval(), meta
