"""Batched augmentation: shapes, value range, reproducibility with a generator, the recipes' transforms."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ferkit.config import RECIPES, TrainConfig
from ferkit.data.augment import BatchAugment, fer_augment, seed_augment, to_float

FER_KW = {"rotate": 15.0, "scale": 0.15, "shift": 0.1, "flip": True, "erase": 1.0, "jitter": 0.3}


def batch(n: int = 8, size: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=g)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("shape", "size"), [((4, 48, 48), 48), ((4, 1, 48, 48), 48), ((2, 48, 48), 64),
                                              ((3, 96, 96), 48)])
def test_to_float_shape_and_normalisation(shape: tuple[int, ...], size: int) -> None:
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    y = to_float(x, size, mean=0.5, std=0.25)
    assert y.shape == (shape[0], 1, size, size) and y.dtype == torch.float32
    assert y.min() >= -2.0 - 1e-5 and y.max() <= 2.0 + 1e-5
    if shape[-1] == size:
        assert torch.allclose(y.view(shape[0], size, size), (x.view(shape[0], size, size).float() / 255 - 0.5) / 0.25)


def test_to_float_leaves_float_input_alone() -> None:
    x = torch.full((2, 48, 48), 255.0)
    to_float(x, 48, 0.5, 0.25)
    assert (x == 255.0).all()


def test_fer_augment_shape_range_and_change() -> None:
    x = batch().unsqueeze(1).float() / 255
    y = fer_augment(x.clone(), generator=gen(0), **FER_KW)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(y, x)


def test_fer_augment_is_reproducible_with_a_generator() -> None:
    x = batch().unsqueeze(1).float() / 255
    a = fer_augment(x.clone(), generator=gen(3), **FER_KW)
    torch.rand(100)  # the global generator must not matter
    b = fer_augment(x.clone(), generator=gen(3), **FER_KW)
    c = fer_augment(x.clone(), generator=gen(4), **FER_KW)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_fer_augment_identity_and_pure_flip() -> None:
    """With every transform off the batch comes back unchanged; with only flips each image is itself or its mirror."""
    x = batch(32).unsqueeze(1).float() / 255
    off = {"rotate": 0.0, "scale": 0.0, "shift": 0.0, "flip": False, "erase": 0.0, "jitter": 0.0}
    assert torch.allclose(fer_augment(x.clone(), generator=gen(0), **off), x, atol=1e-5)
    y = fer_augment(x.clone(), generator=gen(0), **{**off, "flip": True})
    same = (y - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (y - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()  # about half each in 32


def test_fer_augment_erases_patches() -> None:
    x = torch.full((16, 1, 48, 48), 0.5)
    y = fer_augment(x.clone(), generator=gen(0), rotate=0.0, scale=0.0, shift=0.0, flip=False, erase=1.0, jitter=0.0)
    changed = (y - x).abs() > 1e-4
    frac = changed.float().mean(dim=(1, 2, 3))
    assert (frac > 0).sum() >= 12  # every image gets a patch (unless its fill happens to be 0.5)
    assert (frac < 0.5).all()  # 2–20 % of the area, clipped at the border


def test_seed_augment_range_reproducible_and_extremes() -> None:
    x = batch(16).unsqueeze(1).float() / 255
    a = seed_augment(x.clone(), generator=gen(1))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, seed_augment(x.clone(), generator=gen(1)))
    assert not torch.equal(a, seed_augment(x.clone(), generator=gen(2)))
    assert torch.allclose(seed_augment(x.clone(), jitter=0.0, invert=0.0, generator=gen(0)), x)
    assert torch.allclose(seed_augment(x.clone(), jitter=0.0, invert=1.0, generator=gen(0)), 1 - x)


def test_batch_augment_with_the_seed_recipe() -> None:
    """The seed recipe: 48×48 cache upscaled to 160, RandomInvert(0.2) and brightness/contrast jitter."""
    cfg = RECIPES["seed"]
    assert cfg.augment == "seed" and cfg.input_size == 160
    aug = BatchAugment(cfg, mean=0.5, std=0.25)
    x = batch(8)
    u = aug.unit(x, generator=gen(0))
    assert u.shape == (8, 1, 160, 160) and u.min() >= 0 and u.max() <= 1
    assert torch.equal(u, aug.unit(x, generator=gen(0)))
    n = aug(x, generator=gen(0))
    assert torch.allclose(n, (u - 0.5) / 0.25)
    # about a fifth of the images are inverted: a flat grey of 0.2 becomes 0.8 (jitter off to see it plainly)
    flat = torch.full((400, 48, 48), 51, dtype=torch.uint8)
    v = BatchAugment(dataclasses.replace(cfg, jitter=0.0), 0.5, 0.25).unit(flat, generator=gen(0))
    inverted = (v.mean(dim=(1, 2, 3)) > 0.5).float().mean().item()
    assert 0.12 < inverted < 0.28


def test_batch_augment_none_is_plain_scaling() -> None:
    cfg = TrainConfig(augment="none")
    x = batch(4)
    assert torch.equal(BatchAugment(cfg, 0.5, 0.25).unit(x), x.unsqueeze(1).float() / 255)


def test_batch_augment_fer_recipe() -> None:
    aug = BatchAugment(RECIPES["quick"], 0.5, 0.25)
    x = batch(8)
    y = aug(x, generator=gen(0))
    assert y.shape == (8, 1, 48, 48)
    assert y.min() >= -2 - 1e-5 and y.max() <= 2 + 1e-5
    assert torch.equal(y, aug(x, generator=gen(0)))
    assert x.dtype == torch.uint8  # the cache's batch is not modified
