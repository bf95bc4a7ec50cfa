"""Operating points applied to test: per-class one-vs-rest thresholds chosen on validation, frozen.

A ROC-AUC of 1.0 next to an argmax accuracy of 0.90 means the ranking is right and
the decision rule is not: a clinical use picks a threshold per finding. Training
chooses two per class on the validation predictions of the best model and stores
them in its card (`train.validation.choose`: `youden` and `target_sensitivity`), so
test data never influences them; here they are applied, with intervals.

A film is flagged for a class when its probability of that class is at least the
class's threshold (several flags, or none, are possible, unlike argmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evaluation.statistics.bootstrap import interval, resample_indices, widen
from sharding import seeds
from train.validation import POINTS


def _rates(scores: np.ndarray, positive: np.ndarray, threshold: float) -> tuple[float, float]:
    flagged = scores >= threshold
    return float(flagged[positive].mean()), float((~flagged[~positive]).mean())


def apply(
    labels: Sequence[int],
    probs: np.ndarray,
    classes: Sequence[str],
    points: dict,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Test sensitivity/specificity at each frozen point, with stratified-bootstrap 95 % intervals, beside the
    validation rates (and target) it was chosen at."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    rng = seeds.rng(seed, seeds.OPERATING)
    idx = resample_indices(labels, n_resamples, rng) if n_resamples and len(labels) else None
    out = {}
    for c, name in enumerate(classes):
        positive = labels == c
        if name not in points or positive.all() or not positive.any():
            continue
        out[name] = {}
        for point in POINTS:
            chosen = points[name][point]
            threshold = chosen["threshold"]
            sens, spec = _rates(probs[:, c], positive, threshold)
            entry = {"threshold": threshold, "sensitivity": sens, "specificity": spec}
            entry["validation"] = {k: chosen.get(k) for k in ("sensitivity", "specificity", "target") if k in chosen}
            if idx is not None:
                flagged = (probs[:, c] >= threshold)[idx]
                pos = positive[idx]
                sens_ci = interval((flagged & pos).sum(1) / pos.sum(1))
                spec_ci = interval((~flagged & ~pos).sum(1) / (~pos).sum(1))
                entry["sensitivity_ci95"] = widen(sens, sens_ci, int(positive.sum()))
                entry["specificity_ci95"] = widen(spec, spec_ci, int((~positive).sum()))
            out[name][point] = entry
    return out


def flags(probs: np.ndarray, classes: Sequence[str], points: dict, point: str) -> list[list[str]]:
    """Per film, the classes whose probability reaches their frozen `point` threshold."""
    probs = np.asarray(probs)
    return [
        [name for c, name in enumerate(classes) if name in points and row[c] >= points[name][point]["threshold"]]
        for row in probs
    ]
