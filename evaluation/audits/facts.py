"""What the report says about the data and the training, gathered from the manifest, the model card and metrics.jsonl.

Kept apart from the numbers of an evaluation: these facts describe how the
model came to be (CLAIM's data and model items), and the report's limitations
are filled in from them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.collection import CollectionSet
from sharding.manifest import Manifest
from train.card import ModelCard
from train.config import Config


def data_facts(data: CollectionSet) -> dict:
    """Counts per split and class, films per source and split, duplicates, and how the split was made; with
    several collections the counts add up in the run's label space, sources read `collection/source`, and
    `collections` holds each one's own facts."""
    facts = [manifest_facts(m, c.shards) for c, m in zip(data.collections, data.manifests)]
    if not data.mixed:
        return facts[0]
    merged = dict(facts[0], shards=[c.shards for c in data.collections], classes=list(data.classes))
    merged["input"] = [f["input"] for f in facts]
    merged["dataset"] = [f["dataset"] for f in facts]
    splits = sorted({split for m in data.manifests for split in m.splits})
    merged["class_counts"] = {split: list(data.class_counts(split)) for split in splits}
    sources: dict[str, dict[str, list[int]]] = {}
    for c, m, f in zip(data.collections, data.manifests, facts):
        to_shared = [data.classes.index(name) for name in m.classes]
        for src, per_split in f["sources"].items():
            for split, counts in per_split.items():
                row = [0] * len(data.classes)
                for i, n in zip(to_shared, counts):
                    row[i] += int(n)
                sources.setdefault(f"{c.name}/{src}", {})[split] = row
    merged["sources"] = dict(sorted(sources.items()))
    for key in ("duplicate_groups", "duplicate_images", "mixed_label_groups", "masks_predicted"):
        merged[key] = sum(f[key] for f in facts)
    merged["lung_model"] = ", ".join(sorted({f["lung_model"][:12] for f in facts if f["lung_model"]})) or None
    merged["collections"] = {c.name: dict(f, weight=c.weight) for c, f in zip(data.collections, facts)}
    return merged


def manifest_facts(manifest: Manifest, shards: str) -> dict:
    """`data_facts` of one shard set."""
    build = manifest.build or {}
    sources: dict[str, dict[str, list[int]]] = {}
    for split, info in manifest.splits.items():
        for src, counts in (info.sources or {}).items():
            sources.setdefault(src, {})[split] = list(counts)
    counts = manifest.counts or {}
    return {
        "shards": str(shards),
        "classes": list(manifest.classes),
        "input": build.get("input"),
        "dataset": build.get("dataset"),
        "fractions": build.get("split_fractions"),
        "split_level": (build.get("split") or {}).get("by", "sample"),
        "split_requested": (build.get("options") or {}).get("split_by"),
        "max_class_deviation": (build.get("split") or {}).get("max_class_deviation"),
        "class_counts": {split: list(info.class_counts) for split, info in manifest.splits.items()},
        "sources": dict(sorted(sources.items())),
        "duplicate_groups": int(counts.get("duplicate_groups", len(manifest.duplicate_groups))),
        "duplicate_images": int(counts.get("duplicate_images", 0)),
        "mixed_label_groups": int(counts.get("mixed_label_groups", 0)),
        "masks_predicted": int(counts.get("masks_predicted", 0)),
        "lung_model": (build.get("options") or {}).get("lung_model"),
    }


def initial_weights(pretrained: str) -> str:
    """What the network started from, in words: the same reading of `model.pretrained` as `build_model`."""
    choice = str(pretrained).strip()
    if choice.lower() in ("", "false"):
        return "random init"
    if choice.lower() == "true":
        return "ImageNet weights from the timm hub"
    return f"weights from {Path(choice).name}"


def training_facts(run_dir: Path, card: ModelCard, cfg: Config) -> dict:
    """Model, optimiser, epochs run against planned, the chosen epoch and why."""
    metrics = Path(run_dir) / "metrics.jsonl"
    epochs_run = 0
    if metrics.exists():
        epochs_run = len({json.loads(line)["epoch"] for line in metrics.read_text().splitlines() if line.strip()})
    return {
        "model": card.model,
        "weights": initial_weights(cfg.model.pretrained),
        "in_chans": card.in_chans,
        "image_size": card.image_size,
        "stored_size": card.stored_size,
        "optimizer": cfg.optim.name,
        "lr": cfg.optim.lr,
        "scheduler": cfg.optim.scheduler,
        "batch_size": cfg.train.batch_size,
        "precision": card.precision or cfg.train.mixed_precision or "as launched (accelerate)",
        "processes": card.processes or None,
        "grad_accum": cfg.train.grad_accum,
        "seed": cfg.train.seed,
        "epochs_planned": cfg.train.epochs,
        "epochs_run": epochs_run,
        "early_stopped": 0 < epochs_run < cfg.train.epochs,
        "patience": cfg.train.patience,
        "best_epoch": card.epoch,
        "monitor": card.monitor or cfg.train.monitor,
        "monitor_value": card.value,
    }
