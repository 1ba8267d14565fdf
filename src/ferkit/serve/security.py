"""API keys and per-client rate limits, as FastAPI dependencies of the protected routers.

Keys are compared in constant time (``hmac.compare_digest`` on their SHA-256 digests, every key every time, so
neither a key's length nor its position in the file shows in the timing). A client is known by a short digest of
its key (never the key itself, in logs or metrics) or, without keys, by its address. The rate limit is a token
bucket per client that holds N tokens and refills N per second; its state lives in SQLite so that every worker
process shares it (one small transaction per request, ~0.1 ms).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import sqlite3
import threading
import time
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ferkit.errors import ConfigError
from ferkit.serve.upload import Rejected

log = logging.getLogger(__name__)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class APIKeys:
    """The keys of ``--api-keys FILE``: one a line, blank lines and ``#`` comments ignored, UTF-8 (a byte-order mark
    at the start is dropped). Keys must be printable ASCII: HTTP headers carry nothing else reliably, so a key with
    other characters could never match and is refused when the server starts."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    @classmethod
    def from_file(cls, path: str | Path) -> APIKeys:
        """Raises: ConfigError: the file cannot be read or holds no key."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the API keys file ({getattr(e, 'strerror', None) or e})") from None
        keys = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise ConfigError(f"{p}: no API keys in the file (one key a line)")
        bad = [i for i, k in enumerate(keys) if any(c.isspace() for c in k) or len(k) < 8]
        if bad:
            raise ConfigError(f"{p}: key {bad[0] + 1} is shorter than 8 characters or holds spaces")
        bad = [i for i, k in enumerate(keys) if not (k.isascii() and k.isprintable())]
        if bad:
            raise ConfigError(f"{p}: key {bad[0] + 1} holds characters other than printable ASCII (clients cannot "
                              "send them in an HTTP header)")
        return cls(keys)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, presented: str) -> str | None:
        """The client id (12 hex digits of the key's digest) when ``presented`` is a key, else None."""
        d = _digest(presented)
        ok = False
        for k in self._digests:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(d, k)
        return d.hex()[:12] if ok else None


# FastAPI's own header readers: they parse the headers and declare both schemes in the OpenAPI description.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (one of the server's --api-keys)")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY (the same keys)")


class RateLimiter:
    """Token buckets of ``rate`` tokens per second and ``rate`` capacity, one per client, shared by processes."""

    def __init__(self, rate: float, path: str | Path | None = None) -> None:
        self.rate, self.burst = float(rate), max(1.0, float(rate))
        self._path = str(path) if path is not None else ":memory:"
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._path, timeout=2.0, isolation_level=None)
            if self._path != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=OFF")  # the state is disposable: no fsync per request
            db.execute("CREATE TABLE IF NOT EXISTS bucket (client TEXT PRIMARY KEY, tokens REAL, t REAL)")
            self._local.db = db
        return db

    def take(self, client: str) -> float:
        """Spend one token of ``client``'s bucket: 0 when it had one, else the seconds until it will."""
        now = time.time()
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT tokens, t FROM bucket WHERE client = ?", (client,)).fetchone()
            tokens = self.burst if row is None else min(self.burst, row[0] + (now - row[1]) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            if wait == 0.0:
                tokens -= 1
            db.execute("INSERT OR REPLACE INTO bucket VALUES (?, ?, ?)", (client, tokens, now))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return wait


async def guard(request: Request, bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
                api_key: str | None = Depends(_api_key)) -> None:
    """The dependency of every protected route: API key (401/403), then the rate limit (429).

    A request without a valid key counts against its address's rate limit (so keys cannot be guessed at full
    speed): once that is spent, it gets 429 instead of 401/403. Sets ``request.state.client_id`` for the logs and
    metrics.
    """
    state = request.app.state
    keys: APIKeys | None = state.api_keys
    client = request.client.host if request.client else "unknown"
    request.state.client_id = client
    if keys is not None:
        presented = (bearer.credentials.strip() if bearer else "") or (api_key or "").strip()
        kid = keys.check(presented) if presented else None
        if kid is None:
            _limit(state, client)
            if not presented:
                raise Rejected(401, "API key required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                               {"WWW-Authenticate": 'Bearer realm="ferkit"'}, reason="unauthorized")
            raise Rejected(403, "API key not accepted", reason="forbidden")
        client = request.state.client_id = "key:" + kid
    _limit(state, client)


def _limit(state: object, client: str) -> None:
    """Spend one of ``client``'s requests; 429 when its rate limit is spent (nothing without ``--rate-limit``)."""
    limiter: RateLimiter | None = getattr(state, "rate_limiter", None)
    if limiter is not None:
        wait = limiter.take(client)
        if wait > 0:
            raise Rejected(429, f"rate limit: over {limiter.rate:g} requests per second; retry in {wait:.1f} s",
                           {"Retry-After": str(max(1, math.ceil(wait)))}, reason="rate_limited")
