"""Load and fault test of ``ferkit serve`` on loopback: concurrent clients post 640×480 one-face photos to
/v1/predict with an API key, then one worker process is killed mid-load.

Starts the server as a real process (``--workers 2``, API keys on), waits for /readyz, warms it up, then:

1. a load phase per client count (default 8 and 32): requests/s, latency p50/p95/p99, errors by status, and the
   peak RSS of all server processes during the phase (the kernel's high-water mark, reset before each phase), and
   how the clients' connections were spread over the worker processes halfway through;
2. many-pixel uploads, all at once: 32 small PNGs that decode to 64 MP (refused by --max-pixels before decoding)
   and 8 that decode to 24 MP (accepted): statuses and peak RSS;
3. a fault phase (30 s): 8 clients while one worker is killed with SIGKILL a quarter of the way in. Reported: requests
   answered per second before, around and after the kill, the errors (requests in flight on the killed worker lose
   their connection), the longest request (nothing may hang: every request ends in an answer or an error), when
   the replacement worker came up, and that both workers serve afterwards.

Results are printed as tables and written to ``benchmarks/serve_load.json``.

    python benchmarks/serve_load.py                            # fer3, 8 and 32 clients, 20 s each, + fault
    python benchmarks/serve_load.py --clients 8 --duration 30 --no-fault

Targets on a 2-core CPU machine (8 clients): ≥ 40 requests/s, p95 ≤ 250 ms, no errors.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import signal
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


def connections_per_worker(port: int, pids: list[int]) -> list[int]:
    """Established TCP connections to ``port`` that each of ``pids`` holds, largest first (Linux /proc; [] elsewhere).

    Worker processes share one listening socket and each accepts what it can, so a burst of keep-alive connections
    may land mostly on one of them: this shows how the load phase's connections were spread.
    """
    inodes = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()  # sl, local address:port (hex), remote, state (01 = ESTABLISHED), ..., inode
                if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f[9])
    except OSError:
        return []
    counts = []
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        counts.append(sum(1 for ln in links if ln.startswith("socket:[") and ln[8:-1] in inodes))
    return sorted((c for c in counts if c), reverse=True)


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU time used so far by the server's processes (``tree=False``: by ``pid`` alone)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid) if tree else [pid]:
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


KEY = "load-test-key-0123456789"


def start_server(model: str, port: int, backend: str, max_concurrency: int | None, log_path: Path,
                 threads: int | None, workers: int, keys: Path | None) -> subprocess.Popen:
    opts = {
        "host": "127.0.0.1",
        "port": port,
        "model": model,
        "backend": backend,
        "max_upload_mb": 10,
        "workers": workers,
        "max_concurrency": max_concurrency,
        "api_keys": str(keys) if keys else None,
        "access_log": False,
        "log_level": "info",
    }
    code = "from ferkit.serve.app import serve; serve(" + ", ".join(f"{k}={v!r}" for k, v in opts.items()) + ")"
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = log_path.open("wb")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(base: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server not ready after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def workers_of(pid: int) -> list[int]:
    """uvicorn's worker processes: the parent's children that run ``spawn_main`` (not the resource tracker)."""
    out = []
    for p in process_tree(pid)[1:]:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main" in cmd:
            out.append(p)
    return out


def reset_peak_rss(pid: int) -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of the server's processes (``echo 5 > /proc/PID/clear_refs``)."""
    for p in process_tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            pass


async def run_clients(base: str, photo: bytes, clients: int, duration: float, headers: dict[str, str],
                      during: object = None) -> dict:
    """``clients`` loops posting the photo for ``duration`` s; ``during`` (a coroutine function) runs alongside."""
    events: list[tuple[float, float, str]] = []  # (end time since start, latency, outcome: status code or error)
    t_start = time.perf_counter()
    deadline = t_start + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    url = base + "/v1/predict"

    async def client(c: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                r = await c.post(url, files={"file": ("photo.jpg", photo, "image/jpeg")}, headers=headers)
                outcome = str(r.status_code)
            except httpx.HTTPError as e:
                outcome = type(e).__name__
            t1 = time.perf_counter()
            events.append((t1 - t_start, t1 - t0, outcome))

    async with httpx.AsyncClient(limits=limits, timeout=30) as c:
        tasks = [client(c) for _ in range(clients)]
        if during is not None:
            tasks.append(during(t_start))  # type: ignore[operator]
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - t_start
    ok = np.array([lat for _, lat, o in events if o == "200"]) * 1000
    errors: dict[str, int] = {}
    for _, _, o in events:
        if o != "200":
            errors[o] = errors.get(o, 0) + 1
    pct = (lambda q: float(np.percentile(ok, q))) if len(ok) else (lambda q: float("nan"))
    return {
        "clients": clients,
        "requests": len(events),
        "ok": int(len(ok)),
        "errors": errors,
        "n_errors": sum(errors.values()),
        "seconds": wall,
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99),
                       "max": float(max((lat for _, lat, _ in events), default=0) * 1000)},
        "events": events,
    }


