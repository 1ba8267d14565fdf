"""ONNX export of a ferkit model with its metadata, checked against PyTorch on real validation images.

The exported graph takes the *normalised* face batch and returns class **probabilities** (softmax inside the graph):

* input ``"input"``: float32 N×C×S×S, grayscale face crops resized to ``meta.input_size`` and normalised as
  ``(x / 255 - meta.mean) / meta.std`` (C = ``meta.in_chans``, usually 1); the batch axis is dynamic.
* output ``"probs"``: float32 N×K, one row of probabilities per face, columns in ``meta.classes`` order.

The model file's :class:`~ferkit.modelfile.ModelMeta` travels in the ONNX ``metadata_props``: key ``"ferkit"`` holds
its JSON; ``"classes"`` (JSON list), ``"input_size"``, ``"mean"``, ``"std"`` and ``"output"`` (``"probabilities"``)
are there for readers that do not know ferkit.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ferkit._extras import require

require("torch", what="ONNX export")
import torch  # noqa: E402  (after the check that names the extra)
from torch import nn  # noqa: E402

from ferkit.errors import DatasetError, ExportError  # noqa: E402, F401  (ExportError: re-exported)
from ferkit.fsutil import atomic_path  # noqa: E402
from ferkit.modelfile import (  # noqa: E402
    META_KEY,
    ONNX_INPUT,
    ONNX_OUTPUT,
    ONNX_OUTPUT_KIND,
    SOURCE_DIGEST_KEY,
    ModelMeta,
    calibrated_probs,
    file_digest,
    load_model,
    read_meta,
    resolve_model_path,
)

log = logging.getLogger(__name__)

INPUT_NAME = ONNX_INPUT
OUTPUT_NAME = ONNX_OUTPUT
OUTPUT_KIND = ONNX_OUTPUT_KIND
#: The largest max-abs difference in probability between PyTorch and ONNX Runtime that passes the parity check.
PARITY_TOLERANCE = 1e-4


class _WithSoftmax(nn.Module):
    """The network followed by its calibrated softmax (``modelfile.calibrated_probs``): the graph returns scores."""

    def __init__(self, net: nn.Module, meta: ModelMeta) -> None:
        super().__init__()
        self.net, self.meta = net, meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return calibrated_probs(self.net(x), self.meta)


def default_parity_data() -> Path | None:
    """``../shared/data/fer2013/validation`` seen from the working directory or from the source checkout."""
    rel = Path("shared") / "data" / "fer2013" / "validation"
    for base in (Path.cwd().parent, Path(__file__).resolve().parents[3]):
        if (base / rel).is_dir():
            return base / rel
    return None


def _parity_faces(meta: ModelMeta, data: str | os.PathLike | None, n: int) -> tuple[np.ndarray | None, str]:
    """Up to ``n`` uint8 S×S faces of the model's classes, spread over the classes; (None, why) if there are none."""
    from ferkit.data import find_dataset, load_split

    path = Path(data) if data is not None else default_parity_data()
    if path is None:
        return None, "no validation data found (looked for ../shared/data/fer2013/validation)"
    sources_log = logging.getLogger("ferkit.data.sources")
    level = sources_log.level
    sources_log.setLevel(logging.ERROR)  # "skipping folders not among the classes" is expected here, not news
    try:
        ds = find_dataset(path, list(meta.classes), require_all=False)
    except DatasetError as e:
        if data is not None:  # data the user named must be usable
            raise
        return None, f"default validation data unusable ({e})"
    finally:
        sources_log.setLevel(level)
    order = ["validation", "test", "single", "train"]
    split = next((ds.splits[s] for s in order if s in ds.splits), next(iter(ds.splits.values())))
    # Take an even stride through the split so every class is represented without decoding the whole folder.
    if split.pixels is None and len(split) > n:
        idx = np.linspace(0, len(split) - 1, n).round().astype(int)
        split.files = [split.files[i] for i in idx]
        split.labels = split.labels[idx]
    loaded = load_split(split, meta.input_size, use_cache=False)
    images = loaded.images
    if len(images) > n:
        images = images[np.linspace(0, len(images) - 1, n).round().astype(int)]
    if len(images) == 0:
        return None, f"{path}: no readable images"
    return images, str(path)


def _to_input(faces: np.ndarray, meta: ModelMeta) -> np.ndarray:
    from ferkit.preprocess import Preprocess

    return Preprocess.of(meta).numpy(faces)


