"""int8 next to float for the bundled models: validation accuracy, faces/s and file size (``ferkit export --int8``).

Each model is quantised by :func:`ferkit.export.export_int8` (onnxruntime static quantisation calibrated on training
faces), both graphs are scored on the whole FER2013 validation split of the model's classes, and both are timed on a
batch of 256 validation faces with 1 thread and with every CPU.

    python benchmarks/int8_export.py                    # fer3 and fer7 on ../shared/data/fer2013
    python benchmarks/int8_export.py --models fer3 --data path/to/fer2013

Results are printed as a table and written to ``benchmarks/int8_export.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from train_speed import cpu_info  # this folder's script: the CPU's model and vector units, from /proc/cpuinfo

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "fer2013"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="fer3,fer7")
    ap.add_argument("--data", default=str(DATA))
    a = ap.parse_args()

    from ferkit.data import find_dataset, load_split
    from ferkit.export import INT8_MAX_LOSS_POINTS, _faces_per_s, export_int8
    from ferkit.infer.runtime import OnnxRuntime, cpu_threads
    from ferkit.modelfile import bundled_models, read_meta
    from ferkit.preprocess import Preprocess

    rows = []
    for name in a.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{name}.int8.onnx"
            # no limit here, so that a model the export would refuse is still measured (and shown as refused)
            r = export_int8(name, str(out), data=a.data, max_loss_points=float("inf"))
            meta = read_meta(name)
            val = find_dataset(a.data, list(meta.classes), require_all=False).split("validation")
            x = Preprocess.of(meta).numpy(load_split(val, meta.input_size).images[:256])
            speed = {}
            for threads in sorted({1, cpu_threads(), os.cpu_count() or 1}):
                f = OnnxRuntime(str(bundled_models()[name].with_suffix(".onnx")), threads=threads)
                q = OnnxRuntime(str(out), threads=threads)
                speed[threads] = {"float": _faces_per_s(f, x), "int8": _faces_per_s(q, x)}
        row = {k: r[k] for k in ("model", "classes", "n_validation", "n_calibration", "float_accuracy", "int8_accuracy",
                                 "loss_points", "label_agreement", "max_abs_diff", "float_bytes", "int8_bytes")}
        row["export_accepts"] = r["loss_points"] <= INT8_MAX_LOSS_POINTS
        row["faces_per_s_batch256"] = {str(t): {k: round(v) for k, v in s.items()} for t, s in speed.items()}
        rows.append(row)
        sp = " ".join(f"{t} thr: {s['float']:,.0f} → {s['int8']:,.0f}" for t, s in speed.items())
        print(f"{name}: accuracy {r['float_accuracy'] * 100:.2f}% → {r['int8_accuracy'] * 100:.2f}% "
              f"({-r['loss_points']:+.2f} points, n={r['n_validation']}); faces/s {sp}; "
              f"{r['float_bytes'] / 1e6:.2f} → {r['int8_bytes'] / 1e6:.2f} MB"
              + ("" if row["export_accepts"] else " (ferkit export would refuse it)"), flush=True)
    out = HERE / "int8_export.json"
    meta = {"command": "python benchmarks/int8_export.py --models " + a.models, "loadavg": os.getloadavg(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "numpy": np.__version__,
            # int8 speed and accuracy depend on the vector units (VNNI or not): record them
            "cpu": cpu_info()}
    out.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
