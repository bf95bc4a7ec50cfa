"""The mixing plan's pure pieces (`pipeline/mix.py`) against counts, hand-made tables and pinned values.

Pinned values guard the determinism promise across versions (same seed and inputs, same batches): a change
that reorders a mixed epoch must be deliberate and show here.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.mix import Mix, ceil_div, interleave, pass_segments, stream_windows


def test_ceil_div_by_hand():
    assert [ceil_div(a, 3) for a in (0, 1, 2, 3, 4, 6, 7)] == [0, 1, 1, 1, 2, 2, 3]
    assert [ceil_div(a, 2) for a in (-3, -2, -1)] == [-1, -1, 0]


def test_draws_and_cursors_follow_drop_last_and_readable_samples():
    mix = Mix.unbalanced([7, 3], [1.0, 1.0])  # E = 10, G = 4: 3 steps (12 draws), 2 with drop_last (8)
    assert mix.draws(4).tolist() == [6, 6] and mix.draws(4, drop_last=True).tolist() == [4, 4]
    assert mix.cursors(2, 4) == [12, 12] and mix.cursors(2, 4, drop_last=True) == [8, 8]
    assert mix.draws(4, valid=np.arange(7)).tolist() == [12, 0]  # nothing of collection 1 readable
    assert mix.draws(4, True, np.arange(7)).tolist() == [8, 0]
    assert Mix.unbalanced([7, 3], [1.0, 1.0], 20).epoch_samples == 20


@given(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.integers(0, 3), st.integers(0, 3))
def test_interleave_gives_each_collection_exactly_its_slots(draws, seed, epoch):
    slots = interleave(np.array(draws, np.int64), seed, epoch)
    assert slots.dtype == np.int64 and len(slots) == sum(draws)
    assert Counter(slots.tolist()) == Counter({i: n for i, n in enumerate(draws) if n})


def test_interleave_depends_on_seed_and_epoch_and_is_pinned():
    draws = np.array([4, 3, 3], np.int64)
    orders = {(s, e): interleave(draws, s, e).tolist() for s in (0, 1) for e in (0, 1)}
    assert len({tuple(o) for o in orders.values()}) == 4  # every (seed, epoch) its own order
    assert interleave(draws, 0, 0).tolist() == orders[(0, 0)]  # and the same one again
    assert orders[(0, 0)] == PINNED_INTERLEAVE


PINNED_INTERLEAVE = [2, 0, 0, 0, 0, 1, 2, 2, 1, 1]


@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(0, 40), st.integers(0, 40))
def test_pass_segments_cover_the_sequence_pass_after_pass(counts, start, length):
    """Positions [start, start + length): each pass is every sample of the collection exactly once."""
    total = sum(counts)
    segs = pass_segments(counts, 10, 100, (7, 1), start, start + length)
    assert sum(s.hi - s.lo for s in segs) == length
    offsets = np.concatenate([[0], np.cumsum(counts)])
    drawn = [100 + int(offsets[s.shard - 10]) + i for s in segs for i in range(s.lo, s.hi)]
    assert all(s.first == 100 + offsets[s.shard - 10] + s.lo for s in segs)  # split index of sample lo
    for p in range(start, start + length):  # whole passes hold each sample once
        pass_start = p - p % total
        if pass_start >= start and pass_start + total <= start + length:
            whole = drawn[pass_start - start : pass_start - start + total]
            assert sorted(whole) == list(range(100, 100 + total))


def test_pass_segments_take_a_fresh_shard_order_each_pass_pinned():
    counts = [2, 1, 3, 2]
    passes = [[s.shard for s in pass_segments(counts, 0, 0, (3, 0), k * 8, (k + 1) * 8)] for k in range(4)]
    assert all(sorted(p) == [0, 1, 2, 3] for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # not one order for every pass
    assert passes == PINNED_PASSES
    assert [s.shard for s in pass_segments(counts, 0, 0, (4, 0), 0, 8)] != passes[0] or [
        s.shard for s in pass_segments(counts, 0, 0, (5, 0), 0, 8)
    ] != passes[0]  # the key (seed, collection) picks the order


PINNED_PASSES = [[1, 3, 2, 0], [1, 2, 3, 0], [2, 0, 3, 1], [2, 1, 3, 0]]


def _windows(seed=0, epoch=0, rank=0, worker=0, **kw):
    layout = {"batch_size": 2, "world_size": 2, "num_workers": 2, "window_steps": 1, **kw}
    collections, draws = [[3, 3], [4]], np.array([6, 6], np.int64)
    return stream_windows(
        collections,
        draws,
        seed,
        epoch,
        layout["batch_size"],
        rank,
        layout["world_size"],
        worker,
        layout["num_workers"],
        layout["window_steps"],
        *(() if "start" not in kw else (kw["start"],)),
    )


def test_window_seeds_differ_for_every_window_rank_worker_epoch_and_seed():
    seeds_of = {}
    for seed in (0, 1):
        for epoch in (0, 1):
            for rank in (0, 1):
                for worker in (0, 1):
                    for k, w in enumerate(_windows(seed, epoch, rank, worker)):
                        seeds_of[(seed, epoch, rank, worker, k)] = w.seed
    assert len(seeds_of) == 2 * 2 * 2 * 3  # 3 steps per rank: worker 0 reads 2 windows, worker 1 one
    assert len(set(seeds_of.values())) == len(seeds_of)
    assert [w.seed for w in _windows()] == PINNED_WINDOW_SEEDS


PINNED_WINDOW_SEEDS = [5979057907322716590, 2608599750404471689]


def test_stream_windows_start_at_step_zero_unless_told():
    assert _windows() == _windows(start=0)
    assert _windows(start=2) == _windows()[1:]  # worker 0 reads steps 0 and 2: the window of step 0 is left out


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_every_streamed_epoch_draws_each_collection_its_share(epoch):
    """Every window's slots together: collection 0 makes its 6 draws, collection 1 its 6 (shards 0-1 vs 2)."""
    shards = Counter()
    for rank in (0, 1):
        for worker in (0, 1):
            for w in _windows(epoch=epoch, rank=rank, worker=worker):
                for s in w.segments:
                    shards["a" if s.shard < 2 else "b"] += s.hi - s.lo
    assert shards == {"a": 6, "b": 6}


