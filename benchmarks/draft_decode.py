"""Reduced-size JPEG decoding (Pillow's draft mode): recall, time and memory with and without it.

    .venv/bin/python benchmarks/draft_decode.py                 # 4 crowd photos, 30 latency repeats
    .venv/bin/python benchmarks/draft_decode.py --crowds 2 --repeats 10

Measures, on the 12-megapixel crowd photos of ``benchmarks/detectors.py`` (same seed: the same photos, ~108 real
wild-dev faces 80-150 px wide each, saved as JPEG quality 90):
  * ``full``: every pixel decoded (``Recognizer(draft=False).predict(path)``), as before;
    ``draft``: ``Recognizer.predict(path)``, which decodes a 4000×3000 JPEG at 2000×1500 (``Recognizer.read``);
  * recall (a face is found by a box with IoU >= 0.3 in full-image pixels), extra boxes, accuracy (the found faces
    whose label is their wild-dev photo's class), the share of faces whose label is the same both ways, the
    largest box difference between the two (pixels of the full image);
  * median wall time of decoding alone and of the whole prediction;
  * peak memory: the growth of the peak RSS of a fresh process that decodes one of the JPEGs once (after numpy,
    Pillow and ferkit.images are imported);
  * the 640×480 one-face latency (never drafted): median of ``Recognizer.predict`` on a JPEG, both ways.

Prints a table and writes ``draft_decode.json`` next to this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detectors import (DEFAULT_DATA, compose_crowds, face_boxes, latency_scene, load_photos,  # noqa: E402
                       match_boxes)

from ferkit.fsutil import atomic_write_text  # noqa: E402
from ferkit.infer.detect import Detection  # noqa: E402

HERE = Path(__file__).resolve().parent
LOAD_AT_START = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

# The peak from /proc/self/status (VmHWM, kB): ru_maxrss survives exec on Linux, so a child forked from this large
# process would report the parent's peak.
_RSS_CHILD = """
import sys
import numpy, PIL.Image
from ferkit.images import read_image
from ferkit.infer.detect import Detector
def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
r0 = hwm()
need = Detector().working_side if sys.argv[2] == "draft" else None
d = read_image(sys.argv[1], need_side=need)
print(hwm() - r0, d.image.shape[1], d.image.shape[0])
"""


def peak_rss_mib(path: Path, mode: str) -> tuple[float, list[int]]:
    """Growth of a fresh process's peak RSS (MiB) while it decodes ``path`` once, and the decoded size."""
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path), mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return round(int(out[0]) / 1024, 1), [int(out[1]), int(out[2])]


def _iou(a: tuple, b: tuple) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def compare(full, drafted) -> tuple[int, int, int]:
    """(faces paired by IoU >= 0.5, of those with the same label, the largest coordinate difference in pixels)."""
    pairs = same = worst = 0
    for f in drafted:
        best = max(full, key=lambda g: _iou(f.box, g.box), default=None)
        if best is None or _iou(f.box, best.box) < 0.5:
            continue
        pairs += 1
        same += f.label == best.label
        worst = max(worst, max(abs(p - q) for p, q in zip(f.box, best.box)))
    return pairs, same, worst


