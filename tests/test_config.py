"""TrainConfig, recipes, overrides, config files and validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from ferkit.config import RECIPES, TrainConfig, field_names, make_config
from ferkit.errors import ConfigError


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_a_valid_config(name: str) -> None:
    cfg = make_config(name)
    assert cfg.recipe == name
    assert cfg == RECIPES[name]
    assert cfg is not RECIPES[name]  # a copy: callers may change it


def test_recipes_differ_where_they_should() -> None:
    assert make_config().recipe == "quick"
    assert RECIPES["seed"].model == "timm/efficientnet_b0" and RECIPES["seed"].input_size == 160
    assert RECIPES["seed"].pretrained and RECIPES["seed"].augment == "seed"
    assert RECIPES["accurate"].model == "vgg" and RECIPES["accurate"].optimizer == "sgd"


def test_make_config_does_not_change_the_recipes() -> None:
    before = dataclasses.replace(RECIPES["quick"])
    make_config("quick", {"epochs": 2, "lr": 0.5})
    assert RECIPES["quick"] == before


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"epochs": "3"}, {"epochs": 3}),
        ({"batch-size": "16"}, {"batch_size": 16}),
        ({"lr": "1e-2"}, {"lr": 0.01}),
        ({"lr": 2}, {"lr": 2.0}),
        ({"flip": "false"}, {"flip": False}),
        ({"flip": "No"}, {"flip": False}),
        ({"channels_last": "1"}, {"channels_last": True}),
        ({"pretrained": True}, {"pretrained": True}),
        ({"model": "vgg", "epochs": None}, {"model": "vgg", "epochs": 30}),  # None = flag not given
        ({"recipe": "seed"}, {"recipe": "seed", "input_size": 160}),
        ({"recipe": "seed", "input_size": 96}, {"recipe": "seed", "input_size": 96}),
    ],
)
def test_overrides_are_coerced(overrides: dict, expected: dict) -> None:
    cfg = make_config("quick", overrides)
    for k, v in expected.items():
        assert getattr(cfg, k) == v
        assert type(getattr(cfg, k)) is type(v)


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        ("quik", {}, "unknown recipe 'quik'.*did you mean 'quick'"),
        ("quick", {"label_smothing": 0.1}, "unknown config key 'label_smothing'; did you mean 'label_smoothing'"),
        ("quick", {"batchsize": 4}, "did you mean 'batch_size'"),
        ("quick", {"zzzz": 1}, "unknown config key 'zzzz'$"),
        ("quick", {"epochs": "three"}, "config field 'epochs': cannot use 'three' as int"),
        ("quick", {"flip": "maybe"}, "config field 'flip'"),
        ("quick", {"epochs": 0}, "epochs must be at least 1"),
        ("quick", {"batch_size": 0}, "batch_size"),
        ("quick", {"lr": -1}, "lr must be positive"),
        ("quick", {"input_size": 4}, "input_size"),
        ("quick", {"optimizer": "rmsprop"}, "optimizer 'rmsprop'"),
        ("quick", {"schedule": "step"}, "schedule 'step'"),
        ("quick", {"augment": "autoaugment"}, "augment 'autoaugment'"),
        ("quick", {"device": "tpu"}, "device 'tpu'"),
        ("quick", {"precision": "64"}, "precision '64'"),
        ("quick", {"tta": "fivecrop"}, "tta 'fivecrop'"),
        ("quick", {"devices": 0}, "devices"),
        ("quick", {"warmup_pct": 1.5}, "warmup_pct"),
    ],
)
def test_bad_configs_are_refused(recipe: str, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        make_config(recipe, overrides)
    assert "\n" not in str(info.value)


def test_config_file_yaml_and_json(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("recipe: accurate\nepochs: 2\nlabel-smoothing: 0.0\n")
    cfg = make_config("quick", None, str(y))
    assert (cfg.recipe, cfg.model, cfg.epochs, cfg.label_smoothing) == ("accurate", "vgg", 2, 0.0)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"epochs": 4, "lr": 0.02}))
    cfg = make_config("seed", None, str(j))
    assert (cfg.recipe, cfg.epochs, cfg.lr) == ("seed", 4, 0.02)


def test_flags_win_over_the_config_file(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("recipe: accurate\nepochs: 2\n")
    cfg = make_config("quick", {"epochs": 5, "recipe": "seed"}, str(y))
    assert (cfg.recipe, cfg.epochs, cfg.model) == ("seed", 5, "timm/efficientnet_b0")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.yaml", None, "no such config file"),
        ("bad.yaml", "epochs: [1, 2\n", "cannot parse config"),
        ("bad.json", "{epochs: 1}", "cannot parse config"),
        ("list.yaml", "- 1\n- 2\n", "must be a mapping"),
        ("typo.yaml", "epoch: 3\n", "unknown config key 'epoch'; did you mean 'epochs'"),
    ],
)
def test_bad_config_files(tmp_path: Path, name: str, text: str | None, message: str) -> None:
    p = tmp_path / name
    if text is not None:
        p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        make_config("quick", None, str(p))


def test_empty_config_file_is_the_recipe(tmp_path: Path) -> None:
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert make_config("accurate", None, str(p)) == RECIPES["accurate"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_resolved_config_round_trips_through_yaml(tmp_path: Path, name: str) -> None:
    """The run directory's config.yaml is enough to rebuild the exact config (what --resume relies on)."""
    cfg = make_config(name, {"data": "/some/where", "epochs": 7, "lr": 1e-3})
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert make_config("quick", None, str(p)) == cfg
    assert make_config("quick", cfg.to_dict()) == cfg


def test_field_names_are_the_dataclass_fields() -> None:
    assert field_names() == [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(TrainConfig().to_dict()) == set(field_names())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"distill_alpha": 1.5}, "distill_alpha"),
        ({"distill_temp": 0}, "distill_temp"),
        ({"max_steps": -1}, "max_steps"),
    ],
)
def test_out_of_range_values_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config("quick", overrides)
