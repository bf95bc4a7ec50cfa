"""The prediction pass over a split: every sample once across ranks, with its provenance.

Validation (every epoch, in training) and evaluation (`evaluation.run`) both read
a split through this one pass. It lives in `train` because training needs it and
`train` never imports `evaluation`; evaluation builds its reports on what it
returns. Each prediction carries the sample's provenance (source, pixel sha256,
pHash, path from its json, `pipeline.provenance`) and its position in its split,
read together with the pixels: per-source tables and the overlap check are
set operations on it, not another read of the shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from pipeline import provenance
from pipeline.batch import Batch
from pipeline.provenance import Provenance
from train.loop import device_batches


@dataclass
class Predictions:
    """Predictions over a whole split, gathered from every rank (each sample once)."""

    keys: list[str]
    labels: np.ndarray  # int64 [N]
    probs: np.ndarray  # float32 [N, C]
    loss: float  # mean cross-entropy
    provenance: list[Provenance] = field(default_factory=list)  # per sample, from its json (empty: unknown)
    indices: np.ndarray | None = None  # int64 [N]: each sample's position in its split (manifest order; -1 unknown)
    collections: list[str] = field(default_factory=list)  # per sample, its collection's name (empty: unknown)

    def __post_init__(self) -> None:
        n = len(self.keys)
        if not self.provenance:
            self.provenance = [provenance.NONE] * n
        if self.indices is None:
            self.indices = np.full(n, -1, np.int64)
        if not self.collections:
            self.collections = [""] * n
        if not len(self.labels) == len(self.probs) == len(self.provenance) == len(self.indices) == n:
            raise ValueError("Predictions: keys, labels, probs, provenance and indices differ in length")
        if len(self.collections) != n:
            raise ValueError("Predictions: keys and collections differ in length")

    @property
    def sources(self) -> list[str]:
        """Each sample's source (its site, from its json)."""
        return [p.source for p in self.provenance]

    @classmethod
    def concat(cls, parts: list[Predictions]) -> Predictions:
        """Several splits' predictions as one (in the order given); the loss weighted by their sizes."""
        loss = float(np.average([p.loss for p in parts], weights=[max(len(p.keys), 1) for p in parts]))
        return cls(
            [k for p in parts for k in p.keys],
            np.concatenate([p.labels for p in parts]).astype(np.int64),
            np.concatenate([p.probs for p in parts]).astype(np.float32),
            loss,
            [o for p in parts for o in p.provenance],
            np.concatenate([p.indices for p in parts]).astype(np.int64),
            [c for p in parts for c in p.collections],
        )


def _local(keys, labels, probs, origins, indices, collections) -> tuple:
    """This rank's share as host arrays: one device-to-host copy after the last batch."""
    return (
        keys,
        torch.cat(labels).cpu().numpy() if labels else np.zeros(0, np.int64),
        torch.cat(probs).cpu().numpy() if probs else np.zeros((0, 0), np.float32),
        origins,
        torch.cat(indices).cpu().numpy() if indices else np.zeros(0, np.int64),
        collections,
    )


def _gathered(parts: list[tuple]) -> Predictions:
    keys = [k for part in parts for k in part[0]]
    if len(set(keys)) != len(keys):
        raise RuntimeError("evaluation saw a sample twice across ranks: the eval stream is not exact-once")
    labels = np.concatenate([p[1] for p in parts if len(p[1])]).astype(np.int64)
    probs = np.concatenate([p[2] for p in parts if len(p[2])]).astype(np.float32)
    origins = [o for p in parts for o in p[3]]
    indices = np.concatenate([p[4] for p in parts if len(p[4])]).astype(np.int64)
    collections = [c for p in parts for c in p[5]]
    loss = float(F.nll_loss(torch.log(torch.as_tensor(probs).clamp_min(1e-12)), torch.as_tensor(labels)))
    return Predictions(keys, labels, probs, loss, origins, indices, collections)


@torch.no_grad()
def predict_split(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    augment: Callable,
    accelerator: Accelerator,
    progress: bool = False,
    desc: str = "eval",
) -> Predictions:
    """Forward every batch of this rank's share in eval mode, then gather all ranks' results once.

    The model's mode is left as it came (train or eval): callers need not undo anything. No collective
    runs per batch (ranks may hold different batch counts), so the unwrapped model is used.
    """
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    was_training = model.training
    net.eval()
    keys: list[str] = []
    labels: list[torch.Tensor] = []
    probs: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    origins: list[Provenance] = []
    collections: list[str] = []
    waits = [0.0]
    for batch in tqdm(
        device_batches(loader, accelerator.device, waits),
        desc=desc,
        leave=False,
        disable=not (progress and accelerator.is_main_process),
    ):
        images, _ = augment(batch.images, batch.masks)
        with accelerator.autocast():
            logits = net(images)
        # kept on the device: one copy to the host after the last batch, not a host sync per batch
        probs.append(torch.softmax(logits.float(), dim=1))
        labels.append(batch.labels)
        keys.extend(batch.keys)
        origins.extend(batch.provenance if batch.provenance is not None else [provenance.NONE] * len(batch))
        collections.extend(batch.collections if batch.collections is not None else [""] * len(batch))
        if batch.indices is not None:
            indices.append(batch.indices)
        else:
            indices.append(torch.full((len(batch),), -1, dtype=torch.int64, device=batch.labels.device))
    local = _local(keys, labels, probs, origins, indices, collections)
    parts = gather_object([local]) if accelerator.num_processes > 1 else [local]
    model.train(was_training)
    return _gathered(parts)


__all__ = ["Predictions", "predict_split"]
