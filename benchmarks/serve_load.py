"""Load test of ``ferkit serve``: N concurrent clients post 640×480 one-face photos to /v1/predict for a while.

Starts the server as a real process on a loopback port, warms it up, then runs the clients (bounded by time and by
request count) and reports requests/s, latency percentiles, errors and the server process's peak memory. Results are
printed as a table and written to ``benchmarks/serve_load.json``.

    python benchmarks/serve_load.py                      # bundled fer3, 8 clients, 30 s
    python benchmarks/serve_load.py --duration 5 --model runs/x/model.safetensors --backend torch

Targets on a 2-core CPU machine: ≥ 40 requests/s, p95 ≤ 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageFilter

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
TARGET_RPS = 40.0
TARGET_P95_MS = 250.0


def compose_photo(src: Path, size: tuple[int, int] = (640, 480), quality: int = 90) -> bytes:
    """A 640×480 JPEG with one face: the portrait scaled to 80% of the height, on a blurred wide copy of itself."""
    im = Image.open(src).convert("RGB")
    w, h = size
    bg = im.resize((w, h)).filter(ImageFilter.GaussianBlur(12))
    fh = int(h * 0.8)
    fw = max(1, round(im.width * fh / im.height))
    if fw > w * 0.8:
        fw = int(w * 0.8)
        fh = max(1, round(im.height * fw / im.width))
    bg.paste(im.resize((fw, fh), Image.LANCZOS), ((w - fw) // 2, (h - fh) // 2))
    buf = io.BytesIO()
    bg.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (uvicorn's worker processes when ``--workers`` > 1)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by the server's processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            pass
    return total


def memory_mb(pid: int, field: str) -> float | None:
    """Summed over the server's processes: ``VmHWM`` (peak resident memory) or ``VmRSS`` (current), in MiB.

    Where /proc has no such field, psutil's current RSS stands in (psutil reports no peak on Linux).
    """
    kbs = [_status_kb(p, field) for p in process_tree(pid)]
    if kbs and all(k is not None for k in kbs):
        return sum(kbs) / 1024  # type: ignore[arg-type]
    try:
        import psutil

        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except Exception:  # noqa: BLE001 - psutil missing or the process gone: no number rather than a crash
        return None


def start_server(
    model: str, port: int, backend: str, max_concurrency: int | None, log_path: Path, threads: int | None, workers: int
) -> subprocess.Popen:
    opts = {
        "host": "127.0.0.1",
        "port": port,
        "model": model,
        "backend": backend,
        "max_upload_mb": 10,
        "workers": workers,
        "max_concurrency": max_concurrency,
        "access_log": False,
        "log_level": "warning",
    }
    code = "from ferkit.serve.app import serve; serve(" + ", ".join(f"{k}={v!r}" for k, v in opts.items()) + ")"
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = log_path.open("wb")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(base: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server not healthy after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


async def run_clients(
    base: str, photo: bytes, clients: int, duration: float, max_requests: int, detect: bool = True
) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    url = base + "/v1/predict" + ("" if detect else "?detect=false")

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal issued
        while time.perf_counter() < deadline and issued < max_requests:
            issued += 1
            t0 = time.perf_counter()
            try:
                r = await c.post(url, files={"file": ("photo.jpg", photo, "image/jpeg")})
                key = None if r.status_code == 200 else str(r.status_code)
            except httpx.HTTPError as e:
                key = type(e).__name__
            if key is None:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[key] = errors.get(key, 0) + 1

    t_start = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=60) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    wall = time.perf_counter() - t_start
    lat = np.array(latencies) * 1000
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
    return {
        "requests": issued,
        "ok": len(latencies),
        "errors": errors,
        "n_errors": sum(errors.values()),
        "seconds": wall,
        "requests_per_s": len(latencies) / wall if wall else 0.0,
        "latency_ms": {
            "mean": float(lat.mean()) if len(lat) else float("nan"),
            "p50": pct(50),
            "p95": pct(95),
            "p99": pct(99),
            "max": float(lat.max()) if len(lat) else float("nan"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default="fer3",
        help="bundled name or model file (default fer3; a random test model when fer3 is not bundled yet)",
    )
    ap.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    ap.add_argument("--max-requests", type=int, default=20_000, help="stop after this many requests")
    ap.add_argument("--workers", type=int, default=2, help="server processes (ferkit serve defaults to one per CPU)")
    ap.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="inference slots per server process (default: the server's own)",
    )
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the server (0: leave unset)")
    ap.add_argument(
        "--no-detect",
        action="store_true",
        help="classify the whole photo (?detect=false): the server's cost without the face detector",
    )
    ap.add_argument("--photo", type=Path, default=None, help="portrait to compose the 640×480 photo from")
    ap.add_argument("--out", type=Path, default=HERE / "serve_load.json")
    args = ap.parse_args(argv)

    from ferkit.modelfile import bundled_models

    tmp = tempfile.TemporaryDirectory(prefix="ferkit-load-")
    model, note = args.model, ""
    if model == "fer3" and "fer3" not in bundled_models():
        import torch

        from ferkit.modelfile import ModelMeta, save_model
        from ferkit.models import create_model

        torch.manual_seed(0)
        model = str(
            save_model(
                Path(tmp.name) / "fastcnn3.safetensors",
                create_model("fastcnn", num_classes=3),
                ModelMeta(arch="fastcnn", classes=("happy", "sad", "neutral")),
            )
        )
        note = "fer3 not bundled yet: an untrained fastcnn (same architecture and cost) stands in"
        print(f"note: {note}")

    src = args.photo or next(iter(sorted((DATA / "wild-dev" / "happy").glob("*.jpg"))), None)
    if src is None:
        raise SystemExit(f"no portrait to compose from: pass --photo (looked in {DATA / 'wild-dev'})")
    photo = compose_photo(src)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(tmp.name) / "server.log"
    proc = start_server(model, port, args.backend, args.max_concurrency, log_path, args.threads or None, args.workers)
    try:
        wait_healthy(base, proc, log_path)
        info = httpx.get(base + "/v1/models").json()
        first = httpx.post(base + "/v1/predict", files={"file": ("photo.jpg", photo, "image/jpeg")}, timeout=60)
        first.raise_for_status()
        faces = len(first.json()["faces"])
        for _ in range(10):  # warm-up: first-call allocations, thread pools
            httpx.post(base + "/v1/predict", files={"file": ("photo.jpg", photo, "image/jpeg")}, timeout=60)
        rss_before = memory_mb(proc.pid, "VmRSS")
        cpu0, client0 = cpu_seconds(proc.pid), time.process_time()
        res = asyncio.run(run_clients(base, photo, args.clients, args.duration, args.max_requests, not args.no_detect))
        server_cpu, client_cpu = cpu_seconds(proc.pid) - cpu0, time.process_time() - client0
        rss_after = memory_mb(proc.pid, "VmRSS")
        peak = memory_mb(proc.pid, "VmHWM")
        healthy = httpx.get(base + "/healthz", timeout=5).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()

    lat = res["latency_ms"]
    passed = res["requests_per_s"] >= TARGET_RPS and lat["p95"] <= TARGET_P95_MS and res["n_errors"] == 0
    report = {
        "config": {
            "model": args.model,
            "model_used": Path(model).name if note else model,
            "note": note,
            "backend": info["loaded"]["backend"],
            "clients": args.clients,
            "workers": args.workers,
            "detect": not args.no_detect,
            "duration_s": args.duration,
            "max_requests": args.max_requests,
            "server_limits": info["limits"],
            "omp_threads": args.threads,
            "photo": f"640x480 JPEG ({len(photo)} bytes) composed from {src.name}",
            "faces_per_photo": faces,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "results": {
            **res,
            "server_cpu_ms_per_request": 1000 * server_cpu / max(1, res["requests"]),
            "client_cpu_ms_per_request": 1000 * client_cpu / max(1, res["requests"]),
            "load_average_1min": os.getloadavg()[0],
            "server_rss_mb": {"before": rss_before, "after": rss_after, "peak": peak},
            "healthy_after": healthy,
        },
        "targets": {"requests_per_s": TARGET_RPS, "p95_ms": TARGET_P95_MS, "passed": passed},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    def mb(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f} MiB"

    rows = [
        ("model", f"{report['config']['model_used']} ({report['config']['backend']})"),
        ("clients × duration", f"{args.clients} × {res['seconds']:.1f} s"),
        ("faces per photo", str(faces)),
        ("requests ok / errors", f"{res['ok']} / {res['n_errors']} {res['errors'] or ''}".rstrip()),
        ("requests/s", f"{res['requests_per_s']:.1f}   (target ≥ {TARGET_RPS:.0f})"),
        ("latency p50", f"{lat['p50']:.1f} ms"),
        ("latency p95", f"{lat['p95']:.1f} ms   (target ≤ {TARGET_P95_MS:.0f})"),
        ("latency p99", f"{lat['p99']:.1f} ms"),
        (
            "server CPU per request",
            (
                f"{report['results']['server_cpu_ms_per_request']:.1f} ms "
                f"(client {report['results']['client_cpu_ms_per_request']:.1f} ms)"
            ),
        ),
        ("load average (1 min)", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"),
        ("server RSS before/after/peak", f"{mb(rss_before)} / {mb(rss_after)} / {mb(peak)}"),
        ("healthy afterwards", str(healthy)),
        ("targets met", str(passed)),
    ]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    print(f"written {args.out}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
