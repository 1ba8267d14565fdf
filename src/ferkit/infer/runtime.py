"""Classifier backends behind one small interface: ``probs(x) -> N×C`` on a normalised face batch.

``TorchRuntime`` runs the ferkit model file in PyTorch (conv+BN fused, channels-last, inference mode);
``OnnxRuntime`` runs an ONNX graph in onnxruntime. On a CPU onnxruntime is the faster of the two for ferkit's small
CNNs at every batch size (see ``benchmarks/infer_speed.json``), so ``make_runtime(backend="auto")`` picks it whenever
onnxruntime is installed. A ``.safetensors`` model runs from its ONNX sibling (``fer3.onnx`` beside
``fer3.safetensors``: every bundled model ships one) when the sibling's recorded digest matches the model file; a
model without a current sibling is converted once by ``ferkit.export`` (needs torch) and the result kept in
``$FERKIT_CACHE_DIR/onnx`` (default ``~/.cache/ferkit/onnx``), keyed by the model file's content.

A model may also ship an int8 sibling (``fer3.int8.onnx``, ``ferkit export --int8``: static quantisation, its accuracy
check against the float graph stored in it). ``backend="auto"`` runs it instead of the float graph when (1) it was
exported from this very model file, (2) it lost at most :data:`INT8_AUTO_MAX_LOSS_POINTS` of validation accuracy and
(3) it is faster on this CPU: both graphs are timed once on a batch of faces (about 0.1 s) and the verdict is kept in
the cache folder per CPU and model (``int8-choice.json``). Whether int8 pays depends on the CPU's vector units: it was
1.5× the float graph on an AVX2-only EPYC. ``FERKIT_INT8=0`` never uses it, ``FERKIT_INT8=1`` always does;
``backend="onnx"`` always runs the float graph (the same probabilities as torch, to 1e-4).

    >>> rt = make_runtime("fer3")
    >>> p = rt.probs(x)          # x: float32 N×1×S×S, (pixels/255 - meta.mean) / meta.std

Unless the caller set it, ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` when this module loads torch (or the face
detector's OpenMP library) first: idle OpenMP threads then sleep instead of spinning. On a 2-core machine shared with
other work, spinning threads of torch and of YuNet's OpenMP runtime starve each other: one face took 140 ms instead of
1.2 ms in torch, and YuNet 420 ms instead of 21 ms on a 640×480 photo once torch had been imported.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ferkit.errors import ConfigError, DeviceError, ModelFileError, UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ferkit.modelfile import ModelMeta

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
ONNX_INSTALL = "pip install 'ferkit[onnx]'"
#: Bump when the conversion changes, so that stale cached ONNX files are not reused.
ONNX_CACHE_VERSION = 2
#: The most validation accuracy (points, against the float graph) an int8 sibling may have lost to be picked.
INT8_AUTO_MAX_LOSS_POINTS = 0.3
#: Faces per timed batch and timed repeats when deciding between the int8 and the float graph.
INT8_TIMING_BATCH, INT8_TIMING_REPEATS = 128, 5


class Runtime(Protocol):
    """What the recognizer needs from a classifier backend."""

    name: str
    meta: ModelMeta

    def probs(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (float32 N×C) for a normalised float32 N×in_chans×S×S batch."""
        ...