def onnx_bytes(net: nn.Module, meta: ModelMeta, *, opset: int = 17, source_digest: str = "",
               label: str = "") -> bytes:
    """The network as a checked ONNX graph (softmax inside, dynamic batch axis) with ferkit's metadata, in memory.

    The only place ferkit turns a network into ONNX: ``export_onnx`` writes it to a file after a parity check, the
    runtime converts user models that have no ONNX sibling with it, and bundling writes the siblings through
    ``write_sibling``.

    Args:
        net: the network (taken to float32, eval mode).
        meta: its metadata, stored as JSON under the key ``"ferkit"`` plus plain keys for other readers.
        opset: the ONNX opset.
        source_digest: SHA-256 of the model file the weights came from (``SOURCE_DIGEST_KEY``), so a stale ONNX
            sibling can be told from a current one.
        label: how error messages name the model (default its name or architecture).

    Raises:
        ExportError: the exporter cannot trace the network, or the graph fails ``onnx.checker``.
        ImportError: the ``onnx`` package is missing.
    """
    onnx = require("onnx", what="ONNX export")
    label = label or meta.name or meta.arch
    wrapped = _WithSoftmax(net.float().eval(), meta).eval()
    s = meta.input_size
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            torch.onnx.export(wrapped, (torch.zeros(2, meta.in_chans, s, s),), buf, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    except Exception as e:
        raise ExportError(f"{label}: ONNX export failed at opset {opset}: {type(e).__name__}: {e}") from e
    proto = onnx.load_from_string(buf.getvalue())
    props = {
        META_KEY: meta.to_json(),
        "classes": json.dumps(list(meta.classes)),
        "input_size": str(s),
        "in_chans": str(meta.in_chans),
        "mean": repr(float(meta.mean)),
        "std": repr(float(meta.std)),
        "output": OUTPUT_KIND,
    }
    if source_digest:
        props[SOURCE_DIGEST_KEY] = source_digest
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "ferkit"
    proto.doc_string = (f"ferkit {meta.arch} ({', '.join(meta.classes)}): input '{INPUT_NAME}' N×{meta.in_chans}"
                        f"×{s}×{s} normalised (x/255-{meta.mean})/{meta.std}; output '{OUTPUT_NAME}' N×"
                        f"{len(meta.classes)} probabilities")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"{label}: exported graph fails onnx.checker: {e}") from e
    return proto.SerializeToString()


def export_onnx(model: str, out: str, *, data: str | None = None, opset: int = 17,
                parity_images: int = 200) -> dict[str, Any]:
    """Export a ferkit model to ONNX and check that ONNX Runtime gives the same probabilities as PyTorch.

    Args:
        model: a bundled model's name, a run directory or a ``.safetensors`` model file.
        out: the ``.onnx`` file to write (written atomically: nothing appears at ``out`` unless parity passed).
        data: a dataset (root, split folder or CSV) for the parity check; by default up to ``parity_images`` images
            of the model's classes from ``../shared/data/fer2013/validation``, else random inputs.
        opset: the ONNX opset.
        parity_images: how many images to compare on.

    Returns:
        ``{"path", "max_abs_diff", "n", "passed", "opset", "data", "classes", "input_size", "output"}``.

    Raises:
        ModelFileError: ``model`` is not a usable ferkit model.
        ExportError: the export fails, the exported graph is invalid, or parity exceeds ``PARITY_TOLERANCE``.
        ImportError: onnx or onnxruntime are not installed.
    """
    ort = require("onnxruntime", "train", what="the ONNX parity check")
    path = resolve_model_path(model)
    net, meta = load_model(path, meta=read_meta(path))
    net = net.float().eval()
    wrapped = _WithSoftmax(net, meta).eval()
    out_path = Path(out)
    if out_path.suffix.lower() != ".onnx":
        out_path = out_path.with_name(out_path.name + ".onnx")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    s = meta.input_size
    # Written under a temporary name and renamed only once the parity check passed: a failed export leaves nothing.
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(onnx_bytes(net, meta, opset=opset, source_digest=file_digest(path), label=str(model)))

        faces, source = _parity_faces(meta, data, parity_images)
        if faces is None:
            log.warning("parity on random inputs: %s", source)
            g = torch.Generator().manual_seed(0)
            faces = torch.randint(0, 256, (max(parity_images, 1), s, s), dtype=torch.uint8, generator=g).numpy()
            source = f"random inputs ({source})"
        x = _to_input(faces, meta)
        with torch.inference_mode():
            ref = wrapped(torch.from_numpy(x)).numpy()
        so = ort.SessionOptions()
        so.intra_op_num_threads = min(4, os.cpu_count() or 1)
        sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
        got = np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
        max_diff = float(np.abs(got - ref).max()) if len(x) else 0.0
        agree = float((got.argmax(1) == ref.argmax(1)).mean()) if len(x) else 1.0
        passed = bool(np.isfinite(max_diff) and max_diff <= PARITY_TOLERANCE)
        result: dict[str, Any] = {
            "path": str(out_path), "max_abs_diff": max_diff, "n": len(x), "passed": passed, "opset": opset,
            "label_agreement": agree, "data": source, "classes": list(meta.classes), "input_size": s,
            "output": OUTPUT_KIND,
        }
        log.info("ONNX parity on %d inputs from %s: max |Δp| = %.3g", len(x), source, max_diff)
        if not passed:
            raise ExportError(f"{model}: ONNX parity failed: max |Δp| = {max_diff:.3g} over {len(x)} inputs "
                              f"(tolerance {PARITY_TOLERANCE:g}); {out_path} not written")
    return result


def write_sibling(model: str | os.PathLike, *, data: str | None = None) -> dict[str, Any]:
    """Write the ONNX sibling of a ``.safetensors`` model file (``fer3.safetensors`` → ``fer3.onnx``), parity-checked.

    Bundled models ship with theirs so that inference never converts at first use and needs no torch; call this
    whenever a bundled model file is written or its metadata changes (``scripts/bundle_model.py`` does).

    Raises:
        ExportError: ``model`` is not a ``.safetensors`` file, or the export fails its checks.
    """
    path = resolve_model_path(model)
    if path.suffix.lower() != ".safetensors":
        raise ExportError(f"{model}: an ONNX sibling is made from a .safetensors model file")
    return export_onnx(str(path), str(path.with_suffix(".onnx")), data=data)
