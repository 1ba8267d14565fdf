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

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ferkit.errors import DatasetError, FerkitError
from ferkit.modelfile import META_KEY, ModelMeta, load_model

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "probs"
OUTPUT_KIND = "probabilities"
#: The largest max-abs difference in probability between PyTorch and ONNX Runtime that passes the parity check.
PARITY_TOLERANCE = 1e-4


class ExportError(FerkitError, RuntimeError):
    """The ONNX export failed, or the exported model does not match the PyTorch model."""


class _WithSoftmax(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x).float(), dim=1)


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
    from ferkit.data.augment import to_float

    x = to_float(torch.as_tensor(faces), meta.input_size, meta.mean, meta.std)
    if meta.in_chans != 1:
        x = x.expand(-1, meta.in_chans, -1, -1)
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


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
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxruntime: pip install 'ferkit[onnx]' ({e})") from None

    net, meta = load_model(model)
    net = net.float().eval()
    wrapped = _WithSoftmax(net).eval()
    out_path = Path(out)
    if out_path.suffix.lower() != ".onnx":
        out_path = out_path.with_name(out_path.name + ".onnx")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    s = meta.input_size
    try:
        dummy = torch.zeros(2, meta.in_chans, s, s)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
                torch.onnx.export(wrapped, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                                  opset_version=opset, do_constant_folding=True, dynamo=False)
        except Exception as e:
            raise ExportError(f"{model}: ONNX export failed at opset {opset}: {type(e).__name__}: {e}") from e

        proto = onnx.load(str(tmp))
        props = {
            META_KEY: meta.to_json(),
            "classes": json.dumps(list(meta.classes)),
            "input_size": str(s),
            "in_chans": str(meta.in_chans),
            "mean": repr(float(meta.mean)),
            "std": repr(float(meta.std)),
            "output": OUTPUT_KIND,
        }
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
            raise ExportError(f"{model}: exported graph fails onnx.checker: {e}") from e
        onnx.save(proto, str(tmp))

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
        os.replace(tmp, out_path)
        return result
    finally:
        tmp.unlink(missing_ok=True)
