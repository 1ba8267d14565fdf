"""The output folder of ``ferkit batch``: a Parquet dataset written in parts, its ledger, and its reader.

* ``_ferkit_batch.json`` says which model (name and SHA-256) and which options made the results; a rerun with other
  ones is refused, so one folder never mixes two models' rows.
* ``part-RUN-NNNNN.parquet`` hold the rows. Each is written under a temporary name and renamed when complete, and
  holds whole items only (every row of a photo, or of a video's frame range, or of a whole tracked video): a part
  either is there with all its items or is not there at all.
* The ledger is the parts themselves: their ``item``, ``stamp`` and ``digest`` columns say what is done. A rerun skips
  an item whose file has the same size and modification time (no read), and a worker skips a file whose content
  digest is already there (touched, not changed). Anything else runs, and an interrupted run loses at most the items
  since its last part.

Names starting with ``_`` or ``.`` are ignored by Parquet readers (pyarrow, pandas, Spark, DuckDB), so the folder reads
as one dataset: ``pandas.read_parquet(DIR)`` or :func:`read_results`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferkit.errors import FerkitError, OutputError

log = logging.getLogger(__name__)

__all__ = ["MANIFEST", "Ledger", "PartWriter", "open_output", "read_results"]

MANIFEST = "_ferkit_batch.json"
#: What must match for a rerun to add to a folder (besides the model's digest).
_OPTION_KEYS = ("detector", "no_detect", "every", "min_det_score", "min_score", "detect_size", "track")


def _describe(m: dict[str, Any]) -> str:
    opts = m.get("options", {})
    shown = ", ".join(f"{k}={opts[k]}" for k in _OPTION_KEYS if k in opts)
    return f"model {m.get('model')} ({str(m.get('model_digest', ''))[:12]}) with {shown}"


def open_output(out: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Create ``out`` for results made as ``manifest`` says, or check that the results already there were.

    Raises:
        OutputError: ``out`` is a file, a folder of something else, or holds results of another model or options.
    """
    from ferkit.fsutil import atomic_write_text

    d = Path(out)
    m_path = d / MANIFEST
    if d.exists() and not d.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another --out")
    if m_path.is_file():
        try:
            old = json.loads(m_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise OutputError(f"{m_path}: cannot read it ({e}); choose another --out") from None
        same = (old.get("model_digest") == manifest["model_digest"]
                and list(old.get("classes", [])) == list(manifest["classes"])
                and {k: old.get("options", {}).get(k) for k in _OPTION_KEYS}
                == {k: manifest["options"].get(k) for k in _OPTION_KEYS})
        if not same:
            raise OutputError(f"{out}: holds results of {_describe(old)}, not {_describe(manifest)}; use the same "
                              f"model and options to add to it, or choose another --out")
        return d
    if d.is_dir() and any(p for p in d.iterdir()):
        raise OutputError(f"{out}: folder is not empty and holds no ferkit batch results; choose another --out")
    try:
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(m_path, json.dumps(manifest, indent=2) + "\n")
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output folder ({(e.strerror or str(e)).lower()})") from None
    return d


def _parts(d: Path) -> list[Path]:
    return sorted(d.glob("part-*.parquet"))


class Ledger:
    """What the parts in a folder already hold: item → stamps and content digests."""

    def __init__(self, d: Path) -> None:
        import pyarrow.parquet as pq

        self._stamps: dict[str, set[str]] = {}
        self._digests: dict[str, set[str]] = {}
        self.rows = 0
        for part in _parts(d):
            try:
                t = pq.read_table(part, columns=["item", "stamp", "digest"])
            except Exception as e:  # noqa: BLE001  (pyarrow's own classes)
                raise OutputError(f"{part}: cannot read this part of the results ({str(e).splitlines()[0]}); "
                                  f"move it away and rerun to redo its inputs") from None
            self.rows += t.num_rows
            for item, stamp, digest in zip(*(t.column(c).to_pylist() for c in ("item", "stamp", "digest"))):
                if stamp:
                    self._stamps.setdefault(item, set()).add(stamp)
                if digest:
                    self._digests.setdefault(item, set()).add(digest)

    def __len__(self) -> int:
        return len(self._stamps.keys() | self._digests.keys())

    def has_stamp(self, item: str, stamp: str) -> bool:
        return bool(stamp) and stamp in self._stamps.get(item, ())

    def has_digest(self, item: str, digest: str) -> bool:
        return digest in self._digests.get(item, ())

    def digests(self, item: str) -> list[str]:
        return sorted(self._digests.get(item, ()))


class PartWriter:
    """Buffers whole items' rows and writes them as parts: every ``part_rows`` rows or ``flush_seconds``.

    Args:
        d: the output folder; classes: the model's (the schema's score columns).
    """

    def __init__(self, d: Path, classes: Sequence[str], *, part_rows: int = 50_000,
                 flush_seconds: float = 30.0) -> None:
        from ferkit.batch.rows import schema

        self.d, self.schema = d, schema(classes)
        self.part_rows, self.flush_seconds = part_rows, flush_seconds
        self.run = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self._buf: list[dict[str, Any]] = []
        self._seq = 0
        self._last = time.monotonic()
        self.written = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Add one or more whole items' rows; writes a part when enough have gathered."""
        self._buf.extend(rows)
        if len(self._buf) >= self.part_rows or time.monotonic() - self._last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered as one part (temporary name, then renamed)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ferkit.fsutil import atomic_path

        self._last = time.monotonic()
        if not self._buf:
            return
        names = self.schema.names
        table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in self._buf], schema=self.schema)
        self._seq += 1
        with atomic_path(self.d / f"part-{self.run}-{self._seq:05d}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        self.written += table.num_rows
        self._buf = []


def read_results(out: str | os.PathLike, columns: Sequence[str] | None = None) -> Any:
    """The rows ``ferkit batch`` wrote into ``out``, as a pandas DataFrame (one row per face, and one per input that
    failed or held no face: see :mod:`ferkit.batch.rows`), sorted by file, frame and face.

    Args:
        out: the ``--out`` folder.
        columns: read only these columns (default all).

    Raises:
        FerkitError: ``out`` holds no ``ferkit batch`` results.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ferkit.batch.rows import schema

    d = Path(out)
    m_path = d / MANIFEST
    if not m_path.is_file():
        raise FerkitError(f"{out}: holds no ferkit batch results (no {MANIFEST})")
    manifest = json.loads(m_path.read_text(encoding="utf-8"))
    sch = schema(manifest["classes"])
    parts = _parts(d)
    tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in parts]
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = sch.empty_table() if not columns else pa.schema([sch.field(c) for c in columns]).empty_table()
    df = table.to_pandas()
    keys = [k for k in ("file", "frame", "face") if k in df.columns]
    if keys and len(df):
        df = df.sort_values(keys, na_position="first", kind="stable").reset_index(drop=True)
    return df
