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
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ferkit.errors import ConfigError, closest

ENV_PREFIX = "FERKIT_SERVE_"
#: A 64-megapixel image is 192 MB as RGB, and decoding it briefly needs several copies: 32 concurrent uploads of a
#: small PNG decoding to 64 MP pushed two workers to 1.9 GB (issue 11). 25 MP covers a 6000×4000 camera photo.
DEFAULT_MAX_PIXELS = 25_000_000


def _opt(default: Any, help: str, *, env: str | None = None, flag: str | None = None, parse: Callable[[str], Any]
         | None = None, choices: tuple[str, ...] | None = None, metavar: str | None = None, cli: bool = True) -> Any:
    """A settings field; ``metadata`` carries what the environment and the command line need to know about it."""
    meta = {"help": help, "env": env, "flag": flag, "parse": parse, "choices": choices, "metavar": metavar, "cli": cli}
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


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``ferkit serve`` can be told. Each field is a flag ``--name-with-dashes`` and an environment
    variable ``FERKIT_SERVE_NAME`` (unless its metadata names another); flags win over the environment."""

    host: str = _opt("127.0.0.1", "address to listen on (anything but loopback is reachable from other machines)")
    port: int = _opt(8000, "TCP port", parse=int)
    workers: int | None = _opt(
        None, "server processes (default: one per CPU, at most 4; one process is bound by the GIL); a worker that "
        "dies is replaced", parse=_optional_int)
    model: str = _opt("fer3", "bundled model name, model file (.safetensors or .onnx) or run directory")
    backend: str = _opt("auto", "inference backend", choices=("auto", "onnx", "torch"))
    detector: str = _opt("yunet", "face detector (see ferkit.infer.detect.list_detectors)")
    detect_size: int | None = _opt(
        None, "longest side of the image the face detector sees (default: chosen per image, higher for large "
        "photos so that small faces in group photos are found)", parse=_optional_int, metavar="PX")
    min_det_score: float | None = _opt(
        None, "drop faces whose detector confidence is below this (0-1; default: the detector's own threshold)",
        parse=_optional_float, metavar="S")
    max_upload_mb: float = _opt(10.0, "larger uploads get 413", parse=float, metavar="MB")
    max_pixels: int = _opt(DEFAULT_MAX_PIXELS, "images with more pixels get 413 (checked before decoding)", parse=int,
                           metavar="N")
    max_concurrency: int | None = _opt(
        None, "images decoded and classified at once per process (default: the number of CPUs, at most 4)",
        parse=_optional_int, metavar="N")
    max_queue: int | None = _opt(
        None, "requests that may wait for a slot per process (default 8 × max-concurrency); more get 503",
        parse=_optional_int, metavar="N")
    api_keys: str | None = _opt(
        None, "file of API keys, one a line ('#' starts a comment); clients send 'Authorization: Bearer KEY' or "
        "'X-API-Key: KEY'; without it the API is open", env="FERKIT_API_KEYS", parse=_optional_str, metavar="FILE")
    rate_limit: float | None = _opt(
        None, "requests per second per API key (per client address without keys), bursts up to N; more get 429 "
        "(default: off)", parse=_optional_float, metavar="N")
    cors_origins: tuple[str, ...] = _opt(
        (), "comma-separated origins allowed to call the API from a browser, or '*' (default: none)", parse=_origins,
        metavar="ORIGINS")
    log_level: str = _opt("info", "log level", choices=("critical", "error", "warning", "info", "debug"))
    log_format: str = _opt("text", "log lines as text or as JSON lines (access log included)",
                           choices=("text", "json"))
    access_log: bool = _opt(True, "log one line per request", parse=_bool, cli=False)
    graceful_timeout_s: float = _opt(
        30.0, "on SIGTERM/SIGINT stop accepting and give requests in flight this long to finish", parse=float,
        metavar="S", flag="--graceful-timeout")
    max_video_mb: float = _opt(50.0, "larger video uploads to /v1/videos get 413", parse=float, metavar="MB")
    max_video_seconds: float = _opt(120.0, "longer videos get 413 (from the duration the file declares)",
                                    parse=float, metavar="S")
    max_video_jobs: int = _opt(2, "video jobs queued or running at once; more get 503", parse=int, metavar="N")
    video_job_ttl_s: float = _opt(600.0, "a finished video job and its result are forgotten this long after it ended",
                                  parse=float, metavar="S", flag="--video-job-ttl")
    state_dir: str | None = _opt(
        None, "directory for the state shared by worker processes (metrics, rate limits); default: a fresh "
        "temporary directory, emptied at start", parse=_optional_str, metavar="DIR")

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError(problems[0])

    def _problems(self) -> list[str]:
        out = []

        def bad(name: str, msg: str) -> None:
            out.append(f"{describe(name)}: {msg}")

        if not 0 < self.port < 65536:
            bad("port", f"{self.port} is not a TCP port (1-65535)")
        for name in ("workers", "max_concurrency"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(name, f"must be at least 1, got {v}")
        if self.max_queue is not None and self.max_queue < 0:
            bad("max_queue", f"must be 0 or more, got {self.max_queue}")
        if not self.max_upload_mb > 0:
            bad("max_upload_mb", f"must be more than 0, got {self.max_upload_mb:g}")
        if self.max_pixels < 1:
            bad("max_pixels", f"must be at least 1, got {self.max_pixels}")
        if self.detect_size is not None and not 32 <= self.detect_size <= 16384:
            bad("detect_size", f"must be 32 to 16384 pixels, got {self.detect_size}")
        if self.min_det_score is not None and not 0 <= self.min_det_score <= 1:
            bad("min_det_score", f"must be between 0 and 1, got {self.min_det_score:g}")
        if self.rate_limit is not None and not self.rate_limit > 0:
            bad("rate_limit", f"must be more than 0 requests per second, got {self.rate_limit:g}")
        for name in ("max_video_mb", "max_video_seconds", "video_job_ttl_s"):
            if not getattr(self, name) > 0:
                bad(name, f"must be more than 0, got {getattr(self, name):g}")
        if self.max_video_jobs < 1:
            bad("max_video_jobs", f"must be at least 1, got {self.max_video_jobs}")
        if self.graceful_timeout_s < 0:
            bad("graceful_timeout_s", f"must be 0 or more seconds, got {self.graceful_timeout_s:g}")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                v = getattr(self, f.name)
                hint = closest(str(v), choices)
                bad(f.name, f"unknown value {v!r} (valid: {', '.join(choices)})"
                    + (f"; did you mean '{hint}'?" if hint else ""))
        if not self.model:
            bad("model", "must name a model")
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