def prefer_passive_openmp() -> None:
    """Make idle OpenMP threads sleep rather than spin (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose otherwise.

    OpenMP runtimes read the variable once, when they load: this only acts before torch (or yuface) is imported.
    """
    if "torch" not in sys.modules or "yuface" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpu_threads() -> int:
    """CPUs this process may run on (affinity-aware, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class TorchRuntime:
    """PyTorch backend for a ferkit model file.

    On CPU the network's conv+BN pairs are fused (``torch.fx``) and it runs channels-last under
    ``torch.inference_mode``: about 2× the eager throughput for fastcnn. Networks that ``torch.fx`` cannot trace run
    eager.

    Args:
        model: a bundled model's name, a run directory or a ``.safetensors`` model file; or an ``nn.Module``
            together with ``meta``.
        meta: the model's metadata: required with a module; with a path, saves reading the file's header again.
        device: ``"cpu"`` or a CUDA device.
    """

    name = "torch"

    def __init__(
        self, model: str | os.PathLike | torch.nn.Module, meta: ModelMeta | None = None, *, device: str = "cpu"
    ) -> None:
        prefer_passive_openmp()
        from ferkit._extras import require

        torch = require("torch", what="backend 'torch'")
        from ferkit.modelfile import load_model

        if isinstance(model, torch.nn.Module):
            if meta is None:
                raise ValueError("TorchRuntime(module) needs meta=ModelMeta(...)")
            net = model.eval().to(device)
        else:
            net, meta = load_model(model, device=device, meta=meta)
        self.meta: ModelMeta = meta
        self.device = torch.device(device)
        self.fused = False
        if self.device.type == "cpu":
            try:
                from torch.fx.experimental.optimization import fuse

                net = fuse(net)
                self.fused = True
            except Exception as e:  # noqa: BLE001  (tracing can fail in many ways on dynamic control flow)
                log.debug("conv+BN fusion skipped for %s: %s", meta.arch, e)
            self.memory_format = torch.channels_last
        else:
            self.memory_format = torch.contiguous_format
        self.net = net.to(memory_format=self.memory_format).eval()

    def probs(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (float32 N×C) for a normalised float32 N×C×S×S batch."""
        import torch

        from ferkit.modelfile import calibrated_probs

        if len(x) == 0:
            return np.zeros((0, len(self.meta.classes)), np.float32)
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            t = t.contiguous(memory_format=self.memory_format)
            return calibrated_probs(self.net(t), self.meta).cpu().numpy()  # the model's temperature


