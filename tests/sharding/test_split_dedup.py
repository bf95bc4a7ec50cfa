"""Split targets, grouped stratified assignment, exact and near duplicate grouping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharding.dedup import group, hamming, near_pairs, phash, pixel_sha256
from sharding.phantom import PhantomSpec, _source_of, render_sample
from sharding.split import assign, shuffled, split_report, targets


@pytest.mark.parametrize("n", [0, 1, 2, 3, 9, 10, 12, 1345, 3616, 6012, 10192])
def test_targets_within_one_of_80_10_10(n):
    t = targets(n)
    assert sum(t) == n
    for got, frac in zip(t, (0.8, 0.1, 0.1)):
        assert abs(got - frac * n) <= 1


# (n, (train, val, test)) worked by hand: train = n * 0.8 rounded half up; of the rest, test gets the smaller half.
TARGETS_BY_HAND = [
    (0, (0, 0, 0)),
    (1, (1, 0, 0)),
    (2, (2, 0, 0)),
    (3, (2, 1, 0)),
    (4, (3, 1, 0)),
    (5, (4, 1, 0)),
    (7, (6, 1, 0)),
    (9, (7, 1, 1)),
    (10, (8, 1, 1)),
    (12, (10, 1, 1)),
    (13, (10, 2, 1)),
    (17, (14, 2, 1)),
    (1345, (1076, 135, 134)),
    (3616, (2893, 362, 361)),
]


@pytest.mark.parametrize("n,want", TARGETS_BY_HAND)
def test_targets_exact_for_small_and_real_class_sizes(n, want):
    assert targets(n) == want


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3), min_size=20, max_size=200),
    labels_seed=st.integers(0, 2**16),
    seed=st.integers(0, 2**16),
)
def test_groups_never_cross_and_classes_stay_within_one(sizes, labels_seed, seed):
    rng = np.random.default_rng(labels_seed)
    labels, groups = [], []
    for g, size in enumerate(sizes):
        label = int(rng.integers(0, 4))
        labels += [label] * size
        groups += [g] * size
    splits = assign(labels, groups, seed)
    by_group: dict[int, set] = {}
    for g, s in zip(groups, splits):
        by_group.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in by_group.values())
    singles_per_class = np.bincount([labels[i] for i in range(len(labels)) if sizes[groups[i]] == 1], minlength=4)
    for c in range(4):
        n = labels.count(c)
        got = [sum(1 for lab, s in zip(labels, splits) if lab == c and s == name) for name in ("train", "val", "test")]
        if singles_per_class[c] >= 6:  # enough singletons to fill the targets exactly
            assert tuple(got) == targets(n)
        for g_, frac in zip(got, (0.8, 0.1, 0.1)):
            assert abs(g_ - frac * n) <= max(1, 3 if singles_per_class[c] < 6 else 1)


def test_assign_is_deterministic_and_seed_dependent():
    labels = [i % 4 for i in range(200)]
    groups = list(range(200))
    a = assign(labels, groups, 0)
    assert a == assign(labels, groups, 0)
    assert a != assign(labels, groups, 1)


def test_mixed_label_group_counts_for_each_member():
    labels = [0, 1] + [i % 4 for i in range(100)]
    groups = [0, 0] + list(range(1, 101))
    splits = assign(labels, groups, 3)
    assert splits[0] == splits[1]


def test_shuffled_is_a_seeded_permutation():
    keys = [f"k{i}" for i in range(50)]
    a = shuffled(keys, 0, "train")
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert [keys[i] for i in a] == [list(reversed(keys))[i] for i in shuffled(list(reversed(keys)), 0, "train")]
    assert a != shuffled(keys, 1, "train")


def test_exact_groups_by_pixels():
    gid, kinds = group(["a", "b", "a", "c", "b"])
    assert gid == [0, 1, 0, 3, 1]
    assert kinds == {0: "exact", 1: "exact"}


def test_near_duplicates_found_across_classes_and_unrelated_films_apart():
    spec = PhantomSpec(counts=(40,) * 4, seed=0, near_dup_fraction=0.05, dup_fraction=0)
    images = [render_sample(spec, c, i)[0] for c in range(4) for i in range(40)]
    hashes = [phash(x) for x in images]
    near = {c * 40 + i for c in range(4) for i in range(40) if _source_of(spec, c, i)[0] == "near"}
    assert near
    pairs = near_pairs(hashes, 6)
    assert {i for p in pairs for i in p} >= near
    for i, j in pairs:  # only near copies pair up
        assert i in near or j in near
    gid, kinds = group([pixel_sha256(x) for x in images], hashes, 6)
    assert set(kinds.values()) == {"near"}
    assert hamming(hashes[0], hashes[1]) > 6


def test_every_seed_salt_lives_in_seeds_and_is_distinct():
    """One table of seeded streams: no module outside sharding/seeds.py defines a salt, and no two collide."""
    import re
    from pathlib import Path

    from sharding import seeds

    root = Path(__file__).resolve().parents[2]
    salts = {k: v for k, v in vars(seeds).items() if k.isupper() and isinstance(v, int)}
    assert len(set(salts.values())) == len(salts) >= 10
    for name in salts:
        assert f"`{name}`" in seeds.__doc__, f"{name} is not described in the seeds table"
    for path in (
        p for pkg in ("sharding", "pipeline", "train", "evaluation", "tools") for p in (root / pkg).rglob("*.py")
    ):
        if path.name != "seeds.py":
            assert not re.search(r"^\w*SALT\w* = ", path.read_text(), re.M), f"a salt outside seeds.py: {path}"


def test_the_split_and_write_order_of_a_fixed_input_are_pinned():
    """Same seed and inputs, same shards, across versions: these values are part of the shard contract (a change
    needs a BUILD_VERSION bump). They also pin each seeded stream's salt (seeds.SPLIT_GROUPS, WRITE_ORDER)."""
    labels = [0, 1, 2, 0, 1, 2, 0, 0, 2, 2, 1, 0, 3, 3, 0, 2, 2, 2, 1, 0]
    groups = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 2, 14, 15, 16, 17]
    t, v = "train", "val"
    assert assign(labels, groups, 0) == [t, t, t, v, v, t, t, t, t, t, t, t, t, t, t, t, v, t, t, t]
    assert assign(labels, groups, 1) == [t, t, t, t, t, t, v, t, t, v, v, t, t, t, t, t, t, t, t, t]
    keys = [f"k{i}" for i in range(8)]
    assert shuffled(keys, 0, "train") == [6, 5, 3, 7, 2, 4, 1, 0]
    assert shuffled(keys, 0, "val") == [1, 3, 2, 0, 5, 7, 4, 6]


