"""Name → constructor registry for ferkit's networks, with timm backbones reachable as ``timm/<name>``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch.nn as nn

from ferkit.errors import ConfigError, PretrainedUnavailableError, UnknownNameError

TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows of a built-in network."""

    name: str
    fn: Callable[..., nn.Module]
    default_input_size: int
    description: str


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, input_size: int = 48, description: str = "") -> Callable:
    """Decorator that registers a constructor ``fn(num_classes, in_chans) -> nn.Module`` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name '{name}' is already registered")
        _REGISTRY[name] = ModelInfo(name, fn, input_size, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def _ensure_builtins() -> None:
    from ferkit.models import cnn  # noqa: F401  (registers on import)


def list_models() -> list[str]:
    """Names of the built-in networks (timm backbones are reachable as ``timm/<name>`` on top of these)."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_model_info(name: str) -> ModelInfo:
    """Return the registry entry for ``name``.

    Raises:
        UnknownNameError: unknown name, listing the valid names and the closest match.
    """
    _ensure_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise UnknownNameError("model", name, sorted(_REGISTRY), note="or timm/<name> with timm installed")


def create_model(name: str, *, num_classes: int, in_chans: int = 1, pretrained: bool = False) -> nn.Module:
    """Build a network by name.

    Args:
        name: a built-in name from :func:`list_models`, ``timm/<timm model name>``, ``ensemble(a,b,...)`` of those,
            ``flip(a)``: ``a`` with flip test-time augmentation in the model itself, or ``views[orig+zoom_flip](a)``:
            ``a`` with those views built in (see :data:`ferkit.models.ensemble.VIEW_NAMES`).
        num_classes: number of output logits.
        in_chans: 1 for grayscale input, 3 for RGB.
        pretrained: load ImageNet weights (timm backbones only; needs network access the first time).
    """
    from ferkit.models.ensemble import Ensemble, FlipTTA, ViewTTA, ensemble_members, tta_wrapped

    wrapped = tta_wrapped(name)
    if wrapped is not None:  # flip(a), views[...](a): a with test-time augmentation built in (ferkit.models.ensemble)
        if pretrained:
            raise ConfigError(f"{name.split('(')[0]}(...) wraps a trained model; --pretrained does not apply")
        views, inner = wrapped
        net = create_model(inner, num_classes=num_classes, in_chans=in_chans)
        return FlipTTA(net) if views == ("orig", "flip") else ViewTTA(net, views)
    members = ensemble_members(name)
    if members is not None:  # ensemble(a,b,...): built from its members' names (see ferkit.models.ensemble)
        if pretrained:
            raise ConfigError("an ensemble is built from trained members; --pretrained does not apply")
        return Ensemble([create_model(m, num_classes=num_classes, in_chans=in_chans) for m in members])
    if name.startswith(TIMM_PREFIX):
        return _create_timm(name[len(TIMM_PREFIX) :], num_classes=num_classes, in_chans=in_chans, pretrained=pretrained)
    info = get_model_info(name)
    if pretrained:
        raise ConfigError(f"model '{name}' has no pretrained weights; --pretrained is for timm/<name> backbones")
    return info.fn(num_classes=num_classes, in_chans=in_chans)


def _create_timm(name: str, *, num_classes: int, in_chans: int, pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("timm backbones need timm: pip install 'ferkit[train]' (or pip install timm)") from e
    if name not in timm.list_models() and name not in timm.list_pretrained():
        raise UnknownNameError("timm model", name, timm.list_models(), prefix="timm/")
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    import os

    timeout = float(os.environ.get("FERKIT_DOWNLOAD_TIMEOUT", "10"))
    # Fail fast instead of hanging on a closed network: the hub client would otherwise retry with back-off for about
    # a minute. Offline, the hub is told so, which still lets it use weights already in its cache.
    offline = not _hub_reachable(timeout)
    try:
        with _hub_offline(offline):
            return timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans)
    except Exception as e:  # network errors come in many types (requests, httpx, urllib, huggingface_hub)
        why = "you seem to be offline" if offline else "the download failed"
        raise PretrainedUnavailableError(
            f"could not download ImageNet weights for timm/{name} ({type(e).__name__}): {why}; "
            "train without --pretrained, or run once online so timm caches the weights"
        ) from e


def _hub_reachable(timeout: float) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds (assumed yes behind a proxy)."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Switch huggingface_hub to offline mode (cache only, no retries) for the duration, if ``offline``."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm without the hub client: nothing to switch
        constants = None
    if not offline or constants is None or not hasattr(constants, "HF_HUB_OFFLINE"):
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old
