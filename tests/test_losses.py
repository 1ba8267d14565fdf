"""The training maths against values computed by hand: distillation loss (T², alpha), hard-label loss with
unlabelled images, and the per-rank sharding of an epoch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from ferkit.train.distill import distill_loss
from ferkit.train.loop import IGNORE, hard_loss, shard


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _by_hand(s: np.ndarray, teacher_logp: np.ndarray, hard: float, alpha: float, t: float) -> float:
    """alpha·T²·mean_i Σ_c p_t (log p_t − log softmax(s/T)) + (1 − alpha)·hard."""
    pt = np.exp(teacher_logp)
    kl = (pt * (teacher_logp - _log_softmax(s / t))).sum(1).mean()
    return alpha * t * t * kl + (1 - alpha) * hard


@pytest.mark.parametrize(("alpha", "t"), [(0.7, 4.0), (1.0, 3.0), (0.25, 2.0), (0.0, 5.0), (0.5, 1.0)])
def test_distill_loss_matches_hand_computation(alpha: float, t: float) -> None:
    rng = np.random.default_rng(int(alpha * 10 + t))
    s = rng.normal(size=(6, 3)) * 2
    teacher_logp = _log_softmax(rng.normal(size=(6, 3)) * 3 / t)
    hard = 0.8125
    got = distill_loss(torch.tensor(s), torch.tensor(teacher_logp), torch.tensor(hard), alpha=alpha, temperature=t)
    assert got.item() == pytest.approx(_by_hand(s, teacher_logp, hard, alpha, t), rel=1e-6)


def test_distill_loss_scales_the_soft_term_by_t_squared() -> None:
    """Same student, same (tempered) teacher distribution: the soft term at T=3 is exactly 9× its KL."""
    rng = np.random.default_rng(0)
    s = torch.tensor(rng.normal(size=(5, 7)))
    teacher_logp = torch.log_softmax(torch.tensor(rng.normal(size=(5, 7))), 1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 3.0, 1), teacher_logp, log_target=True,
                                    reduction="batchmean").item()
    soft_only = distill_loss(s, teacher_logp, torch.tensor(100.0), alpha=1.0, temperature=3.0).item()
    assert soft_only == pytest.approx(9.0 * kl, rel=1e-6) and kl > 0  # (the student is taken to float32)
    # alpha = 0 is the hard loss alone, whatever the teacher says
    assert distill_loss(s, teacher_logp, torch.tensor(0.5), alpha=0.0, temperature=3.0).item() == pytest.approx(0.5)


def test_distill_loss_is_zero_soft_term_when_student_equals_teacher() -> None:
    z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    t = 4.0
    teacher_logp = torch.log_softmax(z / t, 1)
    assert distill_loss(z, teacher_logp, torch.tensor(1.0), alpha=0.6, temperature=t).item() == pytest.approx(0.4)


def test_hard_loss_uses_only_labelled_images() -> None:
    ce = nn.CrossEntropyLoss()
    out = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, 1.0, 1.0]], requires_grad=True)
    y_all = torch.tensor([0, 1, 2, 0])
    assert hard_loss(ce, out, y_all).item() == pytest.approx(ce(out, y_all).item())
    y = torch.tensor([0, IGNORE, 2, IGNORE])
    # the mean over the two labelled rows only, not over four
    by_hand = -(torch.log_softmax(out, 1)[0, 0] + torch.log_softmax(out, 1)[2, 2]).item() / 2
    assert hard_loss(ce, out, y).item() == pytest.approx(by_hand)
    none = hard_loss(ce, out, torch.full((4,), IGNORE))
    assert none.item() == 0.0 and not math.isnan(none.item())
    none.backward()  # still part of the graph: a batch of only unlabelled images does not break backward
    assert out.grad is not None and torch.count_nonzero(out.grad) == 0


@pytest.mark.parametrize(("n", "world"), [(100, 1), (100, 2), (101, 4), (7, 3)])
def test_shard_is_a_disjoint_equal_split_of_one_permutation(n: int, world: int) -> None:
    parts = [shard(n, epoch=3, seed=11, rank=r, world=world) for r in range(world)]
    per = n // world
    assert all(len(p) == per for p in parts)
    joined = torch.cat(parts)
    assert len(torch.unique(joined)) == per * world  # no image on two ranks
    assert int(joined.min()) >= 0 and int(joined.max()) < n
    if world == 1:
        assert sorted(joined.tolist()) == list(range(n))  # one rank sees every image once
    # every rank computes the same permutation: rank r's shard is the r-th slice of rank 0's world-1 view
    full = shard(n, epoch=3, seed=11, rank=0, world=1)
    assert torch.equal(joined, full[: per * world])


def test_shard_is_deterministic_and_changes_with_epoch_and_seed() -> None:
    a = shard(1000, epoch=0, seed=1, rank=0, world=2)
    assert torch.equal(a, shard(1000, epoch=0, seed=1, rank=0, world=2))
    assert not torch.equal(a, shard(1000, epoch=1, seed=1, rank=0, world=2))
    assert not torch.equal(a, shard(1000, epoch=0, seed=2, rank=0, world=2))
