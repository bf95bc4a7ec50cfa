"""External films checked against training films: exact and near copies (train/overlap.py)."""

from __future__ import annotations

import json

import numpy as np

from sharding.dedup import hamming, near_pairs, near_pairs_between, phash
from sharding.verify import decode_member, iter_samples
from train.overlap import FilmHashes, film_hashes, find_copies, not_copied


def test_near_pairs_between_equals_brute_force():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, size=40)]
    hashes = [b << 192 | b << 128 | b << 64 | b for b in base]
    others = [h ^ (1 << int(rng.integers(0, 256))) for h in hashes[:15]] + [hashes[3], hashes[3] ^ 0b111]
    got = sorted(near_pairs_between(hashes, others, distance=3))
    want = sorted(
        (i, j, hamming(a, b)) for i, a in enumerate(hashes) for j, b in enumerate(others) if hamming(a, b) <= 3
    )
    assert got == want and len(want) >= 17
    assert near_pairs_between([], others, 3) == [] and near_pairs_between(hashes, [], 3) == []
    # the within-set version still gives each pair once, i < j
    assert sorted(near_pairs(hashes[:5] + [hashes[0]], 0)) == [(0, 5)]


def test_exact_copies_win_and_the_closest_near_copy_is_kept():
    train = FilmHashes(["t0", "t1", "t2"], ["s0", "s1", "s2"], [0b0, 0b1111, 0b111])
    films = FilmHashes(["a", "b", "c", "d"], ["s1", "x", "y", "z"], [0b1111, 0b11111, (2**64 - 1) << 192, 0b0])
    copies = find_copies(films, train, distance=2)
    assert copies == {
        "a": {"train_key": "t1", "kind": "exact", "bits": 0},  # same pixels, even though near t2 as well
        "b": {"train_key": "t1", "kind": "near", "bits": 1},  # 1 bit from t1, 2 from t2: the closest
        "d": {"train_key": "t0", "kind": "near", "bits": 0},  # same hash, different pixels: near, 0 bits
    }
    assert find_copies(films, train, distance=None) == {"a": copies["a"]}, "None: exact copies only"
    assert not_copied(["a", "b", "c", "d"], copies).tolist() == [False, False, True, False]


def test_film_hashes_read_sha_and_phash_from_real_shards(phantom_shards):
    tars = sorted(phantom_shards.glob("val-*.tar"))
    got = film_hashes([str(t) for t in tars])
    want = {}
    for tar in tars:
        for s in iter_samples(tar):
            pixels = decode_member("image.npy", s["image.npy"])[0]
            want[s["__key__"]] = (json.loads(s["json"])["sha256"], phash(pixels))
    assert got.keys == sorted(want) and len(got.keys) > 0
    assert [(s, p) for s, p in zip(got.sha256, got.phash)] == [want[k] for k in got.keys]
    # a set against itself: every film is its own exact copy
    assert {c["kind"] for c in find_copies(got, got, 6).values()} == {"exact"}
