"""The one pixels → tensor contract: numpy and torch paths agree, and training/inference use the same numbers."""

import numpy as np
import pytest
import torch

from ferkit.modelfile import ModelMeta
from ferkit.preprocess import DEFAULT_MEAN, DEFAULT_STD, Preprocess


def _faces(n: int = 5, size: int = 48) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size), dtype=np.uint8)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_numpy_and_torch_paths_agree(in_chans: int) -> None:
    meta = ModelMeta(arch="fastcnn", classes=("happy", "sad"), input_size=48, in_chans=in_chans, mean=0.4, std=0.3)
    pre = Preprocess.of(meta)
    faces = _faces()
    a = pre.numpy(faces)
    b = pre.torch(torch.as_tensor(faces)).numpy()
    assert a.shape == b.shape == (5, in_chans, 48, 48) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    # the contract itself: (pixels / 255 - mean) / std
    np.testing.assert_allclose(a[:, 0], (faces / 255.0 - 0.4) / 0.3, atol=1e-5)


def test_torch_path_resizes_and_normalise_matches_unit() -> None:
    pre = Preprocess(24, DEFAULT_MEAN, DEFAULT_STD)
    x = pre.torch(torch.as_tensor(_faces(3, 48)))
    assert x.shape == (3, 1, 24, 24)
    x01 = pre.unit(torch.as_tensor(_faces(3, 48)))
    torch.testing.assert_close(pre.normalise(x01), x)


def test_numpy_path_refuses_wrong_size() -> None:
    with pytest.raises(ValueError, match="48×48"):
        Preprocess(48).numpy(_faces(2, 40))


def test_training_augmentation_without_augment_equals_inference_input() -> None:
    """BatchAugment with augmentation off must hand the net exactly what the Recognizer hands it."""
    from ferkit.config import make_config
    from ferkit.data.augment import BatchAugment

    cfg = make_config("quick", {"augment": "none"})
    faces = _faces()
    train_x = BatchAugment(cfg, DEFAULT_MEAN, DEFAULT_STD)(torch.as_tensor(faces)).numpy()
    infer_x = Preprocess(cfg.input_size).numpy(faces)
    np.testing.assert_allclose(train_x, infer_x, atol=1e-5)
