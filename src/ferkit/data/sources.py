"""Find and validate FER datasets: split folders of class folders, a single split folder, or ``fer2013.csv``."""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferkit.classes import FER2013_CLASSES, match_folder
from ferkit.errors import DatasetError
from ferkit.images import is_image_path

log = logging.getLogger(__name__)

SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "publictest": "validation",
    "test": "test",
    "privatetest": "test",
}
CSV_USAGE = {"Training": "train", "PublicTest": "validation", "PrivateTest": "test"}
CSV_SIDE = 48


@dataclass
class SplitSource:
    """One split of a dataset, not yet decoded: image files with labels, or pixels already read from a CSV."""

    name: str
    classes: list[str]
    root: str
    files: list[str] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pixels: np.ndarray | None = None  # N×48×48 uint8 for CSV sources
    rows: np.ndarray | None = None  # CSV sources: each face's 0-based data row of the file (matches FER+ votes)

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}


@dataclass
class Dataset:
    """A dataset root with its splits (``train``, ``validation``, ``test`` — whichever exist)."""

    root: str
    classes: list[str]
    splits: dict[str, SplitSource]
    skipped_folders: list[str] = field(default_factory=list)

    def split(self, name: str) -> SplitSource:
        name = SPLIT_ALIASES.get(name.lower(), name)
        if name not in self.splits:
            raise DatasetError(f"{self.root}: no '{name}' split (found: {', '.join(self.splits) or 'none'})")
        return self.splits[name]


def find_dataset(path: str | os.PathLike, classes: list[str], *, require_all: bool = True) -> Dataset:
    """Discover a dataset at ``path`` and keep the requested classes.

    ``path`` may be a root of split folders (``train/``, ``validation/``|``val/``|``valid/``, ``test/``), a single split
    folder of class folders (returned as split ``"test"``… see ``single``), or a ``fer2013.csv`` file.

    Args:
        classes: the class names to keep, in label order.
        require_all: every class must have images (training); when False, classes without a folder are dropped
            (evaluating a 7-class model on a 3-class dataset).

    Raises:
        DatasetError: missing path, no class folders, a split with no images, a malformed CSV.
    """
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise DatasetError(f"{path}: expected a dataset folder or a fer2013-style .csv file")
        return _from_csv(p, classes, require_all)
    subdirs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        n = sum(1 for f in p.iterdir() if f.is_file() and is_image_path(f))
        if n:  # photos straight in the folder: a dataset needs to say which class each is
            raise DatasetError(f"{path}: {n} image(s) but no class folders; a dataset holds <class>/ folders of "
                               f"images (happy/, sad/, ...) or split folders (train/, validation/) of those")
        raise DatasetError(f"{path}: empty folder (expected split folders such as train/ or class folders)")
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in subdirs if d.name.lower() in SPLIT_ALIASES}
    skipped: set[str] = set()
    splits: dict[str, SplitSource] = {}
    if split_dirs:
        for name, d in split_dirs.items():
            splits[name] = _from_folder(d, name, classes, skipped)
    else:
        splits["single"] = _from_folder(p, "single", classes, skipped)
    present = [c for c in classes if any(s.counts()[c] > 0 for s in splits.values())]
    if require_all:
        for s in splits.values():
            if len(s) == 0:
                raise DatasetError(f"{s.root}: no images of the classes {', '.join(classes)}")
        missing = [c for c in classes if c not in present]
        if missing:
            raise DatasetError(f"{path}: no images for class(es) {', '.join(missing)}")
    else:
        if not present:
            raise DatasetError(f"{path}: no images of the classes {', '.join(classes)}")
        if present != classes:
            splits = {k: _restrict(s, present) for k, s in splits.items()}
    if skipped:
        log.warning("%s: skipping folders not among the classes: %s", path, ", ".join(sorted(skipped)))
    return Dataset(str(p), present if not require_all else list(classes), splits, sorted(skipped))


def _restrict(s: SplitSource, keep: list[str]) -> SplitSource:
    remap = np.full(len(s.classes), -1, np.int64)
    for i, c in enumerate(s.classes):
        if c in keep:
            remap[i] = keep.index(c)
    new = remap[s.labels]
    m = new >= 0
    files = [f for f, k in zip(s.files, m) if k] if s.files else []
    pix = s.pixels[m] if s.pixels is not None else None
    rows = s.rows[m] if s.rows is not None else None
    return SplitSource(s.name, list(keep), s.root, files, new[m], pix, rows)


