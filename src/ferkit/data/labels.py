"""Label sources beyond folder names: crowd votes such as Microsoft's FER+ (ten annotators per FER2013 face).

One module for the rules that turn votes into training targets and into evaluation labels, used alike by
``train``, ``distill`` and ``evaluate``:

* :func:`read_votes` reads a votes table: ferkit's layout (``path,neutral,happiness,…,NF,fer2013_row``, one file per
  split or a folder of them) or FER+'s own ``fer2013new.csv`` (``Usage,Image name,neutral,…,NF``), whose rows are
  matched to a ``fer2013.csv`` dataset by row order.
* :func:`attach_votes` gives every face of a split its ten votes (a row of NaN where it has none).
* :func:`vote_targets` turns votes into targets for a set of classes (``soft``, ``majority`` or ``probability``,
  as in Barsoum et al. 2016) and says which faces are left out and why.
* :func:`majority_labels` is the FER+ majority rule for evaluation; :func:`vote_metrics` the agreement measures.

Faces without votes: ``missing="skip"`` (default) leaves them out of training and of the FER+ metrics;
``missing="folder"`` trains them on their folder label (a one-hot target) instead. Either way they are counted.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferkit.errors import DatasetError

#: FER+'s ten vote columns, in the order of ``fer2013new.csv``.
VOTE_COLUMNS: tuple[str, ...] = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                                 "contempt", "unknown", "NF")
#: ferkit's class name for each FER+ emotion column (unknown and NF are not classes).
VOTE_CLASS: dict[str, str] = {"neutral": "neutral", "happiness": "happy", "surprise": "surprise", "sadness": "sad",
                              "anger": "angry", "disgust": "disgust", "fear": "fear", "contempt": "contempt"}
LABEL_MODES = ("soft", "majority", "probability")
MISSING_RULES = ("skip", "folder")
#: Reasons a face is left out of training, in the order they are checked (the run's summary counts each).
LEFT_OUT = ("no votes", "unknown or not a face", "votes mostly outside the classes", "no majority")


@dataclass
class VoteTable:
    """Votes keyed by a file's path relative to its dataset root (``train/happy/x.jpg``) and by fer2013.csv row."""

    source: str
    by_path: dict[str, np.ndarray] = field(default_factory=dict)
    by_name: dict[str, np.ndarray | None] = field(default_factory=dict)  # basename → votes (None: ambiguous)
    by_row: dict[int, np.ndarray] = field(default_factory=dict)
    layout: str = "ferkit"  # ferkit | ferplus

    def __len__(self) -> int:
        return max(len(self.by_path), len(self.by_row))


def _parse_votes(row: dict[str, str], where: str) -> np.ndarray:
    """Ten vote counts, or NaN×10 where the row has none; raises DatasetError naming the file and row."""
    cells = [str(row.get(c) or "").strip() for c in VOTE_COLUMNS]
    if all(c == "" for c in cells):
        return np.full(len(VOTE_COLUMNS), np.nan)
    try:
        v = np.array([float(c) for c in cells])
    except ValueError:
        raise DatasetError(f"{where}: vote counts must be numbers (got {', '.join(cells)})") from None
    if not np.isfinite(v).all() or (v < 0).any():
        raise DatasetError(f"{where}: vote counts must be finite and not negative (got {', '.join(cells)})")
    return v


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.glob("*.csv") if p.is_file())
        if not found:
            raise DatasetError(f"{path}: no votes CSV files in this folder (expected e.g. train.csv, validation.csv)")
        return found
    if not path.is_file():
        raise DatasetError(f"{path}: no such votes file or folder")
    return [path]


