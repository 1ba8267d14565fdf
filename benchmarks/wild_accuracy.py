"""End-to-end accuracy on colour web photos: detect, classify, compare the largest face's label with the folder name.

Usage: python benchmarks/wild_accuracy.py [--model fer3] [--data ../shared/data/wild-dev] [--detector yunet]
       python benchmarks/wild_accuracy.py --model fer3 --compare runs/old/fer3.safetensors --out x.json
Writes benchmarks/wild_accuracy.json (each photo's label under ``per_photo``).

``--compare OTHER`` runs a second model on the same photos (same detector) and adds the paired comparison (model minus
OTHER, photos without a face counting as wrong for both, McNemar's exact p) under ``"paired"``.

A photo where the detector finds no face counts as wrong in ``accuracy_all_photos`` (the headline number): since
ferkit no longer makes up a whole-image face when nothing is detected, ``recall`` is the share of photos with a face.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from ferkit import Recognizer
from ferkit.evaluate import confusion, format_table, metrics_from_confusion
from ferkit.fsutil import atomic_write_text
from ferkit.images import is_image_path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fer3")
    ap.add_argument("--data", default=str(HERE.parents[1] / "shared" / "data" / "wild-dev"))
    ap.add_argument("--detector", default="yunet")
    ap.add_argument("--out", default=str(HERE / "wild_accuracy.json"))
    ap.add_argument("--compare", default="", help="a second model: paired comparison on the same photos")
    a = ap.parse_args()
    rec = Recognizer(model=a.model, detector=a.detector)
    other = Recognizer(model=a.compare, detector=a.detector) if a.compare else None
    right, right_other, per_photo = [], [], {}
    folders = sorted(d for d in Path(a.data).iterdir() if d.is_dir() and d.name in rec.classes)
    # A 7-class model is scored on the folders' classes only (argmax over those), as `ferkit evaluate` does.
    classes = [c for c in rec.classes if c in {d.name for d in folders}]
    truth, pred, no_face, missed = [], [], 0, []
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    for d in folders:
        for f in sorted(p for p in d.iterdir() if is_image_path(p)):
            res = rec.predict(str(f))
            if other is not None:
                o = other.predict(str(f))
                right_other.append(bool(o.faces) and max(classes, key=lambda c: o.faces[0].scores[c]) == d.name)
            if not res.faces:
                no_face += 1
                missed.append(f"{d.name}/{f.name}")
                per_photo[f"{d.name}/{f.name}"] = None
                right.append(False)
                continue
            face = res.faces[0]  # largest first
            truth.append(classes.index(d.name))
            pred.append(max(range(len(classes)), key=lambda i: face.scores[classes[i]]))
            per_photo[f"{d.name}/{f.name}"] = classes[pred[-1]]
            right.append(pred[-1] == truth[-1])
    n = len(truth) + no_face
    m = metrics_from_confusion(confusion(truth, pred, len(classes)), classes)
    # A photo where no face was found counts as wrong in the headline number.
    m["accuracy_all_photos"] = sum(int(t == p) for t, p in zip(truth, pred)) / max(n, 1)
    m.update(
        {
            "model": a.model,
            "detector": a.detector,
            "photos": n,
            "no_face": no_face,
            "recall": round((n - no_face) / max(n, 1), 4),
            "missed": missed,
            "seconds": round(time.perf_counter() - t0, 1),
            "load_average_at_start": load,
            "per_photo": per_photo,
        }
    )
    if other is not None:
        from paired import _paired  # this folder's script

        m["paired"] = _paired(a.compare, a.model, "wild-dev", np.array(right_other), np.array(right))
        pr = m["paired"]
        print(f"{a.model} - {a.compare}: {pr['diff'] * 100:+.2f} ± {pr['diff_se'] * 100:.2f} points (paired s.e.); "
              f"only {a.compare} right on {pr['only_a_right']}, only {a.model} on {pr['only_b_right']}; McNemar p = "
              f"{pr['mcnemar_p']:.3g}")
    print(
        f"{a.model} + {a.detector} on {n} wild-dev photos: {m['accuracy_all_photos'] * 100:.2f}% "
        f"(faces found in {n - no_face}/{n})"
    )
    print(format_table(m))
    atomic_write_text(a.out, json.dumps(m, indent=2) + "\n")


if __name__ == "__main__":
    main()