def test_a_stratum_deals_a_fresh_permutation_each_pass_keyed_by_its_place_pinned():
    from pipeline.mix import stratum_draws

    members = np.arange(10, 18, dtype=np.int64)
    draws = stratum_draws(members, 0, 24, (0, 1, 2))
    passes = [draws[i : i + 8].tolist() for i in (0, 8, 16)]
    assert all(sorted(p) == members.tolist() for p in passes)  # each pass: every member once
    assert len({tuple(p) for p in passes}) == 3  # and a fresh order each pass
    assert stratum_draws(members, 5, 7, (0, 1, 2)).tolist() == draws[5:12].tolist()  # any window of the sequence
    other = stratum_draws(members, 0, 8, (0, 1, 3)).tolist()  # another stratum (or collection, or seed)
    assert other != passes[0]
    assert passes[0] == PINNED_STRATUM_PASS


PINNED_STRATUM_PASS = [15, 13, 12, 14, 10, 11, 16, 17]


def test_shares_are_refused_for_impossible_totals_and_weights_with_the_reason():
    from pipeline.mix import allocate

    for total, weights in [(-1, [1.0]), (5, [-1.0, 3.0]), (5, []), (5, [0.0, 0.0])]:
        with pytest.raises(ValueError, match=rf"^cannot share {total} draws by weights \[.*\]$"):
            allocate(total, weights)


def test_the_sampler_keeps_every_slot_unless_told_and_its_epoch_order_is_pinned():
    mix = Mix.unbalanced([5, 3], [1.0, 1.0])  # E = 8, G = 3: 3 steps (9 draws), 2 with drop_last (6)
    assert mix.sampler(3).draws.tolist() == mix.draws(3).tolist() == [5, 4]
    assert mix.sampler(3, drop_last=True).draws.tolist() == [3, 3]
    order = mix.epoch_order(1, 2, 4)
    assert order.tolist() == PINNED_EPOCH_ORDER
    assert order.tolist() != mix.epoch_order(2, 2, 4).tolist() and order.tolist() != mix.epoch_order(1, 3, 4).tolist()


PINNED_EPOCH_ORDER = [3, 6, 5, 7, 7, 2, 1, 0]
