"""Prometheus metrics of the server (``GET /metrics``), with prometheus-client.

With several worker processes, prometheus-client's multiprocess mode is used: each process writes its samples to
files in ``PROMETHEUS_MULTIPROC_DIR`` (set by :func:`ferkit.serve.app.serve`, emptied at start) and ``/metrics``
merges them, so any worker answers for all. Without that variable (an app built in-process, as the tests do), each
app has its own registry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ferkit import __version__

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Latency buckets (seconds): a detect + classify takes ~16 ms alone on 2 cores and ~240 ms at p95 under 8 clients.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.175, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FACE_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
#: The HTTP methods a metric names; any other (a client may send any token) is counted as "other", so that invented
#: methods cannot create series without bound (paths are bounded the same way: see ferkit.serve.observe._endpoint).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def forget_dead_processes(path: str) -> None:
    """Drop the live gauges of worker processes that are gone (a replaced worker's queue depth must not linger)."""
    from prometheus_client import multiprocess

    for f in Path(path).glob("gauge_live*_*.db"):
        pid = f.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            multiprocess.mark_process_dead(int(pid), path)


class Metrics:
    """The server's metrics; ``model`` and ``model_version`` label every request sample."""

    def __init__(self, model: str, model_version: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.labels = {"model": model, "model_version": model_version}
        self._lv = (model, model_version)
        common = ["model", "model_version"]
        kw: dict[str, Any] = {"registry": self.registry}
        self.requests = Counter("ferkit_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status", *common], **kw)
        self.latency = Histogram("ferkit_http_request_duration_seconds", "time from request to response",
                                 ["endpoint", *common], buckets=LATENCY_BUCKETS, **kw)
        self.faces = Histogram("ferkit_faces_per_image", "faces found per predicted image", common,
                               buckets=FACE_BUCKETS, **kw)
        self.inference = Histogram("ferkit_inference_duration_seconds", "decode + detect + classify of one image",
                                   common, buckets=LATENCY_BUCKETS, **kw)
        self.rejections = Counter("ferkit_rejections", "requests refused, by reason", ["reason", *common], **kw)
        self.queue = Gauge("ferkit_queue_depth", "requests admitted (running or waiting for an inference slot)",
                           multiprocess_mode="livesum", **kw)
        self.info = Gauge("ferkit_model_info", "the model being served (value 1)",
                          ["model", "model_version", "ferkit_version"], multiprocess_mode="max", **kw)
        self.info.labels(model, model_version, __version__).set(1)

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        status = status if 100 <= status <= 599 else 0
        self.requests.labels(endpoint, method, str(status), *self._lv).inc()
        self.latency.labels(endpoint, *self._lv).observe(seconds)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason, *self._lv).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every sample (all worker processes' in multiprocess mode) and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path)
        return generate_latest(registry), CONTENT_TYPE_LATEST
