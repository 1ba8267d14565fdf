"""The HTTP server: a FastAPI app around one :class:`~ferkit.infer.recognizer.Recognizer`, and its web page.

Endpoints (see ``/docs`` for the OpenAPI description, ``/openapi.json`` for the machine-readable one):

* ``POST /v1/predict`` — an image as multipart field ``file`` or as the raw request body; ``?detect=false`` classifies
  the whole image as one face. 200 with ``{"model", "classes", "image": {"width", "height"}, "faces": [...]}``;
  413 upload or pixel count too large; 415 not a readable image (empty, truncated, unknown format); 400 malformed
  multipart; 503 (with ``Retry-After``) when the inference queue is full.
* ``GET /healthz`` — 200 once the model is loaded.
* ``GET /v1/models`` — the loaded model and the bundled ones: classes, input size, validation accuracy.
* ``GET /`` — the web page (``static/index.html``), which needs no network.

Inference runs in a small thread pool, never on the event loop, behind an admission counter: at most
``max_concurrency`` images are decoded and classified at once and at most ``max_queue`` more wait, so memory stays
bounded under load. Error responses are ``{"detail": "<one line>"}``; no traceback reaches a client.

The options live in :class:`~ferkit.serve.settings.ServeSettings`; upload handling in :mod:`ferkit.serve.upload`,
the endpoints in :mod:`ferkit.serve.routes`. Run it with :func:`serve`, or
``python -m uvicorn ferkit.serve.app:app_from_env --factory`` with ``FERKIT_SERVE_*`` environment variables.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import importlib.util
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ferkit.errors import FerkitError
from ferkit.serve.routes import STATIC_DIR, Admission, error, meta_summary, router
from ferkit.serve.settings import ServeSettings
from ferkit.serve.upload import one_line

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


def create_app(settings: ServeSettings | None = None, **options: Any) -> FastAPI:
    """Build the FastAPI app; the model is loaded when the app starts (its lifespan), not here.

    Args:
        settings: the server's settings (default: ``ServeSettings()``).
        **options: fields of :class:`~ferkit.serve.settings.ServeSettings` that override ``settings``, e.g.
            ``model="fer7"``, ``max_upload_mb=2``.

    Raises:
        ConfigError: an option that is unknown or out of range.
    """
    s = settings or ServeSettings()
    if options:
        unknown = sorted(set(options) - set(ServeSettings.__dataclass_fields__))
        if unknown:
            from ferkit.errors import ConfigError

            raise ConfigError(f"unknown server option {unknown[0]!r} (see ferkit.serve.settings.ServeSettings)")
        s = s.replace(**options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from ferkit.infer.recognizer import Recognizer

        t0 = time.perf_counter()
        app.state.recognizer = await asyncio.to_thread(Recognizer, model=s.model, backend=s.backend,
                                                       detector=s.detector)
        app.state.admission = Admission(s.concurrency, s.queue)
        app.state.pool = ThreadPoolExecutor(s.concurrency, thread_name_prefix="ferkit-infer")
        app.state.bundled = await asyncio.to_thread(_bundled_summaries)
        log.info(
            "model %s loaded in %.1f s (backend %s); %d inference slot(s), queue %d, uploads ≤ %.1f MB",
            app.state.label,
            time.perf_counter() - t0,
            getattr(app.state.recognizer, "backend", s.backend),
            s.concurrency,
            s.queue,
            s.max_upload_bytes / 2**20,
        )
        try:
            yield
        finally:
            app.state.pool.shutdown(wait=False, cancel_futures=True)
            app.state.recognizer = None

    app = FastAPI(
        title="ferkit",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Facial expression recognition: detect faces in a photo and classify their expressions.",
    )
    app.state.settings = s
    app.state.label = _model_label(s.model)
    app.state.recognizer = None

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, one_line(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return error(422, one_line("; ".join(parts) or "invalid request"))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, "internal server error")

    app.include_router(router)
    for name in EXTRA_ROUTERS:
        if importlib.util.find_spec(name) is not None:
            app.include_router(importlib.import_module(name).router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ferkit")
    except Exception:  # noqa: BLE001 - a source checkout without installed metadata still serves
        return "0"


def app_from_env() -> FastAPI:
    """:func:`create_app` configured by the ``FERKIT_SERVE_*`` variables (see :class:`ServeSettings`).

    This is the factory uvicorn's worker processes import (``uvicorn ferkit.serve.app:app_from_env --factory``).
    """
    return create_app(ServeSettings.from_env())


def serve(settings: ServeSettings | None = None, **options: Any) -> None:
    """Run the server with uvicorn until interrupted (``workers`` > 1 starts that many processes).

    Args:
        settings: the server's settings (default: from the environment).
        **options: fields of :class:`ServeSettings` that override ``settings``.

    Raises:
        ModelFileError: ``model`` names no model file, run directory or bundled model (checked before starting).
        ConfigError: an option that is unknown or out of range.
    """
    import uvicorn

    from ferkit.modelfile import resolve_model_path

    s = settings or ServeSettings.from_env()
    if options:
        s = s.replace(**options)
    resolve_model_path(s.model)  # a user mistake is one line from the CLI, not a failed worker's traceback
    # One thread per operator: a server gets its parallelism from concurrent requests, and per-request thread pools
    # competing for the same cores cost more than they give (benchmarks/serve_load.py: 48 vs 39 req/s on 2 cores).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not s.loopback:
        log.warning("serving on %s: reachable from other machines; the server has no authentication", s.host)
    os.environ.update(s.to_env())
    # uvicorn's own logging setup, plus ferkit's loggers on the same handler (also in the worker processes).
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["ferkit"] = {"handlers": ["default"], "level": s.log_level.upper(), "propagate": False}
    uvicorn.run(
        "ferkit.serve.app:app_from_env",
        factory=True,
        host=s.host,
        port=s.port,
        workers=s.worker_count,
        log_level=s.log_level,
        log_config=log_config,
        access_log=s.access_log,
        timeout_graceful_shutdown=s.graceful_timeout_s,
    )