def read_votes(path: str | Path) -> VoteTable:
    """Read a votes CSV (or every CSV of a folder) in ferkit's layout, or FER+'s ``fer2013new.csv``.

    Raises:
        DatasetError: a missing file, a file that is neither layout, or a malformed row (file and row named).
    """
    path = Path(path)
    table = VoteTable(str(path))
    for f in _files(path):
        try:
            fh = f.open(newline="", encoding="utf-8-sig")
        except OSError as e:
            raise DatasetError(f"{f}: cannot read ({e.strerror})") from None
        with fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = cols
            missing = [c for c in VOTE_COLUMNS if c not in cols]
            if missing:
                raise DatasetError(f"{f}: not a votes CSV: missing column(s) {', '.join(missing)} (expected "
                                   f"path,{','.join(VOTE_COLUMNS)},fer2013_row or FER+'s fer2013new.csv)")
            if "path" in cols:
                layout = "ferkit"
            elif "Image name" in cols or "Usage" in cols:
                layout = "ferplus"
            else:
                raise DatasetError(f"{f}: a votes CSV needs a 'path' column (ferkit's layout) or 'Usage' and "
                                   f"'Image name' (FER+'s fer2013new.csv)")
            table.layout = layout
            for i, row in enumerate(reader):
                where = f"{f}: row {i + 2}"
                if None in row:  # more cells than header columns
                    raise DatasetError(f"{where}: {len(cols) + len(row[None])} cells for {len(cols)} columns")
                v = _parse_votes(row, where)
                if layout == "ferplus":
                    table.by_row[i] = v  # fer2013new.csv row i is fer2013.csv data row i
                    continue
                rel = str(row["path"]).strip().replace("\\", "/")
                if not rel:
                    raise DatasetError(f"{where}: empty path")
                table.by_path[rel] = v
                name = rel.rsplit("/", 1)[-1]
                table.by_name[name] = None if name in table.by_name else v
                r = str(row.get("fer2013_row") or "").strip()
                if r:
                    try:
                        table.by_row[int(float(r))] = v
                    except ValueError:
                        raise DatasetError(f"{where}: fer2013_row '{r}' is not a row number") from None
    return table


def attach_votes(table: VoteTable, src: Any, root: str | Path) -> np.ndarray:
    """The votes of every face of split ``src`` (N×10, NaN rows where there are none), matched by path relative to
    ``root`` (then by a unique file name) for folders, by ``fer2013.csv`` row for CSV datasets.

    Raises:
        DatasetError: FER+'s row-ordered file used with a folder dataset, or not one face of the split matched.
    """
    n = len(src)
    out = np.full((n, len(VOTE_COLUMNS)), np.nan)
    rows = getattr(src, "rows", None)
    if src.pixels is not None:  # a fer2013.csv dataset: match by data row
        if rows is None or not table.by_row:
            raise DatasetError(f"{table.source}: has no fer2013_row numbers to match the rows of {src.root}")
        for i, r in enumerate(rows.tolist()):
            v = table.by_row.get(int(r))
            if v is not None:
                out[i] = v
    else:
        if table.layout == "ferplus":
            raise DatasetError(f"{table.source}: FER+'s fer2013new.csv is matched by row order, so it goes with a "
                               f"fer2013.csv dataset; for image folders use a votes CSV with a 'path' column")
        base = Path(root).resolve()
        for i, f in enumerate(src.files):
            p = Path(f).resolve()
            try:
                rel = p.relative_to(base).as_posix()
            except ValueError:
                rel = p.name
            v = table.by_path.get(rel)
            if v is None:
                v = table.by_name.get(p.name)
            if v is not None:
                out[i] = v
    if n and np.isnan(out[:, 0]).all():
        raise DatasetError(f"{table.source}: none of the {n} faces of {src.root} has votes there (paths are matched "
                           f"relative to the dataset root, e.g. train/happy/x.jpg)")
    return out


def _drop_single(votes: np.ndarray) -> np.ndarray:
    """FER+'s outlier rule: a label only one annotator gave is dropped."""
    v = np.nan_to_num(np.asarray(votes, np.float64), nan=0.0)
    return np.where(v <= 1.0 + 1e-9, 0.0, v)


