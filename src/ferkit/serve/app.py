"""The HTTP server: a FastAPI app around one :class:`~ferkit.infer.recognizer.Recognizer`, and its web page.

Endpoints (see ``/docs`` for the interactive offline description, ``/openapi.json`` for the machine-readable one):

* ``POST /v1/predict`` — an image as multipart field ``file`` or as the raw request body; ``?detect=false`` classifies
  the whole image as one face. 200 with ``{"model", "classes", "image": {"width", "height"}, "faces": [...]}``;
  413 upload or pixel count too large; 415 not a readable image (or a JSON body); 400 malformed multipart or two
  files; 422 an unknown query parameter; 503 (with ``Retry-After``) when the inference queue is full.
* ``GET /v1/models`` — the loaded model and the bundled ones, and the server's limits.
* ``GET /metrics`` — Prometheus metrics of every worker process.
* ``GET /healthz`` (liveness, always open), ``GET /readyz`` (model loaded and warmed up, always open).
* ``GET /`` — the web page (``static/index.html``), ``GET /docs`` — the API page; neither needs a network.

With ``--api-keys`` the ``/v1/*`` and ``/metrics`` routes need a key (401 without, 403 wrong); with
``--rate-limit N`` each key (or client address) gets N requests per second (429 with ``Retry-After``), and requests
without a valid key count against their address's. Inference runs in a small thread pool, never on the event loop,
behind an admission counter: at most ``max_concurrency`` images are decoded and classified at once and at most
``max_queue`` more wait. An upload is read completely (bounded in size, rate and memory; 408 when too slow) before
it asks for admission, so a slow client holds no slot; request heads are timed and connections per address capped
below the HTTP parser (:mod:`ferkit.serve.connections`). ``HEAD`` is answered on every ``GET`` route.
Error responses are ``{"detail": "<one line>"}``; no traceback reaches a client. Every response carries
``X-Request-ID``, and so does every log line.

The options live in :class:`~ferkit.serve.settings.ServeSettings`; upload handling in :mod:`ferkit.serve.upload`,
the endpoints in :mod:`ferkit.serve.routes`, keys and rate limits in :mod:`ferkit.serve.security`, metrics in
:mod:`ferkit.serve.metrics`, request IDs and logs in :mod:`ferkit.serve.observe`. Run it with :func:`serve`, or
``python -m uvicorn ferkit.serve.app:app_from_env --factory`` with ``FERKIT_SERVE_*`` environment variables.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ferkit.errors import ConfigError, FerkitError, ModelFileError, UnknownNameError
from ferkit.serve import metrics as metrics_mod
from ferkit.serve.observe import ObserveMiddleware, log_config
from ferkit.serve.routes import STATIC_DIR, Admission, HeadAsGet, error, meta_summary, protected, public
from ferkit.serve.security import APIKeys, RateLimiter, guard
from ferkit.serve.settings import STATE_MARKER, ServeSettings
from ferkit.serve.upload import MULTIPART_OVERHEAD, Rejected, UploadBudget, drain, one_line, reject_unknown_query
from ferkit.serve.videos import JOBS_DIR

log = logging.getLogger(__name__)

#: Routers of other server features, included when their module is there (each defines ``router``).
EXTRA_ROUTERS = ("ferkit.serve.videos", "ferkit.serve.explain")


def _model_label(spec: str) -> str:
    """How the API names a model: a bundled name as is, a file by its name only (never the server's paths)."""
    from ferkit.modelfile import bundled_models

    return spec if spec in bundled_models() else Path(spec).name


def _bundled_summaries() -> list[dict[str, Any]]:
    from ferkit.modelfile import bundled_models, read_meta

    out = []
    for name, path in bundled_models().items():
        try:
            out.append({"name": name, **meta_summary(read_meta(path))})
        except FerkitError as e:
            log.warning("bundled model %s unreadable: %s", name, e)
    return out


def _model_version(spec: str) -> str:
    """The first 12 hex digits of the model file's SHA-256 (what the metrics and /v1/models call its version)."""
    from ferkit.modelfile import file_digest, resolve_model_path

    return file_digest(resolve_model_path(spec))[:12]


def check_model(spec: str) -> None:
    """Refuse, in one line, a model that would make every worker fail: missing, or not a ferkit model.

    Raises:
        ModelFileError: what is wrong with ``spec``.
    """
    from ferkit.modelfile import read_meta, resolve_model_path

    path = resolve_model_path(spec)
    if path.suffix.lower() == ".onnx":
        from ferkit.infer.runtime import OnnxRuntime

        try:
            OnnxRuntime(path)
        except (FerkitError, ImportError):
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own classes for a file that is not a model
            raise ModelFileError(f"{spec}: not a usable ONNX model ({type(e).__name__})") from None
        return
    read_meta(path)


def _warm_up(rec: Any) -> None:
    """One detection and one classification, so the first client does not pay for lazy initialisation."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    rec.predict_arrays([img], detect=True, keep_images=False)
    rec.classify(np.zeros((1, rec.meta.input_size, rec.meta.input_size), np.uint8))


def create_app(settings: ServeSettings | None = None, **options: Any) -> FastAPI:
    """Build the FastAPI app; the model is loaded and warmed up when the app starts (its lifespan), not here.

    Args:
        settings: the server's settings (default: ``ServeSettings()``).
        **options: fields of :class:`~ferkit.serve.settings.ServeSettings` that override ``settings``, e.g.
            ``model="fer7"``, ``max_upload_mb=2``.

    Raises:
        ConfigError: an option that is unknown or out of range, or an API keys file without keys.
    """
    s = settings or ServeSettings()
    if options:
        unknown = sorted(set(options) - set(ServeSettings.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown server option {unknown[0]!r} (see ferkit.serve.settings.ServeSettings)")
        s = s.replace(**options)
    api_keys = APIKeys.from_file(s.api_keys) if s.api_keys else None
    state_dir = s.state_dir or metrics_mod.multiprocess_dir()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from ferkit._warnings import route_warnings
        from ferkit.infer.recognizer import Recognizer

        route_warnings()  # in every worker: Pillow's and numpy's warnings as log records with the request ID
        t0 = time.perf_counter()
        rec = await asyncio.to_thread(Recognizer, model=s.model, backend=s.backend, detector=s.detector,
                                      detect_size=s.detect_size, min_det_score=s.min_det_score)
        app.state.version = await asyncio.to_thread(_model_version, s.model)
        if metrics_mod.multiprocess_dir():
            metrics_mod.forget_dead_processes(metrics_mod.multiprocess_dir())
        app.state.metrics = metrics_mod.Metrics(app.state.label, app.state.version)
        app.state.admission = Admission(s.concurrency, s.queue, app.state.metrics.queue)
        app.state.pool = ThreadPoolExecutor(s.concurrency, thread_name_prefix="ferkit-infer")
        app.state.bundled = await asyncio.to_thread(_bundled_summaries)
        await asyncio.get_running_loop().run_in_executor(app.state.pool, _warm_up, rec)
        app.state.recognizer = rec
        app.state.ready = True
        log.info(
            "worker %d: model %s (%s) loaded and warmed up in %.1f s (backend %s); %d inference slot(s), queue %d, "
            "uploads ≤ %.1f MB, ≤ %s pixels; API keys: %s; rate limit: %s",
            os.getpid(),
            app.state.label, app.state.version, time.perf_counter() - t0, rec.backend, s.concurrency, s.queue,
            s.max_upload_bytes / 2**20, f"{s.max_pixels:,}", f"{len(api_keys)}" if api_keys else "off",
            f"{s.rate_limit:g}/s" if s.rate_limit else "off",
        )
        try:
            yield
        finally:
            app.state.ready = False
            app.state.pool.shutdown(wait=True, cancel_futures=False)  # requests in flight finish (graceful stop)
            app.state.recognizer = None

    app = FastAPI(
        title="ferkit",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Facial expression recognition: detect faces in a photo and classify their expressions. "
        + ("Send an API key as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'." if api_keys else ""),
    )
    app.state.settings = s
    app.state.label = _model_label(s.model)
    app.state.recognizer = None
    app.state.admission = None
    app.state.metrics = None
    app.state.ready = False
    app.state.version = ""
    app.state.api_keys = api_keys
    app.state.rate_limiter = (
        RateLimiter(s.rate_limit, Path(state_dir) / "ratelimit.sqlite" if state_dir else None) if s.rate_limit else None
    )
    # uploads are read before admission: this bounds the memory of those arriving at once to what the admitted
    # requests and video jobs may hold anyway
    app.state.upload_budget = UploadBudget((s.concurrency + s.queue) * (s.max_upload_bytes + MULTIPART_OVERHEAD)
                                           + s.max_video_jobs * (s.max_video_bytes + MULTIPART_OVERHEAD))

    def count(reason: str) -> None:
        if app.state.metrics is not None:
            app.state.metrics.rejected(reason)

    @app.exception_handler(Rejected)
    async def rejected(request: Request, exc: Rejected) -> JSONResponse:
        count(exc.reason)
        if (exc.headers or {}).get("Connection") == "close" and exc.status != 408:  # a slow client is not waited for
            await drain(request, s.max_upload_bytes + MULTIPART_OVERHEAD)
        return error(exc.status, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count({404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, str(exc.status_code)))
        return error(exc.status_code, one_line(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        count("invalid")
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return error(422, one_line("; ".join(parts) or "invalid request"))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        count("internal")
        return error(500, "internal server error")

    app.include_router(protected)
    app.include_router(public)
    for name in EXTRA_ROUTERS:  # other features' routers sit behind the same key, rate limit and query check
        if importlib.util.find_spec(name) is not None:
            app.include_router(importlib.import_module(name).router,
                               dependencies=[Depends(guard), Depends(reject_unknown_query)])
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if s.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(s.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"], max_age=600,
        )
    app.add_middleware(HeadAsGet)
    app.add_middleware(ObserveMiddleware, access=s.access_log)  # outermost: sees every response, CORS's too
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ferkit")
    except Exception:  # noqa: BLE001 - a source checkout without installed metadata still serves
        return "0"


#: What uvicorn's worker processes import.
APP_FACTORY = "ferkit.serve.app:app_from_env"


def app_from_env() -> FastAPI:
    """:func:`create_app` configured by the ``FERKIT_SERVE_*`` variables (see :class:`ServeSettings`).

    This is the factory uvicorn's worker processes import (``uvicorn ferkit.serve.app:app_from_env --factory``).
    Started that way rather than by :func:`serve`, set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory) and
    ``FERKIT_SERVE_STATE_DIR`` yourself for metrics and rate limits shared by several workers.
    """
    return create_app(ServeSettings.from_env())


#: What the server writes in its state folder (prometheus-client's files, the rate limits, the video jobs' folder),
#: removed at start.
STATE_FILES = ("*.db", "ratelimit.sqlite*", JOBS_DIR)


def _fresh_state_dir(s: ServeSettings) -> tuple[str, bool]:
    """The directory the workers share (metrics, rate limits, video jobs), emptied of the server's own files; and
    whether ferkit created it (and removes it at the end).

    ``--state-dir`` must be new, empty or marked as ferkit's (:data:`~ferkit.serve.settings.STATE_MARKER`, written
    when ferkit takes a folder): only in such a folder are files removed, so a folder that holds anything else is
    refused rather than cleaned.

    Raises:
        ConfigError: the folder is not ferkit's, or cannot be created or written.
    """
    if not s.state_dir:
        return tempfile.mkdtemp(prefix="ferkit-serve-"), True
    d = Path(s.state_dir)
    flag = "--state-dir"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if not (d / STATE_MARKER).is_file():
            if any(d.iterdir()):
                raise ConfigError(f"{flag} {d}: folder holds files ferkit did not make (it has no {STATE_MARKER}); "
                                  "give a new or empty folder")
            (d / STATE_MARKER).write_text("ferkit serve's state: its files here are removed when it starts\n")
        for pattern in STATE_FILES:
            for f in d.glob(pattern):
                if f.is_symlink() or f.is_file():
                    f.unlink()
                else:
                    shutil.rmtree(f)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{flag} {d}: not a folder") from None
    except OSError as e:
        raise ConfigError(f"{flag} {d}: cannot use it ({(e.strerror or str(e)).lower()})") from None
    return str(d), False


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, an address another process is listening on (uvicorn would say so only after a worker
    loaded its model, or with one log line and exit 3).

    Raises:
        ConfigError: the address cannot be bound.
    """
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(f"--port {port}: cannot listen on {host}:{port} "
                              f"({(e.strerror or str(e)).lower()})") from None


