"""Calibration: temperature recovery on a known case, ECE/NLL/Brier against torchmetrics and by hand, the
calibrated scores on every inference path (torch, ONNX) with the argmax kept."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ferkit.metrics import brier, calibration, coverage_curve, ece, nll, reliability, selective
from ferkit.modelfile import bundled_models, calibrated_probs, load_model, read_meta
from ferkit.train.calibrate import (CANDIDATES, Calibration, calibrate, cross_fit_probs, fit_calibration,
                                   fit_temperature)
from shared_data import FER_DIR, VALIDATION, WILD, needs_wild


def _sample(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 1.5
    p = torch.softmax(torch.tensor(z), 1).numpy()
    y = (p.cumsum(1) < rng.random(n)[:, None]).sum(1).clip(0, k - 1)
    return z, y


@pytest.mark.parametrize("factor", [0.5, 2.0, 3.0])
def test_scaled_logits_recover_the_temperature(factor: float) -> None:
    z, y = _sample(8000, 5, seed=int(factor * 10))
    assert fit_temperature(z * factor, y) == pytest.approx(factor, rel=0.06)
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.06)


def test_calibrate_reports_honest_numbers_and_keeps_the_argmax() -> None:
    z, y = _sample(4000, 3, seed=1)
    r = calibrate(z * 2.5, y)  # over-confident by a known factor
    assert r["before"]["ece"] > 0.05 and r["after_cross_fit"]["ece"] < 0.03
    assert r["after_cross_fit"]["nll"] < r["before"]["nll"]
    assert r["fit_split"] == "validation" and r["n"] == 4000 and r["n_fold"] == 2000
    assert set(r["candidates"]) == {"none (raw softmax)", "temperature", "degree 2", "degree 2, top score"}
    cal = Calibration(r["temperature"], tuple(r["temperature_poly"]))
    assert np.array_equal(cal.probs(z * 2.5).argmax(1), z.argmax(1))
    held, fold, fits = cross_fit_probs(z * 2.5, y)
    assert len(fits) == 2 and all(f.temperature == pytest.approx(2.5, rel=0.15) for f in fits)
    assert held.shape == z.shape and np.allclose(held.sum(1), 1)
    # the floors: a perfectly calibrated model's ECE on one half and on all faces; this one is near them
    assert 0 < r["ece_noise_floor"] < r["ece_noise_floor_fold"] < 0.05
    assert r["after_cross_fit"]["ece"] < 2 * r["ece_noise_floor_fold"]


def test_cross_fitted_numbers_measure_each_half_on_its_own() -> None:
    """Not the pooled out-of-fold ECE: pooling lets each half's fit mirror the other half's labels."""
    z, y = _sample(3000, 3, seed=4)
    r = calibrate(z * 2.0, y, seeds=2)
    best = {v: k for k, v in CANDIDATES.items()}[
        next(k for k, c in r["candidates"].items() if c == r["after_cross_fit"])]
    halves = []
    for s in range(2):
        held, fold, _ = cross_fit_probs(z * 2.0, y, seed=s, degree=best[0], objective=best[1])
        halves += [ece(held[fold == k], y[fold == k]) for k in (0, 1)]
    assert r["after_cross_fit"]["ece"] == pytest.approx(np.mean(halves), abs=1e-5)


def test_top_score_objective_calibrates_the_top_score() -> None:
    """Fitted on the top score alone: the top-label ECE drops, the argmax stays."""
    z, y = _sample(6000, 7, seed=5)
    s = torch.softmax(torch.tensor(z), 1).max(1).values.numpy()[:, None]
    distorted = z * (0.5 + 2.5 * s)
    top = fit_calibration(distorted, y, degree=2, objective="top")
    raw = torch.softmax(torch.tensor(distorted), 1).numpy()
    assert ece(top.probs(distorted), y) < 0.5 * ece(raw, y)
    assert np.array_equal(top.probs(distorted).argmax(1), distorted.argmax(1))
    with pytest.raises(ValueError, match="objective"):
        fit_calibration(distorted, y, objective="brier")


def test_score_dependent_temperature_keeps_the_argmax_and_fits_a_shape() -> None:
    """Confident faces over-confident, unsure ones under-confident: one T cannot fix both, a polynomial can."""
    z, y = _sample(8000, 3, seed=2)
    s = torch.softmax(torch.tensor(z), 1).max(1).values.numpy()[:, None]
    distorted = z * (0.6 + 2.0 * s)  # each face its own factor, growing with its score
    plain = fit_calibration(distorted, y, degree=0)
    poly = fit_calibration(distorted, y, degree=2)
    assert poly.temperature_poly and nll(poly.probs(distorted), y) < nll(plain.probs(distorted), y)
    assert np.array_equal(poly.probs(distorted).argmax(1), distorted.argmax(1))


def test_inference_function_equals_the_fit() -> None:
    z, y = _sample(500, 7, seed=3)
    cal = fit_calibration(z * 2, y, degree=2)
    got = calibrated_probs(torch.tensor(z * 2, dtype=torch.float32), cal).numpy()
    assert np.allclose(got, cal.probs(z * 2), atol=1e-5)
    assert np.allclose(calibrated_probs(torch.tensor(z), Calibration(2.0)).numpy(),
                       torch.softmax(torch.tensor(z) / 2, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_agree_with_torchmetrics_and_hand(seed: int) -> None:
    tm = pytest.importorskip("torchmetrics.functional.classification")
    z, y = _sample(3000, 7, seed)
    p = torch.softmax(torch.tensor(z * 1.7), 1)
    ref = tm.multiclass_calibration_error(p.float(), torch.tensor(y), 7, n_bins=15, norm="l1").item()
    assert ece(p, y) == pytest.approx(ref, abs=1e-6)
    assert nll(p, y) == pytest.approx(torch.nn.functional.nll_loss(p.log(), torch.tensor(y)).item(), rel=1e-9)
    pn = p.numpy()
    by_hand = np.mean(1 - 2 * pn[np.arange(len(y)), y] + (pn**2).sum(1))
    assert brier(p, y) == pytest.approx(by_hand, rel=1e-9)
    c = calibration(p, y)
    assert c["ece"] == ece(p, y) and c["ece_bins"] == 15 and 0 < c["mean_confidence"] <= 1


def test_ece_of_a_hand_made_case() -> None:
    # two faces at 0.9 (one right), two at 0.6 (both right): |0.5 − 0.9|·½ + |1 − 0.6|·½ = 0.4
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    assert ece(p, y) == pytest.approx(0.4)
    r = reliability(p, y)
    assert sum(r["count"]) == 4 and r["count"][13] == 2 and r["count"][8] == 2  # (13/15, 14/15] and (8/15, 9/15]
    assert selective(p, y, 0.7) == {"min_score": 0.7, "coverage": 0.5, "kept": 2, "accuracy_kept": 0.5}
    cov = coverage_curve(p, y, points=5)
    assert cov["coverage"] == [0.25, 0.5, 0.75, 1.0] and cov["accuracy"][-1] == 0.75


@pytest.mark.parametrize("name", sorted(bundled_models()))
def test_bundled_models_are_calibrated_on_every_path(name: str) -> None:
    """The stored calibration changes the scores, not the labels, identically in torch and in ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    from ferkit import Recognizer

    meta = read_meta(bundled_models()[name])
    cal = meta.metrics["calibration"]
    assert cal["fit_split"].startswith("validation")  # "validation (FER+ majority)" for models trained on votes
    # the raw softmax is kept only when it measured best (then the stored calibration is the identity)
    identity = cal["method"].startswith("none")
    assert identity == (meta.temperature == 1.0 and not meta.temperature_poly)
    best_ece = min(c["ece"] for c in cal["candidates"].values())
    assert identity == (best_ece == cal["candidates"]["none (raw softmax)"]["ece"])
    s = meta.input_size
    faces = np.random.default_rng(0).integers(0, 256, (64, s, s), dtype=np.uint8)
    p_onnx = Recognizer(model=name, backend="onnx").classify(faces)
    p_torch = Recognizer(model=name, backend="torch").classify(faces)
    assert np.allclose(p_onnx, p_torch, atol=1e-4)
    net, _ = load_model(name)
    from ferkit.preprocess import Preprocess

    with torch.inference_mode():
        raw = torch.softmax(net(torch.from_numpy(Preprocess.of(meta).numpy(faces))), 1).numpy()
    assert np.array_equal(raw.argmax(1), p_onnx.argmax(1)) and identity == np.allclose(raw, p_onnx, atol=1e-3)
    uncal = dataclasses.replace(meta, temperature=1.0, temperature_poly=())
    assert np.allclose(calibrated_probs(torch.log(torch.tensor(raw)), uncal).numpy(), raw, atol=1e-5)


