"""Training speed: images per second of the real training step for each built-in model, and dataset start-up.

    .venv/bin/python benchmarks/train_speed.py                       # CPU, every built-in model, cache timings
    .venv/bin/python benchmarks/train_speed.py --device cuda         # on a GPU (bf16 autocast, as training does)
    .venv/bin/python benchmarks/train_speed.py --models fastcnn --steps 20 --no-data
    .venv/bin/python benchmarks/train_speed.py --threads 1,2             # compare torch thread counts
    .venv/bin/python benchmarks/train_speed.py --precision 32,bf16       # bf16 autocast on a CPU (AVX512-BF16/AMX)

Measures:
  * training throughput: ``ferkit.train.loop.train_one_epoch`` (batched augmentation on the device, forward, loss,
    backward, optimizer step, one-cycle schedule) through Lightning Fabric, on random uint8 48×48 batches of
    ``--batch-size`` (64), after warm-up steps; images/s = steps × batch / wall time. vgg and resnet18 take seconds a
    step on a CPU, so they get fewer steps (``--steps`` overrides every model's count);
  * dataset start-up for ``../shared/data/fer2013`` (all seven classes, train + validation): ``find`` (discover and
    validate the folders), ``cold`` (decode every JPEG into the uint8 cache, with an empty ``FERKIT_CACHE_DIR``) and
    ``cached`` (find + load both splits from that cache, what every later run pays).

Prints a table and writes ``train_speed.json`` next to this script (``--out`` elsewhere). Other processes on the
machine slow every number: the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "fer2013"
CPU_STEPS = {"fastcnn": 8, "fastcnn_wide": 8, "vgg": 3, "resnet18": 3}


def bench_model(name: str, *, device: str, batch_size: int, steps: int, warmup: int, precision: str = "auto") -> dict:
    """Images/s of ``train_one_epoch`` for one architecture."""
    from ferkit.config import make_config
    from ferkit.data.augment import BatchAugment
    from ferkit.models import create_model
    from ferkit.train.loop import MEAN, STD, make_fabric, train_one_epoch

    cfg = make_config(
        "quick", {"model": name, "batch_size": batch_size, "device": device, "epochs": 1, "precision": precision}
    )
    fabric = make_fabric(cfg)
    fabric.seed_everything(0, verbose=False)
    net = create_model(name, num_classes=7)
    n_params = sum(p.numel() for p in net.parameters())
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    net, opt = fabric.setup(net, opt)
    total = warmup + steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total + 1, pct_start=0.3)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size * total, 48, 48), dtype=torch.uint8, generator=g).to(fabric.device)
    labels = torch.randint(0, 7, (batch_size * total,), generator=g).to(fabric.device)
    aug = BatchAugment(cfg, MEAN, STD)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def run(n: int, step0: int) -> float:
        c = dataclasses.replace(cfg, max_steps=step0 + n)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = train_one_epoch(fabric, net, opt, sched, images, labels, c, 0, aug, loss_fn, None, step0)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        assert r["steps"] == n, r
        return time.perf_counter() - t0

    run(warmup, 0)
    seconds = run(steps, warmup)
    return {
        "model": name,
        "params_m": round(n_params / 1e6, 2),
        "batch_size": batch_size,
        "steps": steps,
        "seconds": round(seconds, 3),
        "images_per_second": round(steps * batch_size / seconds, 1),
        "ms_per_step": round(1000 * seconds / steps, 1),
    }


def bench_data(root: Path) -> dict:
    """Seconds to find, decode (cold cache) and reload (warm cache) both splits of a dataset, all seven classes."""
    from ferkit.classes import parse_classes
    from ferkit.data import find_dataset, load_split

    classes = parse_classes("all")
    old = os.environ.get("FERKIT_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="ferkit-bench-cache-") as cache:
        os.environ["FERKIT_CACHE_DIR"] = cache
        try:
            t0 = time.perf_counter()
            ds = find_dataset(root, classes)
            t_find = time.perf_counter() - t0
            t0 = time.perf_counter()
            cold = [load_split(s, 48) for s in ds.splits.values()]
            t_cold = time.perf_counter() - t0
            assert not any(s.from_cache for s in cold)
            t0 = time.perf_counter()
            ds = find_dataset(root, classes)
            warm = [load_split(s, 48) for s in ds.splits.values()]
            t_cached = time.perf_counter() - t0
            assert all(s.from_cache for s in warm)
            cache_mb = sum(p.stat().st_size for p in Path(cache).glob("*.npz")) / 1e6
        finally:
            if old is None:
                os.environ.pop("FERKIT_CACHE_DIR", None)
            else:
                os.environ["FERKIT_CACHE_DIR"] = old
    n = sum(len(s) for s in cold)
    return {
        "data": str(root),
        "splits": {s.name: len(s) for s in cold},
        "images": n,
        "skipped": sum(len(s.skipped) for s in cold),
        "find_seconds": round(t_find, 2),
        "cold_seconds": round(t_cold, 2),
        "cold_images_per_second": round(n / t_cold),
        "cached_seconds": round(t_cached, 2),
        "cache_mb": round(cache_mb, 1),
    }


def main(argv: list[str] | None = None) -> int:
    from ferkit.models import list_models

    os.environ.setdefault("FERKIT_PROGRESS", "0")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default=",".join(list_models()), help="comma-separated (default: every built-in)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--steps",
        type=int,
        default=0,
        help="timed steps per model (default: 8, 3 for vgg/resnet18 on CPU; 50 on a GPU)",
    )
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 1 on CPU, 10 on a GPU)")
    ap.add_argument("--threads", default="0", help="torch CPU threads, comma-separated to compare (0: torch's default)")
    ap.add_argument("--precision", default="auto", help="auto|32|bf16, comma-separated to compare (auto: bf16 on a "
                    "GPU, 32 on a CPU)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--no-data", action="store_true", help="skip the cache timings")
    ap.add_argument("--out", type=Path, default=HERE / "train_speed.json")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("train_speed: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    gpu = a.device == "cuda"
    load0 = os.getloadavg()
    rows = []
    default_threads = torch.get_num_threads()
    for threads in [int(t) or default_threads for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        for precision in [p.strip() for p in a.precision.split(",") if p.strip()]:
            for name in [m.strip() for m in a.models.split(",") if m.strip()]:
                steps = a.steps or (50 if gpu else CPU_STEPS.get(name, 4))
                r = bench_model(name, device=a.device, batch_size=a.batch_size, steps=steps,
                                warmup=a.warmup or (10 if gpu else 1), precision=precision)
                r["threads"], r["precision"] = threads, precision
                rows.append(r)
                print(
                    f"{r['model']:<14}{threads:>3} thr {precision:>5}{r['images_per_second']:>10.1f} img/s"
                    f"{r['ms_per_step']:>10.1f} ms/step  ({r['steps']} steps of {r['batch_size']})",
                    flush=True,
                )
    torch.set_num_threads(default_threads)
    data = None
    if not a.no_data:
        if a.data.is_dir():
            data = bench_data(a.data)
        else:
            print(f"train_speed: no dataset at {a.data}; skipping the cache timings", file=sys.stderr)
    load1 = os.getloadavg()

    print()
    print(f"training throughput on {a.device}, batch {a.batch_size}, 48×48")
    print(f"{'model':<14}{'params':>10}{'threads':>9}{'precision':>10}{'images/s':>12}{'ms/step':>10}")
    for r in rows:
        print(
            f"{r['model']:<14}{r['params_m']:>8.2f} M{r['threads']:>9}{r['precision']:>10}"
            f"{r['images_per_second']:>12.1f}{r['ms_per_step']:>10.1f}"
        )
    if data:
        print()
        print(f"dataset start-up: {data['data']} ({data['images']} images, 7 classes, train + validation)")
        print(f"  find + validate      {data['find_seconds']:>7.2f} s")
        print(
            f"  cold (decode all)    {data['cold_seconds']:>7.2f} s   ({data['cold_images_per_second']} images/s, "
            f"{data['cache_mb']} MB cache)"
        )
        print(f"  cached start-up      {data['cached_seconds']:>7.2f} s")
    print(f"load average {load0[0]:.1f} before, {load1[0]:.1f} after, on {os.cpu_count()} CPUs")

    result = {
        "device": a.device if not gpu else torch.cuda.get_device_name(0),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": {"before": round(load0[0], 2), "after": round(load1[0], 2)},
        "note": ""
        if gpu
        else (
            "measured on a shared CPU machine while other jobs ran (see load_average): the numbers are noisy and lower "
            "than an idle machine gives; compare them only with runs taken under the same conditions. With more runnable "  # noqa: E501
            "processes than cores, two torch threads can be several times slower than one (threads wait for each other "
            "at every operator), hence the per-thread-count rows"
        ),
        "models": rows,
        "data": data,
    }
    if load1[0] > (os.cpu_count() or 1) and gpu:
        result["note"] = "the CPU was busy (see load_average); GPU step times include host-side work"
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
