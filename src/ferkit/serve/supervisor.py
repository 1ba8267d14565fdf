"""The supervisor of several worker processes: uvicorn's, except that a worker that cannot be replaced does not stop
the others.

uvicorn's supervisor stops the whole server when a replacement worker fails to start (exit code 3), which fits a
broken configuration at start but not a deploy that moved the model file while one worker was being replaced: the
healthy workers were stopped too. :class:`Supervisor` keeps serving with the workers that run, logs the failure and
retries with back-off (1, 2, 4 … 60 s). It stops, as uvicorn does, only when a worker fails to start before any
worker ever served (nothing was working to begin with). Readiness stays per worker: ``/readyz`` answers 200 from
each worker that runs, and no worker answers when none does.
"""

from __future__ import annotations

import logging
import time

from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

log = logging.getLogger(__name__)

#: Back-off between attempts to replace a worker that failed to start: doubles from FIRST to MAX seconds.
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0


class Supervisor(Multiprocess):
    """uvicorn's :class:`~uvicorn.supervisors.multiprocess.Multiprocess` with retries instead of a full stop."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.served = False  # some worker has been ready to serve
        self.failures: dict[int, int] = {}  # worker index → failed starts in a row
        self.retry_at: dict[int, tuple[float, Process]] = {}  # worker index → (when, the worker that failed)

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if idx in self.retry_at:
                when, failed = self.retry_at[idx]
                if process is not failed or time.monotonic() >= when:  # (replaced meanwhile: by SIGHUP's restart)
                    del self.retry_at[idx]
                    if process is failed:
                        self._start(idx)
                continue
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                # (one more ping only while it matters: until a worker first serves, and for a retried worker)
                if (not self.served or idx in self.failures) and process.is_ready(timeout=1):
                    self.served = True
                    self.failures.pop(idx, None)
                continue
            process.kill()  # gone, or hung
            process.join()
            if self.should_exit.is_set():
                return
            if process.exitcode != STARTUP_FAILURE:
                log.info("worker [%s] died; starting a new one", process.pid)
                self._start(idx)
            elif not self.served:  # nothing has worked yet: a broken configuration, as uvicorn judges it
                log.error("worker [%s] failed to start; stopping the server", process.pid)
                self.should_exit.set()
                return
            else:
                self._retry_later(idx, process)

    def _start(self, idx: int) -> None:
        process = Process(self.config, self.sockets)
        process.start()
        self.processes[idx] = process

    def _retry_later(self, idx: int, failed: Process) -> None:
        n = self.failures[idx] = self.failures.get(idx, 0) + 1
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (n - 1))
        self.retry_at[idx] = (time.monotonic() + delay, failed)
        serving = sum(1 for i, p in enumerate(self.processes) if i not in self.retry_at and p.process.is_alive())
        log.error("worker [%s] failed to start (%d in a row); %d worker(s) still serving; next try in %.0f s",
                  failed.pid, n, serving, delay)
