"""Lung crop (`data.crop=lungs`): each film cut to a square around its lungs' bounding box, on the device.

Borders, burned-in text and collimation sit outside the lungs, and they are what a model reads to tell
hospitals apart. The box comes from the film's lung mask (drawn, or predicted by a segmenter), grows by
`margin` of its larger side on every side, becomes a square on the box's centre (so anatomy keeps its
aspect), is moved inside the film when it can be, and is resampled to the film's size by one affine warp
shared with the mask. A film whose mask is empty keeps its whole frame. The same function runs in
training, evaluation, the probes and prediction, so the same film gives the same box everywhere.
"""

from __future__ import annotations

import torch

CROPS = ("none", "lungs")


def lung_boxes(masks: torch.Tensor, margin: float) -> torch.Tensor:
    """float32 [B, 4] squares (x0, y0, x1, y1), pixel centres inclusive, around each mask's lungs."""
    b, _, h, w = masks.shape
    rows = masks.amax(dim=(1, 3)) > 0.5  # [B, H]
    cols = masks.amax(dim=(1, 2)) > 0.5  # [B, W]
    iy = torch.arange(h, device=masks.device)
    ix = torch.arange(w, device=masks.device)
    found = rows.any(dim=1)
    y0 = torch.where(rows, iy, h).amin(dim=1).float()
    y1 = torch.where(rows, iy, -1).amax(dim=1).float()
    x0 = torch.where(cols, ix, w).amin(dim=1).float()
    x1 = torch.where(cols, ix, -1).amax(dim=1).float()
    side = torch.maximum(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    side = torch.minimum(side, torch.full_like(side, float(min(h, w) - 1)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # inside the film when the square fits: shift it rather than sample outside
    cx = torch.minimum(torch.maximum(cx, side / 2), (w - 1) - side / 2)
    cy = torch.minimum(torch.maximum(cy, side / 2), (h - 1) - side / 2)
    box = torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1)
    zero = torch.zeros(b, device=masks.device)
    whole = torch.stack([zero, zero, zero + (w - 1), zero + (h - 1)], dim=1)  # built on the device: no host copy
    return torch.where(found[:, None], box, whole)


def crop_matrices(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, 3, 3] source->destination pixel matrices taking each box onto the whole (height x width) frame."""
    b = boxes.shape[0]
    sx = (width - 1) / (boxes[:, 2] - boxes[:, 0]).clamp_min(1.0)
    sy = (height - 1) / (boxes[:, 3] - boxes[:, 1]).clamp_min(1.0)
    m = torch.zeros(b, 3, 3, device=boxes.device, dtype=torch.float32)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = sx, sy, 1.0
    m[:, 0, 2], m[:, 1, 2] = -sx * boxes[:, 0], -sy * boxes[:, 1]
    return m


__all__ = ["CROPS", "crop_matrices", "lung_boxes"]
