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

Run it with :func:`serve`, or ``python -m uvicorn ferkit.serve.app:app_from_env --factory`` with ``FERKIT_SERVE_*``
environment variables (see :func:`app_from_env`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ferkit.errors import FerkitError, ImageError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Room for the multipart envelope (boundaries, part headers) on top of the image itself.
MULTIPART_OVERHEAD = 64 * 1024
#: A client has this long to send its upload; slower ones get 408 so they cannot hold a slot forever.
BODY_TIMEOUT_S = 60.0
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
    "script-src 'self'; style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


class _Rejected(Exception):
    """A request refused with ``status`` and a one-line ``detail``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _one_line(s: str, limit: int = 300) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _model_label(spec: str) -> str:
    """How the API names a model: a bundled name as is, a file by its name only (never the server's paths)."""
    from ferkit.modelfile import bundled_models

    return spec if spec in bundled_models() else Path(spec).name


def _meta_summary(meta: Any) -> dict[str, Any]:
    metrics = dict(getattr(meta, "metrics", {}) or {})
    return {
        "arch": meta.arch,
        "classes": list(meta.classes),
        "input_size": meta.input_size,
        "val_accuracy": metrics.get("accuracy"),
        "val_split": metrics.get("val_split"),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
    }


def _bundled_summaries() -> list[dict[str, Any]]:
    from ferkit.modelfile import bundled_models, read_meta

    out = []
    for name, path in bundled_models().items():
        try:
            out.append({"name": name, **_meta_summary(read_meta(path))})
        except FerkitError as e:
            log.warning("bundled model %s unreadable: %s", name, e)
    return out


class _Admission:
    """At most ``concurrency`` requests run and ``queue`` wait; anything beyond is refused at once."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency, self.queue = concurrency, queue
        self.admitted = 0
        self.running = asyncio.Semaphore(concurrency)

    def try_enter(self) -> bool:
        if self.admitted >= self.concurrency + self.queue:
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1


async def _read_body(request: Request, limit: int, shown_limit: int) -> bytes:
    """The request body, refusing (413) as soon as it grows past ``limit`` bytes, declared or not."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _Rejected(413, f"upload too large: {int(declared):,} bytes (the limit is {shown_limit:,})")
        except ValueError:
            raise _Rejected(400, "malformed Content-Length header") from None
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Rejected(413, f"upload too large: over {shown_limit:,} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise _Rejected(408, f"upload not received within {BODY_TIMEOUT_S:.0f} s") from None
    return b"".join(chunks)


async def _image_bytes(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The uploaded image and a name for it: the multipart field ``file``, or the raw body."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        body = await _read_body(request, max_bytes + MULTIPART_OVERHEAD, max_bytes)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
        except StarletteHTTPException as e:
            raise _Rejected(400, f"malformed multipart upload: {_one_line(e.detail)}") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise _Rejected(400, "multipart upload without a file in field 'file'")
            data = await upload.read(max_bytes + 1)
            name = Path(upload.filename or "upload").name or "upload"
        finally:
            await form.close()
    else:
        data = await _read_body(request, max_bytes, max_bytes)
        name = "upload"
    if len(data) > max_bytes:
        raise _Rejected(413, f"upload too large: over {max_bytes:,} bytes")
    return data, _one_line(name, 100)


def create_app(
    model: str = "fer3",
    backend: str = "auto",
    max_upload_mb: float = 10,
    max_concurrency: int | None = None,
    *,
    max_queue: int | None = None,
    detector: str = "yunet",
) -> FastAPI:
    """Build the FastAPI app; the model is loaded when the app starts (its lifespan), not here.

    Args:
        model: a bundled model's name, a model file (``.safetensors`` or ``.onnx``) or a run directory.
        backend: ``"auto"``, ``"torch"`` or ``"onnx"`` (passed to the Recognizer).
        max_upload_mb: larger uploads get 413.
        max_concurrency: images decoded and classified at once (default: the number of CPU cores, at most 4).
        max_queue: requests allowed to wait for a slot (default 8 × ``max_concurrency``); more get 503.
        detector: the face detector (passed to the Recognizer).
    """
    concurrency = max(1, int(max_concurrency or min(4, os.cpu_count() or 1)))
    queue = max(0, int(max_queue if max_queue is not None else 8 * concurrency))
    max_bytes = max(1, int(max_upload_mb * 1024 * 1024))
    label = _model_label(model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from ferkit.infer.recognizer import Recognizer

        t0 = time.perf_counter()
        app.state.recognizer = await asyncio.to_thread(Recognizer, model=model, backend=backend, detector=detector)
        app.state.admission = _Admission(concurrency, queue)
        app.state.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="ferkit-infer")
        app.state.bundled = await asyncio.to_thread(_bundled_summaries)
        log.info(
            "model %s loaded in %.1f s (backend %s); %d inference slot(s), queue %d, uploads ≤ %.1f MB",
            label,
            time.perf_counter() - t0,
            getattr(app.state.recognizer, "backend", backend),
            concurrency,
            queue,
            max_bytes / 2**20,
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
    app.state.recognizer = None

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, _one_line(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return _error(422, _one_line("; ".join(parts) or "invalid request"))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal server error")

    def infer(data: bytes, name: str, detect: bool) -> dict[str, Any]:
        rec = app.state.recognizer
        image = rec.load(data, name=name)  # decoded here (not by predict) to report the size the boxes refer to
        h, w = image.shape[:2]
        res = rec.predict_arrays([image], detect=detect, keep_images=False)[0].to_dict()
        res.pop("file", None)
        return {"model": label, "classes": list(rec.classes), "image": {"width": w, "height": h}, **res}

    @app.post(
        "/v1/predict",
        summary="Detect faces and classify their expressions",
        responses={
            200: {"description": "faces with boxes (x, y, w, h in image pixels), labels and class probabilities"},
            400: {"description": "malformed multipart upload"},
            408: {"description": "upload not received in time"},
            413: {"description": "upload over the size limit, or image over the pixel limit"},
            415: {"description": "not a readable image (empty, truncated, unknown format)"},
            422: {"description": "bad query parameter, or an image too small to hold a face"},
            503: {"description": "busy: inference queue full (see Retry-After) or model not loaded"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary", "description": "the photo"}},
                        }
                    },
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def predict(
        request: Request,
        detect: bool = Query(True, description="find faces first; false classifies the whole image"),
    ) -> Response:
        admission: _Admission | None = getattr(request.app.state, "admission", None)
        if app.state.recognizer is None or admission is None:
            return _error(503, "model not loaded yet", {"Retry-After": "2"})
        if not admission.try_enter():
            return _error(503, "server busy: too many requests waiting; retry shortly", {"Retry-After": "1"})
        t0 = time.perf_counter()
        try:
            data, name = await _image_bytes(request, max_bytes)
            async with admission.running:
                loop = asyncio.get_running_loop()
                out = await loop.run_in_executor(app.state.pool, infer, data, name, detect)
            del data
        except _Rejected as e:
            return _error(e.status, e.detail, e.headers)
        except ImageError as e:
            msg = _one_line(str(e))
            return _error(413 if "too large" in msg else 422 if "too small" in msg else 415, msg)
        except FerkitError as e:
            return _error(422, _one_line(str(e)))
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; just free the slot
        except MemoryError:
            log.error("out of memory while handling an upload")
            return _error(503, "server out of memory for this image; try a smaller one", {"Retry-After": "5"})
        finally:
            admission.leave()
        out["time_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return JSONResponse(out)

    @app.get("/healthz", summary="200 once the model is loaded")
    async def healthz() -> Response:
        rec = app.state.recognizer
        if rec is None:
            return _error(503, "model not loaded")
        adm: _Admission = app.state.admission
        return JSONResponse({"status": "ok", "model": label, "classes": list(rec.classes), "in_flight": adm.admitted})

    @app.get("/v1/models", summary="The loaded model and the bundled ones")
    async def models() -> Response:
        rec = app.state.recognizer
        if rec is None:
            return _error(503, "model not loaded")
        loaded = {"name": label, "backend": str(getattr(rec, "backend", backend)), **_meta_summary(rec.meta)}
        return JSONResponse(
            {
                "loaded": loaded,
                "bundled": app.state.bundled,
                "limits": {"max_upload_bytes": max_bytes, "max_concurrency": concurrency, "max_queue": queue},
            }
        )

    def page(name: str) -> FileResponse:
        return FileResponse(
            STATIC_DIR / name,
            media_type="text/html",
            headers={
                "Content-Security-Policy": _PAGE_CSP,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return page("index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        # FastAPI's Swagger page loads its scripts from a CDN; this one renders /openapi.json with no network.
        return page("docs.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ferkit")
    except Exception:  # noqa: BLE001 - a source checkout without installed metadata still serves
        return "0"


_ENV = "FERKIT_SERVE_"


def app_from_env() -> FastAPI:
    """:func:`create_app` configured by the ``FERKIT_SERVE_*`` variables
    (MODEL, BACKEND, MAX_UPLOAD_MB, MAX_CONCURRENCY, MAX_QUEUE, DETECTOR).

    This is the factory uvicorn's worker processes import (``uvicorn ferkit.serve.app:app_from_env --factory``).
    """
    env = os.environ
    conc = env.get(_ENV + "MAX_CONCURRENCY")
    queue = env.get(_ENV + "MAX_QUEUE")
    return create_app(
        model=env.get(_ENV + "MODEL", "fer3"),
        backend=env.get(_ENV + "BACKEND", "auto"),
        max_upload_mb=float(env.get(_ENV + "MAX_UPLOAD_MB", "10")),
        max_concurrency=int(conc) if conc else None,
        max_queue=int(queue) if queue else None,
        detector=env.get(_ENV + "DETECTOR", "yunet"),
    )


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str = "fer3",
    workers: int = 1,
    backend: str = "auto",
    max_upload_mb: float = 10,
    *,
    max_concurrency: int | None = None,
    max_queue: int | None = None,
    detector: str = "yunet",
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Run the server with uvicorn until interrupted (``workers`` > 1 starts that many processes).

    Raises:
        ModelFileError: ``model`` names no model file, run directory or bundled model (checked before starting).
    """
    import uvicorn

    from ferkit.modelfile import resolve_model_path

    resolve_model_path(model)  # a user mistake is one line from the CLI, not a failed worker's traceback
    # One thread per operator: a server gets its parallelism from concurrent requests, and per-request thread pools
    # competing for the same cores cost more than they give (benchmarks/serve_load.py: 48 vs 39 req/s on 2 cores).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines; the server has no authentication", host)
    settings = {
        "MODEL": model,
        "BACKEND": backend,
        "MAX_UPLOAD_MB": str(max_upload_mb),
        "DETECTOR": detector,
        "MAX_CONCURRENCY": str(max_concurrency or ""),
        "MAX_QUEUE": "" if max_queue is None else str(max_queue),
    }
    for k, v in settings.items():
        os.environ[_ENV + k] = v
    # uvicorn's own logging setup, plus ferkit's loggers on the same handler (also in the worker processes).
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["ferkit"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    uvicorn.run(
        "ferkit.serve.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=max(1, workers),
        log_level=log_level,
        log_config=log_config,
        access_log=access_log,
        timeout_graceful_shutdown=10,
    )
