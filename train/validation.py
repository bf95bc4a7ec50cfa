"""What training decides from validation predictions: the per-epoch scores and the frozen operating points.

Both run on rank 0 at the end of every epoch, so they live with training (which never imports
`evaluation`); evaluation reads the operating points from the model card and applies them to test
(`evaluation.statistics.operating`).

Operating points: per-class one-vs-rest thresholds, chosen on the validation predictions of the
best model and stored in its card (`best_model.json`), so test data never influences them:

- `youden`: the threshold maximising sensitivity + specificity - 1 (Youden's J);
- `target_sensitivity`: the highest threshold whose validation sensitivity reaches
  `eval.target_sensitivity` (default 0.95), i.e. the most specific rule that
  still finds that share of the positives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sklearn.metrics as skm
from sklearn.metrics import roc_curve

from pipeline.provenance import UNKNOWN

POINTS = ("youden", "target_sensitivity")


def quick_metrics(labels: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and balanced accuracy over the classes present, for per-epoch validation (cheap)."""
    labels = np.asarray(labels)
    preds = np.asarray(probs).argmax(axis=1)
    present = sorted(set(labels.tolist()))
    recalls = [float((preds[labels == c] == c).mean()) for c in present]
    return {
        "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
        "macro_f1": float(skm.f1_score(labels, preds, labels=present, average="macro", zero_division=0))
        if present
        else 0.0,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
    }


#: A source needs this many validation films to count for the worst-source monitor (fewer: too noisy to select by).
MIN_SOURCE_FILMS = 10


def per_source(labels: np.ndarray, probs: np.ndarray, sources: Sequence[str], n_classes: int) -> dict:
    """`quick_metrics` of each source's validation films (balanced accuracy over the classes it has), with counts."""
    which = np.asarray(sources, dtype=object)
    return {
        name: {
            "films": int((which == name).sum()),
            **quick_metrics(labels[which == name], probs[which == name], n_classes),
        }
        for name in sorted(set(which.tolist()))
    }


def worst_source(table: dict, overall: float) -> tuple[str, float]:
    """(source, balanced accuracy) of the worst source with MIN_SOURCE_FILMS films or more; with fewer than two
    such sources, ("all", the overall balanced accuracy): there is no site to be worst at. Films of no known
    source are no site: they never count."""
    counted = {
        s: r["balanced_accuracy"] for s, r in table.items() if r["films"] >= MIN_SOURCE_FILMS and s not in (UNKNOWN, "")
    }
    if len(counted) < 2:
        return "all", overall
    name = min(counted, key=lambda s: (counted[s], s))
    return name, counted[name]


def per_collection(labels: np.ndarray, probs: np.ndarray, collections: Sequence[str], n_classes: int) -> dict:
    """`quick_metrics` of each collection's validation films, with their count."""
    which = np.asarray(collections)
    return {
        name: {
            "films": int((which == name).sum()),
            **quick_metrics(labels[which == name], probs[which == name], n_classes),
        }
        for name in sorted(set(which.tolist()))
    }


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
