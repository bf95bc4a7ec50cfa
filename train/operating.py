"""Operating points: per-class one-vs-rest thresholds chosen on validation, frozen, then applied to test.

A ROC-AUC of 1.0 next to an argmax accuracy of 0.90 means the ranking is right and
the decision rule is not: a clinical use picks a threshold per finding. Two are
chosen on the validation predictions of the best model and stored in its card
(`best_model.json`), so test data never influences them:

- `youden`: the threshold maximising sensitivity + specificity - 1 (Youden's J);
- `target_sensitivity`: the highest threshold whose validation sensitivity reaches
  `eval.target_sensitivity` (default 0.95), i.e. the most specific rule that
  still finds that share of the positives.

A film is flagged for a class when its probability of that class is at least the
class's threshold (several flags, or none, are possible, unlike argmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from sharding import seeds
from train.bootstrap import interval, resample_indices, widen

POINTS = ("youden", "target_sensitivity")
SALT_OPERATING = 0x0B5E


def _rates(scores: np.ndarray, positive: np.ndarray, threshold: float) -> tuple[float, float]:
    flagged = scores >= threshold
    return float(flagged[positive].mean()), float((~flagged[~positive]).mean())


def choose(labels: Sequence[int], probs: np.ndarray, classes: Sequence[str], target: float = 0.95) -> dict:
    """{class: {"youden": {threshold, sensitivity, specificity}, "target_sensitivity": {..., "target"}}}
    from validation predictions; classes without both positives and negatives are left out."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    out = {}
    for c, name in enumerate(classes):
        positive = labels == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, thresholds = roc_curve(positive, probs[:, c], drop_intermediate=False)
        finite = np.isfinite(thresholds)  # sklearn's first threshold is +inf (flag nothing)
        fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
        j = int(np.argmax(tpr - fpr))
        reach = np.flatnonzero(tpr >= target)
        k = int(reach[0]) if len(reach) else len(thresholds) - 1  # thresholds decrease: first = highest
        out[name] = {
            "youden": {
                "threshold": float(thresholds[j]),
                "sensitivity": float(tpr[j]),
                "specificity": float(1 - fpr[j]),
            },
            "target_sensitivity": {
                "threshold": float(thresholds[k]),
                "sensitivity": float(tpr[k]),
                "specificity": float(1 - fpr[k]),
                "target": float(target),
            },
        }
    return out


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
    rng = seeds.rng(seed, SALT_OPERATING)
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