def test_assign_edge_inputs():
    assert assign([], [], 0) == []
    # the last class absent: the per-class targets still cover every class
    got = assign([0, 1, 2] * 4, list(range(12)), 0, n_classes=4)
    assert len(got) == 12 and set(got) <= {"train", "val", "test"}
    with pytest.raises(ValueError, match="^labels and groups must have the same length$"):
        assign([0, 1], [0], 0)


def test_split_report_names_the_level_and_the_largest_class_deviation():
    from types import SimpleNamespace

    labels = [0] * 10 + [1] * 5 + [2] * 3
    found = SimpleNamespace(records=[SimpleNamespace(label=y) for y in labels], classes=["a", "b", "c"])
    # class 0: (6, 3, 1) against targets(10) = (8, 1, 1): 2 off; classes 1 and 2: (4, 1, 0) and (2, 1, 0), exact
    split_of = ["train"] * 6 + ["val"] * 3 + ["test"] + ["train"] * 4 + ["val"] + ["train"] * 2 + ["val"]
    good = list(range(18))
    plain = [{}] * 18
    assert split_report(found, good, split_of, plain, "patient") == {"by": "sample", "max_class_deviation": 2}
    with_patient = [{"patient_id": "p1"}] + [{}] * 17
    assert split_report(found, good, split_of, with_patient, "patient") == {"by": "patient", "max_class_deviation": 2}
    assert split_report(found, good, split_of, plain, "source")["by"] == "source"
    # every class exact; counted over the wrong classes (e.g. lab != c) class 0 would read 8 films as (6, 2, 0)
    exact = ["train"] * 8 + ["val", "test"] + ["train"] * 4 + ["val"] + ["train"] * 2 + ["val"]
    assert split_report(found, good, exact, plain, "patient")["max_class_deviation"] == 0