def class_columns(classes: list[str]) -> list[int]:
    """The vote column of each class.

    Raises:
        DatasetError: a class FER+ does not have.
    """
    inverse = {c: VOTE_COLUMNS.index(k) for k, c in VOTE_CLASS.items()}
    bad = [c for c in classes if c not in inverse]
    if bad:
        raise DatasetError(f"FER+ votes have no class(es) {', '.join(bad)} (they have {', '.join(inverse)})")
    return [inverse[c] for c in classes]


def majority_labels(votes: np.ndarray, classes: list[str]) -> np.ndarray:
    """The FER+ majority label of each face for ``classes`` (index), or -1 where the rule keeps none.

    The rule (FER+'s ``src/ferplus.py``): drop single votes; the face is kept only if its top label holds more than
    half of the remaining votes (all ten columns, unknown and NF included) and is one of ``classes``.
    """
    cols = class_columns(classes)
    v = _drop_single(votes)
    total = v.sum(1)
    top = v.argmax(1)
    ok = (total > 0) & (v.max(1) > 0.5 * total) & np.isin(top, cols)
    pos = {c: i for i, c in enumerate(cols)}
    return np.array([pos[t] if k else -1 for t, k in zip(top.tolist(), ok.tolist())], np.int64)


@dataclass
class Targets:
    """Training targets from votes: ``targets`` N×C rows summing to 1 for kept faces; ``keep`` the mask; ``left_out``
    the count per reason (:data:`LEFT_OUT`) and ``from_folder`` how many faces used their folder label instead."""

    targets: np.ndarray
    keep: np.ndarray
    left_out: dict[str, int]
    from_folder: int = 0

    def summary(self) -> str:
        parts = [f"{n} {why}" for why, n in self.left_out.items() if n]
        kept = f"{int(self.keep.sum())} of {len(self.keep)} faces kept"
        extra = f", {self.from_folder} without votes on their folder label" if self.from_folder else ""
        return kept + extra + (f"; left out: {', '.join(parts)}" if parts else "")


def vote_targets(votes: np.ndarray, classes: list[str], mode: str = "soft", *,
                 folder_labels: np.ndarray | None = None, missing: str = "skip") -> Targets:
    """Targets over ``classes`` from FER+ votes.

    Single votes are dropped first (FER+'s outlier rule). A face is left out when it has no votes (unless
    ``missing="folder"`` and its folder label is one of ``classes``), when its top remaining label is unknown or NF,
    or when at most half of its remaining votes fall on ``classes``. ``soft`` and ``probability`` targets are its
    votes on ``classes``, renormalised (``probability`` draws a label from them at every step; ``soft`` is
    cross-entropy against them); ``majority`` keeps only faces with a FER+ majority among ``classes`` (one-hot).

    Raises:
        DatasetError: an unknown mode or missing rule, or a class FER+ does not have.
    """
    if mode not in LABEL_MODES:
        raise DatasetError(f"label_mode '{mode}' is not one of {', '.join(LABEL_MODES)}")
    if missing not in MISSING_RULES:
        raise DatasetError(f"label_missing '{missing}' is not one of {', '.join(MISSING_RULES)}")
    cols = class_columns(classes)
    n, c = len(votes), len(classes)
    has = ~np.isnan(np.asarray(votes, np.float64)).any(1) if n else np.zeros(0, bool)
    v = _drop_single(votes)
    total = v.sum(1)
    inside = v[:, cols]
    top = v.argmax(1)
    left = dict.fromkeys(LEFT_OUT, 0)
    keep = np.zeros(n, bool)
    targets = np.zeros((n, c), np.float32)
    from_folder = 0
    maj = majority_labels(votes, classes) if mode == "majority" else None
    for i in range(n):
        if not has[i] or total[i] <= 0:
            fl = -1 if folder_labels is None else int(folder_labels[i])
            if not has[i] and missing == "folder" and 0 <= fl < c:
                targets[i, fl], keep[i] = 1.0, True
                from_folder += 1
            else:
                left["no votes" if not has[i] else "votes mostly outside the classes"] += 1
            continue
        if top[i] >= len(VOTE_CLASS):  # unknown / NF
            left["unknown or not a face"] += 1
            continue
        if inside[i].sum() <= 0.5 * total[i]:
            left["votes mostly outside the classes"] += 1
            continue
        if maj is not None:
            if maj[i] < 0:
                left["no majority"] += 1
                continue
            targets[i, maj[i]] = 1.0
        else:
            targets[i] = inside[i] / inside[i].sum()
        keep[i] = True
    return Targets(targets, keep, left, from_folder)


