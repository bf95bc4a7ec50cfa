"""The model card (`best_model.json`) and the one way to load a trained model.

`ModelCard` says what a trained model is (architecture, classes, image sizes),
how it was chosen (epoch, monitored metric) and the run's resolved config, so
evaluation and prediction rebuild the network and its input preparation from
the card alone. `load_trained_model` is used by `evaluation.run` and `evaluation.predict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from pipeline.augment import DeviceAugment
from train.checkpoint import CheckpointError, load_best_model, save_best_model
from train.config import Config, ConfigError, config_from_dict
from train.model import build_model
from train.presets import build_augment


@dataclass(frozen=True)
class ModelCard:
    """best_model.json: the trained model's identity, its input sizes, how it was selected, the run's config."""

    model: str  # timm name
    classes: tuple[str, ...]  # label order
    image_size: int  # the network's input side (after the device resize)
    stored_size: int  # the side of the preprocessed films it reads (the shards' image_size)
    in_chans: int = 1
    epoch: int = -1  # the epoch these weights come from
    monitor: str = ""  # the metric that selected them
    value: float | None = None  # its value at `epoch`
    config: dict = field(default_factory=dict)  # the run's resolved config
    operating_points: dict = field(
        default_factory=dict
    )  # per class, chosen on validation (evaluation.statistics.operating)
    train_digest: str = ""  # the training shards' train split (names, counts, sha256): how an evaluation knows them
    precision: str = ""  # the mixed precision the run trained in, as accelerate ran it ("no", "bf16", "fp16")
    processes: int = 0  # how many processes (devices) trained it: batch_size is per device
    collections: list = field(default_factory=list)  # several collections: each one's name, path, weight, train films
    segmenter: dict = field(default_factory=dict)  # data.lung_model's absolute `path` and `sha256`: prediction runs it

    def identity(self) -> dict:
        """What a resumed checkpoint must share with this model (train.state adds batch and seed)."""
        return {
            "model": self.model,
            "classes": list(self.classes),
            "image_size": self.image_size,
            "in_chans": self.in_chans,
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: dict, where: str | Path = "best_model.json") -> ModelCard:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        if "stored_size" not in values:  # cards written before stored_size had its own field
            values["stored_size"] = data.get("config", {}).get("data", {}).get("stored_size")
        missing = [k for k in ("model", "classes", "image_size", "stored_size") if values.get(k) is None]
        if missing:
            raise CheckpointError(f"{where} lacks {missing}: not a model card this version can read")
        return cls(**{**values, "classes": tuple(values["classes"])})

    def run_config(self) -> Config:
        """The training run's config (unknown keys of other versions dropped)."""
        try:
            return config_from_dict(self.config)
        except ConfigError as exc:
            raise CheckpointError(f"the model card's config does not load: {exc}") from None


@dataclass
class TrainedModel:
    """A trained network in eval mode on `device`, its card and the eval-time input transform."""

    net: torch.nn.Module
    card: ModelCard
    cfg: Config
    augment: DeviceAugment
    device: torch.device


def save_model_card(models_dir: Path, weights: dict[str, torch.Tensor], card: ModelCard) -> None:
    """best_model.{pth,safetensors,json}, renamed into place together (see `save_best_model`)."""
    save_best_model(models_dir, weights, card.to_dict())


def load_trained_model(path: str | Path, device: str | torch.device | None = None) -> TrainedModel:
    """The model at best_model.pth/.safetensors with the card beside it; weights only, never a pickle."""
    state, info = load_best_model(path)
    card = ModelCard.from_dict(info, Path(path).with_suffix(".json"))
    cfg = card.run_config()
    net = build_model(replace(cfg.model, pretrained="false"), num_classes=len(card.classes))
    net.load_state_dict(state)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    augment = build_augment(cfg, train=False).to(dev)
    return TrainedModel(net.to(dev).eval(), card, cfg, augment, dev)