def _from_folder(d: Path, name: str, classes: list[str], skipped: set[str]) -> SplitSource:
    files: list[str] = []
    labels: list[int] = []
    found_class_dir = False
    for sub in sorted(x for x in d.iterdir() if x.is_dir() and not x.name.startswith(".")):
        c = match_folder(sub.name, classes)
        if c is None:
            skipped.add(sub.name)
            continue
        found_class_dir = True
        imgs = sorted(str(f) for f in sub.rglob("*") if f.is_file() and is_image_path(f))
        files += imgs
        labels += [classes.index(c)] * len(imgs)
    if not found_class_dir:
        have = ", ".join(sorted(skipped)) or "none"
        raise DatasetError(f"{d}: no class folders for {', '.join(classes)} (folders found: {have})")
    return SplitSource(name, list(classes), str(d), files, np.asarray(labels, np.int64))


def _from_csv(p: Path, classes: list[str], require_all: bool) -> Dataset:
    want = {FER2013_CLASSES.index(c): i for i, c in enumerate(classes) if c in FER2013_CLASSES}
    unknown = [c for c in classes if c not in FER2013_CLASSES]
    if unknown:
        raise DatasetError(f"{p}: a fer2013 CSV only has the seven FER2013 classes, not {', '.join(unknown)}")
    rows: dict[str, tuple[list[np.ndarray], list[int], list[int]]] = {}
    bad: list[str] = []
    try:
        fh = p.open(newline="", encoding="utf-8-sig")  # -sig: spreadsheet programs write a byte-order mark
    except OSError as e:
        raise DatasetError(f"{p}: cannot read ({e.strerror})") from None
    with fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        need = {"emotion", "pixels"}
        if not need <= set(cols):
            raise DatasetError(
                f"{p}: missing column(s) {', '.join(sorted(need - set(cols)))} "
                f"(found: {', '.join(cols) or 'none'}); expected emotion,pixels,Usage"
            )
        reader.fieldnames = cols
        for rowno, row in enumerate(reader, start=2):  # row 1 is the header
            try:
                emo = int(str(row["emotion"]).strip())
                if not 0 <= emo < 7:
                    raise ValueError(f"emotion {emo} is not in 0..6")
                vals = np.array(str(row["pixels"]).split(), dtype=np.int64)
                if vals.size != CSV_SIDE * CSV_SIDE:
                    raise ValueError(f"pixels has {vals.size} values, expected {CSV_SIDE * CSV_SIDE}")
                if vals.min() < 0 or vals.max() > 255:
                    raise ValueError("pixel values outside 0..255")
            except (ValueError, TypeError, AttributeError) as e:
                bad.append(f"row {rowno}: {e}")
                continue
            usage = str(row.get("Usage") or "Training").strip()
            split = CSV_USAGE.get(usage)
            if split is None:
                bad.append(f"row {rowno}: unknown Usage '{usage}' (expected Training, PublicTest or PrivateTest)")
                continue
            if emo not in want:
                continue
            imgs, labs, nums = rows.setdefault(split, ([], [], []))
            imgs.append(vals.astype(np.uint8).reshape(CSV_SIDE, CSV_SIDE))
            labs.append(want[emo])
            nums.append(rowno - 2)
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DatasetError(f"{p}: {len(bad)} malformed row(s): {'; '.join(bad[:3])}{more}")
    if not rows:
        raise DatasetError(f"{p}: no rows of the classes {', '.join(classes)}")
    splits = {
        name: SplitSource(name, list(classes), f"{p}:{name}", [], np.asarray(labs, np.int64), np.stack(imgs),
                          np.asarray(nums, np.int64))
        for name, (imgs, labs, nums) in rows.items()
    }
    present = [c for c in classes if any(s.counts()[c] for s in splits.values())]
    if require_all and present != list(classes):
        missing = [c for c in classes if c not in present]
        raise DatasetError(f"{p}: no rows for class(es) {', '.join(missing)}")
    if present != list(classes):
        splits = {k: _restrict(s, present) for k, s in splits.items()}
    return Dataset(str(p), present, splits)