# -- "uncertain" below min_score: API, CLI, server, evaluate ----------------------------------------------------



def _photos() -> list:
    return sorted((WILD / "sad").glob("*.jpg"))[:12]


@needs_wild
def test_min_score_labels_unsure_faces_uncertain_and_keeps_scores() -> None:
    from ferkit import Recognizer
    from ferkit.errors import ConfigError

    plain, strict = Recognizer("fer3"), Recognizer("fer3", min_score=0.9)
    seen = set()
    for f in _photos():
        a, b = plain.predict(str(f)).faces[0], strict.predict(str(f)).faces[0]
        assert a.scores == b.scores and a.score == b.score and a.box == b.box  # scores intact
        assert b.label == ("uncertain" if a.score < 0.9 else a.label)
        seen.add(b.label == "uncertain")
    assert seen == {True, False}, "the sample should hold both sure and unsure faces"
    with pytest.raises(ConfigError, match="min_score"):
        Recognizer("fer3", min_score=1.5)


@needs_wild
def test_predict_cli_min_score(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from ferkit.cli import main

    files = [str(f) for f in _photos()]
    assert main(["predict", *files, "--format", "json", "--min-score", "0.9", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    faces = [r["faces"][0] for r in rows]
    assert all((f["label"] == "uncertain") == (f["score"] < 0.9) for f in faces)
    assert any(f["label"] == "uncertain" for f in faces) and all(len(f["scores"]) == 3 for f in faces)


@needs_wild
def test_server_min_score_query() -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ferkit.serve.app import create_app

    with TestClient(create_app(model="fer3", max_concurrency=1)) as c:
        for f in _photos()[:6]:
            data = f.read_bytes()
            plain = c.post("/v1/predict", content=data, headers={"content-type": "image/jpeg"}).json()
            strict = c.post("/v1/predict?min_score=0.99", content=data, headers={"content-type": "image/jpeg"}).json()
            a, b = plain["faces"][0], strict["faces"][0]
            assert b["scores"] == a["scores"] and (b["label"] == "uncertain") == (a["score"] < 0.99)
            assert a["label"] != "uncertain"
        bad = c.post("/v1/predict?min_score=2", content=data, headers={"content-type": "image/jpeg"})
        assert bad.status_code == 422


@needs_wild
def test_evaluate_min_score_and_calibration_report(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    import json

    from ferkit.cli import main

    val = VALIDATION
    assert main(["evaluate", "--model", "fer3", "--data", str(val), "--labels", str(FER_DIR / "ferplus"), "--json",
                 "--min-score", "0.7", "--out", str(tmp_path / "r")]) == 0
    m = json.loads(capsys.readouterr().out)
    assert {"ece", "nll", "brier", "selective"} <= set(m) and m["ece_bins"] == 15
    sel = m["selective"]
    card = read_meta(bundled_models()["fer3"]).metrics["calibration"]
    # fer3 is calibrated against the FER+ majority: the card's in-sample ECE is the one evaluate measures on the votes
    assert m["ferplus"]["ece"] == pytest.approx(card["after_in_sample"]["ece"], abs=2e-4)  # the card's numbers are true
    assert m["ece"] > m["ferplus"]["ece"]  # against the folder labels it is calibrated to people, not to them
    assert 0.5 < sel["coverage"] < 0.9 and sel["accuracy_kept"] > m["accuracy"]
    for png in ("confusion_matrix.png", "reliability.png", "coverage.png"):
        assert (tmp_path / "r" / png).read_bytes()[:4] == b"\x89PNG"
    from ferkit.metrics import format_table

    table = format_table(m)  # what the command prints without --json
    assert "ECE" in table and "min-score 0.7: coverage" in table
    assert main(["evaluate", "--model", "fer3", "--data", str(val), "--min-score", "7"]) == 2
