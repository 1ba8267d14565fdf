"""ONNX export of a ferkit model with its metadata, checked against PyTorch on real validation images.

The exported graph takes the *normalised* face batch and returns class **probabilities** (softmax inside the graph):

* input ``"input"``: float32 N×C×S×S, grayscale face crops resized to ``meta.input_size`` and normalised as
  ``(x / 255 - meta.mean) / meta.std`` (C = ``meta.in_chans``, usually 1); the batch axis is dynamic.
* output ``"probs"``: float32 N×K, one row of probabilities per face, columns in ``meta.classes`` order.

The model file's :class:`~ferkit.modelfile.ModelMeta` travels in the ONNX ``metadata_props``: key ``"ferkit"`` holds
its JSON; ``"classes"`` (JSON list), ``"input_size"``, ``"mean"``, ``"std"`` and ``"output"`` (``"probabilities"``)
are there for readers that do not know ferkit, and ``"source_sha256"`` the digest of the model file it came from.

This module is the only place ferkit makes ONNX: :func:`onnx_bytes` (the graph, in memory), :func:`export_onnx`
(a file, after a parity check against PyTorch), :func:`write_sibling` (the ``.onnx`` beside a bundled model, which
the torch-free install runs) and :func:`export_int8` (static int8 quantisation, refused if it costs accuracy).
:func:`pack_ensemble` writes several models as one ferkit model file (``ferkit export --format ferkit``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ferkit._extras import require

require("torch", what="ONNX export")
import torch  # noqa: E402  (after the check that names the extra)
from torch import nn  # noqa: E402

from ferkit.errors import DatasetError, ExportError, ModelFileError  # noqa: E402, F401  (ExportError: re-exported)
from ferkit.fsutil import atomic_path  # noqa: E402
from ferkit.modelfile import (  # noqa: E402
    INT8_CHECK_KEY,
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
    stores_half,
)

log = logging.getLogger(__name__)

INPUT_NAME = ONNX_INPUT
OUTPUT_NAME = ONNX_OUTPUT
OUTPUT_KIND = ONNX_OUTPUT_KIND
#: The largest max-abs difference in probability between PyTorch and ONNX Runtime that passes the parity check.
PARITY_TOLERANCE = 1e-4


def check_out(out: str | os.PathLike, specs: list[str] | str) -> Path:
    """Refuse an output path that is one of the input models (``--out`` equal to ``--model`` would replace the model
    being read) or that exists as anything but a regular file; before any work.

    Raises:
        OutputError: one line naming the path.
    """
    from ferkit.errors import OutputError
    from ferkit.fsutil import check_target

    target = Path(out)
    for spec in [specs] if isinstance(specs, str) else specs:
        try:
            src = resolve_model_path(spec)
        except ModelFileError:
            continue  # loading it says what is wrong
        same = target.resolve() == src.resolve()
        with contextlib.suppress(OSError):
            same = same or (target.exists() and os.path.samefile(target, src))
        if same:
            raise OutputError(f"--out {out}: is the input model {spec}; write the result to another file")
    check_target(target)
    return target


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
    from ferkit.data import find_dataset

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
    # An even stride through the split: every class is represented without decoding the whole folder.
    images = _sample_split(split, n, meta.input_size).images
    if len(images) == 0:
        return None, f"{path}: no readable images"
    return images, str(path)


def _to_input(faces: np.ndarray, meta: ModelMeta) -> np.ndarray:
    from ferkit.preprocess import Preprocess

    return Preprocess.of(meta).numpy(faces)


def _half_initializers(proto: Any) -> int:
    """Store the graph's float32 weight tensors (2+ dimensions) whose every value is exactly a float16 as float16,
    each behind a ``Cast`` back to float32: a weight file saved with ``half`` (``stored_state``) gives a graph half
    the size that computes in float32 exactly as before (onnxruntime folds the casts when it loads the graph).
    Tensors that are not exact float16 (e.g. a kernel the exporter folded a BatchNorm into) stay float32.
    Returns how many tensors were converted."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or len(init.dims) < 2:
            continue
        w = numpy_helper.to_array(init)
        h = w.astype(np.float16)
        if not np.array_equal(h.astype(np.float32), w):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(h, name + "__f16"))
        casts.append(helper.make_node("Cast", [name + "__f16"], [name], to=TensorProto.FLOAT, name=name + "__cast"))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)  # the casts first: nodes stay in topological order
    return len(casts)


