"""Reading an uploaded image from a request: size limits while it streams in, multipart or raw body, one file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request

#: Room for the multipart envelope (boundaries, part headers) on top of the image itself.
MULTIPART_OVERHEAD = 64 * 1024
#: A client has this long to send its upload; slower ones get 408 so they cannot hold a slot forever.
BODY_TIMEOUT_S = 60.0


class Rejected(Exception):
    """A request refused with ``status`` and a one-line ``detail`` (``reason`` labels it in the metrics)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, reason: str = "") -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers
        self.reason = reason or {400: "bad_request", 408: "timeout", 413: "too_large", 415: "unsupported"}.get(
            status, str(status))


def one_line(s: object, limit: int = 300) -> str:
    """``s`` as one line of at most ``limit`` characters (what an error response's ``detail`` holds)."""
    text = " ".join(str(s).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def read_body(request: Request, limit: int, shown_limit: int) -> bytes:
    """The request body, refusing (413) as soon as it grows past ``limit`` bytes, declared or not."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise Rejected(413, f"upload too large: {int(declared):,} bytes (the limit is {shown_limit:,})")
        except ValueError:
            raise Rejected(400, "malformed Content-Length header") from None
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Rejected(413, f"upload too large: over {shown_limit:,} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise Rejected(408, f"upload not received within {BODY_TIMEOUT_S:.0f} s") from None
    return b"".join(chunks)


#: How long a refused request's unread upload is read and dropped for, before its connection is closed anyway.
DRAIN_TIMEOUT_S = 10.0


async def drain(request: Request, limit: int) -> None:
    """Read and drop what is left of the request body (up to ``limit`` bytes, for up to ``DRAIN_TIMEOUT_S``).

    A response that closes its connection while upload bytes are still unread makes the kernel reset the connection,
    and the client may then see the reset instead of the response. Reading the rest first lets the answer arrive.
    """
    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return

    try:
        await asyncio.wait_for(read(), DRAIN_TIMEOUT_S)
    except (asyncio.TimeoutError, RuntimeError, ClientDisconnect):  # RuntimeError: the body was already read
        pass


#: Bodies that are not an image, and what to send instead.
HOW_TO_SEND = ("send the image itself: as multipart field 'file' (curl -F file=@photo.jpg URL) or as the raw body "
               "(curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' URL)")
NOT_AN_IMAGE_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/")


async def reject_unknown_query(request: Request) -> None:
    """A route dependency: 422 for a query parameter the route does not declare (a typo must not be ignored)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    known = {p.alias for p in dependant.query_params}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise Rejected(422, f"unknown query parameter '{unknown[0]}' (valid: {valid})", reason="invalid")


async def image_bytes(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The uploaded image and a name for it: the multipart field ``file``, or the raw body.

    Raises:
        Rejected: 413 over ``max_bytes``, 408 too slow, 400 malformed multipart or more than one file, 415 a JSON,
            form or text body.
    """
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith(NOT_AN_IMAGE_TYPES):
        raise Rejected(415, f"a {ctype.split(';')[0]} body is not an image; {HOW_TO_SEND}")
    if ctype.startswith("multipart/form-data"):
        body = await read_body(request, max_bytes + MULTIPART_OVERHEAD, max_bytes)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
        except StarletteHTTPException as e:
            raise Rejected(400, f"malformed multipart upload: {one_line(e.detail)}") from None
        try:
            files = [(k, v) for k, v in form.multi_items() if not isinstance(v, str)]
            if len(files) > 1:
                names = ", ".join(f"'{k}'" for k, _ in files)
                raise Rejected(400, f"{len(files)} files in one upload (fields {names}); send one image per request")
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise Rejected(400, "multipart upload without a file in field 'file'")
            data = await upload.read(max_bytes + 1)
            name = Path(upload.filename or "upload").name or "upload"
        finally:
            await form.close()
    else:
        data = await read_body(request, max_bytes, max_bytes)
        name = "upload"
    if len(data) > max_bytes:
        raise Rejected(413, f"upload too large: over {max_bytes:,} bytes")
    return data, one_line(name, 100)
