"""Guards at the connection level, under the HTTP parser: a time limit on request heads and a cap on the connections
one client address may hold open.

uvicorn's h11 protocol bounds a request head's size (16 KiB, ``h11_max_incomplete_event_size``) and closes idle
keep-alive connections (``timeout_keep_alive``), but it never times out a head that arrives slowly, and it accepts
any number of connections from one address: a client sending one header byte every few seconds held its connection,
and a file descriptor, forever. :class:`GuardedH11Protocol` adds both rules; :func:`ferkit.serve.app.serve` makes it
uvicorn's ``http`` protocol. The upload that follows a head is bounded by the app (``--min-upload-rate``, see
:func:`ferkit.serve.upload.read_body`), the requests per second by the rate limit.

The limits come from the ``FERKIT_SERVE_*`` variables every worker process reads (``--header-timeout``,
``--max-client-connections``, ``--forwarded-allow-ips``). Connections are counted per worker process.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

#: How often the refusal of one address's extra connections is logged (seconds): one line, not one per connection.
WARN_EVERY_S = 60.0


def trusted_hosts(spec: str | None) -> Callable[[str], bool]:
    """Whether an address is one of ``--forwarded-allow-ips`` (comma-separated addresses or networks, or ``*``)."""
    entries = [e.strip() for e in (spec or "").split(",") if e.strip()]
    if "*" in entries:
        return lambda host: True
    nets = [ipaddress.ip_network(e, strict=False) for e in entries]

    def trusted(host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in n for n in nets)

    return trusted


@functools.cache
def _limits() -> tuple[float, int, Callable[[str], bool]]:
    from ferkit.serve.settings import ServeSettings

    s = ServeSettings.from_env()
    return s.header_timeout_s, s.max_client_connections, trusted_hosts(s.forwarded_allow_ips)


def _raw_response(status: int, reason: str, detail: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete ``Connection: close`` response written below h11 (the connection is closed right after)."""
    body = json.dumps({"detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout and a per-address connection cap (see the module)."""

    #: Open connections per client address in this process (all connections of a process share one event loop).
    open_per_client: ClassVar[Counter[str]] = Counter()
    _warned: ClassVar[dict[str, float]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout, self.max_per_client, self.trusted = _limits()
        self._counted: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        if host is not None and not self.trusted(host):  # a trusted proxy carries many clients' connections
            if self.open_per_client[host] >= self.max_per_client:
                self._refuse(host)
                return
            self.open_per_client[host] += 1
            self._counted = host
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        host, self._counted = self._counted, None
        if host is not None:
            self.open_per_client[host] -= 1
            if self.open_per_client[host] <= 0:
                del self.open_per_client[host]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request on a kept-alive connection: its head must come in time
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a complete head was parsed and its request started
            self._disarm()

    # -- the head timer ----------------------------------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.debug("%s: request head not complete within %g s; connection closed",
                      self.client[0] if self.client else "-", self.head_timeout)
            self.transport.write(_raw_response(408, "Request Timeout",
                                               f"request headers not received within {self.head_timeout:g} s"))
            self.transport.close()

    def _refuse(self, host: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(host, -WARN_EVERY_S) >= WARN_EVERY_S:
            if len(self._warned) > 1000:  # many addresses (IPv6): forget them rather than grow
                self._warned.clear()
            self._warned[host] = now
            log.warning("%s: over %d open connections; refusing more (429) for now", host, self.max_per_client)
        self.transport.write(_raw_response(
            429, "Too Many Requests", f"too many open connections from {host} (the limit is {self.max_per_client})",
            {"retry-after": "1"}))
        self.transport.close()
