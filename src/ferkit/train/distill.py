"""Knowledge distillation: a student learns the teachers' softened probabilities as well as the hard labels."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferkit.errors import ConfigError
from ferkit.modelfile import ModelMeta, load_model, model_specs
from ferkit.preprocess import Preprocess


class Teachers(nn.Module):
    """One or more trained ferkit models whose averaged probabilities supervise a student."""

    def __init__(self, specs: str, classes: list[str], device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.nets = nn.ModuleList()
        self.metas: list[ModelMeta] = []
        self.index: list[list[int]] = []
        for spec in model_specs(specs):
            net, meta = load_model(spec, device=str(device))
            missing = [c for c in classes if c not in meta.classes]
            if missing:
                raise ConfigError(
                    f"teacher {spec}: has no class(es) {', '.join(missing)} (it has {', '.join(meta.classes)})"
                )
            self.nets.append(net.eval().requires_grad_(False))
            self.metas.append(meta)
            self.index.append([meta.classes.index(c) for c in classes])

    @torch.no_grad()
    def logits(self, x01: torch.Tensor, temperature: float) -> torch.Tensor:
        """Log of the averaged tempered probabilities, restricted to the student's classes, for a [0,1] batch."""
        probs = 0
        for net, meta, idx in zip(self.nets, self.metas, self.index):
            z = net(Preprocess.of(meta).normalise(x01)).float()[:, idx]
            probs = probs + F.softmax(z / temperature, dim=1)
        return torch.log(probs / len(self.nets) + 1e-8)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logp: torch.Tensor,
    hard_loss: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """alpha·T²·KL(teacher ‖ student at temperature T) + (1 − alpha)·hard-label loss (Hinton et al. 2015)."""
    soft = F.kl_div(
        F.log_softmax(student_logits.float() / temperature, dim=1), teacher_logp, log_target=True, reduction="batchmean"
    )
    return alpha * temperature**2 * soft + (1 - alpha) * hard_loss