def test_the_perceptual_hash_uses_the_orthonormal_dct_ii():
    """The DCT matrix against scipy's orthonormal DCT-II of the identity (an independent implementation); it is
    built once at import, so only a direct call can catch a wrong term."""
    import scipy.fft

    from sharding.dedup import _dct_matrix

    for n in (8, 64):
        np.testing.assert_allclose(_dct_matrix(n), scipy.fft.dct(np.eye(n), norm="ortho", axis=0), atol=1e-12)


def test_the_stored_perceptual_hash_of_a_fixed_image_is_pinned():
    """Shards store this hash (build version 3) and the overlap check compares stored with computed ones, so its
    value is part of the shard contract: a change (another resampling filter, another DCT) needs a
    BUILD_VERSION bump. Written with all 64 hex digits, leading zeros included."""
    from sharding.dedup import phash_hex

    image = (np.arange(299 * 299).reshape(299, 299) * 7919 % 251).astype(np.uint8)
    assert phash_hex(phash(image)) == "6a56b4acc944ba2fe157baade157a28ce3d7b28de882b52d6a93b44c1933428c"
    assert phash_hex(1) == "0" * 63 + "1" and len(phash_hex(2**256 - 1)) == 64


def test_group_without_a_distance_groups_exact_copies_only():
    sha = ["a", "b", "a", "c"]
    near = [0, 1, 0, 1]  # b and c would be near copies (identical hashes)
    gids, kinds = group(sha, near, None)
    assert gids[0] == gids[2] and len({gids[1], gids[3], gids[0]}) == 3
    assert list(kinds.values()) == ["exact"]
    gids, kinds = group(sha, near, 0)
    assert gids[1] == gids[3] and sorted(kinds.values()) == ["exact", "near"]


def test_duplicate_groups_list_their_members_by_key_whatever_the_scan_order():
    """Members by key within a group (their files, labels and split alongside), groups by their first key."""
    from types import SimpleNamespace

    from sharding.split import duplicate_report

    def film(key: str, cls: str) -> SimpleNamespace:
        return SimpleNamespace(key=key, class_name=cls, rel=f"{cls}/images/{key}.png")

    records = [film("n-9", "Normal"), film("skip", "COVID"), film("c-2", "COVID"), film("z-0", "Normal")]
    records.append(film("a-5", "Normal"))
    good = [0, 2, 3, 4]  # record 1 was unreadable
    gids, kinds = [7, 7, 3, 3], {7: "near", 3: "exact"}
    report = duplicate_report(records, good, gids, kinds, split_of=["val", "val", "test", "test"])
    assert report == [
        {
            "kind": "exact",
            "members": ["a-5", "z-0"],
            "sources": ["Normal/images/a-5.png", "Normal/images/z-0.png"],
            "labels": ["Normal", "Normal"],
            "mixed_labels": False,
            "split": "test",
        },
        {
            "kind": "near",
            "members": ["c-2", "n-9"],
            "sources": ["COVID/images/c-2.png", "Normal/images/n-9.png"],
            "labels": ["COVID", "Normal"],
            "mixed_labels": True,
            "split": "val",
        },
    ]
