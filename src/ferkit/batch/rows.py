"""The table ``ferkit batch`` writes (and :class:`ferkit.ray.Recognise` returns): one row per face, and one row per
input (or video segment) that failed or held no face, with the reason — nothing is dropped silently.

Columns (``classes`` are the model's, in its order):

====================  ======================================================================================
``file``              the input as given or found (a path or a URL)
``frame``, ``time``   the video frame's index and time in seconds (null for photos; ``frame`` for an
                      animation's frames too)
``face``              the face's index in its image or frame (largest first), null on a status row
``box``               ``[x, y, w, h]`` in the full image's pixels
``det_score``         the face detector's confidence
``label``, ``score``  the most probable class (``uncertain`` below ``--min-score``) and its probability
``score_<class>``     one column per class: its probability
``track``             videos with ``--track``: the face's track ID (null until it is confirmed)
``smoothed_label``,   videos with ``--track``: the track's scores smoothed over time (see
``smoothed_score``    :mod:`ferkit.infer.track`)
``status``            ``face``, ``no_face`` or ``error``
``reason``            why a ``no_face`` or ``error`` row has no face
``model``,            the model's name and the SHA-256 of its file
``model_digest``
``digest``            BLAKE2b-128 of the input's bytes (what a rerun compares to skip inputs already done)
``item``, ``stamp``   the unit of work (a file, or ``FILE#START-STOP`` for a video's frame range) and the
                      input's size and modification time when it was read: the ledger of a resumable run
====================  ======================================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from ferkit.infer.results import Face

__all__ = ["ERROR", "FACE", "NO_FACE", "face_row", "schema", "status_row", "to_table"]

FACE, NO_FACE, ERROR = "face", "no_face", "error"


def schema(classes: Sequence[str]) -> pa.Schema:
    """The Arrow schema of the result rows for a model with these classes."""
    import pyarrow as pa

    return pa.schema([
        ("file", pa.string()), ("frame", pa.int64()), ("time", pa.float64()), ("face", pa.int32()),
        ("box", pa.list_(pa.int32(), 4)), ("det_score", pa.float64()), ("label", pa.string()),
        ("score", pa.float64()), *[(f"score_{c}", pa.float64()) for c in classes],
        ("track", pa.int32()), ("smoothed_label", pa.string()), ("smoothed_score", pa.float64()),
        ("status", pa.string()), ("reason", pa.string()), ("model", pa.string()), ("model_digest", pa.string()),
        ("digest", pa.string()), ("item", pa.string()), ("stamp", pa.string()),
    ])


def face_row(file: str, face: Face, index: int, *, frame: int | None = None, time: float | None = None,
             **extra: Any) -> dict[str, Any]:
    """The row of one recognised face (``extra``: ``model``, ``digest``, ``item`` … columns)."""
    row: dict[str, Any] = {"file": file, "frame": frame, "time": time, "face": index, "box": [int(v) for v in face.box],
                           "det_score": face.det_score, "label": face.label, "score": float(face.score),
                           "track": face.track, "status": FACE, **extra}
    for c, p in face.scores.items():
        row[f"score_{c}"] = float(p)
    if face.smoothed is not None:
        row["smoothed_label"], row["smoothed_score"] = face.smoothed_label, face.smoothed_score
    return row


def status_row(file: str, status: str, reason: str, *, frame: int | None = None, time: float | None = None,
               **extra: Any) -> dict[str, Any]:
    """The row of an input (or video frame range) that failed (``status="error"``) or held no face."""
    return {"file": file, "frame": frame, "time": time, "status": status, "reason": reason, **extra}


def to_table(rows: list[dict[str, Any]], classes: Sequence[str]) -> pa.Table:
    """Rows → an Arrow table of :func:`schema` (columns a row lacks are null; keys outside it are dropped)."""
    import pyarrow as pa

    sch = schema(classes)
    return pa.Table.from_pylist([{k: r.get(k) for k in sch.names} for r in rows], schema=sch)
