"""``ferkit batch``: recognise expressions in many photos and videos on Ray Data, into a Parquet dataset.

The driver (this process) plans the work (:mod:`ferkit.batch.plan`: file names, video frame ranges; nothing is
decoded here) into a Parquet file that Ray Data streams to an actor pool (``map_batches`` with
:class:`ferkit.batch.worker.ItemRecogniser`: the model loads once per actor, one CPU each). Result rows stream back;
the driver keeps exactly one complete attempt of each item, gives tracked videos their IDs and writes parts
(:mod:`ferkit.batch.store`). Without ``address`` a local Ray starts on this machine with all its CPUs; with
``address="auto"`` or ``"ray://HOST:10001"`` the work goes to an existing cluster.

Memory: the driver holds the ledger's keys and the rows of the items in flight (and of each tracked video until its
last range is in); Ray's object store holds the plan and the streamed blocks, capped by ``object_store_memory``.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ferkit.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["BatchSummary", "run_batch"]

#: Object store of the embedded local Ray. The blocks are small (plan rows, result rows: ~1 kB per face) and stream
#: through; Ray's default (30% of the RAM) would reserve 7 GiB of shared memory on a 24 GiB machine for nothing.
LOCAL_OBJECT_STORE = 512 * 1024**2
#: Work items per ``map_batches`` call. A photo takes 20-60 ms on one core here; Ray's cost per call is a few ms.
ITEMS_PER_CALL = 16
#: Plan rows per object-store block (and per row group of the plan file).
PLAN_BLOCK = 1000


@dataclass
class BatchSummary:
    """What a run did. ``inputs``: files planned this run (a video counts once); ``skipped``: items already in the
    output; ``items``: work items finished this run."""

    out: str
    inputs: int = 0
    items: int = 0
    skipped: int = 0
    faces: int = 0
    no_face: int = 0
    errors: int = 0
    frames: int = 0
    seconds: float = 0.0
    first_result_s: float | None = None  # from the start to the first result back (Ray, actors, model loads)
    workers: int = 0
    repeats: int = 0  # item attempts that came back after the item was kept (Ray ran a batch again): dropped
    interrupted: bool = False
    error_lines: list[str] = field(default_factory=list)

    def line(self) -> str:
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        skipped = f" ({self.skipped} already done)" if self.skipped else ""
        first = f", first result after {self.first_result_s:.1f} s" if self.first_result_s is not None else ""
        return (f"ferkit batch: {self.inputs} inputs{skipped}, {self.faces} faces, {self.no_face} without a face, "
                f"{self.errors} failed; {self.frames} images/frames in {self.seconds:.1f} s ({rate:.1f}/s) on "
                f"{self.workers} worker{'s' if self.workers != 1 else ''}{first} -> {self.out}")


def _check(every: int, batch_size: int, workers: int | None, part_rows: int) -> None:
    if every < 1:
        raise ConfigError(f"--every must be at least 1, got {every}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if part_rows < 1:
        raise ConfigError(f"--part-rows must be at least 1, got {part_rows}")


def _import_ray() -> Any:
    """Ray and Ray Data, or ImportError naming ``pip install 'ferkit[ray]'``."""
    from ferkit._extras import require

    ray = require("ray", "ray", what="ferkit batch")
    require("ray.data", "ray", what="ferkit batch")
    return ray


def _start_ray(address: str | None) -> Any:
    ray = _import_ray()
    import logging as _logging

    import warnings

    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    quiet = dict(logging_level=_logging.ERROR, log_to_driver=False, configure_logging=True)
    if address:
        try:
            ray.init(address=address, **quiet)
        except Exception as e:  # noqa: BLE001  (ConnectionError, RuntimeError, grpc errors …)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--address {address}: cannot connect to a Ray cluster ({first})") from None
    else:
        from ferkit.infer.runtime import cpu_threads

        ray.init(num_cpus=cpu_threads(), include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE, **quiet)
    for name in ("ray", "ray.data"):  # Ray Data logs each execution's plan at INFO, and notices, on stderr
        _logging.getLogger(name).setLevel(_logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts items; Ray's would interleave with it
    ctx.print_on_execution_start = False
    return ray


def run_batch(inputs: list[str], out: str | os.PathLike, *, model: str = "fer3", every: int = 1, track: bool = False,
              min_det_score: float | None = None, min_score: float | None = None, detect_size: int | None = None,
              detector: str = "yunet", no_detect: bool = False, address: str | None = None,
              workers: int | None = None, batch_size: int = ITEMS_PER_CALL, part_rows: int = 50_000,
              flush_seconds: float = 30.0, report: bool = False, quiet: bool = False,
              err: TextIO | None = None, range_frames: int | None = None) -> BatchSummary:
    """Recognise the faces of ``inputs`` on Ray and write them into the Parquet dataset ``out``.

    Args:
        inputs: photos, folders (recursively), videos, glob patterns, manifests (.txt/.csv/.parquet) and fsspec URLs.
        out: the output folder; a rerun with the same one finishes what is missing.
        model, every, track, min_det_score, min_score, detect_size, detector, no_detect: as for ``ferkit predict``.
        address: a Ray cluster (``auto``, ``ray://HOST:10001``); None starts a local Ray with this machine's CPUs.
        workers: actors (one CPU and one loaded model each); default all the cluster's CPUs.
        batch_size: work items per ``map_batches`` call.
        part_rows, flush_seconds: a part is written once this many rows have gathered, or this long after the last.
        report: also write per-label counts and per-video time series into ``out/_report`` (:mod:`.report`).
        quiet: no progress bar (there is none anyway when stderr is not a terminal).
        err: where per-input error lines go (default stderr).
        range_frames: sampled video frames per work item (default :data:`ferkit.batch.plan.RANGE_FRAMES`).

    Returns:
        A :class:`BatchSummary`; ``interrupted`` is set when Ctrl-C stopped it (what was finished is kept).

    Raises:
        ConfigError, ModelFileError, UnknownNameError, OutputError: refused before any work.
        ImportError: Ray is not installed (names ``pip install 'ferkit[ray]'``).
    """
    from ferkit.batch.store import Ledger, PartWriter, open_output
    from ferkit.infer.recognizer import Recognizer
    from ferkit.infer.sources import make_progress, progress_enabled
    from ferkit.modelfile import file_digest, resolve_model_path

    err = err if err is not None else sys.stderr
    _check(every, batch_size, workers, part_rows)
    _import_ray()  # without Ray, say so before anything is loaded or the output folder is made
    t0 = time.monotonic()
    # The same checks and messages as predict (model, detector, scores, sizes), before Ray or the output folder.
    rec_kw = dict(detector="whole" if no_detect else detector, min_det_score=min_det_score, min_score=min_score,
                  detect_size=detect_size)
    rec = Recognizer(model, **rec_kw)
    classes = rec.classes
    del rec
    model_digest = file_digest(resolve_model_path(model))
    options = dict(detector=detector, no_detect=no_detect, every=every, min_det_score=min_det_score,
                   min_score=min_score, detect_size=detect_size, track=track)
    from ferkit import __version__

    d = open_output(out, {"format": 1, "ferkit": __version__, "model": str(model), "model_digest": model_digest,
                          "classes": list(classes), "options": options})
    ray = _start_ray(address)
    summary = BatchSummary(out=str(out))
    plan_path = d / f"_plan-{os.getpid()}.parquet"
    try:
        ledger = Ledger(d)
        n_items, videos = _write_plan(plan_path, inputs, every=every, exclude=d, ledger=ledger, summary=summary,
                                      range_frames=range_frames)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        summary.workers = max(1, min(workers or cpus, cpus, max(n_items, 1)))
        writer = PartWriter(d, classes, part_rows=part_rows, flush_seconds=flush_seconds)
        bar = make_progress(n_items, "items", enabled=progress_enabled(quiet))
        committer = _Committer(writer, classes, videos, every=every, track=track, summary=summary, err=err,
                                bar=bar)
        blocks = None
        try:
            if n_items:
                ds = _dataset(ray, plan_path, model, {**rec_kw, "every": every, "track": track,
                                                      "no_detect": no_detect}, model_digest, summary.workers,
                              batch_size)
                blocks = ds.iter_batches(batch_size=None, batch_format="pyarrow")
                del ds
                for block in blocks:
                    if summary.first_result_s is None:
                        summary.first_result_s = time.monotonic() - t0
                    committer.add(block)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            bar.close()
            writer.flush()  # every complete item so far
            # Stop Ray Data's executor and drop every object reference while Ray is up: one touched after
            # ray.shutdown() made Ray's core end the process with status 1 (seen after Ctrl-C).
            if blocks is not None:
                try:
                    blocks.close()
                except Exception:  # noqa: BLE001  (an executor already torn down by the interrupt)
                    log.debug("closing the dataset iterator", exc_info=True)
                blocks = None
            gc.collect()
    finally:
        try:
            plan_path.unlink(missing_ok=True)
        except OSError:
            pass
        ray.shutdown()
    summary.seconds = time.monotonic() - t0
    if report and not summary.interrupted:
        from ferkit.batch.report import write_report

        write_report(d)
    return summary


def _write_plan(path: Path, inputs: list[str], *, every: int, exclude: Path, ledger: Any,
                summary: BatchSummary, range_frames: int | None) -> tuple[int, dict[str, dict[str, Any]]]:
    """Plan into a Parquet file (rows of :class:`ferkit.batch.plan.Item`), written as it goes; returns the item
    count and, per video, its range count, frame rate and declared frames."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ferkit.batch.plan import RANGE_FRAMES, Item, plan_items
    from ferkit.fsutil import atomic_path

    fields = Item("", "", "").to_dict()
    sch = pa.schema([(k, pa.list_(pa.string()) if k == "known" else pa.string() if isinstance(v, str) or v is None
                      else pa.bool_() if isinstance(v, bool) else pa.float64() if isinstance(v, float) else pa.int64())
                     for k, v in fields.items()])
    n, files, videos, chunk = 0, set(), {}, []
    with atomic_path(path) as tmp:
        w = pq.ParquetWriter(tmp, sch)
        try:
            for it in plan_items(inputs, every=every, exclude=exclude, done=ledger,
                                 range_frames=range_frames or RANGE_FRAMES):
                files.add(it.file)
                if it.kind == "video":
                    videos.setdefault(it.file, {"ranges": it.ranges, "fps": it.fps})
                chunk.append(it.to_dict())
                n += 1
                if len(chunk) >= PLAN_BLOCK:
                    w.write_table(pa.Table.from_pylist(chunk, schema=sch))
                    chunk = []
            if chunk or n == 0:
                w.write_table(pa.Table.from_pylist(chunk, schema=sch))
        finally:
            w.close()
    summary.inputs = len(files)
    return n, videos


def _dataset(ray: Any, plan: Path, model: str, options: dict[str, Any], model_digest: str, workers: int,
             batch_size: int) -> Any:
    from ferkit.batch.worker import ItemRecogniser

    import pyarrow as pa
    import pyarrow.parquet as pq

    # The plan goes into the object store from the file, a row group (PLAN_BLOCK items) at a time, so the driver
    # holds object references, not the plan. Not ray.data.read_parquet: its read task waited for ever behind an actor
    # pool holding every CPU (Ray 2.60, even with num_cpus=0 for the read).
    # One block per map_batches call (batch_size=None: Ray Data bundles blocks up to a batch_size otherwise): photos
    # batch_size to a block, each video range (256 frames, as much work as 256 photos) a block of its own, so that
    # one video's ranges spread over the workers; the ranges go first, the longest work starting first.
    pf = pq.ParquetFile(plan)
    videos, photos = [], []
    for i in range(pf.num_row_groups):
        group = pf.read_row_group(i)
        kinds = group.column("kind").to_pylist()
        videos += [ray.put(group.slice(k, 1)) for k, kind in enumerate(kinds) if kind == "video"]
        rest = group.take(pa.array([k for k, kind in enumerate(kinds) if kind != "video"], pa.int64()))
        photos += [ray.put(rest.slice(k, batch_size)) for k in range(0, rest.num_rows, batch_size)]
    ds = ray.data.from_arrow_refs(videos + photos)
    return ds.map_batches(ItemRecogniser, fn_constructor_kwargs=dict(model=model, options=options,
                                                                    model_digest=model_digest, threads=1),
                          batch_size=None, batch_format="pyarrow",
                          # Ray Data restarts a dead actor and runs its batch again (max_restarts and
                          # max_task_retries default to -1 for actor pools): the committer keeps one attempt
                          compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)


class _Committer:
    """Keeps exactly one complete attempt of each item and hands whole items to the writer."""

    def __init__(self, writer: Any, classes: tuple[str, ...], videos: dict[str, dict[str, Any]], *, every: int,
                 track: bool, summary: BatchSummary, err: TextIO, bar: Any) -> None:
        self.writer, self.classes, self.every, self.track = writer, classes, every, track
        self.summary, self.err, self.bar = summary, err, bar
        self.videos = videos
        self.tracked: dict[str, list[list[dict[str, Any]]]] = {}  # video → its finished ranges' rows
        self.done: set[str] = set()
        self.repeated: set[str] = set()
        self.partial: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def add(self, block: Any) -> None:
        for r in block.to_pylist():
            item = r["item"]
            if item in self.done:  # a second attempt of a finished item (a retried task): already kept once
                if r["attempt"] not in self.repeated:
                    self.repeated.add(r["attempt"])
                    self.summary.repeats += 1
                continue
            key = (item, r["attempt"])
            rows = self.partial.setdefault(key, [])
            rows.append(r)
            if len(rows) == r["item_rows"]:
                for k in [k for k in self.partial if k[0] == item]:
                    del self.partial[k]
                self._finish(item, rows)

    def _finish(self, item: str, rows: list[dict[str, Any]]) -> None:
        from ferkit.batch.rows import ERROR, FACE, NO_FACE
        from ferkit.batch.worker import UNCHANGED, track_video

        self.done.add(item)
        self.bar.update(1)
        self.summary.items += 1
        first = rows[0]
        if first["status"] == UNCHANGED:
            self.summary.skipped += 1
            return
        self.summary.frames += first["item_frames"] or 0
        file = first["file"]
        if self.track and file in self.videos:  # a tracked video is tracked, and kept, once all its ranges are in
            done = self.tracked.setdefault(file, [])
            done.append(rows)
            if len(done) < self.videos[file]["ranges"]:
                return
            rows = track_video([r for part in self.tracked.pop(file) for r in part], self.classes,
                               fps=self.videos[file]["fps"], every=self.every)
        for r in rows:
            if r["status"] == FACE:
                self.summary.faces += 1
            elif r["status"] == NO_FACE:
                self.summary.no_face += 1
            elif r["status"] == ERROR:
                self.summary.errors += 1
                line = f"{r['file']}: {r['reason']}"
                self.summary.error_lines.append(line)
                try:
                    self.err.write(f"ferkit: error: {line}\n")
                    self.err.flush()
                except (OSError, ValueError):
                    pass
        self.writer.add(rows)