def correct(res, truth: list[tuple[int, int, int, int]], classes: list[str]) -> list[tuple[int, bool]]:
    """(width, right) for each face of ``truth`` that a box finds (IoU >= 0.3): right when it carries the face's
    true class."""
    out = []
    for box, cls in zip(truth, classes):
        best = max(res, key=lambda f: _iou(f.box, box), default=None)
        if best is not None and _iou(best.box, box) >= 0.3:
            out.append((box[2], best.label == cls))
    return out


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--crowds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30, help="640×480 latency repeats")
    ap.add_argument("--model", default="fer3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "draft_decode.json")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"draft_decode.py: error: {args.data}: no such folder", file=sys.stderr)
        return 2

    from ferkit import Recognizer

    named = load_photos(args.data)
    photos = [img for _, img in named]
    sources: list[list[int]] = []
    crowds = compose_crowds(photos, face_boxes(photos), args.crowds, args.seed, sources=sources)
    truth_classes = [[named[i][0].split("/")[0] for i in used] for used in sources]
    tmp = Path(tempfile.mkdtemp(prefix="ferkit-draft-"))
    files = []
    for i, (img, _) in enumerate(crowds):
        files.append(tmp / f"crowd{i}.jpg")
        Image.fromarray(img).save(files[-1], quality=90)
    lat = tmp / "one-face-640x480.jpg"
    Image.fromarray(latency_scene(photos[0])).save(lat, quality=90)

    rec = Recognizer(args.model)
    full = Recognizer(args.model, draft=False)
    rec.predict(lat), full.predict(lat)  # warm-up
    ways = {"full": full.predict, "draft": rec.predict}
    decoders = {"full": full.read, "draft": rec.read}
    rows: dict[str, dict] = {}
    results: dict[str, list] = {}
    for way, predict in ways.items():
        found = total = extra = 0
        graded: list[tuple[int, bool]] = []
        times, dec_times, res_all = [], [], []
        for f, (_, truth), classes in zip(files, crowds, truth_classes):
            dec_times.append(median_time(lambda: decoders[way](f), 3))  # noqa: B023 - called at once
            t = time.perf_counter()
            res = predict(f)
            times.append(time.perf_counter() - t)
            res_all.append(res)
            n, e = match_boxes([Detection(*face.box, face.det_score or 0.0) for face in res], truth)
            found, total, extra = found + n, total + len(truth), extra + e
            graded += correct(res, truth, classes)
        results[way] = res_all
        rss, decoded = peak_rss_mib(files[0], way)
        rows[way] = {"recall": round(found / max(total, 1), 4), "faces": total, "extra": extra,
                     "accuracy_of_found": round(sum(ok for _, ok in graded) / max(len(graded), 1), 4),
                     "accuracy_by_face_width": {
                         f"{lo}-{hi - 1} px": round(sum(ok for w, ok in sel) / max(len(sel), 1), 4)
                         for lo, hi in ((0, 100), (100, 125), (125, 1000))
                         for sel in [[(w, ok) for w, ok in graded if lo <= w < hi]]},
                     "decode_s_median": round(statistics.median(dec_times), 3),
                     "predict_s_median": round(statistics.median(times), 3),
                     "decode_peak_rss_mib": rss, "decoded_size": decoded}
        print(f"done {way}", file=sys.stderr, flush=True)
    # 640×480 (never drafted): the two ways interleaved, so that a busy machine slows both alike
    lat_ms: dict[str, list[float]] = {"full": [], "draft": []}
    for _ in range(args.repeats):
        for way in ways:
            t = time.perf_counter()
            ways[way](lat)
            lat_ms[way].append((time.perf_counter() - t) * 1000)
    for way in ways:
        rows[way]["latency_640x480_ms_median"] = round(statistics.median(lat_ms[way]), 2)
    assert rec.read(lat).reduction == 1  # type: ignore[union-attr]
    pairs = same = worst = 0
    for a, b in zip(results["full"], results["draft"]):
        p, s, w = compare(a, b)
        pairs, same, worst = pairs + p, same + s, max(worst, w)
    agreement = {"paired_faces": pairs, "same_label": round(same / max(pairs, 1), 4), "max_box_diff_px": worst}

    head = f"{'decode':7} {'size':>10} {'recall':>7} {'extra':>5} {'acc':>6} {'decode s':>8} {'predict s':>9} " \
           f"{'RSS MiB':>8} {'640 ms':>7}"
    print(f"{len(files)} crowd photos 4000×3000 ({rows['full']['faces']} faces 80-150 px), JPEG q90, "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} CPUs, "
          f"load {LOAD_AT_START}")
    print(head)
    print("-" * len(head))
    for way, r in rows.items():
        size = "×".join(map(str, r["decoded_size"]))
        print(f"{way:7} {size:>10} {r['recall']:7.1%} {r['extra']:5d} {r['accuracy_of_found']:6.1%} "
              f"{r['decode_s_median']:8.3f} "
              f"{r['predict_s_median']:9.3f} {r['decode_peak_rss_mib']:8.1f} {r['latency_640x480_ms_median']:7.1f}")
    print(f"draft vs full: {pairs} faces paired, {agreement['same_label']:.1%} same label, boxes within "
          f"{worst} px")
    report = {"crowds": len(files), "size": [4000, 3000], "jpeg_quality": 90, "seed": args.seed, "model": args.model,
              "rows": rows, "draft_vs_full": agreement,
              "machine": {"cpus": os.cpu_count(),
                          "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                          "load_average_at_start": LOAD_AT_START,
                          "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
