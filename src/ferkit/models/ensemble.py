"""Several trained networks as one model: the average of their class probabilities.

An ensemble is stored like any other ferkit model file: its architecture string names the members,
``ensemble(fastcnn,fastcnn_wide)``, and its weights are the members' under ``members.<i>.``. It therefore loads,
exports to ONNX and serves with no special case. Its output is the *log* of the averaged probabilities, so a softmax
downstream (the Recognizer, the ONNX graph) gives back exactly the average.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ENSEMBLE_PREFIX = "ensemble("
FLIP_PREFIX = "flip("


class Ensemble(nn.Module):
    """Average of the members' softmax outputs, returned as log-probabilities (valid logits)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
        return torch.log(p.clamp_min(1e-12))


def ensemble_arch(archs: list[str]) -> str:
    """The architecture string of an ensemble of ``archs`` (nested ensembles are flattened)."""
    flat: list[str] = []
    for a in archs:
        flat += ensemble_members(a) or [a]
    return ENSEMBLE_PREFIX + ",".join(flat) + ")"


def ensemble_members(arch: str) -> list[str] | None:
    """The member architectures of an ensemble string, or None if ``arch`` is not an ensemble."""
    if not (arch.startswith(ENSEMBLE_PREFIX) and arch.endswith(")")):
        return None
    members = [m.strip() for m in arch[len(ENSEMBLE_PREFIX) : -1].split(",")]
    if not all(members):
        raise ValueError(f"'{arch}': an empty member name")
    return members


# Views a model may carry as built-in test-time augmentation (``views[a+b+...](<arch>)``): the face, its mirror, and
# the centre crop of a 12.5% upscale (``evaluate --tta tencrop``'s centre crop) and its mirror.
VIEW_NAMES = ("orig", "flip", "zoom", "zoom_flip")
VIEWS_PREFIX = "views["


def upscaled(x: torch.Tensor) -> torch.Tensor:
    """A B×C×S×S batch enlarged by 12.5% (S + S//8 a side, bilinear): the source of the ten crops and the zoom view."""
    s = x.shape[-1]
    return F.interpolate(x, size=(s + s // 8, s + s // 8), mode="bilinear", align_corners=False)


def views_of(x: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
    """The named :data:`VIEW_NAMES` of a normalised B×C×S×S batch (one zoom crop serves both zoom views)."""
    s = x.shape[-1]
    d = (s // 8) // 2
    crop = upscaled(x)[..., d : d + s, d : d + s] if {"zoom", "zoom_flip"} & set(names) else None
    base = {"orig": x, "flip": x, "zoom": crop, "zoom_flip": crop}
    return [torch.flip(base[n], dims=[3]) if n.endswith("flip") else base[n] for n in names]


def view(x: torch.Tensor, name: str) -> torch.Tensor:
    """One of :data:`VIEW_NAMES` of a normalised B×C×S×S batch."""
    return views_of(x, (name,))[0]


class ViewTTA(nn.Module):
    """A network with test-time augmentation built in: the average of its softmax over ``views`` of the face, as
    log-probabilities (valid logits), like :class:`Ensemble`.

    Its architecture string is ``views[orig+zoom_flip](<arch>)`` (``flip(<arch>)`` for the face and its mirror) and
    its weights are the network's under ``net.``, so the TTA travels in the model file: the Recognizer, the server,
    evaluation and the exported ONNX graph all apply it, and its speed counts it (one pass per view and face). Inside
    an ensemble each member may carry its own views: ``ensemble(views[orig+zoom_flip](a),flip(b))``.
    """

    def __init__(self, net: nn.Module, views: tuple[str, ...] = ("orig", "flip")) -> None:
        super().__init__()
        bad = [v for v in views if v not in VIEW_NAMES]
        if not views or bad or len(set(views)) != len(views):
            raise ValueError(f"views {'+'.join(views) or '(none)'}: give distinct views from {', '.join(VIEW_NAMES)}")
        self.net = net
        self.views = tuple(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One call on all views stacked: the network is traced once (torch.fx's conv+BN fusion would corrupt a module
        # called twice) and runs one batch of k·N instead of k of N.
        k = len(self.views)
        p = torch.softmax(self.net(torch.cat(views_of(x, self.views))).float(), dim=1)
        return torch.log(p.reshape(k, -1, p.shape[1]).mean(0).clamp_min(1e-12))


class FlipTTA(ViewTTA):
    """:class:`ViewTTA` on the face and its mirror: architecture ``flip(<arch>)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net, ("orig", "flip"))


def tta_arch(views: tuple[str, ...], inner: str) -> str:
    """The architecture string of ``inner`` with ``views`` built in (``flip(...)`` for the face and its mirror)."""
    if tuple(views) == ("orig", "flip"):
        return f"{FLIP_PREFIX}{inner})"
    return f"{VIEWS_PREFIX}{'+'.join(views)}]({inner})"


def tta_wrapped(arch: str) -> tuple[tuple[str, ...], str] | None:
    """(views, inner architecture) of ``flip(<arch>)`` or ``views[a+b](<arch>)``; None for a network without TTA."""
    if arch.startswith(FLIP_PREFIX) and arch.endswith(")"):
        views, inner = ("orig", "flip"), arch[len(FLIP_PREFIX) : -1].strip()
    elif arch.startswith(VIEWS_PREFIX) and "](" in arch and arch.endswith(")"):
        head, _, rest = arch[len(VIEWS_PREFIX) :].partition("](")
        views, inner = tuple(v.strip() for v in head.split("+")), rest[:-1].strip()
    else:
        return None
    if not inner:
        raise ValueError(f"'{arch}': no architecture inside {arch.split('(')[0]}()")
    return views, inner


def tta_inner(arch: str) -> str | None:
    """The wrapped architecture of a model with built-in TTA (``flip(<arch>)``, ``views[...](<arch>)``), or None."""
    wrapped = tta_wrapped(arch)
    return wrapped[1] if wrapped else None
