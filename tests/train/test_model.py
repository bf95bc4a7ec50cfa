"""Model construction: local pretrained weights adapted to one channel, clear offline error."""

from __future__ import annotations

import subprocess

import pytest
import safetensors.torch
import timm
import torch

from train.config import ConfigError, ModelConfig
from train.model import build_model


@pytest.fixture(scope="module")
def rgb_weights():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, in_chans=3, num_classes=1000).state_dict()


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_weights_are_summed_over_rgb(tmp_path, rgb_weights, fmt):
    path = tmp_path / f"resnet18.{fmt}"
    if fmt == "safetensors":
        safetensors.torch.save_file(rgb_weights, str(path))
    else:
        torch.save(rgb_weights, path)
    model = build_model(ModelConfig(pretrained=str(path)), num_classes=4)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    torch.testing.assert_close(model.conv1.weight, rgb_weights["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.layer1[0].conv1.weight, rgb_weights["layer1.0.conv1.weight"])
    assert model.fc.weight.shape == (4, 512)  # classifier re-initialised for 4 classes


def test_random_init_one_channel_four_classes():
    model = build_model(ModelConfig(), num_classes=4)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 4)


@pytest.mark.slow
def test_hub_weights_offline_say_how_to_pass_a_file(python_exe, subprocess_env, repo_root):
    # huggingface_hub reads HF_HUB_OFFLINE at import: a fresh process sees it (and fails fast, no retries).
    code = (
        "from train.model import build_model; from train.config import ModelConfig\n"
        "build_model(ModelConfig(pretrained='true'), num_classes=4)"
    )
    run = subprocess.run(
        [python_exe, "-c", code],
        env={**subprocess_env, "HF_HUB_OFFLINE": "1"},
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "ConfigError" in run.stderr and "model.pretrained=/path/to/model.safetensors" in run.stderr


def test_wrong_weights_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"foo": torch.zeros(3)}, str(path))
    with pytest.raises(ConfigError, match="could not be loaded"):
        build_model(ModelConfig(pretrained=str(path)), num_classes=4)


def test_best_model_set_records_digests_and_a_mixed_set_is_refused(tmp_path):
    """A kill between the renames of best_model.{safetensors,pth,json} must not pass as one model."""
    import shutil

    from train.checkpoint import (
        BEST_JSON,
        BEST_PTH,
        BEST_SAFETENSORS,
        CheckpointError,
        load_best_model,
        save_best_model,
    )

    first = {"w": torch.zeros(3), "b": torch.ones(2)}
    second = {"w": torch.full((3,), 2.0), "b": torch.ones(2)}
    save_best_model(tmp_path / "old", first, {"epoch": 1})
    save_best_model(tmp_path / "new", second, {"epoch": 2})
    for name in (BEST_PTH, BEST_SAFETENSORS):
        state, info = load_best_model(tmp_path / "new" / name)
        assert (
            info["epoch"] == 2
            and torch.equal(state["w"], second["w"])
            and set(info["sha256"]) == {BEST_PTH, BEST_SAFETENSORS}
        )
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "new", mixed)
    shutil.copy(tmp_path / "old" / BEST_PTH, mixed / BEST_PTH)  # weights of epoch 1, json of epoch 2
    with pytest.raises(CheckpointError, match="different saves"):
        load_best_model(mixed / BEST_PTH)
    assert torch.equal(load_best_model(mixed / BEST_SAFETENSORS)[0]["w"], second["w"])  # its own file still matches
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted((BEST_PTH, BEST_SAFETENSORS, BEST_JSON))
