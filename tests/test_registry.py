"""Model registry: every built-in network trains, names are checked, timm backbones are reachable."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from ferkit.errors import FerkitError
from ferkit.models import create_model, get_model_info, list_models, register_model
from ferkit.models.registry import _REGISTRY, PretrainedUnavailableError

BUILTINS = {"fastcnn", "fastcnn_wide", "vgg", "resnet18"}


def test_every_model_builds_runs_and_trains() -> None:
    """One pass over list_models(): 3 and 7 classes, output shape, finite outputs, gradients reach every weight."""
    names = list_models()
    assert BUILTINS <= set(names)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 48, 48)
    for name in names:
        for n in (3, 7):
            net = create_model(name, num_classes=n)
            assert isinstance(net, nn.Module)
            net.train()
            out = net(x)
            assert out.shape == (2, n), (name, n, out.shape)
            assert torch.isfinite(out).all(), name
            nn.functional.cross_entropy(out, torch.tensor([0, n - 1])).backward()
            for pname, p in net.named_parameters():
                assert p.grad is not None, f"{name}: no gradient for {pname}"
                assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
            assert any(p.grad.abs().sum() > 0 for p in net.parameters()), name
            net.eval()
            with torch.no_grad():
                assert torch.isfinite(net(x)).all(), name
        info = get_model_info(name)
        assert info.name == name and info.description and info.default_input_size == 48


def test_models_are_deterministic_under_a_seed() -> None:
    torch.manual_seed(1)
    a = create_model("fastcnn", num_classes=3).state_dict()
    torch.manual_seed(1)
    b = create_model("fastcnn", num_classes=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rgb_input() -> None:
    net = create_model("fastcnn", num_classes=3, in_chans=3).eval()
    assert net(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="'fastcnn' is already registered"):
        register_model("fastcnn")(lambda num_classes, in_chans=1: nn.Linear(1, num_classes))
    assert _REGISTRY["fastcnn"].fn.__name__ == "fastcnn"  # the original is kept


def test_register_a_new_model() -> None:
    name = "test_tiny_linear"

    @register_model(name, input_size=32, description="a test model")
    def tiny(num_classes: int, in_chans: int = 1) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    try:
        assert name in list_models()
        assert get_model_info(name).default_input_size == 32
        assert create_model(name, num_classes=4)(torch.zeros(1, 1, 32, 32)).shape == (1, 4)
    finally:
        del _REGISTRY[name]


@pytest.mark.parametrize(
    ("name", "closest"),
    [("fastcn", "fastcnn"), ("FastCNN", "fastcnn"), ("resnet_18", "resnet18"), ("vgg16", "vgg"), ("zzz", None)],
)
def test_unknown_name(name: str, closest: str | None) -> None:
    with pytest.raises(ValueError) as info:
        create_model(name, num_classes=3)
    msg = str(info.value)
    assert f"unknown model '{name}'" in msg
    for b in BUILTINS:
        assert b in msg  # lists the valid names
    if closest:
        assert msg.endswith(f"did you mean '{closest}'?")
    else:
        assert "did you mean" not in msg


def test_pretrained_is_refused_for_builtins() -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("fastcnn", num_classes=3, pretrained=True)


def test_timm_backbone_builds_without_pretrained() -> None:
    pytest.importorskip("timm")
    net = create_model("timm/mobilenetv3_small_050", num_classes=3, in_chans=1).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    # a pretrained tag (name.tag) is a valid timm name too
    assert create_model("timm/mobilenetv3_small_050.lamb_in1k", num_classes=7).eval()(
        torch.randn(1, 1, 64, 64)).shape == (1, 7)


def test_unknown_timm_name_suggests() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"unknown timm model 'efficientnet_b00'; did you mean 'timm/efficientnet_b0"):
        create_model("timm/efficientnet_b00", num_classes=3)


@pytest.mark.timeout(120)
def test_pretrained_offline_fails_fast_with_a_clear_error(monkeypatch: pytest.MonkeyPatch, offline_hub: None) -> None:
    pytest.importorskip("timm")
    import timm  # noqa: F401  (imported first so that only the download attempt is timed)
    from huggingface_hub import constants

    offline_before = constants.HF_HUB_OFFLINE
    monkeypatch.setenv("FERKIT_DOWNLOAD_TIMEOUT", "2")
    t0 = time.perf_counter()
    try:
        net = create_model("timm/mobilenetv3_small_050", num_classes=3, pretrained=True)
    except PretrainedUnavailableError as e:
        err = e
    else:
        assert isinstance(net, nn.Module)
        pytest.skip("ImageNet weights were already in the local hub cache")
    elapsed = time.perf_counter() - t0
    msg = str(err)
    assert isinstance(err, FerkitError)
    assert "offline" in msg and "without --pretrained" in msg and "\n" not in msg
    assert elapsed < 20, f"an offline --pretrained took {elapsed:.0f}s to fail"
    assert constants.HF_HUB_OFFLINE is offline_before  # the hub's offline switch is restored
