"""Strata and the per-epoch counts of a mix (`pipeline/strata.py`, `mix.composition`), against hand-made tables
and a brute-force count: what each `metrics.jsonl` line reports under `collections`."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.mix import Mix, composition
from pipeline.strata import ALL, Strata, strata_of, stratum_key

# Two collections: "a" has 4 samples, "b" 3; sources and classes per sample, numbered a then b.
CLASSES = ["COVID", "Normal", "COVID", "Normal", "COVID", "COVID", "Normal"]
SOURCES = ["s1", "s1", "s2", "s3", "s1", "s4", "s4"]


def test_strata_by_source_leave_unreadable_samples_out_by_name_and_index():
    """Sample 3 (a's only s3 film) and sample 5 (an s4 film; sample 6 is s4 too) are unreadable."""
    strata = strata_of("source", [4, 3], [1.0, 2.0], None, CLASSES, SOURCES, np.array([0, 1, 2, 4, 6]))
    assert strata.names == ["s1", "s2", "s4"]  # s3 only unreadable: no stratum
    assert strata.collection.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert strata.stratum.tolist() == [0, 0, 1, -1, 0, -1, 2]  # 5 is s4 but unreadable: -1 all the same
    assert strata.stratum.dtype == np.int64
    assert [s.tolist() for s in strata.mix.strata] == [[0, 0, 1, -1], [0, -1, 2]]
    assert (strata.mix.sizes, strata.mix.weights, strata.mix.epoch_samples) == ((4, 3), (1.0, 2.0), None)
    assert [[p.tolist() for p in pools] for pools in strata.mix.pools(np.array([0, 1, 2, 4, 6]))] == [
        [[0, 1], [2]],
        [[4], [6]],
    ]


def test_strata_with_every_sample_readable_and_each_balance():
    for balance, names, ids in [
        ("none", [ALL], [0] * 7),
        ("class", ["COVID", "Normal"], [0, 1, 0, 1, 0, 0, 1]),
        ("source", ["s1", "s2", "s3", "s4"], [0, 0, 1, 2, 0, 3, 3]),
        ("source_class", ["s1/COVID", "s1/Normal", "s2/COVID", "s3/Normal", "s4/COVID", "s4/Normal"], None),
    ]:
        strata = strata_of(balance, [4, 3], [1.0, 1.0], 12, CLASSES, SOURCES, None)
        assert strata.names == names, balance
        expected = ids or [names.index(stratum_key(balance, c, s)) for c, s in zip(CLASSES, SOURCES)]
        assert strata.stratum.tolist() == expected and strata.mix.epoch_samples == 12


def test_unbalanced_strata_are_one_stratum_per_collection():
    strata = Strata.unbalanced([2, 0, 3], [1.0, 0.5, 2.0], 10)
    assert strata.names == [ALL]
    assert strata.collection.tolist() == [0, 0, 2, 2, 2] and strata.stratum.tolist() == [0] * 5
    assert (strata.mix.sizes, strata.mix.weights, strata.mix.epoch_samples) == ((2, 0, 3), (1.0, 0.5, 2.0), 10)
    assert [s.tolist() for s in strata.mix.strata] == [[0, 0], [], [0, 0, 0]]
    assert strata.composition(np.array([1, 0, 2, 2, 0]), ["a", "b", "c"]) == {
        "a": {"drawn": 1, "distinct": 1, "size": 2, "strata": {ALL: {"drawn": 1, "distinct": 1, "size": 2}}},
        "b": {"drawn": 0, "distinct": 0, "size": 0, "strata": {}},
        "c": {"drawn": 4, "distinct": 2, "size": 3, "strata": {ALL: {"drawn": 4, "distinct": 2, "size": 3}}},
    }


def test_the_epoch_composition_by_hand():
    """Counts: how often each sample was drawn this epoch; unreadable samples (-1) are never counted."""
    strata = strata_of("source", [4, 3], [1.0, 2.0], None, CLASSES, SOURCES, np.array([0, 1, 2, 4, 6]))
    counts = np.array([2, 0, 1, 0, 3, 0, 1])
    assert strata.composition(counts, ["a", "b"]) == {
        "a": {
            "drawn": 3,
            "distinct": 2,
            "size": 3,
            "strata": {"s1": {"drawn": 2, "distinct": 1, "size": 2}, "s2": {"drawn": 1, "distinct": 1, "size": 1}},
        },
        "b": {
            "drawn": 4,
            "distinct": 2,
            "size": 2,
            "strata": {"s1": {"drawn": 3, "distinct": 1, "size": 1}, "s4": {"drawn": 1, "distinct": 1, "size": 1}},
        },
    }


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(-1, 3), st.integers(0, 5)), min_size=1, max_size=40))
def test_composition_equals_a_brute_force_count(samples):
    """Any samples (collection, stratum or -1, times drawn): the tables equal counting one by one."""
    collection = np.array([c for c, _, _ in samples], np.int64)
    stratum = np.array([s for _, s, _ in samples], np.int64)
    counts = np.array([n if s >= 0 else 0 for _, s, n in samples], np.int64)
    got = composition(counts, collection, stratum, 3, 4)
    drawn, distinct = np.zeros((3, 4), np.int64), np.zeros((3, 4), np.int64)
    for c, s, n in zip(collection.tolist(), stratum.tolist(), counts.tolist()):
        if s >= 0:
            drawn[c, s] += n
            distinct[c, s] += n > 0
    assert got["drawn_strata"].tolist() == drawn.tolist() and got["distinct_strata"].tolist() == distinct.tolist()
    assert got["drawn"].tolist() == drawn.sum(1).tolist() and got["distinct"].tolist() == distinct.sum(1).tolist()
    assert all(v.dtype == np.int64 for v in got.values())


def test_collection_of_at_every_boundary_with_an_empty_collection():
    mix = Mix.unbalanced([3, 0, 2, 1], [1.0] * 4)
    assert mix.offsets.tolist() == [0, 3, 3, 5, 6]
    assert mix.collection_of(np.arange(6)).tolist() == [0, 0, 0, 2, 2, 3]
    assert mix.collection_of([5, 0]).tolist() == [3, 0]
