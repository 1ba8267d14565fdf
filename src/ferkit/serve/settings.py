"""The server's settings: every option, its environment variable, its command-line flag and its documentation.

One frozen dataclass, :class:`ServeSettings`, is the only place an option is declared. ``ferkit serve`` derives its
flags from it (:func:`add_arguments`), :func:`~ferkit.serve.app.app_from_env` and uvicorn's worker processes read it
from the environment (:meth:`ServeSettings.from_env`), and :func:`~ferkit.serve.app.serve` hands it to the workers
as environment variables (:meth:`ServeSettings.to_env`). A bad value or an unknown ``FERKIT_SERVE_*`` variable is
refused with one line (:class:`~ferkit.errors.ConfigError`) before any worker starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ferkit.errors import ConfigError, closest

ENV_PREFIX = "FERKIT_SERVE_"
#: A 64-megapixel image is 192 MB as RGB, and decoding it briefly needs several copies: 32 concurrent uploads of a
#: small PNG decoding to 64 MP pushed two workers to 1.9 GB (issue 11). 25 MP covers a 6000×4000 camera photo.
DEFAULT_MAX_PIXELS = 25_000_000
#: The file that marks a ``--state-dir`` as ferkit's own: only a folder holding it (or an empty one) is cleaned.
STATE_MARKER = ".ferkit-serve-state"


def _opt(default: Any, help: str, *, env: str | None = None, flag: str | None = None, parse: Callable[[str], Any]
         | None = None, choices: tuple[str, ...] | None = None, metavar: str | None = None, cli: bool = True,
         bounds: tuple[float, float] | None = None, above: bool = False) -> Any:
    """A settings field; ``metadata`` carries what the environment and the command line need to know about it.

    ``bounds=(lo, hi)``: a number's range, both ends included (``above=True``: ``lo`` itself excluded). Every numeric
    field has bounds, and :meth:`ServeSettings._problems` checks them all in one place (finite, within them).
    """
    meta = {"help": help, "env": env, "flag": flag, "parse": parse, "choices": choices, "metavar": metavar, "cli": cli,
            "bounds": bounds, "above": above}
    return field(default=default, metadata=meta)


def _optional_int(s: str) -> int | None:
    return None if s.strip() in ("", "none", "auto") else int(s)


def _optional_float(s: str) -> float | None:
    return None if s.strip() in ("", "none", "off", "0") else float(s)


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {s!r}")


def _origins(s: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in s.split(",") if o.strip())


def _optional_str(s: str) -> str | None:
    return s or None


def _out_of_bounds(v: float, lo: float, hi: float, above: bool) -> str | None:
    """Why ``v`` is not a finite number within ``lo``..``hi`` (``above``: more than ``lo``), or None."""
    if isinstance(v, float) and not math.isfinite(v):
        return f"must be a finite number, got {v}"
    if v < lo or v > hi or (above and v == lo):
        return f"must be {'more than' if above else 'from'} {lo:g} {'and at most' if above else 'to'} {hi:g}, got {v:g}"
    return None


def _proxies(s: str) -> str | None:
    """``--forwarded-allow-ips``: comma-separated addresses or networks, or ``*``; None (trust nobody) when empty."""
    entries = [e.strip() for e in s.split(",") if e.strip()]
    for e in entries:
        if e != "*":
            ipaddress.ip_network(e, strict=False)  # ValueError: not an address or network
    return ",".join(entries) or None


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``ferkit serve`` can be told. Each field is a flag ``--name-with-dashes`` and an environment
    variable ``FERKIT_SERVE_NAME`` (unless its metadata names another); flags win over the environment."""

    host: str = _opt("127.0.0.1", "address to listen on (anything but loopback is reachable from other machines)")
    port: int = _opt(8000, "TCP port", parse=int, bounds=(1, 65535))
    workers: int | None = _opt(
        None, "server processes (default: one per CPU, at most 4; one process is bound by the GIL); a worker that "
        "dies is replaced", parse=_optional_int, bounds=(1, 64))
    model: str = _opt("fer3", "bundled model name, model file (.safetensors or .onnx) or run directory")
    backend: str = _opt("auto", "inference backend", choices=("auto", "onnx", "torch"))
    detector: str = _opt("yunet", "face detector (see ferkit.infer.detect.list_detectors)")
    detect_size: int | None = _opt(
        None, "longest side of the image the face detector sees (default: chosen per image, higher for large "
        "photos so that small faces in group photos are found)", parse=_optional_int, metavar="PX",
        bounds=(32, 16384))
    min_det_score: float | None = _opt(
        None, "drop faces whose detector confidence is below this (0-1; default: the detector's own threshold)",
        parse=_optional_float, metavar="S", bounds=(0, 1))
    max_upload_mb: float = _opt(10.0, "larger uploads get 413", parse=float, metavar="MB", bounds=(0, 1024),
                                above=True)
    max_pixels: int = _opt(DEFAULT_MAX_PIXELS, "images (and video frames) with more pixels get 413 (checked before "
                           "decoding)", parse=int, metavar="N", bounds=(1, 500_000_000))
    max_concurrency: int | None = _opt(
        None, "images decoded and classified at once per process (default: the number of CPUs, at most 4)",
        parse=_optional_int, metavar="N", bounds=(1, 256))
    max_queue: int | None = _opt(
        None, "requests that may wait for a slot per process (default 8 × max-concurrency); more get 503",
        parse=_optional_int, metavar="N", bounds=(0, 10_000))
    api_keys: str | None = _opt(
        None, "file of API keys, one a line ('#' starts a comment); clients send 'Authorization: Bearer KEY' or "
        "'X-API-Key: KEY'; without it the API is open", env="FERKIT_API_KEYS", parse=_optional_str, metavar="FILE")
    rate_limit: float | None = _opt(
        None, "requests per second per API key (per client address without keys), bursts up to N; more get 429 "
        "(default: off); failed API key checks count against the client address's", parse=_optional_float,
        metavar="N", bounds=(0, 1e6), above=True)
    cors_origins: tuple[str, ...] = _opt(
        (), "comma-separated origins allowed to call the API from a browser, or '*' (default: none)", parse=_origins,
        metavar="ORIGINS")
    log_level: str = _opt("info", "log level", choices=("critical", "error", "warning", "info", "debug"))
    log_format: str = _opt("text", "log lines as text or as JSON lines (access log included)",
                           choices=("text", "json"))
    access_log: bool = _opt(True, "log one line per request", parse=_bool, cli=False)
    graceful_timeout_s: float = _opt(
        30.0, "on SIGTERM/SIGINT stop accepting and give requests in flight this long to finish", parse=float,
        metavar="S", flag="--graceful-timeout", bounds=(0, 3600))
    max_video_mb: float = _opt(50.0, "larger video uploads to /v1/videos get 413", parse=float, metavar="MB",
                               bounds=(0, 4096), above=True)
    max_video_seconds: float = _opt(
        120.0, "longer videos get 413 (from the duration the file declares; a job whose frames run past it while "
        "decoding stops there and fails)", parse=float, metavar="S", bounds=(0, 86_400), above=True)
    max_video_jobs: int = _opt(2, "video jobs queued or running at once; more get 503", parse=int, metavar="N",
                               bounds=(1, 1000))
    video_job_ttl_s: float = _opt(600.0, "a finished video job and its result are forgotten this long after it ended",
                                  parse=float, metavar="S", flag="--video-job-ttl", bounds=(0, 7 * 86_400), above=True)
    state_dir: str | None = _opt(
        None, "directory for the state shared by worker processes (metrics, rate limits, video jobs), emptied of "
        "ferkit's files at start; it must be new, empty or one ferkit made (holding " + STATE_MARKER + "); "
        "default: a fresh temporary directory", parse=_optional_str, metavar="DIR")
    header_timeout_s: float = _opt(
        10.0, "a client has this long to send a request's headers (else its connection is closed), and its upload "
        "this long before --min-upload-rate applies", parse=float, metavar="S", flag="--header-timeout",
        bounds=(0, 600), above=True)
    min_upload_rate_kb: float = _opt(
        32.0, "uploads arriving slower than this on average (KiB/s, after the first --header-timeout seconds) get "
        "408, so that slow clients cannot hold the server's memory or connections", parse=float, metavar="KB",
        flag="--min-upload-rate", bounds=(0, 1e6), above=True)
    max_client_connections: int = _opt(
        16, "open connections one client address may hold per server process; more are refused with 429 (not "
        "applied to --forwarded-allow-ips proxies)", parse=int, metavar="N", bounds=(1, 100_000))
    forwarded_allow_ips: str | None = _opt(
        None, "comma-separated addresses or networks of reverse proxies whose X-Forwarded-For and X-Forwarded-Proto "
        "headers are trusted (the client address for rate limits and logs), or '*'; default: trust none",
        parse=_proxies, metavar="IPS")

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError(problems[0])

    def _problems(self) -> list[str]:
        out = []

        def bad(name: str, msg: str) -> None:
            out.append(f"{describe(name)}: {msg}")

        for f in dataclasses.fields(self):
            v, b = getattr(self, f.name), f.metadata["bounds"]
            if b is not None and v is not None and not isinstance(v, bool):
                why = _out_of_bounds(v, *b, f.metadata["above"])
                if why:
                    bad(f.name, why)
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                v = getattr(self, f.name)
                hint = closest(str(v), choices)
                bad(f.name, f"unknown value {v!r} (valid: {', '.join(choices)})"
                    + (f"; did you mean '{hint}'?" if hint else ""))
        if not self.model:
            bad("model", "must name a model")
        if self.forwarded_allow_ips is not None:
            try:
                _proxies(self.forwarded_allow_ips)
            except ValueError:
                bad("forwarded_allow_ips", f"not addresses or networks: {self.forwarded_allow_ips!r}")
        return out

    # -- derived values ----------------------------------------------------------------------------------------------

    @property
    def concurrency(self) -> int:
        """Inference slots per process."""
        return self.max_concurrency or max(1, min(4, os.cpu_count() or 1))

    @property
    def queue(self) -> int:
        """Requests allowed to wait for a slot per process."""
        return self.max_queue if self.max_queue is not None else 8 * self.concurrency

    @property
    def worker_count(self) -> int:
        """Server processes: ``workers``, or one per CPU this process may use, at most 4."""
        if self.workers:
            return self.workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(4, cpus))

    @property
    def max_upload_bytes(self) -> int:
        return max(1, int(self.max_upload_mb * 1024 * 1024))

    @property
    def max_video_bytes(self) -> int:
        return max(1, int(self.max_video_mb * 1024 * 1024))

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    def replace(self, **changes: Any) -> ServeSettings:
        """A copy with ``changes`` (validated like the original)."""
        return dataclasses.replace(self, **changes)

    # -- the environment ---------------------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Settings from ``FERKIT_SERVE_*`` (and ``FERKIT_API_KEYS``) variables, then ``overrides``.

        Raises:
            ConfigError: an unknown ``FERKIT_SERVE_*`` variable or a value that does not parse or is out of range.
        """
        env = os.environ if environ is None else environ
        names = {env_name(f.name): f for f in dataclasses.fields(cls)}
        for k in env:
            if k.startswith(ENV_PREFIX) and k not in names:
                hint = closest(k, names)
                raise ConfigError(f"unknown environment variable {k}" + (f"; did you mean {hint}?" if hint else "")
                                  + f" (valid: {', '.join(n for n in names if n.startswith(ENV_PREFIX))})")
        values: dict[str, Any] = {}
        for k, f in names.items():
            if k in env:
                values[f.name] = _parse(f, env[k], k)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment variables that make :meth:`from_env` return these settings (for worker processes)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[env_name(f.name)] = (",".join(v) if isinstance(v, tuple) else "" if v is None else
                                     str(v).lower() if isinstance(v, bool) else str(v))
        return out


def _parse(f: dataclasses.Field, raw: str, where: str) -> Any:
    parse = f.metadata["parse"]
    try:
        return parse(raw) if parse else raw
    except ValueError:
        raise ConfigError(f"{where}: cannot read {raw!r} as {f.type}") from None


def env_name(name: str) -> str:
    """The environment variable of the settings field ``name``."""
    f = {f.name: f for f in dataclasses.fields(ServeSettings)}[name]
    return f.metadata["env"] or ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    """The ``ferkit serve`` flag of the settings field ``name``."""
    f = {f.name: f for f in dataclasses.fields(ServeSettings)}[name]
    return f.metadata["flag"] or "--" + name.replace("_", "-")


def describe(name: str) -> str:
    """How an error message names a setting: ``--port (FERKIT_SERVE_PORT)``."""
    f = {f.name: f for f in dataclasses.fields(ServeSettings)}[name]
    return f"{flag_name(name)} ({env_name(name)})" if f.metadata["cli"] else env_name(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting to ``ferkit serve``'s parser; defaults stay None so the environment can fill in."""
    for f in dataclasses.fields(ServeSettings):
        m = f.metadata
        if not m["cli"]:
            continue
        default = "" if f.default in (None, ()) else f"; default {f.default}"
        help_text = f"{m['help']} [env {env_name(f.name)}{default}]"

        def typed(raw: str, _f: dataclasses.Field = f) -> Any:
            try:
                return _f.metadata["parse"](raw)
            except ValueError:
                raise argparse.ArgumentTypeError(f"cannot read {raw!r} as {_f.type}") from None

        parser.add_argument(flag_name(f.name), dest=f.name, default=None, help=help_text, metavar=m["metavar"],
                            choices=m["choices"], type=typed if m["parse"] else str)


def from_arguments(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Settings from the environment, overridden by the flags that were given."""
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(ServeSettings) if hasattr(ns, f.name)}
    return ServeSettings.from_env(environ, **given)
