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


#: File in the run directory holding the stored views and their soft labels (``distill_views``).
VIEWS_FILE = "teacher_views.safetensors"
#: Faces augmented and labelled per batch while making the stored views.
VIEW_BATCH = 512


class StoredViews:
    """The teachers' soft labels for a fixed set of augmented views of every training image, computed once.

    ``distill_views = K`` draws K augmented copies of each training image (the run's own augmentation, seeded by the
    run's seed), asks the teachers once per copy and keeps both: K×N uint8 faces and K×N×C float16 log-probabilities.
    Every training step then picks one stored view per image, so a long, patient distillation costs the student's
    steps only. The views are saved in the run directory under a key of everything they depend on (teachers'
    weights, augmentation, seed, temperature, the training images); a resumed or repeated run with the same key
    loads them instead of asking the teachers again. View ``v`` depends on its index, not on K, so a run that asks
    for more views than are stored keeps the stored ones and labels only the new ones (``build(..., base=stored)``),
    and one that asks for fewer uses the first K.
    """

    def __init__(self, images: torch.Tensor, logp: torch.Tensor, key: str) -> None:
        self.images, self.logp, self.key = images, logp, key

    @property
    def views(self) -> int:
        return int(self.images.shape[0])

    def batch(self, j: torch.Tensor, generator: torch.Generator,
              flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One stored view per index in ``j`` (drawn from ``generator``): faces in [0, 1], teachers' log-probs.
        ``flip``: each face is mirrored with probability 1/2 (its teachers' labels unchanged)."""
        v = torch.randint(self.views, (len(j),), generator=generator, device=generator.device).to(j.device)
        x01 = self.images[v, j].float().div_(255.0).unsqueeze(1)
        if flip:
            m = (torch.rand(len(j), generator=generator, device=generator.device) < 0.5).to(j.device)
            x01 = torch.where(m[:, None, None, None], x01.flip(-1), x01)
        return x01, self.logp[v, j].float()

    @staticmethod
    def make_key(teachers: Teachers, images: torch.Tensor, cfg) -> str:  # noqa: ANN001 - TrainConfig
        import hashlib
        import json

        h = hashlib.sha256()
        for net in teachers.nets:
            for name, t in net.state_dict().items():
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(images.cpu().contiguous().numpy().tobytes())
        # not distill_views: view v is the same whatever the number of views, so a stored set can grow
        fields = ("distill_temp", "seed", "input_size", "augment", "rotate", "scale", "shift", "flip",
                  "erase", "jitter", "classes")
        h.update(json.dumps({f: getattr(cfg, f) for f in fields}, sort_keys=True).encode())
        return h.hexdigest()

    @classmethod
    @torch.no_grad()
    def build(cls, teachers: Teachers, images: torch.Tensor, augment, cfg, *, autocast=None,  # noqa: ANN001
              progress: bool = True, key: str | None = None, base: StoredViews | None = None) -> StoredViews:
        """Augment every image ``cfg.distill_views`` times and label each view with the teachers (at ``autocast``).

        The views depend only on the images, the augmentation settings, the seed and their index (fixed batches of
        ``VIEW_BATCH`` draw the random numbers), so the same run makes the same views. ``base``: views already made
        under the same key; they are kept and only views ``base.views .. K-1`` are made.
        """
        import contextlib

        n, k = len(images), cfg.distill_views
        key = key or cls.make_key(teachers, images, cfg)  # the caller may have computed it to look for stored ones
        start = 0 if base is None else min(base.views, k)
        out = torch.empty((k, n, cfg.input_size, cfg.input_size), dtype=torch.uint8, device=images.device)
        logp = torch.empty((k, n, len(teachers.index[0])), dtype=torch.float16, device=images.device)
        if start:
            if base.key != key or base.images.shape[1:] != out.shape[1:] or base.logp.shape[1:] != logp.shape[1:]:
                raise ValueError("stored views made under other settings cannot be extended")
            out[:start], logp[:start] = base.images[:start], base.logp[:start]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=(k - start) * n, desc="teacher soft labels", unit="face", leave=False,
                       dynamic_ncols=True)
        for v in range(start, k):
            g = torch.Generator(device=images.device).manual_seed(cfg.seed * 15_485_863 + v)
            for b in range(0, n, VIEW_BATCH):
                x01 = augment.unit(images[b : b + VIEW_BATCH], generator=g)
                q = x01.mul(255.0).round_().clamp_(0, 255)  # the student reads the stored uint8 view: label that one
                out[v, b : b + len(q)] = q[:, 0].to(torch.uint8)
                with autocast() if autocast is not None else contextlib.nullcontext():
                    logp[v, b : b + len(q)] = teachers.logits(q / 255.0, cfg.distill_temp).float().half()
                if bar is not None:
                    bar.update(len(q))
        if bar is not None:
            bar.close()
        return cls(out, logp, key)

    def save(self, path) -> None:  # noqa: ANN001 - str | Path
        from safetensors.torch import save_file

        from ferkit.fsutil import atomic_path

        with atomic_path(path) as tmp:
            save_file({"images": self.images.cpu().contiguous(), "logp": self.logp.cpu().contiguous()}, str(tmp),
                      metadata={"key": self.key, "format": "ferkit-teacher-views-1"})

    @classmethod
    def load(cls, path, key: str, device: torch.device | str = "cpu",  # noqa: ANN001 - str | Path
             views: int | None = None) -> StoredViews | None:
        """The views stored at ``path`` if they were made under ``key`` (the first ``views`` of them when more are
        stored; all of them, perhaps fewer, otherwise); None if absent, stale or unreadable."""
        from pathlib import Path

        from safetensors import SafetensorError, safe_open

        if not Path(path).is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                sl = f.get_slice("images")
                k = sl.get_shape()[0] if views is None else min(views, sl.get_shape()[0])
                return cls(sl[:k], f.get_slice("logp")[:k], key)
        except (SafetensorError, OSError, KeyError):
            return None