def onnx_bytes(net: nn.Module, meta: ModelMeta, *, opset: int = 17, source_digest: str = "",
               label: str = "", half: bool = False) -> bytes:
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
        half: store the weights that are exact float16 values as float16 (:func:`_half_initializers`); for
            networks loaded from a file saved with ``half``, whose weights all are.

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
                              opset_version=opset, do_constant_folding=True, dynamo=False,
                              # EVAL folds each BatchNorm into its convolution's kernel, which is then no float16
                              # value; PRESERVE (the network is in eval mode) keeps the BatchNorm nodes, and
                              # onnxruntime fuses them in float32 when it loads the graph
                              training=torch.onnx.TrainingMode.PRESERVE if half else torch.onnx.TrainingMode.EVAL)
    except Exception as e:
        raise ExportError(f"{label}: ONNX export failed at opset {opset}: {type(e).__name__}: {e}") from e
    proto = onnx.load_from_string(buf.getvalue())
    if half:
        log.debug("%s: %d weight tensors stored as float16", label, _half_initializers(proto))
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
    out_path = Path(out)
    if out_path.suffix.lower() != ".onnx":
        out_path = out_path.with_name(out_path.name + ".onnx")
    check_out(out_path, model)
    path = resolve_model_path(model)
    net, meta = load_model(path, meta=read_meta(path))
    net = net.float().eval()
    wrapped = _WithSoftmax(net, meta).eval()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    s = meta.input_size
    # Written under a temporary name and renamed only once the parity check passed: a failed export leaves nothing.
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(onnx_bytes(net, meta, opset=opset, source_digest=file_digest(path), label=str(model),
                                   half=stores_half(path)))

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


# -- int8 ------------------------------------------------------------------------------------------------------------

#: The most validation accuracy (in points) an int8 model may lose against the float model before it is refused.
INT8_MAX_LOSS_POINTS = 0.5
#: Training faces the activation ranges are calibrated on (spread evenly over the split, so over the classes too).
INT8_CALIBRATION_IMAGES = 1000
#: Only the layers holding the weights are quantised; the calibrated softmax stays in float (its small probabilities
#: would round to a few int8 levels).
INT8_OP_TYPES = ("Conv", "Gemm", "MatMul")
#: Activation ranges from the 99.99th percentile of |activation| rather than the extremes. Measured on the bundled
#: models' whole validation splits (1000 calibration faces): MinMax lost 0.05 points on fer3 and 0.53 on fer7
#: (refused), Entropy 0.53 on fer7; the percentile gained 0.05 and 0.06.
INT8_PERCENTILE = 99.99
#: Faces per calibration batch; the percentile calibrator needs batches of one size.
INT8_CALIBRATION_BATCH = 50


def _sample_split(split: Any, n: int, size: int) -> Any:
    """Up to ``n`` images of a split, an even stride through it, decoded (not cached: a sample is not the split)."""
    from ferkit.data import load_split

    if split.pixels is None and len(split) > n:
        idx = np.linspace(0, len(split) - 1, n).round().astype(int)
        split.files = [split.files[i] for i in idx]
        split.labels = split.labels[idx]
    loaded = load_split(split, size, use_cache=False)
    if len(loaded) > n:
        keep = np.linspace(0, len(loaded) - 1, n).round().astype(int)
        loaded.images, loaded.labels = loaded.images[keep], loaded.labels[keep]
    return loaded


def _session(model: bytes | str, threads: int | None = None) -> Any:
    from ferkit.infer.runtime import OnnxRuntime

    return OnnxRuntime(model, threads=threads)


