"""The Batch type: the same on the host (uint8, pinned) and on the device."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pipeline.provenance import UNKNOWN, Provenance


def _move(t: torch.Tensor | None, fn) -> torch.Tensor | None:
    return None if t is None else fn(t)


@dataclass
class Batch:
    """A batch of samples from one split.

    On the host `images` is uint8 [B, 1, H, W] (pinned when asked); after
    `pipeline.augment` it is float on the device. `masks` is uint8 [B, 1, H, W]
    in {0, 1} when the shards carry masks, else None. `indices` are the samples'
    positions in the split (manifest order: shard by shard), what coverage checks
    count; `step` is the batch's step in its epoch (-1 when not from a loader).
    `provenance` is each sample's origin from its json (source, pixel sha256, pHash,
    path), read with the pixels; `sources` lists the sources alone. `collections` names
    each sample's collection (`pipeline.collection`) when it comes from a loader.
    """

    images: torch.Tensor
    labels: torch.Tensor  # int64 [B]
    keys: list[str]
    masks: torch.Tensor | None = None
    indices: torch.Tensor | None = None  # int64 [B]
    step: int = -1
    provenance: list[Provenance] | None = None
    collections: list[str] | None = None

    @property
    def sources(self) -> list[str]:
        """Each sample's source (its site), "unknown" where the shard's json names none."""
        return [p.source for p in self.provenance] if self.provenance is not None else [UNKNOWN] * len(self)

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """Move tensors to `device`; non_blocking overlaps the copy when memory is pinned."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            images=move(self.images),
            labels=move(self.labels),
            masks=_move(self.masks, move),
            indices=_move(self.indices, move),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copy, so the host-to-device copy can run asynchronously.

        `torch.utils.data.DataLoader(pin_memory=True)` calls this on custom batch types.
        """

        def pin(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory()

        return replace(
            self,
            images=pin(self.images),
            labels=pin(self.labels),
            masks=_move(self.masks, pin),
            indices=_move(self.indices, pin),
        )
