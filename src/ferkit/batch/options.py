"""The ``ferkit batch`` command line: its options (argparse only, nothing heavy) and the call into the engine."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run_from_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``ferkit batch``'s options; those it shares with ``ferkit predict`` mean the same."""
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursively), videos, glob patterns ('photos/**/*.jpg'), manifests "
                        "(.txt, .csv or .parquet listing paths or URLs) and fsspec URLs (s3://bucket/photos/)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="Parquet dataset folder; rerun with the same DIR to finish an interrupted run")
    p.add_argument("--model", default="fer3")
    p.add_argument("--every", type=int, default=1, help="video: every Nth frame")
    p.add_argument("--track", action="store_true", help="video: track IDs and smoothed scores, per video")
    p.add_argument("--min-det-score", type=float, default=None, metavar="S",
                   help="drop faces whose detector confidence (det_score) is below S (0..1)")
    p.add_argument("--min-score", type=float, default=None, metavar="P",
                   help="label a face 'uncertain' when its top calibrated score is below P")
    p.add_argument("--detect-size", type=int, default=None, metavar="PX",
                   help="longest side of the image the face detector sees (default as for predict)")
    p.add_argument("--detector", default="yunet")
    p.add_argument("--no-detect", action="store_true", help="classify each whole image as one face")
    p.add_argument("--address", default=None,
                   help="a Ray cluster: auto, or ray://HOST:10001 (default: start Ray here with all CPUs)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray actors, one CPU and one loaded model each (default: every CPU of the cluster)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="photos or video segments per worker call (default 16)")
    p.add_argument("--part-rows", type=int, default=50_000, metavar="N",
                   help="rows per Parquet part (a part is also written every 30 s)")
    p.add_argument("--report", action="store_true",
                   help="also write per-label counts and per-video time series (PNG, HTML, Markdown) to DIR/_report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_from_arguments(a: argparse.Namespace) -> int:
    """Run ``ferkit batch``; the exit status (0, 1 when an input failed, 130 when interrupted)."""
    from ferkit.batch.engine import ITEMS_PER_CALL, run_batch

    summary = run_batch(a.inputs, a.out, model=a.model, every=a.every, track=a.track, min_det_score=a.min_det_score,
                        min_score=a.min_score, detect_size=a.detect_size, detector=a.detector,
                        no_detect=a.no_detect, address=a.address, workers=a.workers,
                        batch_size=a.batch_size or ITEMS_PER_CALL, part_rows=a.part_rows, report=a.report,
                        quiet=a.quiet)
    if summary.interrupted:
        print(f"ferkit: interrupted: {summary.items} items kept in {a.out}; run the same command again to finish",
              file=sys.stderr)
        return 130
    print(summary.line())
    if summary.repeats:
        print(f"ferkit batch: {summary.repeats} batch(es) came back twice (a worker was lost and Ray ran its work "
              f"again); each item was kept once", file=sys.stderr)
    return 1 if summary.errors else 0
