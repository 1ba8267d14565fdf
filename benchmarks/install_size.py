"""What installing ferkit costs: each extra's size in a fresh virtualenv, `ferkit predict` start-up, idle server RSS.

For each extra it makes a fresh venv, runs ``pip install 'TREE[extra]'`` (a regular, non-editable install of the
source tree), and measures the venv's added size (site-packages less the empty venv's pip), the three largest
packages, and whether ``import torch`` works there. In the plain install it times ``ferkit predict photo.jpg``
(process start to result) the first time after installing (cold: empty ferkit cache, so a conversion to ONNX on
first use counts) and warm (median of the next runs). In the ``serve`` install it starts ``ferkit serve --workers 1``
on a loopback port, waits for ``/healthz`` and reads the resident memory of the server's processes once idle.

    python benchmarks/install_size.py --label after                  # this tree
    git worktree add /tmp/before <commit> && python benchmarks/install_size.py --label before --tree /tmp/before

Results are printed as a table and merged into ``benchmarks/install_size.json`` under the label.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
OUT = HERE / "install_size.json"


def du(path: Path) -> int:
    """Bytes on disk under ``path`` (apparent sizes, links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def biggest(sp: Path, n: int = 3) -> list[tuple[str, int]]:
    sizes = [(p.name, du(p) if p.is_dir() else p.stat().st_size) for p in sp.iterdir()
             if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__"]
    return [(k, v) for k, v in sorted(sizes, key=lambda kv: -kv[1])[:n]]


def make_venv(path: Path, python: str) -> Path:
    if path.exists():
        shutil.rmtree(path)
    subprocess.run([python, "-m", "venv", str(path)], check=True)
    return path


def pip_install(venv: Path, spec: str) -> float:
    t = time.perf_counter()
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", spec],
                   check=True)
    return time.perf_counter() - t


def imports(venv: Path, module: str) -> bool:
    return subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True).returncode == 0


def time_predict(venv: Path, photo: Path, env: dict[str, str], runs: int) -> tuple[float, list[float], str]:
    """Seconds of the first `ferkit predict` after install, then of ``runs`` more; and the first run's output."""
    times, first_out = [], ""
    for i in range(runs + 1):
        t = time.perf_counter()
        r = subprocess.run([str(venv / "bin" / "ferkit"), "predict", str(photo), "--format", "json"], env=env,
                           capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise RuntimeError(f"ferkit predict failed ({r.returncode}): {r.stderr.strip()[-400:]}")
        if i == 0:
            first_out = r.stdout
    return times[0], times[1:], first_out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> dict[int, int]:
    """Resident bytes of ``pid`` and all its descendants (from /proc)."""
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            out[p] = next(int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmRSS:"))
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return out


def idle_server_rss(venv: Path, env: dict[str, str], settle_s: float = 3.0) -> dict[str, object]:
    port = free_port()
    proc = subprocess.Popen([str(venv / "bin" / "ferkit"), "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    t0 = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ferkit serve exited ({proc.returncode}): {proc.stderr.read().decode()[-400:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("ferkit serve did not answer /healthz within 120 s")
            time.sleep(0.1)
        ready_s = time.perf_counter() - t0
        time.sleep(settle_s)
        rss = tree_rss(proc.pid)
        return {"healthz_s": round(ready_s, 2), "processes": len(rss),
                "rss_mib_by_process": [round(v / 2**20, 1) for v in sorted(rss.values(), reverse=True)],
                "worker_rss_mib": round(max(rss.values()) / 2**20, 1),
                "total_rss_mib": round(sum(rss.values()) / 2**20, 1)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True, help="key in install_size.json, e.g. before / after")
    ap.add_argument("--tree", default=str(HERE.parent), help="the source tree to install (default: this one)")
    ap.add_argument("--extras", default="base,serve,train,all", help="comma-separated; 'base' is no extra")
    ap.add_argument("--python", default=sys.executable if sys.prefix == sys.base_prefix else "python3")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ferkit-install-bench"))
    ap.add_argument("--reuse", action="store_true", help="use venvs already installed in --workdir (sizes only)")
    ap.add_argument("--runs", type=int, default=5, help="warm `ferkit predict` runs")
    ap.add_argument("--predict", default="base", help="extras whose install times `ferkit predict` (comma-separated)")
    ap.add_argument("--photo", default=str(next((DATA / "wild-dev" / "happy").glob("*.jpg"), "")))
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    empty = make_venv(work / "empty", a.python)
    empty_size = du(site_packages(empty))
    result: dict[str, object] = {
        "tree": str(Path(a.tree).resolve()),
        "commit": subprocess.run(["git", "-C", a.tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "python": subprocess.run([a.python, "-V"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "loadavg_at_start": os.getloadavg(),
        "extras": {},
    }
    for extra in a.extras.split(","):
        venv = work / f"{a.label}-{extra}"
        spec = a.tree if extra == "base" else f"{a.tree}[{extra}]"
        if a.reuse and (venv / "bin" / "ferkit").exists():
            old = json.loads(OUT.read_text()).get(a.label, {}).get("extras", {}) if OUT.exists() else {}
            secs = old.get(extra, {}).get("pip_install_s")
        else:
            make_venv(venv, a.python)
            secs = pip_install(venv, spec)
        sp = site_packages(venv)
        size = du(sp) - empty_size
        row = {"spec": spec.replace(a.tree, "ferkit"), "installed_mb": round(size / 1e6, 1), "pip_install_s":
               secs and round(secs, 1), "torch_importable": imports(venv, "torch"),
               "biggest_mb": {k: round(v / 1e6, 1) for k, v in biggest(sp)}}
        result["extras"][extra] = row
        print(f"{a.label:>7} {extra:<6} {row['installed_mb']:>8.1f} MB  torch={row['torch_importable']}  "
              f"biggest {row['biggest_mb']}", flush=True)
        env = {**os.environ, "FERKIT_CACHE_DIR": str(work / f"cache-{a.label}-{extra}")}
        shutil.rmtree(env["FERKIT_CACHE_DIR"], ignore_errors=True)
        env.pop("VIRTUAL_ENV", None)
        if extra in a.predict.split(",") and a.photo:
            cold, warm, out = time_predict(venv, Path(a.photo), env, a.runs)
            faces = json.loads(out)
            row["predict"] = {"photo": Path(a.photo).name, "cold_s": round(cold, 3),
                                 "warm_median_s": round(statistics.median(warm), 3),
                                 "warm_s": [round(t, 3) for t in warm], "first_result": faces}
            print(f"{a.label:>7} {extra:<6} predict cold {cold:.2f} s, warm {statistics.median(warm):.2f} s (median of "
                  f"{len(warm)})", flush=True)
        if extra == "serve":
            row["serve_idle"] = srv = idle_server_rss(venv, env)
            print(f"{a.label:>7} serve  idle RSS {srv['rss_mib_by_process']} MiB, /healthz after "
                  f"{srv['healthz_s']} s", flush=True)
    result["loadavg_at_end"] = os.getloadavg()
    all_results = json.loads(OUT.read_text()) if OUT.exists() else {}
    if a.reuse and a.label in all_results:  # a partial rerun keeps the other extras' rows
        result["extras"] = {**all_results[a.label].get("extras", {}), **result["extras"]}
    all_results[a.label] = result
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(all_results, indent=2) + "\n")
    os.replace(tmp, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