def vote_metrics(probs: np.ndarray, votes: np.ndarray, classes: list[str], *, bins: int = 15,
                 folder: np.ndarray | None = None) -> dict[str, Any]:
    """How a model's probabilities agree with people, on the faces that have votes.

    * ``accuracy``: against the FER+ majority rule (:func:`majority_labels`), with ``n`` faces kept by it;
    * ``soft_agreement``: the mean share of (all ten) votes that the predicted label got;
    * ``cross_entropy``: against the votes on ``classes`` after dropping single votes, renormalised (faces with
      such votes only);
    * ``ece``: calibration error (``bins`` bins) against the majority label;
    * ``share_error``: mean |top score − share of the votes on ``classes`` that went to the predicted label| —
      whether a score reads as "the share of people who would say so";
    * with ``folder`` (each face's folder label among ``classes``, -1 outside them): ``accuracy_in_folders`` and
      ``n_in_folders``, the majority accuracy on the faces whose folder is one of ``classes`` only (what a dataset
      of just those folders would measure; faces of other folders that people call e.g. neutral are harder).
    """
    from ferkit.metrics import ece

    probs = np.asarray(probs, np.float64)
    votes = np.asarray(votes, np.float64)
    has = ~np.isnan(votes).any(1)
    extra: dict[str, Any] = {}
    if folder is not None:
        f = np.asarray(folder)[has]
    p, v = probs[has], votes[has]
    cols = class_columns(classes)
    pred = p.argmax(1)
    raw = np.nan_to_num(v)
    shares = raw[np.arange(len(p)), np.asarray(cols)[pred]] / np.maximum(raw.sum(1), 1e-12)
    maj = majority_labels(v, classes)
    k = maj >= 0
    if folder is not None:
        kf = k & (f >= 0)
        extra = {"accuracy_in_folders": float((pred[kf] == maj[kf]).mean()) if kf.any() else math.nan,
                 "n_in_folders": int(kf.sum())}
    inside = _drop_single(v)[:, cols]
    s = inside.sum(1)
    ok = s > 0
    t = inside[ok] / s[ok, None]
    ce = float(-(t * np.log(np.clip(p[ok], 1e-12, 1))).sum(1).mean()) if ok.any() else math.nan
    share_on = raw[:, cols]
    tot_on = share_on.sum(1)
    on = tot_on > 0
    share_pred = share_on[on][np.arange(int(on.sum())), pred[on]] / tot_on[on]
    return {
        "labels": "FER+ majority (single votes dropped; top label > half the remaining votes)",
        "n_votes": int(has.sum()),
        "n": int(k.sum()),
        "accuracy": float((pred[k] == maj[k]).mean()) if k.any() else math.nan,
        "soft_agreement": float(shares.mean()) if len(shares) else math.nan,
        "cross_entropy": ce,
        "ece": float(ece(p[k], maj[k], bins)) if k.any() else math.nan,
        "share_error": float(np.abs(p[on].max(1) - share_pred).mean()) if on.any() else math.nan,
        **extra,
    }


__all__ = ["LABEL_MODES", "LEFT_OUT", "MISSING_RULES", "Targets", "VOTE_CLASS", "VOTE_COLUMNS", "VoteTable",
           "attach_votes", "class_columns", "majority_labels", "read_votes", "vote_metrics", "vote_targets"]
