"""The Batch type: the same on the host (uint8, pinned) and on the device."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Batch:
    """A batch of samples from one split.

    On the host `images` is uint8 [B, 1, H, W] (pinned when asked); after
    `pipeline.augment` it is float on the device. `masks` is uint8 [B, 1, H, W]
    in {0, 1} when the shards carry masks, else None.
    """

    images: torch.Tensor
    labels: torch.Tensor  # int64 [B]
    keys: list[str]
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        """Move tensors to `device`; non_blocking overlaps the copy when memory is pinned."""
        return replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            masks=None if self.masks is None else self.masks.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "Batch":
        """Page-locked copy, so the host-to-device copy can run asynchronously.

        `torch.utils.data.DataLoader(pin_memory=True)` calls this on custom batch types.
        """
        return replace(
            self,
            images=self.images.pin_memory(),
            labels=self.labels.pin_memory(),
            masks=None if self.masks is None else self.masks.pin_memory(),
        )
