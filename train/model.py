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
        model = timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except Exception as exc:
        raise ConfigError(
            f"model.pretrained={choice!r} could not be loaded into {cfg.name}: {type(exc).__name__}: {exc}"
        ) from None
    _check_covers(model, path)
    return model


def _check_covers(model: torch.nn.Module, path: Path) -> None:
    """timm loads leniently (missing keys only warn): refuse a file that is not this architecture."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        keys = set(state.get("state_dict", state.get("model", state)).keys())
    classifier = model.default_cfg.get("classifier", "fc")
    needed = {k for k in model.state_dict() if not k.startswith(classifier + ".") and "num_batches_tracked" not in k}
    missing = sorted(needed - keys)
    if missing:
        raise ConfigError(
            f"model.pretrained={str(path)!r} could not be loaded into {model.default_cfg.get('architecture')}: "
            f"the file lacks {len(missing)} of its weights (e.g. {missing[:3]}); is it another architecture?"
        )
