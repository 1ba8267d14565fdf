"""THE pixels → model input contract, driven by a model's metadata (``ModelMeta``).

A model sees ``(pixels / 255 - mean) / std`` on a ``size``×``size`` gray crop, repeated over ``in_chans`` channels.
Training, evaluation, distillation teachers, export and the Recognizer all call this module, so a new input size or
normalisation is one edit here. The numpy path needs no torch (the lean inference install); the torch paths work
on whole batches on the training device.

    >>> pre = Preprocess.of(meta)
    >>> x = pre.numpy(crops)          # uint8 N×S×S → float32 N×C×S×S (Recognizer, ONNX export, parity checks)
    >>> x = pre.torch(batch_uint8)    # uint8 B×H×W → normalised float B×C×S×S (evaluation)
    >>> x = pre.normalise(x01)        # [0, 1] B×1×H×W → normalised (training after augmentation, teachers)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# The normalisation every ferkit-trained model uses: gray faces have mean ≈ 0.5 and std ≈ 0.25 in [0, 1].
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25


@dataclass(frozen=True)
class Preprocess:
    """How pixels become a model's input: crop size, normalisation and channel count."""

    size: int
    mean: float = DEFAULT_MEAN
    std: float = DEFAULT_STD
    in_chans: int = 1

    @classmethod
    def of(cls, meta: Any) -> Preprocess:
        """The contract stored in a ``ModelMeta`` (or anything with ``input_size``, ``mean``, ``std``, ``in_chans``)."""
        return cls(int(meta.input_size), float(meta.mean), float(meta.std), int(getattr(meta, "in_chans", 1)))

    # -- numpy (inference, no torch) --------------------------------------------------------------------------------

    def numpy(self, faces: np.ndarray) -> np.ndarray:
        """uint8 N×S×S gray crops at this size → contiguous float32 N×C×S×S model input."""
        faces = np.asarray(faces)
        if faces.ndim == 2:
            faces = faces[None]
        if faces.ndim != 3 or faces.shape[1:] != (self.size, self.size):
            raise ValueError(f"expected N×{self.size}×{self.size} face crops, got shape {faces.shape}")
        x = faces.astype(np.float32)
        x *= np.float32(1.0 / (255.0 * self.std))  # one fused scale and shift instead of three passes
        x -= np.float32(self.mean / self.std)
        x = x[:, None]
        if self.in_chans != 1:
            x = np.repeat(x, self.in_chans, axis=1)
        return np.ascontiguousarray(x)

    # -- torch (training, evaluation, teachers) -------------------------------------------------------------------

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) B×H×W / B×1×H×W → float B×1×size×size in [0, 1]."""
        import torch.nn.functional as F

        if x.dim() == 3:
            x = x.unsqueeze(1)
        if not x.is_floating_point():
            x = x.float() / 255.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return x

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] B×1×H×W → the model's input (resized if need be, normalised, channels repeated)."""
        x = (self.unit(x01) - self.mean) / self.std
        if self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        return x

    def torch(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 B×H×W (or B×1×H×W) → the model's input."""
        return self.normalise(self.unit(x))


__all__ = ["DEFAULT_MEAN", "DEFAULT_STD", "Preprocess"]
