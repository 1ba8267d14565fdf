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
