"""benchmarks/tta_views.py --classes: 7-class members scored as if cut to some classes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "tta_views", Path(__file__).resolve().parents[1] / "benchmarks" / "tta_views.py")
tta_views = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tta_views)

SEVEN = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def test_restrict_drops_other_faces_renormalises_and_relabels() -> None:
    rng = np.random.default_rng(0)
    y = np.array([3, 0, 6, 4, 5, 3, 6])
    probs = [{v: rng.dirichlet(np.ones(7), size=len(y)) for v in ("orig", "flip")} for _ in range(2)]
    cut, y3, classes = tta_views.restrict(probs, y, SEVEN, ["happy", "sad", "neutral"])
    assert classes == ["happy", "sad", "neutral"]
    assert y3.tolist() == [0, 2, 1, 0, 2]  # angry and surprise faces gone, labels renumbered
    for member, full in zip(cut, probs):
        for v in ("orig", "flip"):
            assert member[v].shape == (5, 3)
            np.testing.assert_allclose(member[v].sum(1), 1.0)
            kept = full[v][[0, 2, 3, 5, 6]][:, [3, 4, 6]]
            np.testing.assert_allclose(member[v], kept / kept.sum(1, keepdims=True))
    # the score of the cut members is the accuracy of the argmax over the three classes only
    scheme = [(0, "orig"), (1, "flip")]
    p = (cut[0]["orig"] + cut[1]["flip"]) / 2
    assert tta_views.score(cut, y3, scheme) == pytest.approx(float((p.argmax(1) == y3).mean()))


def test_restrict_names_a_class_the_models_lack() -> None:
    probs = [{"orig": np.full((2, 7), 1 / 7)}]
    with pytest.raises(SystemExit, match="contempt"):
        tta_views.restrict(probs, np.array([0, 1]), SEVEN, ["happy", "contempt"])
