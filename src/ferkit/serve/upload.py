"""Reading an uploaded image from a request: size limits while it streams in, multipart or raw body, one file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request

#: Room for the multipart envelope (boundaries, part headers) on top of the image itself.
MULTIPART_OVERHEAD = 64 * 1024


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


class UploadBudget:
    """The bytes of request bodies being received at once by this process.

    Uploads are read before a request is admitted to the inference queue (so that a slow client holds no slot), and
    this budget bounds their memory instead: a chunk that does not fit is refused with 503.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


def too_slow(size: int, seconds: float, grace: float, rate: float) -> Rejected:
    """The 408 for an upload that fell below the minimum rate (its connection is closed with the answer)."""
    return Rejected(408, f"upload too slow: {size:,} bytes in {seconds:.1f} s (uploads must average at least "
                         f"{rate / 1024:g} KiB/s after the first {grace:g} s)", {"Connection": "close"})


async def read_body(request: Request, limit: int, shown_limit: int) -> bytes:
    """The request body, refusing as soon as it grows past ``limit`` bytes, declared or not (413), falls below the
    server's minimum upload rate (408), or does not fit in the server's upload budget (503).

    The rate rule: ``t`` seconds after the body started, at least ``min_upload_rate × (t − header_timeout)`` bytes
    must have arrived. It covers a client trickling bytes, one that stops sending, and one whose Content-Length is
    larger than what it sends, with one deadline that each chunk pushes further.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise Rejected(400, "malformed Content-Length header") from None
        if n > limit:
            raise Rejected(413, f"upload too large: {n:,} bytes (the limit is {shown_limit:,})")
    state = request.app.state
    grace, rate = state.settings.header_timeout_s, state.settings.min_upload_rate_kb * 1024
    budget: UploadBudget | None = getattr(state, "upload_budget", None)
    loop = asyncio.get_running_loop()
    start = loop.time()
    chunks: list[bytes] = []
    size = 0
    stream = request.stream().__aiter__()
    try:
        while True:
            wait = start + grace + size / rate - loop.time()
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                chunk = await asyncio.wait_for(stream.__anext__(), wait)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise too_slow(size, loop.time() - start, grace, rate) from None
            size += len(chunk)
            if size > limit:
                raise Rejected(413, f"upload too large: over {shown_limit:,} bytes")
            if budget is not None and not budget.take(len(chunk)):
                raise Rejected(503, "server busy: too many uploads arriving at once; retry shortly",
                               {"Retry-After": "1", "Connection": "close"}, reason="busy")
            chunks.append(chunk)
    finally:
        if budget is not None:
            budget.give(sum(map(len, chunks)))
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
        Rejected: 413 over ``max_bytes``, 408 too slow, 503 upload budget full, 400 malformed multipart or more
            than one file, 415 a JSON, form or text body.
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
