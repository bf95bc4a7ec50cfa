"""What an evaluation reads: a target (one shard set, or a run's several collections) and its prediction pass.

A run's own evaluation reads the collections it trained on (`data.shards`, one or several, labels in the
run's label space); an external test reads one other shard set, its classes mapped to the model's by
name. Either way every film of the target's splits is predicted once across ranks, with its provenance
and its collection (`train.predictions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from evaluation.audits import probes
from pipeline.collection import CollectionError, CollectionSet, open_collections
from train.card import TrainedModel
from train.config import Config
from train.predictions import Predictions, predict_split
from train.presets import build_split_loader


class EvaluationInputError(ValueError):
    """Nothing to evaluate: a split without films."""


class ExternalShardsError(EvaluationInputError):
    """An external shard set the model cannot be evaluated on (unknown class names, no films)."""


@dataclass(frozen=True)
class Target:
    """What to evaluate (a shard set's splits, or a run's collections) and where its report goes."""

    data: CollectionSet
    splits: tuple[str, ...]
    out_dir: Path
    split_name: str  # "test", "val" or "all": names the report and its files
    lut: np.ndarray | None = None  # the shards' label index -> the model's class index (external sets)
    external: str | None = None  # the external set's name
    train_shards: str | list | None = None  # the model's training collections (external sets: checked for copies)

    @property
    def shards(self) -> str | list:
        """How the report names the evaluated shards: a path, or each collection's name and path."""
        if not self.data.mixed:
            return self.data.collections[0].shards
        return [{"name": c.name, "path": c.shards} for c in self.data.collections]


def open_run_data(shards, classes) -> CollectionSet:
    """A run's collections (its `data.shards`), in its label space; a failure is an EvaluationInputError."""
    try:
        return open_collections(shards, classes)
    except CollectionError as exc:
        raise EvaluationInputError(str(exc)) from None


def needs_masks(cfg: Config, data: CollectionSet, where: str) -> None:
    """Refuse, before any work, shards without lung masks for a model that reads films through them."""
    uses = [
        k for k, on in (("data.mask_lungs", cfg.data.mask_lungs), ("data.crop=lungs", cfg.data.crop == "lungs")) if on
    ]
    if uses and not data.masks:
        raise ExternalShardsError(
            f"{where} carries no lung masks, and this model was trained with {' and '.join(uses)}: every film it "
            "reads needs its mask; rebuild those shards with --include-masks (from masks that come with the films)"
        )


def class_lut(model_classes: list[str], shard_classes: list[str], where: str) -> np.ndarray:
    """int64 lookup from the shards' label indices to the model's; an unknown class name is an error."""
    unknown = [c for c in shard_classes if c not in model_classes]
    if unknown:
        raise ExternalShardsError(
            f"{where} has classes {unknown} that the model does not know (its classes: {model_classes}); "
            "rebuild that shard set with --classes naming only the model's classes"
        )
    return np.array([model_classes.index(c) for c in shard_classes], dtype=np.int64)


def predict_target(
    trained: TrainedModel, cfg: Config, target: Target, accelerator: Accelerator, augment=None
) -> Predictions:
    """Every film of the target's splits once across ranks, labels in the model's class order."""
    parts = []
    for split in target.splits:
        loader = build_split_loader(
            cfg,
            split,
            collections=target.data,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            pin_memory=accelerator.device.type == "cuda",
            train=False,
        )
        preds = predict_split(trained.net, loader, augment or trained.augment, accelerator)
        expected = target.data.samples(split)
        if len(preds.keys) != expected:
            raise RuntimeError(f"evaluation counted {len(preds.keys)} {split} films, the manifests list {expected}")
        parts.append(preds)
    preds = Predictions.concat(parts)
    if len(set(preds.keys)) != len(preds.keys):
        raise RuntimeError("the same film key appears in two splits: cannot evaluate them together")
    if target.lut is not None:
        preds.labels = target.lut[preds.labels]
    return preds


def run_probes(trained: TrainedModel, cfg: Config, target: Target, accelerator: Accelerator) -> dict:
    """Predictions with the lungs blanked and with only the lungs (all ranks); {} without masks."""
    if not target.data.masks:
        return {}
    return {
        name: predict_target(trained, cfg, target, accelerator, probes.probe_augment(trained.augment, name))
        for name in probes.PROBES
    }


__all__ = [
    "EvaluationInputError",
    "ExternalShardsError",
    "Target",
    "class_lut",
    "needs_masks",
    "open_run_data",
    "predict_target",
    "run_probes",
]
