"""Metrics, test-time augmentation and report files, checked against torchmetrics and by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ferkit.evaluate import (
    confusion,
    evaluate_probs,
    format_table,
    metrics_from_confusion,
    predict_probs,
    tta_views,
    write_report,
)

C3 = ["happy", "sad", "neutral"]


def test_metrics_by_hand() -> None:
    cm = np.array([[5, 1, 0],   # happy: 5 of 6 right
                   [2, 2, 0],   # sad: 2 of 4
                   [0, 0, 0]])  # neutral: absent from the data, never predicted
    m = metrics_from_confusion(cm, C3)
    assert m["n"] == 10 and m["accuracy"] == pytest.approx(0.7)
    happy, sad = m["per_class"]["happy"], m["per_class"]["sad"]
    assert happy["precision"] == pytest.approx(5 / 7) and happy["recall"] == pytest.approx(5 / 6)
    assert sad["precision"] == pytest.approx(2 / 3) and sad["recall"] == pytest.approx(0.5)
    assert m["per_class"]["neutral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    f1 = [2 * p * r / (p + r) for p, r in ((5 / 7, 5 / 6), (2 / 3, 0.5))]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 2)  # over the classes present
    assert m["confusion_matrix"] == cm.tolist() and m["classes"] == C3


def test_empty_confusion() -> None:
    m = metrics_from_confusion(np.zeros((3, 3), int), C3)
    assert m["accuracy"] == 0.0 and m["macro_f1"] == 0.0 and m["n"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_torchmetrics(seed: int) -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(seed)
    n, k = 200, 7
    y = torch.randint(0, k, (n,), generator=g)
    probs = torch.softmax(torch.randn(n, k, generator=g) + 2 * torch.nn.functional.one_hot(y, k), 1)
    m = evaluate_probs(probs, y.numpy(), [f"c{i}" for i in range(k)])
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(tm.multiclass_accuracy(pred, y, k, average="micro").item())
    assert m["macro_f1"] == pytest.approx(tm.multiclass_f1_score(pred, y, k, average="macro").item(), abs=1e-6)
    assert np.array_equal(np.array(m["confusion_matrix"]), tm.multiclass_confusion_matrix(pred, y, k).numpy())
    assert np.array_equal(confusion(y.numpy(), pred.numpy(), k), np.array(m["confusion_matrix"]))


@pytest.mark.parametrize(("tta", "views"), [("none", 1), ("flip", 2), ("tencrop", 10)])
def test_tta_views(tta: str, views: int) -> None:
    x = torch.randn(3, 1, 48, 48)
    v = tta_views(x, tta)
    assert len(v) == views and all(t.shape == x.shape for t in v)
    assert torch.equal(v[0], x) or tta == "tencrop"
    if tta == "flip":
        assert torch.equal(v[1], x.flip(-1))
    if tta == "tencrop":
        assert all(torch.equal(v[i + 5], v[i].flip(-1)) for i in range(5))


def test_unknown_tta() -> None:
    with pytest.raises(ValueError, match="unknown tta 'five'"):
        tta_views(torch.zeros(1, 1, 8, 8), "five")


def test_predict_probs_is_a_distribution_whatever_the_batching() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48 * 48, 3)).eval()
    imgs = np.random.default_rng(0).integers(0, 256, (10, 48, 48), dtype=np.uint8)
    for tta in ("none", "flip", "tencrop"):
        p = predict_probs(net, imgs, size=48, mean=0.5, std=0.25, tta=tta, batch_size=4)
        assert p.shape == (10, 3) and torch.allclose(p.sum(1), torch.ones(10), atol=1e-5)
        assert torch.allclose(p, predict_probs(net, imgs, size=48, mean=0.5, std=0.25, tta=tta, batch_size=512),
                              atol=1e-6)
    # flip TTA of a mirror-symmetric input changes nothing
    sym = np.concatenate([imgs[:, :, :24], imgs[:, :, :24][:, :, ::-1]], axis=2)
    assert torch.allclose(predict_probs(net, sym, size=48, mean=0.5, std=0.25, tta="flip"),
                          predict_probs(net, sym, size=48, mean=0.5, std=0.25), atol=1e-6)


def test_report_files_and_table(tmp_path: Path) -> None:
    m = metrics_from_confusion(np.array([[3, 1, 0], [0, 2, 1], [1, 0, 4]]), C3)
    write_report(m, tmp_path / "r", title="test")
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == m
    assert (tmp_path / "r" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(m)
    assert "accuracy 75.00%" in table and "n=12" in table
    for c in C3:
        assert c in table


def test_metrics_live_in_metrics_py_and_old_names_still_import() -> None:
    import subprocess
    import sys

    import ferkit.ensemble as ens
    import ferkit.evaluate as ev
    import ferkit.metrics as mt

    for name in ("confusion", "evaluate_probs", "format_table", "metrics_from_confusion", "write_report",
                 "plot_confusion", "plot_curves"):
        assert getattr(ev, name) is getattr(mt, name), name
    assert ens.evaluate_models is ev.evaluate_models and ens.ensemble_probs is ev.ensemble_probs
    from ferkit.export import pack_ensemble  # an export: it lives in export.py, its old import path still works

    assert ens.pack_ensemble is pack_ensemble
    # the metrics need neither torch nor matplotlib until a plot is drawn
    code = "import sys, ferkit.metrics; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_report_with_probabilities_adds_reliability_and_coverage(tmp_path: Path) -> None:
    from ferkit.metrics import calibration

    g = np.random.default_rng(0)
    probs = g.dirichlet(np.ones(3), 300)
    labels = g.integers(0, 3, 300)
    m = evaluate_probs(probs, labels, C3)
    assert m["ece"] == calibration(probs, labels)["ece"] and "nll" in m and "brier" in m
    write_report(m, tmp_path, title="t", probs=probs, labels=labels)
    for png in ("confusion_matrix.png", "reliability.png", "coverage.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp*"))  # written under temporary names, renamed
