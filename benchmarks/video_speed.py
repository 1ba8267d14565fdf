"""Video tracking speed and memory: frames per second with tracking on, where the time goes, RSS over a long video.

    .venv/bin/python benchmarks/video_speed.py                      # 20 s clip + a 10-minute clip, every frame
    .venv/bin/python benchmarks/video_speed.py --long-minutes 2     # quicker memory check

The clip: 640×480 at 30 fps, made from wild-dev photos (tests/videoclips.py): one face for the first third, two for
the second, three for the last, moving and changing size. Measured, every frame, tracking on:
  * ``track_fps``: ``Recognizer.track`` over the whole clip (decode → detect → track → classify → smooth), best of
    ``--rounds``; ``predict_fps``: ``ferkit predict``'s untracked path (``run_predict`` to /dev/null) for comparison;
  * the share of each stage, timed separately in one instrumented pass with the same public calls: decode
    (``read_video``), detection (``detector.detect``), classification (``crops`` + ``classify``), tracking
    (``FaceTracker.update`` + ``ScoreSmoother.update``);
  * RSS: ``ferkit track`` on a ``--long-minutes`` clip in a subprocess, its resident memory sampled every second
    (``/proc/PID/status``); a flat curve means frames are streamed, not held.

Goal: ≥ 60 frames/s on 2 cores. Prints a table and writes ``video_speed.json`` next to this script, with the load
average (other processes slow every number).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from infer_speed import cpu_name  # noqa: E402
from videoclips import Actor, load_face, write_clip  # noqa: E402

TARGET_FPS = 60.0
FPS = 30.0


def actors(seconds: float) -> list[Actor]:
    """Up to three wild-dev faces drifting across the frame; the second joins at 1/3, the third at 2/3."""
    import math

    def mover(x0: float, y0: float, s0: float, start: float, phase: float):
        def at(t: float):
            if t < start * seconds:
                return None
            u = t + phase
            return (x0 + 60 * math.sin(u * 0.7), y0 + 25 * math.sin(u * 1.3), s0 * (1 + 0.25 * math.sin(u * 0.5)))
        return at

    return [Actor(load_face("happy", 0), mover(150, 200, 120, 0.0, 0.0)),
            Actor(load_face("sad", 0), mover(470, 220, 110, 1 / 3, 1.0)),
            Actor(load_face("neutral", 1), mover(320, 360, 90, 2 / 3, 2.0))]


def timed_track(clip: Path, rounds: int) -> tuple[float, int, int]:
    from ferkit import Recognizer

    rec = Recognizer("fer3")
    best, n, faces = float("inf"), 0, 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = faces = 0
        for res in rec.track(clip):
            n += 1
            faces += len(res)
        best = min(best, time.perf_counter() - t0)
    return n / best, n, faces


def timed_predict(clip: Path, rounds: int) -> float:
    from ferkit.cli.predict import run_predict

    best = float("inf")
    with open(os.devnull, "w") as null:
        for _ in range(rounds):
            t0 = time.perf_counter()
            run_predict([str(clip)], model="fer3", fmt="jsonl", out=null, err=sys.stderr, quiet=True)
            best = min(best, time.perf_counter() - t0)
    return int(FPS * args.seconds) / best


def stage_shares(clip: Path) -> dict[str, float]:
    """Seconds per stage over one pass, the same calls ``track_units`` makes."""
    import numpy as np

    from ferkit import Recognizer
    from ferkit.infer.sources import read_video
    from ferkit.infer.track import FaceTracker, ScoreSmoother

    rec = Recognizer("fer3")
    tracker, smoother = FaceTracker(FPS), ScoreSmoother()
    tot = dict.fromkeys(("decode", "detect", "classify", "track"), 0.0)
    it = read_video(str(clip), None, 1)
    while True:
        t0 = time.perf_counter()
        u = next(it, None)
        t1 = time.perf_counter()
        tot["decode"] += t1 - t0
        if u is None:
            break
        dets = rec.detector.detect(u.image)
        t2 = time.perf_counter()
        ids = tracker.update(dets, u.image, u.time)
        t3 = time.perf_counter()
        probs = rec.classify(rec.crops(u.image, [d.box for d in dets])) if dets else np.zeros((0, 3))
        t4 = time.perf_counter()
        for tid, p in zip(ids, probs):
            if tid is not None:
                smoother.update(tid, u.time, p)
        t5 = time.perf_counter()
        tot["detect"] += t2 - t1
        tot["track"] += (t3 - t2) + (t5 - t4)
        tot["classify"] += t4 - t3
    return tot


def id_switches(d: Path) -> dict[str, Any]:
    """ID switches on scripted clips, ByteTrack alone and with ferkit's re-identification. Each face is given to the
    person whose scripted centre is nearest; a switch is a change of the ID a person carries (fragmentation or
    swap); a swap is an ID carried by two people."""
    from ferkit import Recognizer

    happy, sad = load_face("happy", 0), load_face("sad", 0)

    def lerp(p0, p1, secs):
        return lambda t: tuple(a + (b - a) * min(max(t / secs, 0.0), 1.0) for a, b in zip(p0, p1))

    clips = {
        "cross (2 people swap sizes and cross, one hidden ~0.5 s)": (
            [Actor(sad, lerp((520, 240, 170), (120, 240, 90), 4.0)), Actor(happy, lerp((120, 240, 90),
                                                                                      (520, 240, 170), 4.0))], 4.0),
        "gap (1 face away 1 s)": ([Actor(happy, lambda t: None if 1.0 <= t < 2.0 else (320, 240, 150))], 3.0),
        "speed clip (1-3 faces moving)": (actors(args.seconds), args.seconds),
    }
    rec = Recognizer("fer3")
    out = {}
    for name, (cast, secs) in clips.items():
        path = write_clip(d / "ids.mp4", cast, secs, FPS)
        row = {}
        for mode, reid in (("bytetrack", False), ("bytetrack+reid", True)):
            carried: dict[int, list[int]] = {}
            for res in rec.track(path, reid=reid):
                where = [(k, a.path(res.time)) for k, a in enumerate(cast)]
                where = [(k, p) for k, p in where if p is not None]
                for f in res:
                    if f.track is None or not where:
                        continue
                    cx, cy = f.box[0] + f.box[2] / 2, f.box[1] + f.box[3] / 2
                    near = sorted(where, key=lambda kp: (kp[1][0] - cx) ** 2 + (kp[1][1] - cy) ** 2)
                    if len(near) > 1 and abs(near[0][1][0] - near[1][1][0]) + abs(near[0][1][1] - near[1][1][1]) < 80:
                        continue  # two people overlap here: which is which is what the tracker must carry through
                    carried.setdefault(near[0][0], []).append(f.track)
            switches = sum(sum(1 for a, b in zip(ids, ids[1:]) if a != b) for ids in carried.values())
            owners: dict[int, set[int]] = {}
            for k, ids in carried.items():
                for i in ids:
                    owners.setdefault(i, set()).add(k)
            row[mode] = {"people": len(cast), "ids": len(owners), "id_switches": switches,
                         "swapped_ids": sum(1 for v in owners.values() if len(v) > 1)}
        out[name] = row
    return out


def rss_curve(clip: Path, out: Path, every: int) -> dict[str, Any]:
    """Run ``ferkit track`` on ``clip``; sample its RSS (MiB) each second."""
    cmd = [sys.executable, "-m", "ferkit", "track", str(clip), "--out", str(out), "--quiet", "--every", str(every)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float]] = []
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    samples.append((round(time.perf_counter() - t0, 1), round(int(line.split()[1]) / 1024, 1)))
        except OSError:
            pass
        time.sleep(1.0)
    err = proc.stderr.read() if proc.stderr else ""
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"ferkit track failed ({proc.returncode}): {err}")
    rss = [r for _, r in samples]
    k = max(1, len(rss) // 10)
    return {"wall_s": round(wall, 1), "samples": len(rss), "rss_mib_first_10pct": max(rss[:k]) if rss else None,
            "rss_mib_max": max(rss) if rss else None, "rss_mib_last_10pct": max(rss[-k:]) if rss else None,
            "curve": samples[:: max(1, len(samples) // 40)]}


def main() -> None:
    global args
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the speed clip")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--long-every", type=int, default=1,
                    help="--every for the long clip (every frame is still decoded; fewer are tracked)")
    ap.add_argument("--long-minutes", type=float, default=10.0,
                    help="length of the RSS clip (0: skip, keeping the long-video result already in the JSON)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        clip = write_clip(d / "speed.mp4", actors(args.seconds), args.seconds, FPS)
        track_fps, n, faces = timed_track(clip, args.rounds)
        predict_fps = timed_predict(clip, args.rounds)
        stages = stage_shares(clip)
        ids = id_switches(d)
        total = sum(stages.values())
        long = None
        if args.long_minutes <= 0 and (HERE / "video_speed.json").exists():
            long = json.loads((HERE / "video_speed.json").read_text()).get("long_video")
        if args.long_minutes > 0:
            secs = args.long_minutes * 60
            lclip = write_clip(d / "long.mp4", actors(secs), secs, FPS)
            long = {"minutes": args.long_minutes, "frames": int(secs * FPS), "every": args.long_every,
                    **rss_curve(lclip, d / "out", args.long_every)}
            lclip.unlink()

    res = {
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                    "python": platform.python_version()},
        "clip": {"size": "640x480", "fps": FPS, "seconds": args.seconds, "frames": n, "faces": faces,
                 "faces_per_frame": round(faces / max(n, 1), 2)},
        "target_fps": TARGET_FPS,
        "track_fps": round(track_fps, 1),
        "predict_fps_untracked": round(predict_fps, 1),
        "stage_ms_per_frame": {k: round(1000 * v / max(n, 1), 2) for k, v in stages.items()},
        "stage_share": {k: round(v / total, 3) for k, v in stages.items()},
        "id_switches": ids,
        "long_video": long,
    }
    (HERE / "video_speed.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"{'clip':<28} 640x480 {FPS:.0f} fps, {n} frames, {res['clip']['faces_per_frame']} faces/frame")
    print(f"{'track (frames/s)':<28} {res['track_fps']:>8.1f}   target {TARGET_FPS:.0f}")
    print(f"{'predict, untracked':<28} {res['predict_fps_untracked']:>8.1f}")
    for k in stages:
        print(f"  {k:<26} {res['stage_ms_per_frame'][k]:>8.2f} ms/frame  {res['stage_share'][k]:>6.1%}")
    for name, row in ids.items():
        print(f"{name:<60} " + "  ".join(f"{m}: {r['ids']} IDs for {r['people']}, {r['id_switches']} switches, "
                                          f"{r['swapped_ids']} swapped" for m, r in row.items()))
    if long:
        print(f"{'RSS over ' + str(long['minutes']) + ' min (MiB)':<28} first 10%: {long['rss_mib_first_10pct']}, "
              f"max: {long['rss_mib_max']}, last 10%: {long['rss_mib_last_10pct']} ({long['wall_s']} s)")
    print(f"load average {res['machine']['load_avg']}")


args: argparse.Namespace

if __name__ == "__main__":
    main()
