"""Batched augmentation on the training device: whole uint8 batches in, normalised float batches out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ferkit.preprocess import Preprocess


def to_float(x: torch.Tensor, size: int, mean: float, std: float) -> torch.Tensor:
    """uint8 B×H×W (or B×1×H×W) → normalised float B×1×size×size (the contract in ``ferkit.preprocess``)."""
    return Preprocess(size, mean, std).torch(x)


def fer_augment(
    x: torch.Tensor,
    *,
    rotate: float,
    scale: float,
    shift: float,
    flip: bool,
    erase: float,
    jitter: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random affine (rotation, scale, shift, flip), brightness/contrast and random erasing on a [0,1] batch."""
    b, dev = x.shape[0], x.device

    def u(lo: float, hi: float, n: int = b) -> torch.Tensor:
        return torch.rand(n, device=dev, generator=generator) * (hi - lo) + lo

    ang = u(-rotate, rotate) * math.pi / 180
    sc = u(1 - scale, 1 + scale)
    fl = torch.where(u(0, 1) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=dev)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack(
        [
            torch.stack([cos * fl, -sin, u(-shift, shift) * 2], 1),
            torch.stack([sin * fl, cos, u(-shift, shift) * 2], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter > 0:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        c = u(1 - jitter, 1 + jitter).view(b, 1, 1, 1)
        br = u(1 - jitter, 1 + jitter).view(b, 1, 1, 1)
        x = ((x - mean) * c + mean) * br
    if erase > 0:
        h, w = x.shape[-2:]
        area = u(0.02, 0.2) * h * w
        ratio = torch.exp(u(math.log(0.3), math.log(3.3)))
        eh = (area * ratio).sqrt().clamp(max=h)
        ew = (area / ratio).sqrt().clamp(max=w)
        cy, cx = u(0, 1) * h, u(0, 1) * w
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        m = ((ys - cy.view(b, 1, 1)).abs() < eh.view(b, 1, 1) / 2) & (
            (xs - cx.view(b, 1, 1)).abs() < ew.view(b, 1, 1) / 2
        )
        m = m & (u(0, 1) < erase).view(b, 1, 1)
        fill = torch.rand(b, 1, 1, 1, device=dev, generator=generator, dtype=x.dtype)  # the generator: reproducible
        x = torch.where(m.unsqueeze(1), fill.expand_as(x), x)
    return x.clamp_(0, 1)


def seed_augment(
    x: torch.Tensor, *, jitter: float = 0.5, invert: float = 0.2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The original project's transforms on a [0,1] batch: RandomInvert(0.2) and ColorJitter(brightness, contrast)."""
    b, dev = x.shape[0], x.device
    r = torch.rand(b, 3, device=dev, generator=generator)
    x = torch.where((r[:, 0] < invert).view(b, 1, 1, 1), 1 - x, x)
    br = (1 - jitter + 2 * jitter * r[:, 1]).view(b, 1, 1, 1)
    ct = (1 - jitter + 2 * jitter * r[:, 2]).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (((x - mean) * ct + mean) * br).clamp_(0, 1)


class BatchAugment:
    """Turns a uint8 batch into a normalised, augmented float batch according to a TrainConfig."""

    def __init__(self, cfg, mean: float, std: float) -> None:  # noqa: ANN001 - TrainConfig, kept import-light
        self.cfg, self.mean, self.std = cfg, mean, std
        self.pre = Preprocess(cfg.input_size, mean, std)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.pre.normalise(self.unit(x, generator))

    def unit(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmented batch in [0, 1], before normalisation (distillation teachers normalise it their own way)."""
        c = self.cfg
        x = self.pre.unit(x)
        if c.augment == "fer":
            x = fer_augment(
                x,
                rotate=c.rotate,
                scale=c.scale,
                shift=c.shift,
                flip=c.flip,
                erase=c.erase,
                jitter=c.jitter,
                generator=generator,
            )
        elif c.augment == "seed":
            x = seed_augment(x, jitter=c.jitter, generator=generator)
        return x
