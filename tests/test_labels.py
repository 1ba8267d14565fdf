"""Crowd labels (FER+ votes): the reader, the targets and majority rule, the soft loss, and train/evaluate with
``--labels`` end to end on a slice of the real data and its real votes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ferkit.cli import main
from ferkit.data import find_dataset
from ferkit.data.labels import (
    VOTE_COLUMNS,
    attach_votes,
    majority_labels,
    read_votes,
    vote_metrics,
    vote_targets,
)
from ferkit.errors import DatasetError
from ferkit.modelfile import read_meta
from ferkit.train.loop import soft_loss
from shared_data import FER_DIR, needs_fer

FERPLUS = FER_DIR / "ferplus"
#   neutral happiness surprise sadness anger disgust fear contempt unknown NF
V = {
    "happy8": [1, 8, 0, 0, 0, 0, 0, 0, 1, 0],  # clear happy (the single neutral and unknown votes are dropped)
    "split": [4, 0, 0, 4, 0, 0, 0, 0, 2, 0],  # neutral/sad tie: no majority, soft 50/50
    "unknown": [2, 0, 0, 2, 0, 0, 0, 0, 6, 0],  # mostly unsure: left out
    "nf": [0, 0, 0, 0, 0, 0, 0, 0, 0, 10],  # not a face
    "angry": [3, 0, 0, 0, 7, 0, 0, 0, 0, 0],  # angry face: outside happy/sad/neutral
    "contempt": [3, 0, 0, 0, 0, 0, 0, 7, 0, 0],  # contempt
    "none": [math.nan] * 10,  # FER+ dropped it
}


def votes(*names: str) -> np.ndarray:
    return np.array([V[n] for n in names], np.float64)


def write_votes(path: Path, rows: list[tuple[str, list[float]]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", *VOTE_COLUMNS, "fer2013_row"])
        for i, (p, v) in enumerate(rows):
            w.writerow([p, *["" if math.isnan(x) else int(x) for x in v], i])
    return path


def test_targets_map_classes_subsets_and_leave_out_with_reasons() -> None:
    v = votes("happy8", "split", "unknown", "nf", "angry", "contempt", "none")
    three = vote_targets(v, ["happy", "sad", "neutral"], "soft")
    assert three.keep.tolist() == [True, True, False, False, False, False, False]
    np.testing.assert_allclose(three.targets[0], [1, 0, 0])  # FER+ "happiness" column → ferkit "happy"
    np.testing.assert_allclose(three.targets[1], [0, 0.5, 0.5])  # renormalised over the chosen classes
    assert three.left_out == {"no votes": 1, "unknown or not a face": 2, "votes mostly outside the classes": 2,
                              "no majority": 0}
    seven = vote_targets(v, ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"], "soft")
    assert seven.keep.tolist() == [True, True, False, False, True, False, False]
    np.testing.assert_allclose(seven.targets[4], [0.7, 0, 0, 0, 0, 0, 0.3])
    eight = vote_targets(v, ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral", "contempt"])
    assert eight.keep[5] and eight.targets[5, 7] == pytest.approx(0.7)
    majority = vote_targets(v, ["happy", "sad", "neutral"], "majority")
    assert majority.keep.tolist() == [True, False, False, False, False, False, False]
    assert majority.left_out["no majority"] == 1
    # files without votes: skipped, or trained on their folder label
    fallback = vote_targets(v, ["happy", "sad", "neutral"], folder_labels=np.array([0] * 6 + [2]), missing="folder")
    assert fallback.keep[6] and fallback.targets[6].tolist() == [0, 0, 1] and fallback.from_folder == 1
    with pytest.raises(DatasetError, match="no class"):
        vote_targets(v, ["happy", "bored"])


def test_majority_rule_on_hand_made_votes() -> None:
    v = np.array([
        [6, 4, 0, 0, 0, 0, 0, 0, 0, 0],  # 6 of 10 > half: neutral
        [5, 5, 0, 0, 0, 0, 0, 0, 0, 0],  # 5 of 10 is not more than half: none
        [5, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # singles dropped: 5 of 5: neutral
        [2, 2, 2, 2, 2, 0, 0, 0, 0, 0],  # 2 of 10: none
        [0, 0, 0, 0, 0, 0, 0, 0, 7, 3],  # unknown wins: none
        [1, 0, 0, 0, 0, 0, 9, 0, 0, 0],  # fear, not one of the classes: none
    ], np.float64)
    assert majority_labels(v, ["happy", "sad", "neutral"]).tolist() == [2, -1, 2, -1, -1, -1]
    assert majority_labels(v, ["fear", "neutral"]).tolist() == [1, -1, 1, -1, -1, 0]


def test_soft_loss_is_cross_entropy_against_the_votes() -> None:
    out = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    t = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.25, 0.75]])  # row 2: no target, ignored
    lse0 = math.log(math.exp(2) + 1 + math.exp(-1))
    lse2 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    expected = ((0.5 * (lse0 - 2) + 0.5 * (lse0 - 0)) + (0.25 * (lse2 - 2) + 0.75 * (lse2 - 3))) / 2
    assert soft_loss(out, t).item() == pytest.approx(expected, rel=1e-6)
    assert soft_loss(out, torch.zeros_like(t)).item() == 0.0


def test_vote_metrics_by_hand() -> None:
    v = votes("happy8", "split", "angry")
    p = np.array([[0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])  # classes happy, sad, neutral
    m = vote_metrics(p, v, ["happy", "sad", "neutral"], folder=np.array([0, -1, 2]))
    assert m["n"] == 1 and m["accuracy"] == 1.0 and m["n_votes"] == 3
    assert m["soft_agreement"] == pytest.approx((8 / 10 + 4 / 10 + 3 / 10) / 3)
    # cross-entropy on the faces with votes among the classes after dropping singles: happy8 → [1,0,0],
    # split → [0,.5,.5], angry → [0,0,1]
    assert m["cross_entropy"] == pytest.approx(-(math.log(0.9) + 0.5 * math.log(0.3) + 0.5 * math.log(0.5)
                                                 + math.log(0.8)) / 3)
    assert m["accuracy_in_folders"] == 1.0 and m["n_in_folders"] == 1


def test_malformed_votes_are_refused_naming_file_and_row(tmp_path: Path, one_line_error, capsys) -> None:
    bad = write_votes(tmp_path / "votes.csv", [("train/happy/a.jpg", V["happy8"])])
    bad.write_text(bad.read_text() + "train/sad/b.jpg,1,2,x,0,0,0,0,0,0,0,1\n")
    with pytest.raises(DatasetError, match=r"votes\.csv: row 3: vote counts must be numbers"):
        read_votes(bad)
    (tmp_path / "other.csv").write_text("file,score\na.jpg,1\n")
    with pytest.raises(DatasetError, match="not a votes CSV: missing column"):
        read_votes(tmp_path / "other.csv")
    assert main(["evaluate", "--model", "fer3", "--data", str(tmp_path), "--labels", str(bad)]) == 2
    assert "row 3" in one_line_error(capsys.readouterr().err)


@needs_fer
def test_real_votes_match_real_files_by_path(tiny_dataset: Path) -> None:
    table = read_votes(FERPLUS)  # the folder: train.csv and validation.csv
    assert table.layout == "ferkit" and len(table.by_path) == 28_709 + 3_589
    ds = find_dataset(tiny_dataset, ["happy", "sad", "neutral"])
    v = attach_votes(table, ds.splits["validation"], ds.root)
    assert len(v) == 90 and (~np.isnan(v).all(1)).sum() >= 85  # a few files FER+ dropped have none
    first = sorted((tiny_dataset / "validation" / "happy").iterdir())[0]
    row = next(r for r in csv.DictReader((FERPLUS / "validation.csv").open())
               if r["path"] == f"validation/happy/{first.name}")
    assert v[0].tolist() == [float(row[c]) for c in VOTE_COLUMNS]


def test_ferplus_own_layout_is_matched_by_row_order(tiny_csv: Path, tmp_path: Path) -> None:
    n = sum(1 for _ in csv.reader(tiny_csv.open())) - 1
    rows = [[i % 10, 10 - i % 10, 0, 0, 0, 0, 0, 0, 0, 0] for i in range(n)]
    new = tmp_path / "fer2013new.csv"
    with new.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Usage", "Image name", *VOTE_COLUMNS])
        for i, r in enumerate(rows):
            w.writerow(["Training", f"fer{i:07d}.png", *r])
    table = read_votes(new)
    assert table.layout == "ferplus"
    ds = find_dataset(tiny_csv, ["happy", "sad", "neutral"])
    src = ds.splits["validation"]
    v = attach_votes(table, src, ds.root)
    assert v.tolist() == [rows[r] for r in src.rows.tolist()]
    with pytest.raises(DatasetError, match="row order"):  # no rows to match image folders by
        attach_votes(table, find_dataset(FER_DIR, ["happy"]).splits["validation"], FER_DIR)


@needs_fer
def test_train_and_evaluate_on_votes_end_to_end(make_tiny_dataset, tmp_path: Path, capsys) -> None:
    data = make_tiny_dataset(20, 20, classes=("happy", "sad", "neutral", "fear"))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--labels", str(FERPLUS), "--epochs", "1", "--batch-size", "16",
                 "--out", str(out), "--set", "label_mode=soft"]) == 0
    said = capsys.readouterr().out
    assert "left out:" in said and "with a FER+ majority" in said and "against people (FER+ votes)" in said
    m = json.loads((out / "metrics.json").read_text())
    ls = m["labels"]
    # fear-folder faces that people call happy/sad/neutral train the 3-class model; the rest are counted
    assert ls["train_faces"] == 80 and ls["train_kept"] + sum(ls["left_out"].values()) == 80
    assert ls["train_kept"] > 60 and ls["left_out"]["votes mostly outside the classes"] > 0
    meta = read_meta(out / "model.safetensors")
    assert meta.training["labels"]["mode"] == "soft" and meta.metrics["labels"] == "ferplus-majority"
    assert meta.metrics["n"] == ls["val_kept"] and meta.metrics["n_folder"] == 60
    assert meta.metrics["accuracy"] == pytest.approx(m["ferplus"]["accuracy"], abs=1e-9)
    assert main(["evaluate", "--model", str(out), "--data", str(data), "--split", "validation", "--labels",
                 str(FERPLUS), "--json", "--out", str(tmp_path / "rep")]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["n"] == 60 and ev["ferplus"]["n"] == ls["val_kept"]
    assert ev["ferplus"]["accuracy"] == pytest.approx(m["ferplus"]["accuracy"], abs=1e-6)
    assert "ferplus" in json.loads((tmp_path / "rep" / "metrics.json").read_text())
    # the other label modes run too
    for mode in ("majority", "probability"):
        assert main(["train", "--data", str(data), "--labels", str(FERPLUS), "--epochs", "1", "--batch-size", "16",
                     "--out", str(tmp_path / mode), "--set", f"label_mode={mode}", "--set", "max_steps=2"]) == 0


@pytest.fixture(scope="module")
def micro_votes(make_tiny_dataset) -> Path:
    return make_tiny_dataset(10, 6, classes=("happy", "sad", "neutral", "fear"))


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoint, written by this test


@needs_fer
def test_votes_resume_bit_identical(micro_votes: Path, tmp_path: Path) -> None:
    """A run on votes stopped after epoch 1 and resumed ends with the weights of one uninterrupted run."""
    common = ["train", "--data", str(micro_votes), "--labels", str(FERPLUS), "--epochs", "2", "--batch-size", "8",
              "--device", "cpu", "--seed", "4", "--set", "label_mode=probability"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    per_epoch = _ckpt(tmp_path / "whole" / "last.ckpt")["step"] // 2
    assert main([*common, "--out", str(tmp_path / "split"), "--max-steps", str(per_epoch)]) == 0
    assert main(["train", "--resume", "--out", str(tmp_path / "split"), "--max-steps", "0"]) == 0
    a, b = _ckpt(tmp_path / "whole" / "last.ckpt")["model"], _ckpt(tmp_path / "split" / "last.ckpt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert read_meta(tmp_path / "split").training["labels"]["mode"] == "probability"


@needs_fer
def test_distill_blends_teacher_and_votes_with_stored_views(micro_votes: Path, tmp_path: Path, capsys) -> None:
    teacher = tmp_path / "teacher"
    assert main(["train", "--data", str(micro_votes), "--labels", str(FERPLUS), "--epochs", "1", "--batch-size", "8",
                 "--out", str(teacher)]) == 0
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher), "--data", str(micro_votes), "--labels", str(FERPLUS),
                 "--alpha", "0.5", "--views", "2", "--epochs", "1", "--batch-size", "8", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "teacher soft labels: 2 views" in said and "labels: soft targets" in said
    meta = read_meta(out)
    assert meta.training["teacher"] == str(teacher) and meta.training["labels"]["mode"] == "soft"
    assert (out / "teacher_views.safetensors").is_file()
