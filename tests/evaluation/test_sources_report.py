"""Per-source results and the single-source warning, from hand-made predictions and a real manifest."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.audits.sources import UNKNOWN, per_source, single_source_classes
from pipeline.collection import open_collections

from helpers.indexed_shards import write_shards

CLASSES = ["A", "B"]


def test_per_source_accuracy_and_sensitivity():
    keys = ["k0", "k1", "k2", "k3", "k4", "k5"]
    labels = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4], [0.9, 0.1]])
    sources = {"k0": "site-x", "k1": "site-x", "k2": "site-x", "k3": "site-y", "k4": "site-y"}  # k5: unknown
    out = per_source(keys, labels, probs, sources, CLASSES, n_resamples=200, seed=0)
    assert set(out) == {"site-x", "site-y", UNKNOWN}
    x = out["site-x"]
    assert x["support"] == 3 and x["accuracy"] == pytest.approx(2 / 3)
    assert x["per_class"]["A"]["sensitivity"] == 0.5 and x["per_class"]["B"]["sensitivity"] == 1.0
    lo, hi = x["accuracy_ci95"]
    assert 0 <= lo <= 2 / 3 <= hi <= 1
    assert out["site-y"]["accuracy"] == 1.0 and out[UNKNOWN]["accuracy"] == 0.0


def test_single_source_classes_from_the_manifest(phantom_shards):
    from pipeline.collection import open_collections

    single = single_source_classes(open_collections(str(phantom_shards)))
    # the phantom's Lung_Opacity and Viral Pneumonia films each come from one collection, COVID from three
    assert {"Lung_Opacity", "Viral Pneumonia"} <= set(single) and "COVID" not in single


def test_no_source_information_means_no_single_source_claim(tmp_path):
    write_shards(tmp_path, {"train": [4], "val": [2], "test": [2]}, masks=False)
    assert single_source_classes(open_collections(str(tmp_path))) == []
