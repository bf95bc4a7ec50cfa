"""Build the network: any timm model with one input channel."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from train.config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """timm model with `in_chans=1`; pretrained conv1 weights are summed over RGB by timm.

    `cfg.pretrained` is 'false', 'true' (hub weights) or a local weights file;
    a local file goes through timm's own loader so the 1-channel adaptation and
    the classifier reset for a different class count still happen.
    """
    choice = cfg.pretrained.strip()
    kwargs = dict(in_chans=1, num_classes=num_classes, drop_rate=cfg.drop_rate)
    if choice.lower() == "false":
        return timm.create_model(cfg.name, pretrained=False, **kwargs)
    if choice.lower() == "true":
        try:
            return timm.create_model(cfg.name, pretrained=True, **kwargs)
        except Exception as exc:
            raise ConfigError(
                f"model.pretrained=true could not fetch {cfg.name} weights from the hub "
                f"({type(exc).__name__}). Offline? Download "
                "the weights once elsewhere and pass model.pretrained=/path/to/model.safetensors"
            ) from None
    path = Path(choice)
    if not path.is_file():
        raise ConfigError(f"model.pretrained={choice!r}: no such weights file")
    try:
        return timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except Exception as exc:
        raise ConfigError(
            f"model.pretrained={choice!r} could not be loaded into {cfg.name}: {type(exc).__name__}: {exc}"
        ) from None
