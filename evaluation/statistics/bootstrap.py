"""95 % confidence intervals by a seeded, stratified bootstrap over test samples, vectorised.

Each resample draws, within every class, as many samples as the class has (with
replacement), so class supports are those of the test set and every resample
has every class that the test set has. All metrics of a resample come from its
confusion matrix (one `bincount` per chunk of resamples) and, for ROC-AUC, from
the Mann-Whitney statistic over per-sample multiplicities (ties count one half),
so 2,000 resamples of 21,000 samples take seconds. Intervals are the 2.5th and
97.5th percentiles (the percentile bootstrap).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sharding import seeds

#: Names the bootstrap seed's stream in `sharding.seeds`' sense (the seed is the evaluation's).
CHUNK = 100  # resamples per vectorised block (memory ~ CHUNK x N x 8 bytes)


def resample_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [n, N]: `n` stratified resamples of the sample indices (each class keeps its count)."""
    out = np.empty((n, len(labels)), dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        out[:, start : start + len(members)] = members[rng.integers(0, len(members), (n, len(members)))]
        start += len(members)
    return out


def confusion(labels: np.ndarray, preds: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 [B, C, C] confusion matrices (rows true, columns predicted) of the resamples `idx` [B, N]."""
    b = np.arange(idx.shape[0])[:, None]
    flat = (b * n_classes + labels[idx]) * n_classes + preds[idx]
    counts = np.bincount(flat.ravel(), minlength=idx.shape[0] * n_classes * n_classes)
    return counts.reshape(idx.shape[0], n_classes, n_classes)


def rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-resample, per-class rates from confusion matrices [B, C, C] (NaN where undefined)."""
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    support = cm.sum(axis=2).astype(np.float64)
    predicted = cm.sum(axis=1).astype(np.float64)
    total = cm.sum(axis=(1, 2)).astype(np.float64)[:, None]
    fp, fn = predicted - tp, support - tp
    tn = total - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / support
        spec = tn / (tn + fp)
        ppv = tp / predicted
        f1 = 2 * tp / (2 * tp + fp + fn)
    return {"sensitivity": sens, "specificity": spec, "ppv": ppv, "f1": f1, "accuracy": tp.sum(axis=1) / total[:, 0]}


def auc_resamples(scores: np.ndarray, positive: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """float [B]: one-vs-rest ROC-AUC of each resample (Mann-Whitney over multiplicities, ties 1/2)."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tie groups
    group_of = np.empty(len(scores), dtype=np.int64)
    group_of[order] = np.cumsum(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]) - 1
    mult = np.zeros((idx.shape[0], len(scores)))
    np.add.at(mult, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    neg = mult * ~positive
    neg_groups = np.add.reduceat(neg[:, order], starts, axis=1)  # [B, G] negatives per tie group
    below = np.cumsum(neg_groups, axis=1) - neg_groups
    credit = below + 0.5 * neg_groups  # per group: negatives strictly below + half the tied ones
    pos = mult * positive
    wins = (pos * credit[:, group_of]).sum(axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return wins / (n_pos * n_neg)


def interval(values: np.ndarray) -> list[float] | None:
    """The 95 % percentile interval of finite values, or None."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_ci(
    labels: Sequence[int], probs: np.ndarray, present: Sequence[int], n_resamples: int = 2000, seed: int = 0
) -> dict:
    """95 % intervals: {"accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc": [lo, hi],
    "per_class": {c: {"sensitivity", "specificity", "ppv", "roc_auc": [lo, hi]}}} (classes in `present`);
    where the bootstrap has no width, accuracy, balanced accuracy (at its effective count) and the per-class
    rates get their Wilson interval (`widen`); macro-F1 and ROC-AUC keep the bootstrap's."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    present = list(present)
    rng = seeds.rng(seed, seeds.BOOTSTRAP)
    acc, bal, mf1, mauc = [], [], [], []
    per = {c: {k: [] for k in ("sensitivity", "specificity", "ppv", "roc_auc")} for c in present}
    for start in range(0, n_resamples, CHUNK):
        idx = resample_indices(labels, min(CHUNK, n_resamples - start), rng)
        r = rates(confusion(labels, preds, idx, n_classes))
        acc.append(r["accuracy"])
        bal.append(r["sensitivity"][:, present].mean(axis=1))
        mf1.append(r["f1"][:, present].mean(axis=1))
        aucs = []
        for c in present:
            for k in ("sensitivity", "specificity", "ppv"):
                per[c][k].append(r[k][:, c])
            if len(present) > 1:
                aucs.append(auc_resamples(probs[:, c], labels == c, idx))
                per[c]["roc_auc"].append(aucs[-1])
        if aucs:
            mauc.append(np.mean(aucs, axis=0))
    cat = np.concatenate
    # the full sample's rates and their denominators, for the intervals the bootstrap leaves without width (widen)
    cm = confusion(labels, preds, np.arange(len(labels))[None, :], n_classes)[0]
    point = {k: v[0] for k, v in rates(cm[None]).items()}
    counts = {"sensitivity": cm.sum(axis=1), "specificity": len(labels) - cm.sum(axis=1), "ppv": cm.sum(axis=0)}

    def class_ci(c: int, rate: str, values: list) -> list[float] | None:
        if not values:
            return None
        ci = interval(cat(values))
        return widen(float(point[rate][c]), ci, int(counts[rate][c])) if rate in counts else ci

    # balanced accuracy weighs each present class 1/k: a mean of k proportions with the variance of one over
    # n_eff = 1 / sum(1 / (k^2 n_c)) films (accuracy's weights n_c / N give n_eff = N: the same rule)
    positives = cm.sum(axis=1)[present]
    n_eff = 1.0 / float(np.sum(1.0 / (len(present) ** 2 * positives))) if len(present) else 0.0
    balanced = float(point["sensitivity"][present].mean()) if len(present) else None
    return {
        "accuracy": widen(float(point["accuracy"]), interval(cat(acc)), len(labels)),
        "balanced_accuracy": widen(balanced, interval(cat(bal)), n_eff),
        "macro_f1": interval(cat(mf1)),
        "macro_roc_auc": interval(cat(mauc)) if mauc else None,
        "per_class": {c: {k: class_ci(c, k, v) for k, v in d.items()} for c, d in per.items()},
    }


def wilson(successes: float, n: float, z: float = 1.959964) -> list[float] | None:
    """The Wilson score 95 % interval of a proportion (None for n = 0)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def widen(value: float | None, ci: list[float] | None, n: float) -> list[float] | None:
    """`ci`, or the Wilson interval of `value` out of `n` (an effective count may be fractional) where the
    bootstrap has no width.

    Every resample of 30 right out of 30 is 30 out of 30, so the percentile
    bootstrap says 1.00 (1.00-1.00); the Wilson interval says 1.00 (0.89-1.00).
    The same happens inside: a model that calls every film one class has a
    sensitivity of 0 or 1 in every class of every stratified resample, so its
    accuracy (that class's share) would read 0.43 (0.43-0.43) on 14 films.
    """
    if ci is None or value is None or n <= 0 or ci[0] != ci[1]:
        return ci
    return wilson(value * n, n)


def fmt(value: float | None, ci: list[float] | None, digits: int = 2) -> str:
    """`0.90 (0.80–0.96)`; n/a for a missing value."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return text if ci is None else f"{text} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})"
