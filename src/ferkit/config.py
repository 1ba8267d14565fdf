"""TrainConfig: the single source of truth for a training run, and the named recipes."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ferkit.errors import ConfigError


@dataclass
class TrainConfig:
    """Every setting of a training run. Recipes are instances; CLI flags and ``--config`` files override fields."""

    data: str = ""
    classes: str = "happy,sad,neutral"
    out: str = "runs/train"
    recipe: str = "quick"
    model: str = "fastcnn"
    pretrained: bool = False
    input_size: int = 48
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    optimizer: str = "adamw"  # sgd | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | plateau | none
    warmup_pct: float = 0.15
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    label_smoothing: float = 0.1
    class_weighting: bool = False
    augment: str = "fer"  # fer | seed | none
    rotate: float = 15.0
    scale: float = 0.15
    shift: float = 0.1
    flip: bool = True
    erase: float = 0.5
    jitter: float = 0.3
    mixup: float = 0.0
    # weight EMA (exponential moving average of the weights and BatchNorm statistics, torch.optim.swa_utils), decay
    # per optimizer step, e.g. 0.998; 0 = off. On: each epoch validates both, and the averaged weights are the
    # ones kept (best.ckpt, the model file)
    ema: float = 0.0
    early_stop: int = 0  # epochs without improvement before stopping; 0 = off
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    devices: int = 1
    num_nodes: int = 1
    precision: str = "auto"  # auto | 32 | bf16
    channels_last: bool = True
    compile: bool = False
    strict: bool = False
    max_steps: int = 0  # stop after this many optimizer steps (smoke runs); 0 = no limit
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    val_split: str = "validation"
    # crowd labels (ferkit.data.labels): a votes CSV (or folder of them) such as FER+'s, matched to the dataset's
    # faces; "" = the folder labels. With votes, faces are validated against the FER+ majority rule
    labels: str = ""
    label_mode: str = "soft"  # soft (cross-entropy against the votes) | majority | probability (a label drawn per step)
    label_missing: str = "skip"  # faces without votes: skip | folder (train them on their folder label)
    tta: str = "flip"  # test-time augmentation for the final evaluation
    init: str = ""  # start from this ferkit model's weights (fine-tuning); the head is reset if classes differ
    teacher: str = ""  # distillation: comma-separated teacher models
    distill_alpha: float = 0.7  # weight of the soft-label loss
    distill_temp: float = 4.0
    # distillation: also learn the teachers' soft labels on the train split's images of the *other* FER2013
    # expressions (no hard label), e.g. angry/fear/... faces for a happy/sad/neutral student
    distill_unlabeled: bool = False
    # distillation: compute the teachers' soft labels once, for this many augmented views of every training image,
    # store them in the run directory (teacher_views.safetensors) and train on those views: the teachers are then
    # paid once, not at every step of every epoch. 0 = the teachers label each freshly augmented batch
    distill_views: int = 0
    # distillation with stored views: mirror a random half of the stored views a step reads, keeping the teachers'
    # labels (expressions are left-right symmetric), so the student meets twice as many distinct faces
    view_flip: bool = False
    # write every process's final weights to <dir>/rank<N>.safetensors before rank 0 writes the run: lets a check of
    # distributed training compare the ranks (they must agree). "" = off
    rank_weights: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: dict[str, TrainConfig] = {
    # The default without a GPU: the small CNN, a few minutes on two CPU cores.
    "quick": TrainConfig(recipe="quick"),
    # The original project's recipe: EfficientNet-B0 fine-tuned at 160×160 with its transforms.
    "seed": TrainConfig(
        recipe="seed", model="timm/efficientnet_b0", pretrained=True, input_size=160, epochs=50, batch_size=32,
        lr=5e-4, optimizer="adam", weight_decay=0.0, schedule="plateau", plateau_patience=3, plateau_factor=0.5,
        label_smoothing=0.0, augment="seed", jitter=0.5, channels_last=False, tta="none",
    ),
    # The deep VGG-style CNN for a GPU.
    "accurate": TrainConfig(
        recipe="accurate", model="vgg", epochs=60, batch_size=256, lr=0.1, optimizer="sgd", momentum=0.9,
        weight_decay=5e-4, schedule="onecycle", warmup_pct=0.2, label_smoothing=0.1, tta="tencrop",
    ),
}


def _coerce(name: str, value: Any, typ: Any) -> Any:
    t = typ if isinstance(typ, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(str(typ), str)
    try:
        if t is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        return t(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{name}': cannot use {value!r} as {t.__name__}") from None


def make_config(recipe: str = "quick", overrides: dict[str, Any] | None = None,
                config_file: str | None = None) -> TrainConfig:
    """Start from a recipe, apply a YAML/JSON config file, then explicit overrides (CLI flags win).

    Raises:
        ConfigError: unknown recipe or key (with the closest valid name), or a value of the wrong type.
    """
    file_values: dict[str, Any] = {}
    if config_file:
        file_values = _read_config_file(config_file)
        recipe = str(file_values.pop("recipe", recipe)) if not (overrides or {}).get("recipe") else recipe
    recipe = (overrides or {}).get("recipe") or recipe
    if recipe not in RECIPES:
        close = difflib.get_close_matches(recipe, list(RECIPES), n=1)
        raise ConfigError(f"unknown recipe '{recipe}' (known: {', '.join(RECIPES)})"
                          + (f"; did you mean '{close[0]}'?" if close else ""))
    cfg = dataclasses.replace(RECIPES[recipe])
    types = {f.name: f.type for f in fields(TrainConfig)}
    for source in (file_values, overrides or {}):
        for k, v in source.items():
            key = k.replace("-", "_")
            if key not in types:
                close = difflib.get_close_matches(key, list(types), n=1)
                raise ConfigError(f"unknown config key '{k}'" + (f"; did you mean '{close[0]}'?" if close else ""))
            if v is None:
                continue
            setattr(cfg, key, _coerce(key, v, types[key]))
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.epochs >= 1, "epochs must be at least 1"),
        (cfg.batch_size >= 1, "batch_size must be at least 1"),
        (cfg.lr > 0, "lr must be positive"),
        (cfg.input_size >= 8, "input_size must be at least 8"),
        (cfg.optimizer in ("sgd", "adam", "adamw"), f"optimizer '{cfg.optimizer}' is not sgd, adam or adamw"),
        (cfg.schedule in ("onecycle", "cosine", "plateau", "none"), f"schedule '{cfg.schedule}' is unknown"),
        (cfg.augment in ("fer", "seed", "none"), f"augment '{cfg.augment}' is not fer, seed or none"),
        (cfg.device in ("auto", "cpu", "cuda", "gpu", "mps"), f"device '{cfg.device}' is not auto, cpu or cuda"),
        (cfg.precision in ("auto", "32", "bf16", "16"), f"precision '{cfg.precision}' is not auto, 32 or bf16"),
        (cfg.tta in ("none", "flip", "tencrop"), f"tta '{cfg.tta}' is not none, flip or tencrop"),
        (cfg.devices >= 1 and cfg.num_nodes >= 1, "devices and num_nodes must be at least 1"),
        (0.0 <= cfg.warmup_pct < 1.0, f"warmup_pct {cfg.warmup_pct} must be in [0, 1)"),
        (0.0 <= cfg.label_smoothing < 1.0, f"label_smoothing {cfg.label_smoothing} must be in [0, 1)"),
        (0.0 <= cfg.distill_alpha <= 1.0, f"distill_alpha {cfg.distill_alpha} must be in [0, 1]"),
        (cfg.distill_temp > 0, "distill_temp must be positive"),
        (not cfg.distill_unlabeled or bool(cfg.teacher), "distill_unlabeled needs teachers (ferkit distill --teacher)"),
        (cfg.distill_views >= 0, "distill_views must be 0 (off) or positive"),
        (not cfg.distill_views or bool(cfg.teacher), "distill_views needs teachers (ferkit distill --teacher)"),
        (not cfg.view_flip or bool(cfg.distill_views), "view_flip mirrors stored views: it needs distill_views"),
        (cfg.ema == 0.0 or 0.0 < cfg.ema < 1.0, f"ema {cfg.ema} must be 0 (off) or a decay in (0, 1)"),
        (cfg.label_mode in ("soft", "majority", "probability"),
         f"label_mode '{cfg.label_mode}' is not soft, majority or probability"),
        (cfg.label_missing in ("skip", "folder"), f"label_missing '{cfg.label_missing}' is not skip or folder"),
        (cfg.max_steps >= 0 and cfg.early_stop >= 0, "max_steps and early_stop must be 0 (off) or positive"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            import json

            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise ConfigError(f"{path}: cannot parse config ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config must be a mapping of field: value")
    return dict(data)


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


__all__ = ["RECIPES", "TrainConfig", "field", "field_names", "make_config"]
