"""Grad-CAM over a whole split for the report: lung shares, the example grid and the failure gallery.

One pass, in one process (rank 0): every film gets a Grad-CAM map for its
predicted class, which gives the lung share per class (when the shards carry
masks), a grid of right and wrong examples per class, and the gallery of the
most confident wrong predictions chosen beforehand from the gathered results.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.explain import gradcam as explain
from pipeline.batch import Batch
from sharding.grid import image_grid
from train.card import TrainedModel
from train.predictions import Predictions

TILE, LABEL_WIDTH = 150, 150


def confident_failures(preds: Predictions, classes: Sequence[str], per_class: int, sources: dict) -> dict:
    """{true class: [{key, predicted, confidence, source}]}: the `per_class` most confident wrong predictions."""
    predicted = preds.probs.argmax(axis=1)
    confidence = preds.probs.max(axis=1)
    out = {}
    for c, name in enumerate(classes):
        wrong = np.flatnonzero((preds.labels == c) & (predicted != c))
        if not (preds.labels == c).any():
            continue
        # most confident first; ties by key, so the gallery does not depend on gather order
        order = sorted(wrong.tolist(), key=lambda i: (-float(confidence[i]), preds.keys[i]))[:per_class]
        out[name] = [
            {
                "key": preds.keys[i],
                "predicted": classes[int(predicted[i])],
                "confidence": round(float(confidence[i]), 4),
                "source": sources.get(preds.keys[i], "unknown"),
            }
            for i in order
        ]
    return out


def explain_split(
    trained: TrainedModel,
    loader: Iterable[Batch],
    classes: Sequence[str],
    per_class: int,
    failures: dict | None = None,
    lut: np.ndarray | None = None,
) -> dict:
    """{"grid": image, "lung_share": per class (with masks), "failures_grid": image (when `failures`)}.

    `lut` maps the shards' label indices to the model's (external shard sets).
    """
    augment, device, model = trained.augment, trained.device, trained.net
    # eval mode before the first forward: in train mode BatchNorm would use batch statistics and update its
    # running ones
    model.eval()
    wanted = {f["key"]: (true, i) for true, items in (failures or {}).items() for i, f in enumerate(items)}
    shares, labels = [], []
    picks: dict[tuple[int, bool], list] = {}
    gallery: dict[tuple[str, int], tuple] = {}
    for batch in loader:
        batch = batch.to(device)
        images, seen_masks = augment(batch.images, batch.masks)  # masks: data.mask_lungs and crop=lungs need them
        # what the model saw: with crop=lungs the cropped film and masks, else the stored film (unmasked)
        film, film_masks = _as_seen(augment, images, seen_masks) if augment.crop != "none" else (None, batch.masks)
        with torch.no_grad():
            preds = model(images).argmax(1).tolist()
        batch_labels = batch.labels.cpu().numpy()
        if lut is not None:
            batch_labels = lut[batch_labels]
        cams = explain.gradcam(model, images)
        masks = None
        if film_masks is not None:
            masks = F.interpolate(film_masks.float(), size=cams.shape[-2:], mode="nearest").squeeze(1).cpu().numpy()
            shares.append(explain.lung_share(cams, masks))
            labels.append(batch_labels)
        base = batch.images.float() if film is None else film
        small = F.interpolate(base, size=cams.shape[-2:], mode="bilinear").squeeze(1).cpu().numpy()
        for i, (key, label, pred) in enumerate(zip(batch.keys, batch_labels.tolist(), preds)):
            tile = (explain.overlay(small[i], cams[i]), None if masks is None else masks[i])
            slot = picks.setdefault((label, label == pred), [])
            if len(slot) < per_class:
                slot.append(tile)
            if key in wanted:
                gallery[wanted[key]] = tile
    result: dict = {"grid": _grid(classes, picks)}
    if shares:
        result["lung_share"] = explain.summarize_shares(np.concatenate(shares), np.concatenate(labels), classes)
    if gallery:
        rows = [
            (f"{name}\nmost confident\nwrong", [gallery[(name, i)] for i in range(len(items)) if (name, i) in gallery])
            for name, items in failures.items()
            if items
        ]
        result["failures_grid"] = image_grid(
            [(label, [t[0] for t in tiles]) for label, tiles in rows],
            tile=TILE,
            label_width=LABEL_WIDTH,
            outlines=[[t[1] for t in tiles] for _, tiles in rows],
        )
    return result


def _as_seen(augment, images: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The films as the model saw them, back on the stored grey scale (0..255), and their masks."""
    return (images.float() * augment.std + augment.mean) * 255.0, masks


def _grid(classes: Sequence[str], picks: dict) -> object:
    rows, outlines = [], []
    for c, name in enumerate(classes):
        good, bad = picks.get((c, True), []), picks.get((c, False), [])
        rows.append((f"{name}\n{len(good)} right | {len(bad)} wrong", [p[0] for p in good + bad]))
        outlines.append([p[1] for p in good + bad])
    return image_grid(rows, tile=TILE, label_width=LABEL_WIDTH, outlines=outlines)
