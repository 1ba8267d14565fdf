"""The HTTP endpoints: ``/v1/predict``, ``/v1/models``, ``/metrics`` (behind the API key and rate limit when
configured), ``/healthz``, ``/readyz``, the web page and the offline API docs (always open).

The routes read what :mod:`ferkit.serve.app` puts on ``request.app.state``: ``settings``, ``recognizer``,
``admission``, ``pool``, ``bundled``, ``label``, ``version``, ``metrics``, ``ready``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ferkit.errors import FerkitError, ImageError, ImageTooLargeError, ImageTooSmallError
from ferkit.serve import schemas
from ferkit.serve.security import guard
from ferkit.serve.upload import Rejected, image_bytes, one_line, reject_unknown_query

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
    "script-src 'self'; style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)

#: Exception class → (HTTP status, rejection reason), most specific first; the message text is never consulted.
STATUS_FOR: tuple[tuple[type[BaseException], int, str], ...] = (
    (ImageTooLargeError, 413, "too_large"),
    (ImageTooSmallError, 422, "too_small"),
    (ImageError, 415, "unsupported"),
    (FerkitError, 422, "invalid"),
)

#: Routes behind the API key and the rate limit, checked first (``/healthz``, ``/readyz``, the pages stay open).
protected = APIRouter(dependencies=[Depends(guard), Depends(reject_unknown_query)], responses=schemas.AUTH_RESPONSES)
#: Routes anyone may call. They take no parameters and ignore a query string (probes and links add cache-busters
#: and tracking parameters; a 422 there would take a healthy server out of a load balancer).
public = APIRouter()


def error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape: ``{"detail": "<one line>"}``."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def rejection(exc: BaseException) -> Rejected:
    """The HTTP refusal for a ferkit error raised while handling a request, by its class."""
    for cls, status, reason in STATUS_FOR:
        if isinstance(exc, cls):
            return Rejected(status, one_line(exc), reason=reason)
    raise TypeError(f"no HTTP status for {type(exc).__name__}")


class Admission:
    """At most ``concurrency`` requests run and ``queue`` wait; anything beyond is refused at once."""

    def __init__(self, concurrency: int, queue: int, gauge: Any = None) -> None:
        self.concurrency, self.queue = concurrency, queue
        self.admitted = 0
        self.running = asyncio.Semaphore(concurrency)
        self._gauge = gauge

    def try_enter(self) -> bool:
        if self.admitted >= self.concurrency + self.queue:
            return False
        self.admitted += 1
        if self._gauge is not None:
            self._gauge.inc()
        return True

    def leave(self) -> None:
        self.admitted -= 1
        if self._gauge is not None:
            self._gauge.dec()


@asynccontextmanager
async def admitted(state: Any) -> AsyncIterator[Admission]:
    """Admission of one inference request (:func:`run_upload` uses it for every route that decodes and runs the model).

    Raises ``Rejected`` 503 (with ``Retry-After``) when the model is not loaded yet or the queue is full; otherwise
    the request counts against the queue until the block ends. Inside, ``async with slot.running`` waits for one of
    the ``max_concurrency`` places to run.
    """
    admission: Admission | None = state.admission
    if state.recognizer is None or admission is None:
        raise Rejected(503, "model not loaded yet", {"Retry-After": "2"}, reason="not_ready")
    if not admission.try_enter():
        # The connection is closed with the refusal: worker processes share one listening socket and one of them
        # accepts a burst of keep-alive connections at once (31 of 32 measured), so without this a full worker keeps
        # refusing its clients while the other idles. A retry on a new connection can land on any worker.
        raise Rejected(503, "server busy: too many requests waiting; retry shortly",
                       {"Retry-After": "1", "Connection": "close"}, reason="busy")
    try:
        yield admission
    finally:
        admission.leave()


async def run_upload(request: Request, work: Callable[..., Any], *args: Any) -> Any:
    """Read the request's image, then run ``work(state, data, name, *args)`` in the inference pool under admission.

    The upload is read first (bounded in size, rate and memory: :func:`~ferkit.serve.upload.read_body`) and only a
    complete one asks for admission, so a client that sends slowly holds no inference slot or queue place.

    Raises:
        Rejected: the upload's refusals, 503 busy or not ready, a ferkit error's status (by class), 400 when the
            client went away.
    """
    state = request.app.state
    try:
        data, name = await image_bytes(request, state.settings.max_upload_bytes)
        async with admitted(state) as slot, slot.running:
            return await asyncio.get_running_loop().run_in_executor(state.pool, work, state, data, name, *args)
    except FerkitError as e:
        raise rejection(e) from None
    except ClientDisconnect:  # nobody is listening any more; just free the slot
        raise Rejected(400, "client disconnected during the upload", reason="disconnected") from None
    except MemoryError:
        log.error("out of memory while handling an upload")
        raise Rejected(503, "server out of memory for this image; try a smaller one", {"Retry-After": "5"},
                       reason="memory") from None


class HeadAsGet:
    """ASGI middleware: ``HEAD`` is answered as ``GET`` without the body, on every route (FastAPI routes declared
    with ``GET`` alone would answer 405; monitors and ``curl -I`` send ``HEAD``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def meta_summary(meta: Any) -> dict[str, Any]:
    """What the API says about a model's metadata."""
    metrics = dict(getattr(meta, "metrics", {}) or {})
    return {
        "arch": meta.arch,
        "classes": list(meta.classes),
        "input_size": meta.input_size,
        "val_accuracy": metrics.get("accuracy"),
        "val_split": metrics.get("val_split"),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)},
    }


