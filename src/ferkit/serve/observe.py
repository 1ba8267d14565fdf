"""Request IDs, access logs (text or JSON lines) and request metrics: one ASGI middleware and the logging set-up.

Every response carries ``X-Request-ID`` (the client's own, when it sent a sane one, else a fresh one) and every log
line written while handling the request carries it too (a :class:`contextvars.ContextVar` read by a logging
filter). The access log is ferkit's own (``ferkit.access``; uvicorn's is switched off) so that it knows the request
ID, the client id (an API key's digest, never the key) and the time taken.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("ferkit_request_id", default="-")
access_log = logging.getLogger("ferkit.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request) so every formatter can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


def log_config(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for uvicorn and ferkit (uvicorn applies it in every worker process)."""
    formatter: dict[str, Any] = {"format": TEXT_FORMAT}
    if fmt == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS

        formatter = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            "reserved_attrs": [*RESERVED_ATTRS, "color_message"],  # uvicorn's ANSI-coloured copy of the message
        }
    handler = {"class": "logging.StreamHandler", "formatter": "main", "filters": ["request_id"],
               "stream": "ext://sys.stderr"}
    lv = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "loggers": {
            "uvicorn": {"handlers": ["main"], "level": lv, "propagate": False},
            "uvicorn.error": {"level": lv},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "ferkit": {"handlers": ["main"], "level": lv, "propagate": False},
            # library warnings, one record each with the request ID (ferkit._warnings.route_warnings in lifespan)
            "py.warnings": {"handlers": ["main"], "level": "WARNING", "propagate": False},
        },
    }


def _endpoint(scope: Scope) -> str:
    """The route's path template (``/v1/predict``), ``static`` for files, ``other`` for unknown paths (bounded
    label values: a scanner's random URLs must not create metric series)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return "static" if path.startswith("/static") else path
    return "static" if scope.get("path", "").startswith("/static/") else "other"


class ObserveMiddleware:
    """Sets the request ID, writes the access log line and counts the request in the metrics."""

    def __init__(self, app: ASGIApp, access: bool = True) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), "")
        rid = incoming if _SANE_ID.match(incoming) else uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        t0 = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - t0
            state = scope.get("state") or {}
            app = scope.get("app")
            metrics = getattr(getattr(app, "state", None), "metrics", None)
            endpoint = _endpoint(scope)
            if metrics is not None and endpoint != "static":
                metrics.request(endpoint, scope["method"], status, seconds)
            if self.access:
                client = state.get("client_id") or (scope.get("client") or ("-",))[0]
                path = scope.get("path", "")
                if scope.get("query_string"):
                    path += "?" + scope["query_string"].decode("latin-1")
                access_log.info(
                    "%s %s %d %.1f ms %s", scope["method"], path, status, seconds * 1000, client,
                    extra={"method": scope["method"], "path": path, "status": status,
                           "duration_ms": round(seconds * 1000, 1), "client": client},
                )
            request_id.reset(token)
