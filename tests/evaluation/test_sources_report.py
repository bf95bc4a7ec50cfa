"""Per-source results and the single-source warning, from hand-made predictions and a real manifest."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from evaluation.audits.sources import UNKNOWN, per_source, single_source_classes
from pipeline.collection import open_collections
from sharding.manifest import load_manifest

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
    single = single_source_classes(open_collections(str(phantom_shards)))
    # the phantom's Lung_Opacity and Viral Pneumonia films each come from one collection, COVID from three
    assert {"Lung_Opacity", "Viral Pneumonia"} <= set(single) and "COVID" not in single


def test_no_source_information_means_no_single_source_claim(tmp_path):
    write_shards(tmp_path, {"train": [4], "val": [2], "test": [2]}, masks=False)
    assert single_source_classes(open_collections(str(tmp_path))) == []


def test_facts_and_single_source_classes_of_several_collections(tmp_path):
    """Counts add up in the run's label space (a collection with other classes in another order), sources read
    `collection/source`, and a class is single-source only when one site of one collection holds it."""
    from evaluation.audits.facts import data_facts

    write_shards(tmp_path / "a", {"train": [8], "val": [4], "test": [4]})
    write_shards(tmp_path / "b", {"train": [6], "val": [2], "test": [2]}, start=100, classes=("Normal", "COVID"))
    data = open_collections([str(tmp_path / "a"), str(tmp_path / "b")])
    facts = data_facts(data)
    a, b = load_manifest(tmp_path / "a"), load_manifest(tmp_path / "b")
    for split in ("train", "val", "test"):
        want = list(a.split(split).class_counts)
        want[2] += b.split(split).class_counts[0]  # b's Normal
        want[0] += b.split(split).class_counts[1]  # b's COVID
        assert facts["class_counts"][split] == want
    assert set(facts["collections"]) == {"a", "b"} and facts["collections"]["b"]["classes"] == ["Normal", "COVID"]
    assert facts["shards"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    sources = {"x": [2, 0, 3, 0], "y": [0, 2, 0, 1]}
    a = replace(a, splits={**a.splits, "train": replace(a.split("train"), sources=sources)})
    b = replace(b, splits={**b.splits, "train": replace(b.split("train"), sources={"hosp": [3, 3]})})
    mixed = open_collections([str(tmp_path / "a"), str(tmp_path / "b")], manifests=[a, b])
    # COVID and Normal come from a/x and b/hosp; Lung_Opacity and Viral Pneumonia only from a/y
    assert single_source_classes(mixed) == ["Lung_Opacity", "Viral Pneumonia"]
    alone = open_collections(str(tmp_path / "a"), manifests=[a])  # in a alone, each class has one site
    assert single_source_classes(alone) == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
