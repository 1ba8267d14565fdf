"""Face-detector benchmark: recall on face photos, recall on composed multi-face scenes, CPU latency.

    .venv/bin/python benchmarks/detectors.py                    # every registered detector, default settings
    .venv/bin/python benchmarks/detectors.py --variants         # also the settings the defaults were chosen against
    .venv/bin/python benchmarks/detectors.py --detectors yunet --scenes 20
    .venv/bin/python benchmarks/detectors.py --detectors yunet --crowds 4    # the numbers the README quotes

Measures, per detector:
  * recall: share of the wild-dev photos (../shared/data/wild-dev/<class>/*, colour web photos, one face each, mostly
    tight crops) with at least one face; ``one`` is the share with exactly one (more means duplicate boxes);
  * no-face: faces reported on photos without any (skimage.data's scenes, objects, animals, text, microscopy;
    noise, blank and smooth images of 48×48 to 4000×3000): must be 0;
  * crowds: 12-megapixel (4000×3000) group photos tiled with ~108 real wild-dev photos each, every face scaled to
    80-150 px wide; a face is found by a detection with IoU >= 0.3; ``s/photo`` is the median wall time of
    ``detect`` on one photo, ``e2e s`` of ``Recognizer.predict`` on it saved as a JPEG (decode, detect, classify;
    the JPEG is decoded at half size, see ``benchmarks/draft_decode.py``), with the CPUs this process may use;
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
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ferkit.fsutil import atomic_write_text
from ferkit.infer.detect import Detection, Detector, get_detector, list_detectors

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "wild-dev"
SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp"}
CANVAS_W, CANVAS_H = 1280, 720
LOAD_AT_START = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


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
            out.append(Variant(f"{name} (no second look)", name, {"retry_pad": 0.0}))
            out.append(Variant(f"{name} (400 px always)", name, {"detect_size": 400}))
            out.append(Variant(f"{name} (pad 0.25 always)", name, {"pad": 0.25}))
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


def face_boxes(photos: list[np.ndarray]) -> list[tuple[int, int, int, int] | None]:
    """Each photo's own face box (YuNet, largest face), the ground truth once the photo is pasted."""
    det = get_detector("yunet")
    out = []
    for p in photos:
        faces = det.detect(p)
        out.append(faces[0].box if faces else None)
    return out


def compose_crowds(
    photos: list[np.ndarray], boxes: list[tuple[int, int, int, int] | None], n: int, seed: int,
    width: int = 4000, height: int = 3000, face_px: tuple[int, int] = (80, 150), sources: list | None = None,
) -> list[tuple[np.ndarray, list[tuple[int, int, int, int]]]]:
    """``n`` group photos of ``width``×``height`` (12 MP) tiled with real wild-dev photos, each scaled so that its
    face is ``face_px`` wide, placed on a jittered grid without overlap; returns (image, face boxes x, y, w, h).
    ``sources``, when given, receives per photo the list of the pasted photos' indices (in box order)."""
    rng = np.random.default_rng(seed)
    usable = [i for i, b in enumerate(boxes) if b is not None]
    scenes = []
    for _ in range(n):
        canvas = background(rng, width, height)
        faces: list[tuple[int, int, int, int]] = []
        used: list[int] = []
        cell = 2 * face_px[1] + 20
        for gy in range(0, height - cell + 1, cell):
            for gx in range(0, width - cell + 1, cell):
                i = int(rng.choice(usable))
                photo, (fx, fy, fw, fh) = photos[i], boxes[i]
                target = int(rng.integers(face_px[0], face_px[1] + 1))
                k = target / fw
                w, h = max(1, round(photo.shape[1] * k)), max(1, round(photo.shape[0] * k))
                if w > cell or h > cell:  # photo much larger than its face: crop around the face to fit the cell
                    cx, cy = fx + fw / 2, fy + fh / 2
                    half = (cell / k) / 2
                    x0, y0 = max(0, round(cx - half)), max(0, round(cy - half))
                    photo = photo[y0 : y0 + round(2 * half), x0 : x0 + round(2 * half)]
                    fx, fy = fx - x0, fy - y0
                    w, h = max(1, round(photo.shape[1] * k)), max(1, round(photo.shape[0] * k))
                x = gx + int(rng.integers(0, cell - w + 1))
                y = gy + int(rng.integers(0, cell - h + 1))
                canvas[y : y + h, x : x + w] = np.asarray(Image.fromarray(photo).resize((w, h), Image.BILINEAR))
                faces.append((x + round(fx * k), y + round(fy * k), round(fw * k), round(fh * k)))
                used.append(i)
        scenes.append((canvas, faces))
        if sources is not None:
            sources.append(used)
    return scenes


