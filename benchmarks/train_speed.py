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

Also recorded: which CPU ran (model, family, clock, the matrix/vector features torch can use), which oneDNN kernels
the training step ran (``ONEDNN_VERBOSE=1`` in a subprocess: e.g. ``brg_conv_fwd:avx512_core_bf16`` or
``..._amx_bf16``), and the achieved TFLOP/s of each step (FLOPs of forward + backward counted by
``torch.utils.flop_counter``) against the CPU's nominal peak (cores × clock × FLOPs per cycle of the widest unit).

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


def step_flops(name: str, batch_size: int) -> int:
    """FLOPs of one forward + backward of ``name`` at batch ``batch_size`` (convolutions and matmuls; torch counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ferkit.models import create_model

    net = create_model(name, num_classes=7)
    x = torch.randn(batch_size, 1, 48, 48)
    with FlopCounterMode(display=False) as fc:
        net(x).sum().backward()
    return int(fc.get_total_flops())


# FLOPs per cycle per core of the widest unit the CPU has, by ISA. Zen 5 (family 26) runs 512-bit ops at full width
# on two FMA pipes; Zen 4 double-pumps 256-bit ones; Intel AMX does 1,024 bf16 multiply-adds a cycle per core.
# Nominal figures from the vendors' optimisation guides: the peak the table compares against, not a measurement.
PEAK_FLOPS_PER_CYCLE = {
    "amx_bf16": {"bf16": 2048, "32": 64},
    "avx512_bf16_zen5": {"bf16": 128, "32": 64},
    "avx512_bf16": {"bf16": 64, "32": 32},
    "avx512f": {"bf16": 64, "32": 64},
    "avx2": {"bf16": 32, "32": 32},
}


def cpu_info() -> dict:
    """The CPU as /proc/cpuinfo and torch see it, and the nominal peak FLOP/s of all its cores."""
    info: dict = {"cpus": os.cpu_count(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    first = text.split("\n\n")[0]
    kv = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    kv = {k.strip(): v.strip() for k, v in kv.items()}
    flags = set(kv.get("flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"]
    info.update(model=kv.get("model name"), vendor=kv.get("vendor_id"), family=kv.get("cpu family"),
                model_number=kv.get("model"), mhz=float(kv.get("cpu MHz", 0) or 0),
                features=[f for f in wanted if f in flags])
    if "amx_bf16" in flags:
        isa = "amx_bf16"
    elif "avx512_bf16" in flags:
        zen5 = kv.get("vendor_id") == "AuthenticAMD" and kv.get("cpu family") == "26"
        isa = "avx512_bf16_zen5" if zen5 else "avx512_bf16"
    elif "avx512f" in flags:
        isa = "avx512f"
    else:
        isa = "avx2"
    ghz = info["mhz"] / 1000
    info["peak_basis"] = isa
    cores = os.cpu_count() or 1
    info["peak_tflops"] = {p: round(cores * ghz * f / 1000, 3) for p, f in PEAK_FLOPS_PER_CYCLE[isa].items()}
    info["peak_note"] = ("nominal: logical CPUs × the reported clock × FLOPs/cycle of " + isa + "; two logical CPUs "
                         "may be hyperthreads of one core, which would halve the real peak")
    return info


def onednn_kernels(name: str, precision: str, batch_size: int = 64) -> list[str]:
    """The oneDNN primitive implementations one training step of ``name`` runs (ONEDNN_VERBOSE=1, a subprocess)."""
    import subprocess

    code = (
        "import torch\n"
        "from ferkit.models import create_model\n"
        f"net = create_model({name!r}, num_classes=7).to(memory_format=torch.channels_last)\n"
        f"x = torch.randn({batch_size}, 1, 48, 48).to(memory_format=torch.channels_last)\n"
        f"with torch.autocast('cpu', dtype=torch.bfloat16, enabled={precision == 'bf16'}):\n"
        "    y = net(x).float().sum()\n"
        "y.backward()\n"
    )
    env = dict(os.environ, ONEDNN_VERBOSE="1", DNNL_VERBOSE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    kernels = set()
    for line in r.stdout.splitlines():
        parts = line.split(",")
        # onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core_bf16,forward_training,...
        if len(parts) > 7 and parts[0] == "onednn_verbose" and "exec" in parts:
            i = parts.index("exec")
            kernels.add(f"{parts[i + 2]}:{parts[i + 3]}" if len(parts) > i + 3 else parts[i + 2])
    return sorted(kernels)


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
    cpu = cpu_info()
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
                flops = step_flops(name, a.batch_size)
                r["gflop_per_step"] = round(flops / 1e9, 2)
                r["achieved_tflops"] = round(flops / (r["ms_per_step"] / 1000) / 1e12, 4)
                peak = cpu["peak_tflops"].get(precision if precision in ("bf16", "32") else "32") if cpu.get(
                    "peak_tflops") else None
                r["share_of_peak"] = round(r["achieved_tflops"] / peak, 3) if peak else None
                if not gpu:
                    r["onednn_kernels"] = onednn_kernels(name, precision)
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
    print(f"CPU: {cpu.get('model')} (family {cpu.get('family')}, {cpu.get('mhz')} MHz, "
          f"{', '.join(cpu.get('features', []))}); nominal peak {cpu.get('peak_tflops')} TFLOP/s "
          f"({cpu.get('peak_basis')})")
    print(f"{'model':<14}{'params':>10}{'threads':>9}{'precision':>10}{'images/s':>12}{'ms/step':>10}"
          f"{'TFLOP/s':>10}{'of peak':>9}")
    for r in rows:
        share = f"{100 * r['share_of_peak']:.1f}%" if r.get("share_of_peak") is not None else "-"
        print(
            f"{r['model']:<14}{r['params_m']:>8.2f} M{r['threads']:>9}{r['precision']:>10}"
            f"{r['images_per_second']:>12.1f}{r['ms_per_step']:>10.1f}{r['achieved_tflops']:>10.3f}{share:>9}"
        )
        if r.get("onednn_kernels"):
            print(f"{'':<14}oneDNN: {', '.join(r['onednn_kernels'])}")
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
        "cpu_info": cpu,
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
