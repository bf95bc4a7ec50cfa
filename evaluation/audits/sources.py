"""Results per source (the site a film came from): support, accuracy and per-class sensitivity with intervals.

Each class of the COVID-19 Radiography Database comes almost entirely from one
collection, and models trained on it are known to recognise the collection
rather than the disease. The sample json's `source` (metadata sheet, label CSV),
which reaches evaluation with each prediction (`train.predictions`), lets the
report break results down by site and say plainly when a class has a single
source in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evaluation.statistics.bootstrap import interval, resample_indices, widen
from pipeline.collection import CollectionSet
from pipeline.provenance import UNKNOWN
from sharding import seeds


def single_source_classes(data: CollectionSet) -> list[str]:
    """Classes whose train films all come from one known source (the shortcut risk); with several
    collections a source is `collection/source`, and a collection without sources is one source."""
    having: dict[str, set[str]] = {name: set() for name in data.classes}
    for c, m in zip(data.collections, data.manifests):
        for source, counts in (m.split("train").sources or {}).items():
            site = f"{c.name}/{source}" if data.mixed else source
            for cls, count in zip(m.classes, counts):
                if count > 0:
                    having[cls].add(site)
    return [name for name, sites in having.items() if len(sites) == 1 and UNKNOWN not in sites]


def qualified_sources(preds) -> list[str]:
    """Each prediction's source; `collection/source` when the predictions span several collections."""
    if len(set(preds.collections)) < 2:
        return preds.sources
    return [f"{c}/{s}" for c, s in zip(preds.collections, preds.sources)]


def per_source(
    keys: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    sources: dict[str, str],
    classes: Sequence[str],
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """{source: {support, accuracy, accuracy_ci95, per_class: {class: {support, sensitivity, sensitivity_ci95}}}}."""
    labels, preds = np.asarray(labels), np.asarray(probs).argmax(axis=1)
    site = np.array([sources.get(k, UNKNOWN) for k in keys])
    rng = seeds.rng(seed, seeds.SOURCES)
    out = {}
    for name in sorted(set(site.tolist())):
        mask = site == name
        y, p = labels[mask], preds[mask]
        right = p == y
        idx = resample_indices(y, n_resamples, rng) if n_resamples else None
        entry = {
            "support": int(mask.sum()),
            "accuracy": float(right.mean()),
            "accuracy_ci95": widen(float(right.mean()), interval(right[idx].mean(axis=1)), int(mask.sum()))
            if idx is not None
            else None,
            "per_class": {},
        }
        for c, cls in enumerate(classes):
            pos = y == c
            if pos.any():
                hits = right & pos
                ci = interval(hits[idx].sum(1) / pos[idx].sum(1)) if idx is not None else None
                entry["per_class"][cls] = {
                    "support": int(pos.sum()),
                    "sensitivity": float(hits.sum() / pos.sum()),
                    "sensitivity_ci95": widen(float(hits.sum() / pos.sum()), ci, int(pos.sum())),
                }
        out[name] = entry
    return out
