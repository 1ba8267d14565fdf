"""The peer ferkit's speed is compared with: the `fer` package's own emotion classifier (its quantised TFLite model,
the default, and its Keras model), on N 48×48 faces, as faces/s. Prints one JSON object.

Runs in a separate virtual environment that has `fer` and TensorFlow (they pin packages ferkit does not want):

    python3 -m venv /work/fervenv
    /work/fervenv/bin/pip install tensorflow-cpu==2.21.0 pandas tqdm requests opencv-python-headless
    /work/fervenv/bin/pip install fer==25.10.3 --no-deps
    /work/fervenv/bin/python benchmarks/fer_peer.py --faces 256

`benchmarks/infer_speed.py --fer-python /work/fervenv/bin/python` runs it side by side with ferkit's models.
The faces are fer's own preprocessing of real FER2013 validation faces when they are given (`--faces-npy`), else
random pixels (speed does not depend on them). Timing: classification only, as `FER._classify_emotions` does it
(the TFLite path runs one face per call, as fer does), best of `--rounds`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--faces-npy", default="", help="uint8 N×H×W faces to classify (e.g. FER2013 validation)")
    ap.add_argument("--keras", action="store_true", help="also time fer's Keras model (use_tflite=False)")
    a = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import cv2
    import fer
    from fer.fer import FER

    if a.faces_npy:
        raw = np.load(a.faces_npy)
        raw = np.resize(raw, (a.faces, *raw.shape[1:]))
    else:
        raw = np.random.default_rng(0).integers(0, 256, (a.faces, 48, 48), dtype=np.uint8)
    out: dict = {"fer_version": fer.__version__, "faces": a.faces}
    for name, tflite in (("tflite", True), ("keras", False)):
        if name == "keras" and not a.keras:
            continue
        det = FER(use_tflite=tflite)
        size = det._FER__emotion_target_size  # fer's own input size (64×64)
        x = np.stack([cv2.resize(f, size) for f in raw]).astype(np.float32)
        x = (x / 255.0 - 0.5) * 2.0  # fer's _preprocess_input(v2=True)
        det._classify_emotions(x[:8])  # warm up
        best = float("inf")
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            det._classify_emotions(x)
            best = min(best, time.perf_counter() - t0)
        out[name] = {"faces_per_s": a.faces / best, "input_size": list(size)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