def _accuracy(rt: Any, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    pred = np.concatenate([rt.probs(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def _faces_per_s(rt: Any, x: np.ndarray, batch: int = 256, repeats: int = 5) -> float:
    """Throughput on one batch of real faces: the best of ``repeats`` timed runs after a warm-up run."""
    import time

    xb = x[:batch]
    rt.probs(xb)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        rt.probs(xb)
        best = min(best, time.perf_counter() - t)
    return len(xb) / best


def export_int8(model: str, out: str, *, data: str | os.PathLike, opset: int = 17,
                calibration_images: int = INT8_CALIBRATION_IMAGES,
                max_loss_points: float = INT8_MAX_LOSS_POINTS) -> dict[str, Any]:
    """Export a ferkit model to a statically quantised int8 ONNX file, refused if it loses accuracy.

    onnxruntime's ``quantize_static`` (QDQ format, per-channel int8 weights, uint8 activations) with activation ranges
    calibrated (99.99th percentile) on training images of ``data``; then the float and the int8 graphs are both
    scored on the whole validation split and timed on a batch of 256 faces.

    Args:
        model: a bundled model's name, a run directory or a ``.safetensors`` model file.
        out: the int8 ``.onnx`` file, written (atomically) only when the int8 model is within ``max_loss_points``.
        data: a dataset root with a ``train`` split (calibration) and a ``validation`` split (the accuracy check).

    Returns:
        ``{"path", "float_accuracy", "int8_accuracy", "loss_points", "float_faces_per_s", "int8_faces_per_s",
        "float_bytes", "int8_bytes", "n_validation", "n_calibration", ...}``.

    Raises:
        ExportError: the int8 model loses more than ``max_loss_points`` of validation accuracy (nothing written).
        DatasetError: ``data`` lacks a train or validation split of the model's classes.
    """
    import tempfile

    require("onnxruntime", "train", what="int8 export")
    onnx = require("onnx", what="int8 export")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ferkit.data import find_dataset, load_split
    from ferkit.preprocess import Preprocess

    check_out(out, model)
    path = resolve_model_path(model)
    net, meta = load_model(path, meta=read_meta(path))
    pre = Preprocess.of(meta)
    ds = find_dataset(data, list(meta.classes), require_all=False)
    train, val = ds.split("train"), ds.split("validation")
    calib = _sample_split(train, calibration_images, meta.input_size)
    votes = (meta.training.get("labels") or {}).get("source")
    if votes and Path(votes).exists():
        # a model that learnt the crowd votes is checked against them: the faces with a FER+ majority label
        from ferkit.data.labels import majority_labels
        from ferkit.evaluate import split_with_votes

        _, src, v, _ = split_with_votes(str(data), votes, "validation", list(meta.classes))
        loaded_val = load_split(src, meta.input_size)
        y_all = majority_labels(loaded_val.take(v), list(meta.classes))
        keep = y_all >= 0
        x_val, y_val = pre.numpy(loaded_val.images[keep]), y_all[keep]
        truth = "FER+ majority"
    else:
        # labels index ds.classes (the classes present in the data); the model's columns follow meta.classes
        to_model = np.array([list(meta.classes).index(c) for c in ds.classes])
        loaded_val = load_split(val, meta.input_size)
        x_val, y_val = pre.numpy(loaded_val.images), to_model[loaded_val.labels]
        truth = "folder labels"
    x_cal = pre.numpy(calib.images)

    b = min(INT8_CALIBRATION_BATCH, len(x_cal))
    x_cal = x_cal[:len(x_cal) // b * b]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([x_cal[i:i + b] for i in range(0, len(x_cal), b)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self.batches, None)
            return None if b is None else {INPUT_NAME: b}

    float_bytes = onnx_bytes(net, meta, opset=opset, source_digest=file_digest(path), label=str(model))
    with tempfile.TemporaryDirectory(prefix="ferkit-int8-") as tmp:
        f32, prep, q8 = (Path(tmp) / n for n in ("float.onnx", "prep.onnx", "int8.onnx"))
        f32.write_bytes(float_bytes)
        quant_pre_process(str(f32), str(prep), skip_symbolic_shape=True)  # shape inference + fusions first
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its progress to stdout
            # reduce_range: 7-bit weights, so that CPUs without VNNI (AVX2) do not saturate their 16-bit
            # intermediate sums: with 8-bit ones fer3 lost 1.90 points on an AVX2 EPYC (0.19 with 7-bit)
            quantize_static(str(prep), str(q8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            calibrate_method=CalibrationMethod.Percentile, op_types_to_quantize=list(INT8_OP_TYPES),
                            extra_options={"CalibPercentile": INT8_PERCENTILE})
        proto = onnx.load(str(q8))
    # quantize_static keeps the graph but not ferkit's metadata: copy it over, and say what was done
    src = onnx.load_from_string(float_bytes)
    del proto.metadata_props[:]
    for p in src.metadata_props:
        proto.metadata_props.add().CopyFrom(p)
    entry = proto.metadata_props.add()
    entry.key = "quantization"
    entry.value = (f"int8 static QDQ (onnxruntime {_ort_version()}): per-channel int8 weights, uint8 activations, "
                   f"percentile {INT8_PERCENTILE} on {len(x_cal)} training faces")
    proto.producer_name, proto.doc_string = "ferkit", src.doc_string + " (int8)"
    int8_bytes = proto.SerializeToString()

    rt_f, rt_q = _session(float_bytes), _session(int8_bytes)
    acc_f, acc_q = _accuracy(rt_f, x_val, y_val), _accuracy(rt_q, x_val, y_val)
    loss = (acc_f - acc_q) * 100
    result: dict[str, Any] = {
        "path": str(out), "model": str(model), "classes": list(meta.classes), "n_validation": int(len(y_val)),
        "labels": truth,
        "n_calibration": int(len(x_cal)), "float_accuracy": acc_f, "int8_accuracy": acc_q, "loss_points": loss,
        "max_loss_points": max_loss_points, "float_faces_per_s": _faces_per_s(rt_f, x_val),
        "int8_faces_per_s": _faces_per_s(rt_q, x_val), "float_bytes": len(float_bytes), "int8_bytes": len(int8_bytes),
        "threads": rt_f.session.get_session_options().intra_op_num_threads, "written": False,
    }
    p_f, p_q = rt_f.probs(x_val[:1000]), rt_q.probs(x_val[:1000])
    result["label_agreement"] = float((p_f.argmax(1) == p_q.argmax(1)).mean())
    result["max_abs_diff"] = float(np.abs(p_f - p_q).max())
    log.info("int8: validation %.2f%% (float %.2f%%), %.0f faces/s (float %.0f)", acc_q * 100, acc_f * 100,
             result["int8_faces_per_s"], result["float_faces_per_s"])
    # the check travels with the file: the runtime picks an int8 sibling only when it lost at most
    # INT8_AUTO_MAX_LOSS_POINTS here (see ferkit.infer.runtime)
    entry = proto.metadata_props.add()
    entry.key = INT8_CHECK_KEY
    entry.value = json.dumps({"labels": truth, "n": int(len(y_val)), "float_accuracy": round(acc_f, 6),
                              "int8_accuracy": round(acc_q, 6), "loss_points": round(loss, 4)})
    int8_bytes = proto.SerializeToString()
    result["int8_bytes"] = len(int8_bytes)  # what is written, its check included
    out_path = Path(out)
    if loss > max_loss_points:
        raise ExportError(f"{model}: int8 loses {loss:.2f} points of validation accuracy ({acc_f * 100:.2f}% → "
                          f"{acc_q * 100:.2f}%, limit {max_loss_points:g}); {out_path} not written")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as t:
        t.write_bytes(int8_bytes)
    result["written"] = True
    return result


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def pack_ensemble(specs: list[str], out: str, *, data: str | None = None, split: str = "validation",
                  say: Callable[[str], None] = lambda s: None, half: bool = False, score: bool = True
                  ) -> dict[str, Any]:
    """Write the ensemble of ``specs`` as one ferkit model file (see :mod:`ferkit.models.ensemble`).

    The members must agree on classes (same order), input size, channels and normalisation. The packed model is then
    scored on ``split`` of ``data`` (default: the first member's training data, when it is there) and the metrics
    are stored in its metadata, as a training run stores its own. ``half``: float16 weights (see
    :func:`ferkit.modelfile.stored_state`), calibrated and scored as stored. ``score=False``: neither (an uncalibrated
    file with no metrics, e.g. one that is wrapped or unpacked next).

    Raises:
        ModelFileError: fewer than two members, or members that disagree.
    """
    from ferkit.models.ensemble import Ensemble, ensemble_arch

    if len(specs) < 2:
        raise ModelFileError("an ensemble needs at least two models (--model a,b)")
    check_out(out, specs)
    models = [load_model(s) for s in specs]
    first = models[0][1]
    for spec, (_, meta) in zip(specs[1:], models[1:]):
        for field in ("classes", "input_size", "in_chans", "mean", "std"):
            mine, theirs = getattr(meta, field), getattr(first, field)
            if mine != theirs:
                show = (lambda v: ", ".join(v)) if field == "classes" else str
                raise ModelFileError(
                    f"{spec}: {field} {show(mine)} differ from {specs[0]}'s ({show(theirs)}); the members of an "
                    "ensemble must agree"
                )
    members: list[torch.nn.Module] = []
    for net, _ in models:
        members += list(net.members) if isinstance(net, Ensemble) else [net]
    ens = Ensemble(members).eval()
    meta = dataclasses.replace(
        first,
        arch=ensemble_arch([m.arch for _, m in models]),
        name=Path(out).stem,
        training={
            "recipe": "ensemble",
            "ensemble_of": list(specs),
            "data": first.training.get("data"),
            "train_images": first.training.get("train_images"),
            **({"labels": first.training["labels"]} if first.training.get("labels") else {}),
        },
        metrics={},
    )
    return _write_scored(out, ens, meta, (data or first.training.get("data")) if score else None, split, say, half=half)


def _write_scored(out: str, net: torch.nn.Module, meta: ModelMeta, data: str | None, split: str,
                  say: Callable[[str], None], *, half: bool = False) -> dict[str, Any]:
    """Save ``net`` as a ferkit model file (``half``: float16 weights); when ``data`` is there, calibrate it and
    store its metrics on ``split``, both measured on the weights as stored.

    A new combination of weights (averaged members, a cut output layer) is as confident as it is, not as its parts
    were: it is calibrated itself, on the split it is scored on (ECE quoted by cross-fitting, see train.calibrate).
    """
    from ferkit.evaluate import evaluate_models, model_logits
    from ferkit.modelfile import save_model
    from ferkit.train.calibrate import calibrate

    meta = dataclasses.replace(meta, temperature=1.0, temperature_poly=(), metrics={})
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Calibrated and scored under a temporary name: only the finished file ever appears at ``out`` (an interrupted
    # run left an uncalibrated, unscored model there).
    with atomic_path(out_path) as path:
        save_model(path, net, meta, json_sidecar=False, half=half)
        votes = (meta.training.get("labels") or {}).get("source")
        if data and Path(data).exists() and votes and Path(votes).exists():
            meta = _score_on_votes(path, net, meta, data, votes, split, say, half)
        elif data and Path(data).exists():
            z, y, _ = model_logits(str(path), data=data, split=split)
            cal = calibrate(z, y, split=split)
            meta = dataclasses.replace(meta, temperature=cal["temperature"],
                                       temperature_poly=tuple(cal["temperature_poly"]))
            save_model(path, net, meta, json_sidecar=False, half=half)
            m = evaluate_models([str(path)], data=data, split=split, say=say)
            flip = evaluate_models([str(path)], data=data, split=split, tta="flip")
            meta = dataclasses.replace(meta, metrics={
                "val_split": m["split"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                "accuracy_tta_flip": flip["accuracy"], "n": m["n"], "calibration": cal})
            save_model(path, net, meta, json_sidecar=False, half=half)
    return {"path": str(out_path), "arch": meta.arch, "metrics": meta.metrics}


def _score_on_votes(path: Path, net: torch.nn.Module, meta: ModelMeta, data: str, votes: str, split: str,
                    say: Callable[[str], None], half: bool) -> ModelMeta:
    """``_write_scored`` for a model trained on crowd votes: calibrated against the FER+ majority label and scored
    against people (``metrics["accuracy"]``), with the folder-label accuracy beside it. Returns the metadata
    written."""
    from ferkit.data.labels import majority_labels
    from ferkit.evaluate import evaluate_models, vote_logits
    from ferkit.modelfile import save_model
    from ferkit.train.calibrate import calibrate

    z, v, _, _ = vote_logits(str(path), data=data, labels=votes, split=split)
    y = majority_labels(v, list(meta.classes))
    cal = calibrate(z[y >= 0], y[y >= 0], split=f"{split} (FER+ majority)")
    meta = dataclasses.replace(meta, temperature=cal["temperature"], temperature_poly=tuple(cal["temperature_poly"]))
    save_model(path, net, meta, json_sidecar=False, half=half)
    m = evaluate_models([str(path)], data=data, split=split, say=say, labels=votes)
    flip = evaluate_models([str(path)], data=data, split=split, tta="flip", labels=votes)
    fp = m["ferplus"]
    meta = dataclasses.replace(meta, metrics={
        "val_split": m["split"], "labels": "ferplus-majority", "accuracy": fp["accuracy"], "n": fp["n"],
        "accuracy_tta_flip": flip["ferplus"]["accuracy"], "accuracy_folder": m["accuracy"], "n_folder": m["n"],
        "macro_f1": m.get("macro_f1"), "ferplus": fp, "calibration": cal})
    save_model(path, net, meta, json_sidecar=False, half=half)
    return meta


def restrict_classes(spec: str, classes: list[str], out: str, *, data: str | None = None, split: str = "validation",
                     say: Callable[[str], None] = lambda s: None, half: bool = False) -> dict[str, Any]:
    """Write ``spec`` cut down to ``classes`` (a subset of its own, in the order given) as one ferkit model file.

    Every member's output layer keeps only the rows of those classes, so each member's softmax is its softmax over
    them (renormalised); an ensemble then averages those, a model's own TTA views stay. A network trained on all
    seven expressions is often a better happy/sad/neutral classifier than one trained on three: the other four
    teach it more about faces. The cut model is calibrated and scored like a packed ensemble.

    Raises:
        ModelFileError: a class the model does not have, or a network whose output layer cannot be found.
    """
    from ferkit.models.ensemble import ensemble_members, tta_inner

    check_out(out, spec)
    net, meta = load_model(spec)
    missing = [c for c in classes if c not in meta.classes]
    if missing or len(classes) < 2:
        raise ModelFileError(f"{spec}: cannot keep classes {', '.join(missing or classes)}: it has "
                             f"{', '.join(meta.classes)} (keep two or more of them)")
    rows = torch.tensor([meta.classes.index(c) for c in classes])
    inner = tta_inner(meta.arch) or meta.arch
    expected = len(ensemble_members(inner) or [inner])
    heads = [(name, m) for name, m in net.named_modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == len(meta.classes)]
    if len(heads) != expected:
        raise ModelFileError(f"{spec}: found {len(heads)} output layers of {len(meta.classes)} classes in "
                             f"'{meta.arch}', expected {expected} (one a network); cannot cut its classes")
    for name, old in heads:
        cut = torch.nn.Linear(old.in_features, len(classes), bias=old.bias is not None)
        with torch.no_grad():
            cut.weight.copy_(old.weight[rows])
            if old.bias is not None:
                cut.bias.copy_(old.bias[rows])
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, cut)
    meta = dataclasses.replace(
        meta, classes=tuple(classes), name=Path(out).stem,
        training={**meta.training, "restricted_from": spec, "restricted_from_classes": list(meta.classes)})
    return _write_scored(out, net.eval(), meta, data or meta.training.get("data"), split, say, half=half)
