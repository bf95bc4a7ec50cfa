"""Grad-CAM heatmaps (pytorch-grad-cam) and the lung-share shortcut check.

The lung share of an image is the fraction of its Grad-CAM mass that falls
inside the lung mask. Models trained on this dataset are known to read text
markers, borders and scanner artefacts (each class comes from different
hospitals); a low lung share is how that shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget


def cam_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The last feature stage of a timm model (layer4 for a ResNet)."""
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
        return dict(model.named_modules())[last]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ValueError("model has no convolution layer for Grad-CAM")
    return convs[-1]


def gradcam(model: torch.nn.Module, images: torch.Tensor, targets: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM maps float [B, H, W] in [0, 1] for normalised float images [B, 1, H, W].

    `targets` are class indices (default: the predicted class).
    """
    model.eval()
    with GradCAM(model=model, target_layers=[cam_layer(model)]) as cam:
        return cam(
            input_tensor=images.float().contiguous(),
            targets=None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets],
        )


def lung_share(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's mass inside its binary mask: float [B] (NaN for an empty map)."""
    cams = np.asarray(cams, np.float64)
    masks = np.asarray(masks).reshape(cams.shape) > 0
    total = cams.sum(axis=(1, 2))
    inside = (cams * masks).sum(axis=(1, 2))
    return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 RGB [H, W, 3]: grayscale image with a jet-coloured heatmap."""
    import matplotlib

    gray = np.asarray(image, np.float32).squeeze()
    gray = (gray - gray.min()) / max(float(np.ptp(gray)), 1e-6)
    heat = matplotlib.colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    rgb = (1 - alpha) * np.repeat(gray[..., None], 3, axis=2) + alpha * heat
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def summarize_shares(shares: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Per class and overall: mean and 10th percentile of the lung share."""
    out = {}
    for c, name in enumerate(list(classes) + ["all"]):
        sel = shares[labels == c] if name != "all" else shares
        sel = sel[~np.isnan(sel)]
        out[name] = {
            "mean": float(sel.mean()) if len(sel) else None,
            "p10": float(np.percentile(sel, 10)) if len(sel) else None,
            "n": int(len(sel)),
        }
    return out
