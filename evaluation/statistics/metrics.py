"""Classification metrics for imbalanced multi-class chest X-ray data.

scikit-learn computes the standard scores and torchmetrics the calibration
error; this module arranges them per class name (and adds specificity, which
neither reports directly), averages over the classes the data has, and adds
bootstrap intervals (`evaluation.statistics.bootstrap`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn import metrics as skm
from torchmetrics.functional.classification import multiclass_calibration_error

from evaluation.statistics.bootstrap import bootstrap_ci
from evaluation.statistics.registry import NAMES

#: The per-class rates a class without test samples has none of.
_RATES = ("precision", "ppv", "sensitivity", "specificity", "f1", "roc_auc")


def _class_entry(c: int, labels: np.ndarray, probs: np.ndarray, cm: np.ndarray, f1: float, ci: dict | None) -> dict:
    """One class's rates from the confusion matrix (one-vs-rest), with its intervals when `ci` is given."""
    tp = cm[c, c]
    fp = cm[:, c].sum() - tp
    fn = cm[c, :].sum() - tp
    tn = cm.sum() - tp - fp - fn
    positives = labels == c
    auc = float(skm.roc_auc_score(positives, probs[:, c])) if 0 < positives.sum() < len(labels) else None
    ppv = float(tp / (tp + fp)) if tp + fp else None  # never predicted: undefined, not 0
    entry = {
        "precision": ppv,
        "ppv": ppv,
        "sensitivity": float(tp / (tp + fn)),
        "specificity": float(tn / (tn + fp)) if tn + fp else None,  # no negatives: undefined
        "f1": float(f1),
        "support": int(tp + fn),
        "roc_auc": auc,
    }
    if ci is not None:
        entry.update({f"{k}_ci95": v for k, v in ci.items()})
    return entry


def classification_report(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    ece_bins: int = 15,
    bootstrap: int = 2000,
    seed: int = 0,
) -> dict:
    """All numbers of an evaluation: labels int [N], probs float [N, C] (rows sum to 1).

    Macro averages run over the classes with test support (`classes_evaluated`); a
    class without any is reported as such, not as zeros. `ci95` holds 95 % intervals
    from a stratified bootstrap of `bootstrap` resamples (0: none), seeded by `seed`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if not len(labels):
        raise ValueError("classification_report needs at least one film (an evaluation refuses empty splits first)")
    n_classes = len(class_names)
    preds = probs.argmax(axis=1)
    idx = list(range(n_classes))
    present = [c for c in idx if (labels == c).any()]
    cm = skm.confusion_matrix(labels, preds, labels=idx)
    _, recall, f1, _ = skm.precision_recall_fscore_support(labels, preds, labels=idx, zero_division=0)
    ci = bootstrap_ci(labels, probs, present, bootstrap, seed) if bootstrap else None
    per_class = {}
    aucs = {}
    for c, name in enumerate(class_names):
        if c not in present:
            per_class[name] = {"support": 0, "note": "no test samples", **dict.fromkeys(_RATES)}
            continue
        per_class[name] = _class_entry(c, labels, probs, cm, f1[c], ci["per_class"][c] if ci else None)
        if per_class[name]["roc_auc"] is not None:
            aucs[name] = per_class[name]["roc_auc"]
    row_sums = cm.sum(axis=1, keepdims=True)
    ece = multiclass_calibration_error(
        torch.as_tensor(probs, dtype=torch.float32),
        torch.as_tensor(labels),
        num_classes=n_classes,
        n_bins=ece_bins,
        norm="l1",
    )
    return {
        "samples": int(len(labels)),
        "classes_evaluated": [class_names[c] for c in present],
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "balanced_accuracy": float(np.mean([recall[c] for c in present])),
        "macro_f1": float(np.mean([f1[c] for c in present])),
        "macro_roc_auc": float(np.mean(list(aucs.values()))) if aucs else None,
        "ci95": {k: ci[k] for k in NAMES} if ci else {},
        "bootstrap": {"resamples": int(bootstrap), "seed": int(seed), "stratified": True},
        "ece": float(ece),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": np.divide(cm, np.maximum(row_sums, 1)).round(4).tolist(),
        "classes": list(class_names),
    }