def per_second(events: list[tuple[float, float, str]], seconds: float) -> list[dict]:
    bins = [{"t": i, "ok": 0, "errors": 0} for i in range(int(seconds) + 2)]
    for t, _, o in events:
        bins[min(int(t), len(bins) - 1)]["ok" if o == "200" else "errors"] += 1
    return bins


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fer3", help="bundled name or model file (default fer3)")
    ap.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"])
    ap.add_argument("--clients", default="8,32", help="comma-separated client counts, one load phase each")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per phase")
    ap.add_argument("--workers", type=int, default=2, help="server processes (ferkit serve defaults to one per CPU)")
    ap.add_argument("--max-concurrency", type=int, default=None, help="inference slots per server process")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the server (0: leave unset)")
    ap.add_argument("--no-keys", action="store_true", help="run the server without API keys")
    ap.add_argument("--no-fault", action="store_true", help="skip the kill-a-worker phase")
    ap.add_argument("--no-large", action="store_true", help="skip the many-pixel uploads phase")
    ap.add_argument("--fault-clients", type=int, default=8, help="clients during the fault phase")
    ap.add_argument("--fault-duration", type=float, default=30.0,
                    help="seconds of the fault phase (the worker is killed after a quarter of it)")
    ap.add_argument("--photo", type=Path, default=None, help="portrait to compose the 640×480 photo from")
    ap.add_argument("--out", type=Path, default=HERE / "serve_load.json")
    args = ap.parse_args(argv)

    src = args.photo or next(iter(sorted((DATA / "wild-dev" / "happy").glob("*.jpg"))), None)
    if src is None:
        raise SystemExit(f"no portrait to compose from: pass --photo (looked in {DATA / 'wild-dev'})")
    photo = compose_photo(src)
    tmp = tempfile.TemporaryDirectory(prefix="ferkit-load-")
    keys = None if args.no_keys else Path(tmp.name) / "keys.txt"
    if keys:
        keys.write_text(KEY + "\n")
    headers = {} if keys is None else {"Authorization": f"Bearer {KEY}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(tmp.name) / "server.log"
    load0 = os.getloadavg()[0]
    proc = start_server(args.model, port, args.backend, args.max_concurrency, log_path, args.threads or None,
                        args.workers, keys)
    phases, fault, large = [], None, []
    try:
        wait_ready(base, proc, log_path)
        info = httpx.get(base + "/v1/models", headers=headers).json()
        first = httpx.post(base + "/v1/predict", files={"file": ("photo.jpg", photo, "image/jpeg")}, headers=headers,
                           timeout=60)
        first.raise_for_status()
        faces = len(first.json()["faces"])
        for _ in range(10):  # warm-up: first-call allocations, thread pools
            httpx.post(base + "/v1/predict", files={"file": ("photo.jpg", photo, "image/jpeg")}, headers=headers,
                       timeout=60)
        idle_rss = memory_mb(proc.pid, "VmRSS")
        for n in [int(c) for c in args.clients.split(",") if c.strip() and c.strip() != "0"]:
            reset_peak_rss(proc.pid)
            cpu0 = cpu_seconds(proc.pid)
            spread: list[int] = []

            async def sample(t_start: float, out: list[int] = spread) -> None:  # halfway through the phase
                await asyncio.sleep(args.duration / 2)
                out[:] = connections_per_worker(port, process_tree(proc.pid)[1:])

            res = asyncio.run(run_clients(base, photo, n, args.duration, headers, sample))
            res["connections_per_worker"] = spread
            res["server_cpu_ms_per_request"] = 1000 * (cpu_seconds(proc.pid) - cpu0) / max(1, res["requests"])
            res["peak_rss_mb"] = memory_mb(proc.pid, "VmHWM")
            res["load_average_1min"] = os.getloadavg()[0]
            res.pop("events")
            phases.append(res)
        large = [] if args.no_large else run_large(base, proc, headers)
        if not args.no_fault:
            fault = run_fault(base, proc, photo, args, headers, log_path)
        healthy = httpx.get(base + "/readyz", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log_text = log_path.read_text(errors="replace")
    if fault is not None:
        fault["server_log"] = [ln for ln in log_text.splitlines() if "died" in ln or ": model " in ln]

    target = next((p for p in phases if p["clients"] == 8), phases[0] if phases else None)
    passed = bool(target) and target["requests_per_s"] >= TARGET_RPS and target["latency_ms"]["p95"] <= TARGET_P95_MS \
        and target["n_errors"] == 0
    report = {
        "config": {
            "model": args.model,
            "backend": info["loaded"]["backend"],
            "workers": args.workers,
            "api_keys": keys is not None,
            "duration_s_per_phase": args.duration,
            "server_limits": info["limits"],
            "omp_threads": args.threads,
            "photo": f"640x480 JPEG ({len(photo)} bytes) composed from {src.name}",
            "faces_per_photo": faces,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1min_before": load0},
        "idle_rss_mb": idle_rss,
        "phases": phases,
        "large_uploads": large,
        "fault": fault,
        "healthy_after": healthy,
        "server_log_tracebacks": log_text.count("Traceback"),
        "targets": {"clients": 8, "requests_per_s": TARGET_RPS, "p95_ms": TARGET_P95_MS, "passed": passed},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"model {args.model} ({report['config']['backend']}), {args.workers} workers, API keys "
          f"{'on' if keys else 'off'}, {faces} face per photo, load average before {load0:.1f} on "
          f"{os.cpu_count()} CPUs")
    print(f"{'clients':>7} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'ok':>6}  {'errors':<18} "
          f"{'peak RSS':>9} {'load':>5}  connections per worker")
    for p in phases:
        lat = p["latency_ms"]
        err = ", ".join(f"{k}: {v}" for k, v in p["errors"].items()) or "none"
        print(f"{p['clients']:>7} {p['requests_per_s']:>7.1f} {lat['p50']:>7.0f} {lat['p95']:>7.0f} {lat['p99']:>7.0f} "
              f"{p['ok']:>6}  {err:<18} {p['peak_rss_mb'] or 0:>5.0f} MiB {p['load_average_1min']:>5.1f}  "
              f"{' / '.join(map(str, p['connections_per_worker'])) or '?'}")
    for g in large:
        print(f"{g['uploads']} uploads at once of a {g['upload_bytes'] / 1000:.0f} kB PNG decoding to "
              f"{g['pixels'] / 1e6:.0f} MP: {g['status']} in {g['seconds']:.1f} s, peak RSS {g['peak_rss_mb']:.0f} MiB")
    if fault:
        print()
        rows = [
            ("clients × duration", f"{fault['clients']} × {fault['seconds']:.1f} s"),
            ("worker killed (SIGKILL) at", f"{fault['killed_at_s']:.1f} s: pid {fault['killed_pid']}"),
            ("replacement serving after", "never" if fault["replaced_after_s"] is None else
             f"{fault['replaced_after_s']:.1f} s (pid {fault['replacement_pid']})"),
            ("answered 200", str(fault["ok"])),
            ("errors", ", ".join(f"{k}: {v}" for k, v in fault["errors"].items()) or "none"),
            ("req/s before / first 5 s after / rest", " / ".join(f"{v:.1f}" for v in fault["rps_before_around_after"])),
            ("longest request", f"{fault['longest_request_ms']:.0f} ms (client timeout 30 s: none hung)"
             if fault["longest_request_ms"] < 30000 else f"{fault['longest_request_ms']:.0f} ms"),
            ("afterwards, 40 new connections", f"{fault['probe_after']['status']}; CPU s per worker "
             f"{fault['probe_after']['worker_cpu_s']}: all workers serve = {fault['all_workers_answer_after']}"),
        ]
        w = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    print(f"targets met (8 clients: ≥ {TARGET_RPS:.0f} req/s, p95 ≤ {TARGET_P95_MS:.0f} ms, no errors): {passed}")
    print(f"written {args.out}")
    tmp.cleanup()
    return 0


def png_of_pixels(w: int, h: int) -> bytes:
    """A valid 1-bit black PNG of w×h pixels: a few kB to upload, w·h pixels when decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (w + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


async def _all_at_once(url: str, body: bytes, headers: dict[str, str], n: int) -> list[tuple[str, float]]:
    """``n`` concurrent posts of ``body``: (outcome, seconds) each."""

    async def one(c: httpx.AsyncClient) -> tuple[str, float]:
        t0 = time.perf_counter()
        try:
            r = await c.post(url, content=body, headers=headers)
            return str(r.status_code), time.perf_counter() - t0
        except httpx.HTTPError as e:
            return type(e).__name__, time.perf_counter() - t0

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(one(c) for _ in range(n)))


def run_large(base: str, proc: subprocess.Popen, headers: dict[str, str]) -> list[dict]:
    """Small uploads that decode to many pixels, all at once: 32 of 64 MP (over --max-pixels: refused before
    decoding) and 8 of 24 MP (under it: decoded and searched for faces). Peak RSS of the server's processes."""
    out = []
    for n, (w, h) in ((32, (8000, 8000)), (8, (6000, 4000))):
        body = png_of_pixels(w, h)
        reset_peak_rss(proc.pid)

        t0 = time.perf_counter()
        res = asyncio.run(_all_at_once(base + "/v1/predict", body, {**headers, "Content-Type": "image/png"}, n))
        status: dict[str, int] = {}
        for s, _ in res:
            status[s] = status.get(s, 0) + 1
        out.append({"uploads": n, "pixels": w * h, "upload_bytes": len(body), "status": status,
                    "seconds": time.perf_counter() - t0, "slowest_s": max(d for _, d in res),
                    "peak_rss_mb": memory_mb(proc.pid, "VmHWM")})
    return out


def run_fault(base: str, proc: subprocess.Popen, photo: bytes, args: argparse.Namespace,
              headers: dict[str, str], log_path: Path) -> dict:
    """Load with ``--fault-clients`` clients; SIGKILL one worker a quarter of the way in; see the module docstring."""
    before = workers_of(proc.pid)
    if len(before) < 2:
        return {"skipped": f"{len(before)} worker process(es): the fault phase needs --workers 2 or more"}
    victim = before[-1]
    duration = args.fault_duration
    kill_at = duration / 4
    seen: dict[str, float | int | None] = {"killed_at_s": None, "replaced_after_s": None, "replacement_pid": None}

    async def killer(t_start: float) -> None:
        await asyncio.sleep(kill_at)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.perf_counter()
        seen["killed_at_s"] = t_kill - t_start
        # the replacement: a new worker process whose model is loaded and warmed up (its line in the server log)
        while time.perf_counter() - t_kill < duration:
            new = [p for p in workers_of(proc.pid) if p not in before]
            if new and f"worker {new[0]}: model" in log_path.read_text(errors="replace"):
                seen["replaced_after_s"] = time.perf_counter() - t_kill
                seen["replacement_pid"] = new[0]
                return
            await asyncio.sleep(0.1)

    res = asyncio.run(run_clients(base, photo, args.fault_clients, duration, headers, killer))
    events = res.pop("events")
    k = seen["killed_at_s"] or kill_at

    def rps(lo: float, hi: float) -> float:
        n = sum(1 for t, _, o in events if lo <= t < hi and o == "200")
        return n / max(1e-9, hi - lo)

    # Every worker, the replacement included, serves new connections afterwards: the clients' keep-alive connections
    # all sit on the surviving worker by now, so probe with one fresh connection per request and see which workers
    # spent CPU time on them.
    probe_cpu = {p: cpu_seconds(p, tree=False) for p in workers_of(proc.pid)}
    probe_status: dict[str, int] = {}
    for _ in range(40):
        with httpx.Client(headers=headers, timeout=30) as c:
            r = c.post(base + "/v1/predict", files={"file": ("photo.jpg", photo, "image/jpeg")})
        probe_status[str(r.status_code)] = probe_status.get(str(r.status_code), 0) + 1
    served_cpu_s = {str(p): round(cpu_seconds(p, tree=False) - c, 2) for p, c in probe_cpu.items()}
    return {
        "clients": args.fault_clients,
        "seconds": res["seconds"],
        "killed_pid": victim,
        **seen,
        "ok": res["ok"],
        "errors": res["errors"],
        "rps_before_around_after": [rps(0, k), rps(k, k + 5), rps(k + 5, res["seconds"])],
        "longest_request_ms": res["latency_ms"]["max"],
        "latency_ms": res["latency_ms"],
        "per_second": per_second(events, res["seconds"]),
        "workers_after": workers_of(proc.pid),
        "probe_after": {"requests": 40, "status": probe_status, "worker_cpu_s": served_cpu_s},
        "all_workers_answer_after": len(served_cpu_s) == len(before) and probe_status == {"200": 40}
        and all(v > 0.05 for v in served_cpu_s.values()),
    }


if __name__ == "__main__":
    sys.exit(main())