class OnnxRuntime:
    """onnxruntime backend for an ONNX graph written by ``ferkit export`` (or converted in memory).

    The graph's ferkit metadata (``ModelMeta`` JSON) is read from the ONNX ``metadata_props`` key ``"ferkit"``;
    graphs whose ``"output"`` property is not ``"probabilities"`` are taken to return logits.

    Args:
        model: a ``.onnx`` path or the serialised model bytes.
        meta: overrides the metadata stored in the graph (needed for graphs without it).
        threads: intra-op threads; default all CPUs this process may use.

    Raises:
        ImportError: onnxruntime is not installed.
        ModelFileError: not an ONNX file onnxruntime can load, or no ferkit metadata in it.
    """

    name = "onnx"

    def __init__(
        self, model: str | os.PathLike | bytes, meta: ModelMeta | None = None, *, threads: int | None = None
    ) -> None:
        ort = _import_onnxruntime()
        from ferkit.modelfile import ONNX_OUTPUT, ONNX_OUTPUT_KIND, parse_meta

        label = "in-memory ONNX model" if isinstance(model, bytes) else str(model)
        so = ort.SessionOptions()
        env = os.environ.get("OMP_NUM_THREADS", "")
        so.intra_op_num_threads = threads or (int(env) if env.isdigit() and int(env) > 0 else cpu_threads())
        so.inter_op_num_threads = 1
        # Idle worker threads spinning after each run steal the CPU from the face detector's own OpenMP threads that
        # run next: with spinning on, detect + classify of one photo took 1.7× as long on 2 cores; throughput on
        # large batches is the same either way.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3  # onnxruntime's own warnings go to stderr unconditionally otherwise
        src = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own Fail/InvalidGraph/… classes)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelFileError(f"{label}: not an ONNX model onnxruntime can load ({first[:200]})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        #: The graph's metadata properties (``"ferkit"``, ``"source_sha256"``, …).
        self.props: dict[str, str] = dict(props)
        if meta is None:
            if "ferkit" not in props:
                raise ModelFileError(f"{label}: ONNX file without ferkit metadata (export it with 'ferkit export')")
            meta = parse_meta(props["ferkit"], f"{label} (ONNX metadata)")
        self.meta = meta
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        _check_graph(self.session, meta, label)
        self.is_probs = (
            props.get("output", ONNX_OUTPUT_KIND if self.output_name == ONNX_OUTPUT else "") == ONNX_OUTPUT_KIND
        )
        #: True for a quantised (int8) graph.
        self.int8 = "quantization" in props

    def probs(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (float32 N×C) for a normalised float32 N×C×S×S batch."""
        if len(x) == 0:
            return np.zeros((0, len(self.meta.classes)), np.float32)
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return out if self.is_probs else softmax(out)


def _check_graph(session: Any, meta: ModelMeta, label: str) -> None:
    """The graph's declared input and output shapes against the metadata (symbolic dimensions pass).

    Raises:
        ModelFileError: the metadata's input size or channels, or its number of classes, differ from the graph's.
    """
    ins, outs = session.get_inputs(), session.get_outputs()
    shape = list(ins[0].shape) if len(ins) == 1 else None
    want = [meta.in_chans, meta.input_size, meta.input_size]
    if shape is None or len(shape) != 4 or any(isinstance(g, int) and g != w for g, w in zip(shape[1:], want)):
        got = "several inputs" if shape is None else "×".join(str(g) for g in shape)
        raise ModelFileError(f"{label}: the metadata says the input is N×{meta.in_chans}×{meta.input_size}×"
                             f"{meta.input_size}, the graph takes {got}")
    out = list(outs[0].shape) if outs else []
    if len(out) != 2 or (isinstance(out[1], int) and out[1] != len(meta.classes)):
        got = "×".join(str(g) for g in out) or "nothing"
        raise ModelFileError(f"{label}: the metadata names {len(meta.classes)} classes, the graph outputs {got}")


def check_runtime(rt: Runtime, label: str) -> None:
    """One forward pass on a blank face, checked: ``len(classes)`` finite probabilities that sum to 1.

    Catches what no declared shape shows (a symbolic output dimension, weights that turn everything into NaN) when
    the model loads, rather than as NaN scores in the results. A millisecond for ferkit's networks.

    Raises:
        ModelFileError: one line naming the model and what came out.
    """
    from ferkit.preprocess import Preprocess

    s = rt.meta.input_size
    try:
        p = np.asarray(rt.probs(Preprocess.of(rt.meta).numpy(np.full((1, s, s), 128, np.uint8))))
    except Exception as e:  # noqa: BLE001  (onnxruntime and torch raise their own classes on a bad graph)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{label}: the model cannot run on a {s}×{s} face ({first[:200]})") from None
    if p.shape != (1, len(rt.meta.classes)):
        raise ModelFileError(f"{label}: the model outputs {p.shape[-1] if p.ndim else 0} scores for "
                             f"{len(rt.meta.classes)} class names")
    if not (np.isfinite(p).all() and abs(float(p.sum()) - 1.0) < 1e-3):
        raise ModelFileError(f"{label}: the model gives scores that are not probabilities (NaN, infinite or not "
                             "summing to 1): damaged weights or calibration")


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"the ONNX backend needs onnxruntime: {ONNX_INSTALL} ({e})") from None
    return onnxruntime


def onnx_available() -> bool:
    """Whether onnxruntime can be imported (without importing it when it is absent)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def make_runtime(model: str | os.PathLike, backend: str = "auto", *, device: str = "cpu") -> Runtime:
    """Load a model into the fastest available backend.

    Args:
        model: a bundled model's name, a run directory, a ``.safetensors`` model file or a ``.onnx`` file.
        backend: ``"onnx"``, ``"torch"`` or ``"auto"``: onnxruntime when it is installed and ``device`` is the CPU
            (a ``.safetensors`` model runs from its ONNX sibling, or is converted once and the conversion cached),
            else PyTorch.
        device: ``"cpu"`` or a CUDA device (PyTorch backend only).

    Raises:
        ModelFileError: ``model`` is missing or not a ferkit model.
        ImportError: ``backend="onnx"`` without onnxruntime, naming the ``pip install`` that fixes it.
        UnknownNameError: unknown backend.
        ConfigError: an ONNX model with a CUDA device / the torch backend.
        DeviceError: ``device`` is not on this machine.
        ModelFileError: also when the model's metadata does not fit its weights or graph, or it gives no valid
            probabilities on a blank face (:func:`check_runtime`).
    """
    rt = _make_runtime(model, backend, device=device)
    check_runtime(rt, str(model))
    return rt


def _make_runtime(model: str | os.PathLike, backend: str, *, device: str) -> Runtime:
    prefer_passive_openmp()
    from ferkit.modelfile import read_meta, resolve_model_path

    if backend not in BACKENDS:
        raise UnknownNameError("backend", backend, BACKENDS)
    check_device(device)
    path = resolve_model_path(model)
    is_onnx = path.suffix.lower() == ".onnx"
    on_cpu = str(device).startswith("cpu")
    auto = backend == "auto"
    if auto:
        backend = "onnx" if on_cpu and (is_onnx or onnx_available()) else "torch"
    if is_onnx:
        if backend == "torch" or not on_cpu:
            raise ConfigError(
                f"{model}: an ONNX model runs only with backend 'onnx' on the CPU "
                f"(use the .safetensors model file for backend='torch' or device='{device}')"
            )
        return OnnxRuntime(path)
    meta = read_meta(path)  # the one read of the model file's metadata; every backend below gets it
    if backend == "torch":
        return TorchRuntime(path, meta, device=device)
    if not on_cpu:
        raise ConfigError(f"backend 'onnx' runs on the CPU only; use backend='torch' for device='{device}'")
    _import_onnxruntime()  # fail with the install hint before spending time on loading and converting
    rt = _onnx_for(path, meta)
    return _int8_if_faster(path, rt) if auto else rt


def check_device(device: str) -> None:
    """Refuse a device that is not there with one line (torch would raise a bare RuntimeError or AssertionError).

    Raises:
        DeviceError: not a device name torch knows, or a CUDA/MPS device this machine does not have.
    """
    if str(device).startswith("cpu"):
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device '{device}': not a device name torch knows; use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeviceError(f"device '{device}': no CUDA device is available (use device='cpu')")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device '{device}': this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device '{device}': MPS is not available here (use device='cpu')")


def onnx_cache_dir() -> Path:
    """Where converted models are kept: ``$FERKIT_CACHE_DIR/onnx`` or ``~/.cache/ferkit/onnx``."""
    return Path(os.environ.get("FERKIT_CACHE_DIR") or Path.home() / ".cache" / "ferkit") / "onnx"


def _onnx_for(path: Path, meta: ModelMeta) -> Runtime:
    """A ``.safetensors`` model in onnxruntime: its ONNX sibling when that was exported from this very file, else a
    cached conversion keyed by the file's content, else a conversion now (needs torch; cached for next time)."""
    from ferkit.modelfile import SOURCE_DIGEST_KEY, file_digest, onnx_sibling

    digest = file_digest(path)
    sibling = onnx_sibling(path)
    if sibling is not None:
        try:
            rt = OnnxRuntime(sibling, meta)
        except ModelFileError as e:
            log.warning("%s; ignoring it", e)
        else:
            if rt.props.get(SOURCE_DIGEST_KEY) == digest:
                return rt
            # A sibling left from other weights or metadata (a temperature recalibrated, a model re-bundled) would
            # give other probabilities than the model file: never use it silently.
            log.warning("%s was not exported from %s as it is now (its digest differs); ignoring it. Rewrite it "
                        "with: ferkit export --model %s --format onnx --out %s", sibling, path, path, sibling)
    cached = onnx_cache_dir() / f"{path.stem[:40]}-{digest[:32]}-v{ONNX_CACHE_VERSION}.onnx"
    if cached.is_file():
        try:
            return OnnxRuntime(cached, meta)
        except ModelFileError:
            log.info("%s: damaged cached conversion, converting again", cached)
            cached.unlink(missing_ok=True)

    try:
        import importlib

        export = importlib.import_module("ferkit.export")  # needs torch
    except ImportError as e:
        raise ImportError(f"{path}: no current ONNX file beside it, and converting one needs torch ({e}); or "
                          f"export it where torch is installed: ferkit export --model {path} --format onnx") from None
    from ferkit.errors import ExportError
    from ferkit.modelfile import load_model

    net, meta = load_model(path, meta=meta)
    try:
        data = export.onnx_bytes(net, meta, source_digest=digest, label=str(path))
    except ExportError as e:  # an architecture the exporter cannot trace still runs in torch
        log.warning("%s; using the torch backend", e)
        return TorchRuntime(net, meta)
    try:
        from ferkit.fsutil import atomic_write_bytes

        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cached, data)
    except OSError as e:  # a read-only home or full disk only costs the conversion next time
        log.debug("not caching the ONNX conversion in %s: %s", cached.parent, e)
    return OnnxRuntime(data, meta)


def _int8_if_faster(path: Path, rt: Runtime) -> Runtime:
    """The model's int8 sibling instead of the float graph ``rt`` where it is allowed and faster (module docstring)."""
    import json

    from ferkit.modelfile import INT8_CHECK_KEY, SOURCE_DIGEST_KEY, int8_sibling

    choice = os.environ.get("FERKIT_INT8", "auto").strip().lower()
    sibling = int8_sibling(path)
    if sibling is None or choice in ("0", "no", "false", "off") or not isinstance(rt, OnnxRuntime):
        return rt
    try:
        q = OnnxRuntime(sibling, rt.meta)
        check = json.loads(q.props.get(INT8_CHECK_KEY) or "{}")
        loss = float(check["loss_points"])
    except (ModelFileError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: not a usable int8 sibling (%s); using the float graph", sibling, e)
        return rt
    digest = rt.props.get(SOURCE_DIGEST_KEY)
    if q.props.get(SOURCE_DIGEST_KEY) != digest or not digest:
        log.warning("%s was not exported from %s as it is now (its digest differs); using the float graph",
                    sibling, path)
        return rt
    if not loss <= INT8_AUTO_MAX_LOSS_POINTS:
        log.info("%s: lost %.2f points of accuracy, more than %.1f; using the float graph", sibling, loss,
                 INT8_AUTO_MAX_LOSS_POINTS)
        return rt
    if choice in ("1", "yes", "true", "on"):
        return q
    key = f"{_cpu_signature()}|{rt.session.get_session_options().intra_op_num_threads}|{digest[:32]}"
    book = onnx_cache_dir() / "int8-choice.json"
    try:
        seen = json.loads(book.read_text())
        if not isinstance(seen, dict):
            seen = {}
    except (OSError, ValueError):
        seen = {}
    if key not in seen:
        t_float, t_int8 = _race(rt, q)
        seen[key] = {"int8": t_int8 < 0.95 * t_float, "float_ms": round(t_float * 1e3, 3),
                     "int8_ms": round(t_int8 * 1e3, 3)}
        log.debug("%s: float %.2f ms, int8 %.2f ms per %d faces", path.name, t_float * 1e3, t_int8 * 1e3,
                  INT8_TIMING_BATCH)
        try:
            from ferkit.fsutil import atomic_write_bytes

            book.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(book, json.dumps(seen, indent=1).encode())
        except OSError as e:  # a read-only home only costs the timing next time
            log.debug("not keeping the int8 verdict in %s: %s", book, e)
    entry = seen[key]
    return q if isinstance(entry, dict) and entry.get("int8") is True else rt


def _race(a: OnnxRuntime, b: OnnxRuntime) -> tuple[float, float]:
    """Best time of each graph on one batch of face-like inputs, after a warm-up run each; the runs alternate, so a
    busy moment of the machine slows both rather than the one that happened to run then."""
    import time

    s = a.meta.input_size
    x = np.random.default_rng(0).normal(0, 1, (INT8_TIMING_BATCH, a.meta.in_chans, s, s)).astype(np.float32)
    best = [float("inf"), float("inf")]
    for rt in (a, b):
        rt.probs(x)
    for _ in range(INT8_TIMING_REPEATS):
        for i, rt in enumerate((a, b)):
            t = time.perf_counter()
            rt.probs(x)
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


def _cpu_signature() -> str:
    """The CPU's model name and vector extensions (what decides whether int8 pays), as one short string."""
    import hashlib
    import platform

    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and ":" in line and not flags:
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx",
                                                                                                  "asimd", "sve"))))
    except OSError:
        pass
    return f"{name} [{hashlib.sha256(flags.encode()).hexdigest()[:12]}]"
