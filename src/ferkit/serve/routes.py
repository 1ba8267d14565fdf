"""The HTTP endpoints: ``/v1/predict``, ``/v1/models``, ``/healthz``, the web page and the offline API docs.

The routes read what the app's lifespan put on ``request.app.state``: ``settings``, ``recognizer``, ``admission``,
``pool``, ``bundled`` and ``label`` (see :mod:`ferkit.serve.app`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect

from ferkit.errors import FerkitError, ImageError
from ferkit.serve.upload import Rejected, image_bytes, one_line

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
    "script-src 'self'; style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)

router = APIRouter()


def error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape: ``{"detail": "<one line>"}``."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class Admission:
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


def meta_summary(meta: Any) -> dict[str, Any]:
    """What the API says about a model's metadata."""
    metrics = dict(getattr(meta, "metrics", {}) or {})
    return {
        "arch": meta.arch,
        "classes": list(meta.classes),
        "input_size": meta.input_size,
        "val_accuracy": metrics.get("accuracy"),
        "val_split": metrics.get("val_split"),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
    }


def _infer(state: Any, data: bytes, name: str, detect: bool) -> dict[str, Any]:
    rec = state.recognizer
    image = rec.load(data, name=name)  # decoded here (not by predict) to report the size the boxes refer to
    h, w = image.shape[:2]
    res = rec.predict_arrays([image], detect=detect, keep_images=False)[0].to_dict()
    res.pop("file", None)
    return {"model": state.label, "classes": list(rec.classes), "image": {"width": w, "height": h}, **res}


@router.post(
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
    state = request.app.state
    admission: Admission | None = getattr(state, "admission", None)
    if state.recognizer is None or admission is None:
        return error(503, "model not loaded yet", {"Retry-After": "2"})
    if not admission.try_enter():
        return error(503, "server busy: too many requests waiting; retry shortly", {"Retry-After": "1"})
    t0 = time.perf_counter()
    try:
        data, name = await image_bytes(request, state.settings.max_upload_bytes)
        async with admission.running:
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(state.pool, _infer, state, data, name, detect)
        del data
    except Rejected as e:
        return error(e.status, e.detail, e.headers)
    except ImageError as e:
        msg = one_line(e)
        return error(413 if "too large" in msg else 422 if "too small" in msg else 415, msg)
    except FerkitError as e:
        return error(422, one_line(e))
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is listening; just free the slot
    except MemoryError:
        log.error("out of memory while handling an upload")
        return error(503, "server out of memory for this image; try a smaller one", {"Retry-After": "5"})
    finally:
        admission.leave()
    out["time_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return JSONResponse(out)


@router.get("/healthz", summary="200 once the model is loaded")
async def healthz(request: Request) -> Response:
    state = request.app.state
    rec = state.recognizer
    if rec is None:
        return error(503, "model not loaded")
    return JSONResponse(
        {"status": "ok", "model": state.label, "classes": list(rec.classes), "in_flight": state.admission.admitted}
    )


@router.get("/v1/models", summary="The loaded model and the bundled ones")
async def models(request: Request) -> Response:
    state = request.app.state
    rec, s = state.recognizer, state.settings
    if rec is None:
        return error(503, "model not loaded")
    loaded = {"name": state.label, "backend": str(getattr(rec, "backend", s.backend)), **meta_summary(rec.meta)}
    limits = {"max_upload_bytes": s.max_upload_bytes, "max_concurrency": s.concurrency, "max_queue": s.queue}
    return JSONResponse({"loaded": loaded, "bundled": state.bundled, "limits": limits})


def _page(name: str) -> FileResponse:
    return FileResponse(
        STATIC_DIR / name,
        media_type="text/html",
        headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return _page("index.html")


@router.get("/docs", include_in_schema=False)
async def docs() -> FileResponse:
    # FastAPI's Swagger page loads its scripts from a CDN; this one renders /openapi.json with no network.
    return _page("docs.html")