def _infer(state: Any, data: bytes, name: str, detect: bool, min_score: float | None = None) -> dict[str, Any]:
    rec = state.recognizer
    t0 = time.perf_counter()
    # decoded here (not by predict) under the server's own pixel limit, checked on the header's size before
    # decoding; a large JPEG is decoded at reduced size (a 12-MP upload takes a quarter of the memory)
    image = rec.read(data, name=name, max_pixels=state.settings.max_pixels)
    result = rec.predict_arrays([image], detect=detect, keep_images=False)[0]
    w, h = result.size or (0, 0)  # the full image's: the boxes are in its pixels
    res = result.to_dict()
    res.pop("file", None)
    if min_score is not None:  # per request, so the shared Recognizer is left as it is
        from ferkit.infer.recognizer import UNCERTAIN

        for face in res.get("faces", ()):
            if face["score"] < min_score:
                face["label"] = UNCERTAIN
    if state.metrics is not None:
        state.metrics.inference.labels(**state.metrics.labels).observe(time.perf_counter() - t0)
        state.metrics.faces.labels(**state.metrics.labels).observe(len(res.get("faces", ())))
    return {"model": state.label, "classes": list(rec.classes), "image": {"width": w, "height": h}, **res}


def _responses(**codes: str) -> dict[int | str, dict[str, Any]]:
    return {int(k[1:]): {"model": schemas.Error, "description": v} for k, v in codes.items()}


@protected.post(
    "/v1/predict",
    summary="Detect faces and classify their expressions",
    response_model=schemas.Prediction,
    responses=_responses(
        e400="malformed multipart upload, or more than one file in it",
        e408="upload too slow (under --min-upload-rate on average after --header-timeout)",
        e413="upload over the size limit, or image over the pixel limit",
        e415="not a readable image (empty, truncated, unknown format), or a JSON/form body instead of an image",
        e422="bad or unknown query parameter, or an image too small to hold a face",
        e503="busy: inference queue or upload memory full (see Retry-After), or model not loaded",
    ),
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
    min_score: float | None = Query(None, ge=0.0, le=1.0, description="label a face 'uncertain' when its top "
                                    "calibrated score is below this (scores kept); the model card suggests one"),
) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = await run_upload(request, _infer, detect, min_score)
    out["time_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return out


@protected.get("/v1/models", summary="The loaded model, the bundled ones and the server's limits",
               response_model=schemas.Models)
async def models(request: Request) -> dict[str, Any]:
    state = request.app.state
    rec, s = state.recognizer, state.settings
    if rec is None:
        raise Rejected(503, "model not loaded", {"Retry-After": "2"}, reason="not_ready")
    loaded = {"name": state.label, "backend": str(getattr(rec, "backend", s.backend)),
              "int8": bool(getattr(getattr(rec, "runtime", None), "int8", False)), "version": state.version,
              **meta_summary(rec.meta)}
    limits = {"max_upload_bytes": s.max_upload_bytes, "max_pixels": s.max_pixels, "max_concurrency": s.concurrency,
              "max_queue": s.queue, "rate_limit_per_s": s.rate_limit, "auth": state.api_keys is not None}
    return {"loaded": loaded, "bundled": state.bundled, "limits": limits}


@protected.get("/metrics", summary="Prometheus metrics (text format) of every worker process",
               response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    body, ctype = request.app.state.metrics.exposition()
    return Response(body, media_type=ctype)


@public.get("/healthz", summary="Liveness: 200 while the process is up", response_model=schemas.Health)
async def healthz(request: Request) -> dict[str, Any]:
    state = request.app.state
    adm = state.admission
    return {"status": "ok", "model_loaded": state.recognizer is not None, "in_flight": adm.admitted if adm else 0}


@public.get("/readyz", summary="Readiness: 200 once the model is loaded and a warm-up inference ran",
            response_model=schemas.Ready, responses=_responses(e503="not ready yet, or shutting down"))
async def readyz(request: Request) -> dict[str, Any]:
    state = request.app.state
    if not state.ready or state.recognizer is None:
        raise Rejected(503, "not ready: the model is loading or the server is stopping", {"Retry-After": "1"},
                       reason="not_ready")
    return {"status": "ready", "model": state.label, "classes": list(state.recognizer.classes)}


def _page(name: str) -> FileResponse:
    return FileResponse(
        STATIC_DIR / name,
        media_type="text/html",
        headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


@public.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return _page("index.html")


@public.get("/docs", include_in_schema=False)
async def docs() -> FileResponse:
    # FastAPI's Swagger page loads its scripts from a CDN; this one renders /openapi.json with no network.
    return _page("docs.html")
