"""Shortcut probes: test metrics with the lungs blanked out, and with everything but the lungs blanked.

Grad-CAM shows where a model looks; a probe shows what it needs. With the lung
fields removed (`lungs_blanked`) a chest X-ray classifier that reads the
disease should fall to chance: if it still scores far above chance it reads
something outside the lungs (text markers, borders, the scanner's look, the
source hospital). `lungs_only` is the converse: what the lungs alone support.

Blanked pixels take the mean of the kept pixels of the same film (after
normalisation), so the probe input is a function of the kept region alone (no
lung brightness leaks into `lungs_blanked`) and has no black hole a network
never saw: a black fill makes most models collapse onto one class whatever
they read, which hides a shortcut instead of showing it (measured on the
marker phantom: black fill 0.25, mean fill 0.47 balanced accuracy with lungs
blanked). The masks are the shards' lung masks, resized with the film.
Chance levels: for accuracy the share of the largest class (what a
constant guess scores), for balanced accuracy 1 / (classes evaluated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from evaluation.statistics.bootstrap import bootstrap_ci, fmt
from pipeline.augment import DeviceAugment

PROBES = {
    "lungs_blanked": "lungs blanked (outside-lung signal only)",
    "lungs_only": "lungs only (everything else blanked)",
}
#: A probe flags a shortcut when its balanced accuracy's lower 95 % bound clears chance by this much.
SHORTCUT_MARGIN = 0.10


def probe_augment(augment: DeviceAugment, probe: str) -> Callable:
    """`augment` followed by blanking: keep the lungs (`lungs_only`) or everything else (`lungs_blanked`)."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; known: {sorted(PROBES)}")

    def apply(images: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if masks is None:
            raise ValueError("shortcut probes need lung masks: build the shards with --include-masks")
        x, m = augment(images, masks)
        lungs = m > 0.5
        keep = lungs if probe == "lungs_only" else ~lungs
        k = keep.to(x.dtype)
        fill = (x * k).sum(dim=(1, 2, 3), keepdim=True) / k.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
        return torch.where(keep, x, fill), m

    return apply


def chance_levels(labels: np.ndarray) -> dict[str, float]:
    """Accuracy of the constant majority guess; balanced accuracy of any input-blind model."""
    counts = np.bincount(np.asarray(labels, np.int64))
    present = counts[counts > 0]
    return {"accuracy": float(present.max() / present.sum()), "balanced_accuracy": float(1.0 / len(present))}


def probe_result(labels: np.ndarray, probs: np.ndarray, n_resamples: int, seed: int) -> dict:
    """{accuracy, balanced_accuracy, their ci95, chance, shortcut, outcome} of one probe's predictions.

    `outcome`: "shortcut" (the balanced accuracy's lower 95 % bound clears chance by
    SHORTCUT_MARGIN: judged on the interval, so a small test set cannot raise it by
    luck), "near chance" (the estimate is within the margin), "inconclusive" (above
    the margin, but the interval reaches it) or "not judged" (no intervals).
    """
    labels = np.asarray(labels, np.int64)
    preds = np.asarray(probs).argmax(axis=1)
    present = sorted(set(labels.tolist()))
    right = preds == labels
    ci = bootstrap_ci(labels, probs, present, n_resamples, seed) if n_resamples else {}
    chance = chance_levels(labels)
    bal = float(np.mean([right[labels == c].mean() for c in present]))
    bal_ci = ci.get("balanced_accuracy")
    bar = chance["balanced_accuracy"] + SHORTCUT_MARGIN
    if bal_ci is None:
        outcome = "not judged"
    elif bal_ci[0] > bar:
        outcome = "shortcut"
    else:
        outcome = "near chance" if bal <= bar else "inconclusive"
    return {
        "samples": int(len(labels)),
        "accuracy": float(right.mean()),
        "balanced_accuracy": bal,
        "ci95": {"accuracy": ci.get("accuracy"), "balanced_accuracy": bal_ci},
        "chance": chance,
        "shortcut": outcome == "shortcut",
        "outcome": outcome,
    }


def verdict(probes: dict, classes: Sequence[str]) -> str:
    """One sentence for the report and the console."""
    blanked = probes.get("lungs_blanked")
    if not blanked:
        return ""
    chance = blanked["chance"]["balanced_accuracy"]
    bal, ci = blanked["balanced_accuracy"], blanked["ci95"]["balanced_accuracy"]
    measured = f"with the lungs blanked balanced accuracy is {fmt(bal, ci)} against a chance level of {chance:.2f}"
    outcome = blanked.get("outcome", "shortcut" if blanked["shortcut"] else "near chance")
    if outcome == "shortcut":
        return f"Shortcut: {measured} over {len(classes)} classes: the model reads something outside the lungs."
    if outcome == "near chance":
        return f"No shortcut found by the probe: {measured}, within {SHORTCUT_MARGIN:.2f} of chance."
    if outcome == "inconclusive":
        return f"Shortcut probe inconclusive: {measured}; the interval is too wide to tell (more films needed)."
    return f"Shortcut probe not judged (no intervals: eval.bootstrap_resamples=0): {measured}."
