"""Several trained networks as one model: the average of their class probabilities.

An ensemble is stored like any other ferkit model file: its architecture string names the members,
``ensemble(fastcnn,fastcnn_wide)``, and its weights are the members' under ``members.<i>.``. It therefore loads,
exports to ONNX and serves with no special case. Its output is the *log* of the averaged probabilities, so a softmax
downstream (the Recognizer, the ONNX graph) gives back exactly the average.
"""

from __future__ import annotations

import torch
import torch.nn as nn

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


class FlipTTA(nn.Module):
    """A network with horizontal-flip test-time augmentation built in: the average of its softmax on the face and on
    the mirrored face, as log-probabilities (valid logits), like :class:`Ensemble`.

    Its architecture string is ``flip(<arch>)`` and its weights are the network's under ``net.``, so the TTA travels
    in the model file: the Recognizer, the server, evaluation and the exported ONNX graph all apply it, and its speed
    counts it (two passes per face).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One call on the face and its mirror stacked: the network is traced once (torch.fx's conv+BN fusion would
        # corrupt a module called twice) and runs one batch of 2N instead of two of N.
        n = x.shape[0]
        p = torch.softmax(self.net(torch.cat([x, torch.flip(x, dims=[3])])).float(), dim=1)
        return torch.log(((p[:n] + p[n:]) / 2).clamp_min(1e-12))


def flip_inner(arch: str) -> str | None:
    """The wrapped architecture of ``flip(<arch>)``, or None if ``arch`` is not one."""
    if not (arch.startswith(FLIP_PREFIX) and arch.endswith(")")):
        return None
    inner = arch[len(FLIP_PREFIX) : -1].strip()
    if not inner:
        raise ValueError(f"'{arch}': no architecture inside flip()")
    return inner
