"""``ferkit batch``: recognise expressions in millions of photos and hours of video on Ray Data, into Parquet.

    >>> from ferkit.batch import run_batch, read_results
    >>> run_batch(["photos/", "session.mp4"], "results/")      # a local Ray with all this machine's CPUs
    >>> df = read_results("results/")                            # pandas: one row per face (and per failed input)

Modules: :mod:`.plan` (inputs → work items), :mod:`.worker` (the Ray actor), :mod:`.store` (Parquet parts and the
ledger that makes reruns resume), :mod:`.engine` (the run), :mod:`.rows` (the columns), :mod:`.report` (``--report``).
For your own Ray pipelines: :class:`ferkit.ray.Recognise`. Needs ``pip install 'ferkit[ray]'``. Imports nothing heavy
until used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatchSummary", "read_results", "run_batch"]


def __getattr__(name: str) -> Any:
    if name in ("run_batch", "BatchSummary"):
        from ferkit.batch import engine

        return getattr(engine, name)
    if name == "read_results":
        from ferkit.batch.store import read_results

        return read_results
    raise AttributeError(f"module 'ferkit.batch' has no attribute {name!r}")