def startup_warnings(s: ServeSettings) -> list[str]:
    """What an operator should hear about these settings before the server starts."""
    out = []
    if not s.loopback and not s.api_keys:
        out.append(f"serving on {s.host}: reachable from other machines, and without API keys anyone can use it "
                   "(--api-keys FILE)")
    if "*" in s.cors_origins and s.api_keys:
        out.append("--cors-origins '*' lets any web page call this server with a key its user holds")
    return out


def serve(settings: ServeSettings | None = None, **options: Any) -> None:
    """Run the server with uvicorn until interrupted (``workers`` > 1 starts that many processes, and replaces one
    that dies).

    Args:
        settings: the server's settings (default: from the environment).
        **options: fields of :class:`ServeSettings` that override ``settings``.

    Raises:
        ModelFileError: ``model`` is missing or not a ferkit model (checked before any worker starts).
        ConfigError: an option that is unknown or out of range, or an API keys file that cannot be used.
    """
    import uvicorn

    s = settings or ServeSettings.from_env()
    if options:
        s = s.replace(**options)
    check_model(s.model)  # a user mistake is one line from the CLI, not a failed worker's traceback per worker
    from ferkit.infer.detect import list_detectors

    if s.detector not in list_detectors():
        raise UnknownNameError("detector", s.detector, list_detectors())
    if s.api_keys:
        APIKeys.from_file(s.api_keys)  # same: an unreadable or empty keys file stops here
    check_port(s.host, s.port)
    # One thread per operator: a server gets its parallelism from concurrent requests, and per-request thread pools
    # competing for the same cores cost more than they give (benchmarks/serve_load.py: 48 vs 39 req/s on 2 cores).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for w in startup_warnings(s):
        log.warning("%s", w)
    state_dir, created = _fresh_state_dir(s)
    s = s.replace(state_dir=state_dir)
    os.environ.update(s.to_env())
    os.environ[metrics_mod.MULTIPROC_ENV] = state_dir  # before any worker imports prometheus_client
    options = dict(
        factory=True,
        host=s.host,
        port=s.port,
        workers=s.worker_count,
        log_level=s.log_level,
        log_config=log_config(s.log_level, s.log_format),
        access_log=False,  # ferkit.access writes it, with the request ID (see ferkit.serve.observe)
        timeout_graceful_shutdown=s.graceful_timeout_s,
        # the head timeout and the per-address connection cap (ferkit.serve.connections)
        http="ferkit.serve.connections:GuardedH11Protocol",
        # uvicorn trusts X-Forwarded-For from 127.0.0.1 unless told otherwise: a local client could pick its address
        proxy_headers=s.forwarded_allow_ips is not None,
        forwarded_allow_ips=s.forwarded_allow_ips or "",
    )
    try:
        if s.worker_count > 1:  # uvicorn's supervisor stops every worker when one cannot be replaced: ferkit's retries
            from ferkit.serve.supervisor import Supervisor

            config = uvicorn.Config(APP_FACTORY, **options)
            Supervisor(config, sockets=[config.bind_socket()]).run()
        else:
            uvicorn.run(APP_FACTORY, **options)
    finally:
        if created:
            shutil.rmtree(state_dir, ignore_errors=True)