def match_boxes(faces: list[Detection], truth: list[tuple[int, int, int, int]], iou: float = 0.3) -> tuple[int, int]:
    """(true faces found, detections matching none): a detection finds a face when their IoU is at least ``iou``."""
    found = [False] * len(truth)
    extra = 0
    for f in faces:
        best, best_iou = None, iou
        for i, (x, y, w, h) in enumerate(truth):
            if found[i]:
                continue
            iw = min(f.x + f.w, x + w) - max(f.x, x)
            ih = min(f.y + f.h, y + h) - max(f.y, y)
            if iw <= 0 or ih <= 0:
                continue
            v = iw * ih / (f.area + w * h - iw * ih)
            if v >= best_iou:
                best, best_iou = i, v
        if best is None:
            extra += 1
        else:
            found[best] = True
    return sum(found), extra


def latency_scene(photo: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    canvas = background(rng, 640, 480)
    scale = 220 / max(photo.shape[:2])
    w, h = round(photo.shape[1] * scale), round(photo.shape[0] * scale)
    canvas[130 : 130 + h, 210 : 210 + w] = np.asarray(Image.fromarray(photo).resize((w, h), Image.BILINEAR))
    return canvas


def no_face_images(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Real photos without faces from skimage.data (not astronaut or camera, which have faces) plus noise, blank and
    smooth random images at sizes from a dataset crop to a 12-MP photo."""
    out: list[tuple[str, np.ndarray]] = []
    try:
        import skimage.data as sd
    except ImportError:
        print("no-face set: scikit-image is not installed (pip install scikit-image); synthetic images only",
              file=sys.stderr)
        sd = None
    for name in SKIMAGE_NO_FACE if sd is not None else ():
        try:
            a = np.asarray(getattr(sd, name)())
        except Exception as e:  # a few need the optional 'pooch' download: not here
            print(f"no-face set: skip skimage.data.{name} ({type(e).__name__})", file=sys.stderr)
            continue
        out.append((name, to_uint8_rgb(a)))
    rng = np.random.default_rng(seed)
    for h, w in [(48, 48), (64, 64), (480, 640), (1000, 1000), (3000, 4000)]:
        out.append((f"noise {w}x{h}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        out.append((f"blank {w}x{h}", np.full((h, w, 3), int(rng.integers(0, 256)), np.uint8)))
        blocks = rng.normal(128, 30, (h // 8 + 1, w // 8 + 1, 3)).clip(0, 255).astype(np.uint8)
        out.append((f"smooth {w}x{h}", np.ascontiguousarray(blocks.repeat(8, 0).repeat(8, 1)[:h, :w])))
    return out


SKIMAGE_NO_FACE = ["coffee", "rocket", "chelsea", "cat", "page", "coins", "hubble_deep_field", "moon", "horse", "text",
                   "clock", "immunohistochemistry", "logo", "brick", "grass", "gravel", "colorwheel", "retina", "cell",
                   "checkerboard", "microaneurysms", "shepp_logan_phantom", "binary_blobs"]


def to_uint8_rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(np.ptp(a)), 1e-9)).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a)


def bench_no_face(det: Detector, images: list[tuple[str, np.ndarray]]) -> dict:
    hits = {name: [round(f.det_score, 3) for f in det.detect(img)] for name, img in images}
    return {"images": len(images), "faces": sum(len(v) for v in hits.values()),
            "with_faces": {k: v for k, v in hits.items() if v}}


def bench_crowds(det: Detector, crowds, files: list[Path], model: str | None) -> dict:
    found = total = extra = 0
    times, cpu = [], []
    for img, truth in crowds:
        t, c = time.perf_counter(), time.process_time()
        faces = det.detect(img)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        f, e = match_boxes(faces, truth)
        found, total, extra = found + f, total + len(truth), extra + e
    r = {"photos": len(crowds), "size": [int(crowds[0][0].shape[1]), int(crowds[0][0].shape[0])] if crowds else None,
         "faces": total, "recall": round(found / max(total, 1), 4), "extra": extra,
         "detect_s_median": round(statistics.median(times), 3) if times else None,
         "detect_cpu_s_median": round(statistics.median(cpu), 3) if cpu else None}
    if model and files:
        from ferkit import Recognizer

        rec = Recognizer(model, detector=det)
        rec.predict(str(files[0]))  # warm-up: the backend's first call
        e2e = []
        for f in files:
            t = time.perf_counter()
            rec.predict(str(f))
            e2e.append(time.perf_counter() - t)
        r["predict_s_median"] = round(statistics.median(e2e), 3)
    return r


def bench(v: Variant, photos, scenes, lat_img: np.ndarray, repeats: int, negatives=(), crowds=(), crowd_files=(),
          model: str | None = None) -> dict:
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
            "retry_pad": det.retry_pad,
            "detect_size": det.detect_size,
            "threshold": getattr(det, "threshold", None),
        },
        "photos": n,
        "recall": round(1 - len(misses) / n, 4),
        "one_face": round(sum(len(c) == 1 for c in counts) / n, 4),
        "missed": misses,
        "scenes": len(scenes),
        "pasted": pasted,
        "multi_recall": round(found / max(pasted, 1), 4),
        "multi_extra": extra,
        "latency_ms_median": round(statistics.median(times), 2),
        "latency_ms_p90": round(times[int(0.9 * (len(times) - 1))], 2),
        "cpu_ms_median": round(statistics.median(cpu), 2),
        "load_s": round(load_s, 2),
        "no_face": bench_no_face(det, list(negatives)),
        "crowds": bench_crowds(det, list(crowds), list(crowd_files), model) if crowds else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of <class>/<photo> face photos")
    ap.add_argument("--detectors", nargs="*", default=None, help="default: every registered detector")
    ap.add_argument("--variants", action="store_true",
                    help="also benchmark without the second look, at 400 px always, and padded always")
    ap.add_argument("--scenes", type=int, default=50)
    ap.add_argument("--crowds", type=int, default=4, help="12-MP group photos (0: skip)")
    ap.add_argument("--model", default="fer3", help="model for the end-to-end crowd timing ('' to skip)")
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
    negatives = no_face_images(args.seed)
    crowds, crowd_files = [], []
    if args.crowds:
        imgs = [img for _, img in photos]
        crowds = compose_crowds(imgs, face_boxes(imgs), args.crowds, args.seed)
        tmp = Path(tempfile.mkdtemp(prefix="ferkit-crowds-"))
        for i, (img, _) in enumerate(crowds):
            crowd_files.append(tmp / f"crowd{i}.jpg")
            Image.fromarray(img).save(crowd_files[-1], quality=90)

    results = []
    for v in variants(names, args.variants):
        try:
            r = bench(v, photos, scenes, lat_img, args.repeats, negatives, crowds, crowd_files, args.model or None)
        except ImportError as e:
            print(f"skip {v.label}: {e}", file=sys.stderr)
            continue
        results.append(r)
        print(f"done {v.label}", file=sys.stderr, flush=True)

    head = (f"{'detector':28} {'recall':>7} {'one':>6} {'multi':>6} {'extra':>5} {'ms p50':>7} {'ms p90':>7} "
            f"{'cpu ms':>7} {'noface':>6} {'crowd':>6} {'s/photo':>7} {'e2e s':>6}")
    print(
        f"{len(photos)} photos, {len(scenes)} scenes ({sum(len(s[1]) for s in scenes)} faces), latency on 640×480, "
        "1 thread"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        c = r["crowds"] or {}
        print(
            f"{r['label']:28} {r['recall']:7.1%} {r['one_face']:6.1%} {r['multi_recall']:6.1%} "
            f"{r['multi_extra']:5d} {r['latency_ms_median']:7.1f} {r['latency_ms_p90']:7.1f} "
            f"{r['cpu_ms_median']:7.1f} {r['no_face']['faces']:6d} {c.get('recall', float('nan')):6.1%} "
            f"{c.get('detect_s_median') or float('nan'):7.2f} {c.get('predict_s_median') or float('nan'):6.2f}"
        )
    report = {
        "data": str(args.data.name),
        "photos": len(photos),
        "scenes": len(scenes),
        "seed": args.seed,
        "canvas": [CANVAS_W, CANVAS_H],
        "latency_image": [640, 480],
        "threads": 1,
        "crowd_threads": "the process's CPUs (tiles and requests run in parallel where the detector allows)",
        "no_face_images": [n for n, _ in negatives],
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_at_start": LOAD_AT_START,
        },
        "results": results,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
