"""Temperature scaling (Guo et al. 2017) and a score-dependent temperature: probabilities = softmax(logits / T).

Dividing every logit by the same positive T never changes the argmax, so accuracy is exactly unchanged; T > 1
softens over-confident scores, T < 1 sharpens under-confident ones. The fitted T travels in the model file
(``ModelMeta.temperature``, ``temperature_poly``) and the Recognizer, the server and the exported ONNX graph apply it.

Honest numbers: a calibration fitted on a split and measured on the same split looks better than it is.
:func:`calibrate` therefore reports *cross-fitted* numbers: fitted on one half of the split and measured on the
other half alone, and vice versa. Each half is measured on its own: pooling the two out-of-fold halves before
measuring lets each half's fit mirror the other's labels, and for a flexible calibration that pooled ECE comes out
close to the in-sample one (fer7, third session: 0.011 pooled against 0.023 measured per half). The stored T is the
one fitted on the whole split.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ferkit.metrics import ECE_BINS, calibration, ece_noise_floor
from ferkit.modelfile import TEMPERATURE_RANGE

log = logging.getLogger(__name__)

#: Polynomial degree of the score-dependent temperature tried next to the plain one (see :func:`fit_calibration`).
POLY_DEGREE = 2
#: The candidates :func:`calibrate` measures: (polynomial degree, fit objective) and the name each is reported by.
CANDIDATES: dict[tuple[int, str], str] = {
    (-1, "none"): "none (raw softmax)",
    (0, "nll"): "temperature",
    (POLY_DEGREE, "nll"): f"degree {POLY_DEGREE}",
    (POLY_DEGREE, "top"): f"degree {POLY_DEGREE}, top score",
}


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration, in the two ``ModelMeta`` fields that carry it."""

    temperature: float = 1.0
    temperature_poly: tuple[float, ...] = ()

    def probs(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities (float64 numpy) through the same function inference uses."""
        z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
        return _probs(z, torch.tensor([math.log(self.temperature), *self.temperature_poly], dtype=torch.float64)
                      ).numpy()


def _probs(z: torch.Tensor, w: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """softmax(z / T), log T = w0 + w1·s + w2·s² + … with s the top softmax probability of z (float64 mirror of
    ``modelfile.calibrated_probs``, differentiable in ``w``; the fit runs unclamped so no gradient is cut off)."""
    log_t = w[0].expand(len(z), 1)
    if len(w) > 1:
        s = z.softmax(1).amax(1, keepdim=True)
        log_t = log_t + sum(c * s ** (k + 1) for k, c in enumerate(w[1:]))
    if clamp:
        lo, hi = (math.log(v) for v in TEMPERATURE_RANGE)
        log_t = log_t.clamp(lo, hi)
    return (z / log_t.exp()).softmax(1)


def fit_calibration(logits: Any, labels: Any, *, degree: int = 0, objective: str = "nll", max_iter: int = 200,
                    ) -> Calibration:
    """The calibration minimising ``objective`` on ``labels``: a temperature (``degree`` 0) or a score-dependent one.

    Degree 0 is temperature scaling (Guo et al. 2017): the NLL is convex in 1/T, L-BFGS on log T finds its minimum.
    Degree d > 0 lets log T be a degree-d polynomial of the face's uncalibrated top score, so confident and unsure
    faces can be scaled differently; every face still gets one positive T, which keeps its argmax.

    ``objective`` "nll" is the NLL of the true class over all classes; "top" is the binary NLL of the top score as
    the probability that the predicted label is right, the quantity a top-label ECE and a ``min_score`` act on.
    """
    if objective == "none":  # the identity: the raw softmax, kept when no fit measures better
        return Calibration()
    if objective not in ("nll", "top"):
        raise ValueError(f"calibration objective {objective!r} is not 'nll' or 'top'")
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y) == 0:
        return Calibration()
    right = (z.argmax(1) == y).double()
    # Start a polynomial at the plain temperature's optimum: from there the objective only improves.
    w0 = [math.log(fit_calibration(z, y, degree=0, objective=objective).temperature)] if degree else [0.0]
    w = torch.tensor(w0 + [0.0] * degree, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        p = _probs(z, w, clamp=False)
        if objective == "nll":
            loss = F.nll_loss(p.clamp_min(1e-300).log(), y)
        else:
            loss = F.binary_cross_entropy(p.amax(1).clamp(1e-12, 1 - 1e-12), right)
        loss.backward()
        return loss

    opt.step(closure)
    c = [float(v) for v in w.detach()]
    if not all(math.isfinite(v) for v in c):
        log.warning("calibration fit diverged; keeping T = 1")
        return Calibration()
    t = math.exp(c[0])
    if degree == 0:  # with a polynomial only the resulting per-face T is bounded (at inference), not its base
        t = min(max(t, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])
    return Calibration(float(f"{t:.6g}"), tuple(round(v, 6) for v in c[1:]))


def fit_temperature(logits: Any, labels: Any) -> float:
    """The plain temperature T minimising the NLL of softmax(logits / T)."""
    return fit_calibration(logits, labels, degree=0).temperature


def scaled_probs(logits: Any, temperature: float) -> np.ndarray:
    """softmax(logits / T) as float64 numpy."""
    return Calibration(temperature).probs(logits)


def _folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A seeded, class-stratified fold number per sample."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        fold[rng.permutation(idx)] = np.arange(len(idx)) % folds
    return fold


def cross_fit_probs(logits: Any, labels: Any, *, folds: int = 2, seed: int = 0, degree: int = 0,
                    objective: str = "nll") -> tuple[np.ndarray, np.ndarray, list[Calibration]]:
    """Out-of-fold calibrated probabilities: each fold is scaled by the calibration fitted on the other folds.

    Returns the probabilities, each sample's fold number and the fold's calibrations."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    fold = _folds(y, folds, seed)
    out = np.empty_like(z)
    fits = []
    for k in range(folds):
        cal = fit_calibration(z[fold != k], y[fold != k], degree=degree, objective=objective)
        fits.append(cal)
        out[fold == k] = cal.probs(z[fold == k])
    return out, fold, fits


def _per_fold(probs: np.ndarray, y: np.ndarray, fold: np.ndarray, bins: int) -> list[dict[str, float]]:
    """Each fold measured on its own (see the module's note on pooling)."""
    return [calibration(probs[fold == k], y[fold == k], bins) for k in np.unique(fold)]


def _cross_fitted(z: np.ndarray, y: np.ndarray, cand: tuple[int, str], *, folds: int, seeds: int, bins: int,
                  ) -> tuple[dict[str, float], float]:
    """One candidate's cross-fitted calibration (mean over halves and fold draws) and the per-half noise floor."""
    runs, floors = [], []
    for s in range(seeds):
        probs, fold, _ = cross_fit_probs(z, y, folds=folds, seed=s, degree=cand[0], objective=cand[1])
        runs += _per_fold(probs, y, fold, bins)
        floors.append(np.mean([ece_noise_floor(probs[fold == k], draws=50, seed=s) for k in range(folds)]))
    return ({k: round(float(np.mean([r[k] for r in runs])), 5) for k in ("ece", "nll", "brier", "mean_confidence")},
            round(float(np.mean(floors)), 4))


def calibrate(logits: Any, labels: Any, *, split: str = "validation", folds: int = 2, seeds: int = 3,
              bins: int = ECE_BINS) -> dict[str, Any]:
    """Fit the calibration on all of ``logits``/``labels``; report calibration before and after.

    Each candidate of :data:`CANDIDATES` is measured by 2-fold cross-fitting repeated over ``seeds`` fold draws: fit
    on one half, measure on the other half alone; the mean over halves and draws is its score. The one with the
    lower cross-fitted ECE is kept and refitted on the whole split. Too few faces (under 200) keep the plain
    temperature. ``ece_noise_floor`` / ``ece_noise_floor_fold``: the ECE a perfectly calibrated model would show on
    all ``n`` faces / on one half, for scale.

    Returns:
        ``{"method", "temperature", "temperature_poly", "fit_split", "n", "n_fold", "bins", "before" (the raw
        softmax on the same halves), "before_all" (on all faces), "after_cross_fit", "after_in_sample",
        "candidates", "cross_fit", "ece_noise_floor", "ece_noise_floor_fold"}``; quote "after_cross_fit": the fit
        never saw those faces.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)

    def rounded(d: dict[str, float]) -> dict[str, float]:
        return {k: round(float(v), 5) for k, v in d.items() if k != "ece_bins"}

    raw = (-1, "none")
    choices = list(CANDIDATES) if len(y) >= 200 else [raw, (0, "nll")]
    measured = {c: _cross_fitted(z, y, c, folds=folds, seeds=seeds, bins=bins) for c in choices}
    candidates = {c: m for c, (m, _) in measured.items()}
    best = min(choices if len(y) >= 200 else [(0, "nll")], key=lambda c: (candidates[c]["ece"], c))
    cal = fit_calibration(z, y, degree=best[0], objective=best[1])
    method = {-1: "none (the raw softmax measured best)", 0: "temperature"}.get(
        best[0], f"score-dependent temperature (degree {best[0]})")
    if best[1] == "top":
        method += ", fitted on the top score"
    return {
        "method": method,
        "temperature": cal.temperature,
        "temperature_poly": list(cal.temperature_poly),
        "fit_split": split,
        "bins": bins,
        "n": int(len(y)),
        "n_fold": int(len(y) // folds),
        "before": candidates[raw],
        "before_all": rounded(calibration(scaled_probs(z, 1.0), y, bins)),
        "after_cross_fit": candidates[best],
        "after_in_sample": rounded(calibration(cal.probs(z), y, bins)),
        "candidates": {CANDIDATES[c]: v for c, v in candidates.items()},
        "cross_fit": f"{folds}-fold class-stratified, each half measured on its own, mean of {seeds} fold draws",
        "ece_noise_floor": round(ece_noise_floor(cal.probs(z)), 4),
        "ece_noise_floor_fold": measured[best][1],
    }
