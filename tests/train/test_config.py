"""Typed config: every shipped file loads, bad values are refused by key, docs/configuration.md is current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from train.config import Config, ConfigError, _all_fields_documented, load_config, reference_markdown

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == pytest.approx(1e-3)
    # classes, class count and stored size come from the shards' manifest unless a config pins them
    assert cfg.model.num_classes is None and cfg.data.classes is None and cfg.data.stored_size is None


def test_accelerate_configs_exist_and_parse():
    import yaml

    names = {p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert {"cpu_2proc.yaml", "gpu_1.yaml", "gpu_8.yaml", "nodes_2x8.yaml"} <= names
    cpu = yaml.safe_load((ROOT / "configs" / "accelerate" / "cpu_2proc.yaml").read_text())
    assert cpu["num_processes"] == 2 and cpu["num_machines"] == 1  # launched for real in test_train_run.py
    assert yaml.safe_load((ROOT / "configs" / "accelerate" / "gpu_8.yaml").read_text())["num_processes"] == 8


def test_overrides_apply_with_types():
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.epochs=3", "optim.lr=3e-4", "data.cache_dir=/tmp/c"])
    assert (cfg.train.epochs, cfg.optim.lr, cfg.data.cache_dir) == (3, 3e-4, "/tmp/c")
    assert cfg.data.shards == "shards/demo"  # from the file


BAD = [
    (["train.epoch=3"], "train.epoch"),
    (["train.epochs=three"], "train.epochs"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.patience=-1"], "train.patience"),
    (["optim.name=rmsprop"], "optim.name"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.scheduler=linear"], "optim.scheduler"),
    (["train.monitor=val_auc"], "train.monitor"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["data.hflip_p=1.5"], "data.hflip_p"),
    (["data.rotation_degrees=270"], "data.rotation_degrees"),
    (["data.num_workers=-2"], "data.num_workers"),
    (["data.warp=opencv"], "data.warp"),
    (["model.pretrained=/no/such/file.safetensors"], "model.pretrained"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs"),
    (["train.max_steps_per_epoch=0"], "train.max_steps_per_epoch"),
    (["eval.batch_size=-1"], "eval.batch_size"),
    (["nonsense"], "nonsense"),
    (["model.unknown=1"], "model.unknown"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_bad_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_every_field_has_a_docstring():
    assert _all_fields_documented() == []


def test_readme_configuration_reference_is_current():
    readme = (ROOT / "docs" / "configuration.md").read_text()
    assert reference_markdown() in readme, "docs/configuration.md is stale: run `python -m train.config --markdown`"


def test_the_config_default_warp_is_device_augments():
    from pipeline.augment import DEFAULT_WARP, WARPS

    assert Config().data.warp == DEFAULT_WARP and set(WARPS) == {"torch", "kornia"}
