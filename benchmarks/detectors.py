"""Face-detector benchmark: recall on face photos, recall on composed multi-face scenes, CPU latency.

    .venv/bin/python benchmarks/detectors.py                    # every registered detector, default settings
    .venv/bin/python benchmarks/detectors.py --variants         # also the settings the defaults were chosen against
    .venv/bin/python benchmarks/detectors.py --detectors yunet --scenes 20

Measures, per detector:
  * recall: share of the wild-dev photos (../shared/data/wild-dev/<class>/*, colour web photos, one face each, mostly
    tight crops) with at least one face; ``one`` is the share with exactly one (more means duplicate boxes) and
    ``fallback`` the share answered by the whole-image fallback (score 0.0) rather than a detection;
  * multi-face recall: wild-dev photos pasted 2-4 at a time onto 1280×720 canvases (fixed seed); a pasted photo is
    found when a detection's centre lies inside it (each detection counts once); ``extra`` counts detections that
    match no pasted photo;
  * latency: median and 90th percentile wall time of ``detect`` on a 640×480 scene with one face, one CPU thread
    (the detector's own threads and torch's), after warm-up; ``cpu ms`` is the median process CPU time of the same
    calls, the steadier number on a shared machine (wall time includes waiting for a core).

Prints a table and writes ``detectors.json`` next to this script.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ferkit.infer.detect import Detection, Detector, get_detector, list_detectors

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "wild-dev"
SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp"}
CANVAS_W, CANVAS_H = 1280, 720


@dataclass
class Variant:
    label: str
    detector: str
    kwargs: dict


def variants(names: list[str], with_ablation: bool) -> list[Variant]:
    out = []
    for name in names:
        if name == "whole":  # finds "a face" in anything: no recall to measure
            continue
        if with_ablation:
            out.append(Variant(f"{name} (no pad, no fallback)", name, {"pad": 0.0, "crop_fallback": False}))
            out.append(Variant(f"{name} (pad 0.25, no fallback)", name, {"pad": 0.25, "crop_fallback": False}))
        out.append(Variant(f"{name} (default)", name, {}))
    return out


def make_detector(v: Variant) -> Detector:
    if not v.kwargs:
        return get_detector(v.detector)
    cls = type(get_detector(v.detector))
    return cls(**v.kwargs)


def load_photos(root: Path) -> list[tuple[str, np.ndarray]]:
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in SUFFIXES)
    return [(str(p.relative_to(root)), np.asarray(Image.open(p).convert("RGB"))) for p in files]


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth two-colour gradient with mild noise: no faces, some texture."""
    c0, c1 = rng.integers(40, 216, size=(2, 3))
    t = np.linspace(0.0, 1.0, width)[None, :, None]
    img = c0 * (1 - t) + c1 * t + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def compose_scenes(
    photos: list[np.ndarray], n: int, seed: int
) -> list[tuple[np.ndarray, list[tuple[int, int, int, int]]]]:
    """``n`` canvases with 2-4 non-overlapping photos each; returns (canvas, pasted rectangles x, y, w, h)."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        canvas = background(rng, CANVAS_W, CANVAS_H)
        rects: list[tuple[int, int, int, int]] = []
        for idx in rng.choice(len(photos), size=int(rng.integers(2, 5)), replace=False):
            photo = photos[idx]
            side = int(rng.integers(140, 320))  # longest side on the canvas: faces of ~60-300 px
            scale = side / max(photo.shape[:2])
            w, h = max(1, round(photo.shape[1] * scale)), max(1, round(photo.shape[0] * scale))
            for _try in range(100):
                x, y = int(rng.integers(0, CANVAS_W - w)), int(rng.integers(0, CANVAS_H - h))
                if all(
                    x + w + 10 <= rx or rx + rw + 10 <= x or y + h + 10 <= ry or ry + rh + 10 <= y
                    for rx, ry, rw, rh in rects
                ):
                    break
            else:
                continue
            canvas[y : y + h, x : x + w] = np.asarray(Image.fromarray(photo).resize((w, h), Image.BILINEAR))
            rects.append((x, y, w, h))
        scenes.append((canvas, rects))
    return scenes


def match(faces: list[Detection], rects: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """(pasted photos found, detections matching no photo)."""
    found = [False] * len(rects)
    extra = 0
    for f in faces:
        cx, cy = f.x + f.w / 2, f.y + f.h / 2
        hit = next(
            (i for i, (x, y, w, h) in enumerate(rects) if not found[i] and x <= cx < x + w and y <= cy < y + h), None
        )
        if hit is None:
            extra += 1
        else:
            found[hit] = True
    return sum(found), extra


def latency_scene(photo: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    canvas = background(rng, 640, 480)
    scale = 220 / max(photo.shape[:2])
    w, h = round(photo.shape[1] * scale), round(photo.shape[0] * scale)
    canvas[130 : 130 + h, 210 : 210 + w] = np.asarray(Image.fromarray(photo).resize((w, h), Image.BILINEAR))
    return canvas


def bench(v: Variant, photos, scenes, lat_img: np.ndarray, repeats: int) -> dict:
    t0 = time.perf_counter()
    det = make_detector(v)
    det.detect(lat_img)
    load_s = time.perf_counter() - t0

    counts = [det.detect(img) for _, img in photos]
    n = len(photos)
    misses = [name for (name, _), faces in zip(photos, counts) if not faces]
    found = pasted = extra = 0
    for canvas, rects in scenes:
        f, e = match(det.detect(canvas), rects)
        found, pasted, extra = found + f, pasted + len(rects), extra + e

    for _ in range(3):
        det.detect(lat_img)
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        det.detect(lat_img)
        times.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    times.sort()
    return {
        "label": v.label,
        "detector": v.detector,
        "settings": {
            "max_side": det.max_side,
            "min_side": det.min_side,
            "pad": det.pad,
            "crop_fallback": det.crop_fallback,
        },
        "photos": n,
        "recall": round(1 - len(misses) / n, 4),
        "one_face": round(sum(len(c) == 1 for c in counts) / n, 4),
        "fallback": round(sum(bool(c) and c[0].score == 0.0 for c in counts) / n, 4),
        "missed": misses,
        "scenes": len(scenes),
        "pasted": pasted,
        "multi_recall": round(found / max(pasted, 1), 4),
        "multi_extra": extra,
        "latency_ms_median": round(statistics.median(times), 2),
        "latency_ms_p90": round(times[int(0.9 * (len(times) - 1))], 2),
        "cpu_ms_median": round(statistics.median(cpu), 2),
        "load_s": round(load_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of <class>/<photo> face photos")
    ap.add_argument("--detectors", nargs="*", default=None, help="default: every registered detector")
    ap.add_argument("--variants", action="store_true", help="also benchmark without padding / fallback")
    ap.add_argument("--scenes", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "detectors.json")
    args = ap.parse_args(argv)

    try:
        import torch

        torch.set_num_threads(1)  # one CPU thread for every detector, so latencies compare like with like
    except ImportError:
        pass
    if not args.data.is_dir():
        print(f"detectors.py: error: {args.data}: no such folder", file=sys.stderr)
        return 2
    photos = load_photos(args.data)
    scenes = compose_scenes([img for _, img in photos], args.scenes, args.seed)
    lat_img = latency_scene(photos[0][1])
    names = args.detectors or list_detectors()

    results = []
    for v in variants(names, args.variants):
        try:
            r = bench(v, photos, scenes, lat_img, args.repeats)
        except ImportError as e:
            print(f"skip {v.label}: {e}", file=sys.stderr)
            continue
        results.append(r)
        print(f"done {v.label}", file=sys.stderr, flush=True)

    head = f"{'detector':32} {'recall':>7} {'one':>6} {'fallbk':>6} {'multi':>6} {'extra':>5} {'ms p50':>7} {'ms p90':>7} {'cpu ms':>7}"  # noqa: E501
    print(
        f"{len(photos)} photos, {len(scenes)} scenes ({sum(len(s[1]) for s in scenes)} faces), latency on 640×480, "
        "1 thread"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['label']:32} {r['recall']:7.1%} {r['one_face']:6.1%} {r['fallback']:6.1%} {r['multi_recall']:6.1%} "
            f"{r['multi_extra']:5d} {r['latency_ms_median']:7.1f} {r['latency_ms_p90']:7.1f} "
            f"{r['cpu_ms_median']:7.1f}"
        )
    report = {
        "data": str(args.data.name),
        "photos": len(photos),
        "scenes": len(scenes),
        "seed": args.seed,
        "canvas": [CANVAS_W, CANVAS_H],
        "latency_image": [640, 480],
        "threads": 1,
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpus": __import__("os").cpu_count(),
        },
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
