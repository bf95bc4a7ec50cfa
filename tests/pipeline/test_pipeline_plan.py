"""The epoch plan's pure functions: exact coverage, padding, rank slices, stream windows, eval ranges."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import plan

PROPERTY = settings(max_examples=200, derandomize=True, deadline=None)


@PROPERTY
@given(
    n=st.integers(1, 300),
    batch=st.integers(1, 16),
    world=st.integers(1, 8),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
    drop_last=st.booleans(),
)
def test_epoch_order_is_a_padded_permutation(n, batch, world, seed, epoch, drop_last):
    g = batch * world
    if drop_last and n < g:
        assert plan.steps_per_epoch(n, g, drop_last) == 0
        return
    order = plan.epoch_order(n, seed, epoch, g, drop_last)
    steps = plan.steps_per_epoch(n, g, drop_last)
    assert len(order) == steps * g
    if drop_last:
        assert len(set(order.tolist())) == len(order) == n - n % g  # a cut, no repeat
    else:
        assert set(order.tolist()) == set(range(n))  # every sample
        assert len(order) - n < g  # fewer than G repeats
        assert np.array_equal(order[n:], np.resize(order[:n], len(order) - n))  # repeats from the start
    ranks = [plan.rank_batches(order, r, batch, world) for r in range(world)]
    assert all(r.shape == (steps, batch) for r in ranks)
    glued = np.stack(ranks, axis=1).reshape(-1)  # rank r's slice of each global batch, in rank order
    assert np.array_equal(glued, order)


def test_order_depends_on_seed_epoch_and_global_batch_only():
    a = plan.epoch_order(1000, 7, 3, 32)
    assert np.array_equal(a, plan.epoch_order(1000, 7, 3, 32))
    assert not np.array_equal(a, plan.epoch_order(1000, 7, 4, 32))
    assert not np.array_equal(a, plan.epoch_order(1000, 8, 3, 32))
    # 2 ranks x 16 and 4 ranks x 8: the same global batches
    two = np.concatenate([plan.rank_batches(a, r, 16, 2) for r in range(2)], axis=1)
    four = np.concatenate([plan.rank_batches(a, r, 8, 4) for r in range(4)], axis=1)
    assert np.array_equal(two, four)


def test_valid_subset_keeps_the_step_count():
    valid = np.array([0, 1, 2, 10, 11])
    order = plan.epoch_order(12, 0, 0, 4, valid=valid)
    assert len(order) == plan.steps_per_epoch(12, 4) * 4 == 12
    assert set(order.tolist()) == set(valid.tolist())


@PROPERTY
@given(steps=st.integers(0, 40), start=st.integers(0, 40), workers=st.integers(1, 6))
def test_worker_steps_partition_the_remaining_steps(steps, start, workers):
    made = sorted(s for w in range(workers) for s in plan.worker_steps(steps, w, workers, start))
    assert made == list(range(start, steps))


@PROPERTY
@given(epochs=st.lists(st.integers(1, 9), min_size=1, max_size=4), start=st.integers(0, 8), workers=st.integers(1, 5))
def test_worker_roles_give_step_order_across_epochs(epochs, start, workers):
    """DataLoader takes batch i of an iteration from worker i % W, across epoch boundaries too."""
    start = min(start, epochs[0])
    due = [(e, s) for e, steps in enumerate(epochs) for s in range(start if e == 0 else 0, steps)]
    made: dict[tuple[int, int], int] = {}
    for w in range(workers):
        before = 0
        for e, steps in enumerate(epochs):
            first = start if e == 0 else 0
            for s in plan.worker_steps(steps, plan.worker_role(w, workers, before, first), workers, first):
                made[(e, s)] = w
            before += steps - first
    assert sorted(made) == sorted(due)
    assert [made[d] for d in due] == [i % workers for i in range(len(due))]


@PROPERTY
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=9),
    batch=st.integers(1, 12),
    world=st.integers(1, 8),
    workers=st.integers(1, 4),
    window=st.integers(1, 5),
    seed=st.integers(0, 99),
    drop_last=st.booleans(),
)
def test_stream_windows_cover_the_split_exactly(counts, batch, world, workers, window, seed, drop_last):
    n, g = sum(counts), batch * world
    steps = plan.steps_per_epoch(n, g, drop_last)
    if steps == 0:
        return
    positions = Counter()
    for rank in range(world):
        rank_steps = []
        for w in range(workers):
            for win in plan.stream_windows(counts, seed, 0, batch, rank, world, w, workers, window, drop_last):
                rank_steps += win.steps
                assert sum(s.hi - s.lo for s in win.segments) == len(win.steps) * batch
                for s in win.segments:
                    assert 0 <= s.lo < s.hi <= counts[s.shard]
                    positions.update(range(s.first, s.first + s.hi - s.lo))
        assert sorted(rank_steps) == list(range(steps))  # every rank: all steps, once
    total = sum(positions.values())
    assert total == steps * g
    if drop_last:
        assert max(positions.values()) == 1 and total == n - n % g
    else:
        assert set(positions) == set(range(n)) and total - n < g


def test_stream_windows_skip_to_the_resume_step():
    full = plan.stream_windows([50, 50], 0, 0, 4, 0, 1, 0, 1, window_steps=3)
    later = plan.stream_windows([50, 50], 0, 0, 4, 0, 1, 0, 1, window_steps=3, start=7)
    assert later == [w for w in full if w.steps[-1] >= 7] and later[0].steps == (6, 7, 8)


def test_shard_order_changes_with_the_epoch():
    orders = {tuple(plan.stream_shard_order(20, 0, e)) for e in range(5)}
    assert len(orders) == 5


@pytest.mark.parametrize("total,world,workers", [(0, 1, 1), (5, 3, 2), (7, 8, 4), (100, 3, 3)])
def test_eval_ranges_partition(total, world, workers):
    ranges = [plan.eval_range(total, r, world, w, workers) for r in range(world) for w in range(workers)]
    assert sum(hi - lo for lo, hi in ranges) == total
    covered = [i for lo, hi in ranges for i in range(lo, hi)]
    assert covered == list(range(total))
    assert sum(plan.eval_steps(total, r, world, workers, 3) for r in range(world)) == sum(
        math.ceil((hi - lo) / 3) for lo, hi in ranges
    )


def test_epoch_and_shard_orders_of_a_fixed_input_are_pinned():
    """Same seed, same batches, across versions: these orders are part of the loader contract (a resumed run
    from an older checkpoint relies on them). They also pin each stream's salt (seeds.EPOCH_PERMUTATION,
    seeds.SHARD_ORDER). Without drop_last the order is padded from its start to whole global batches."""
    assert plan.epoch_order(10, 0, 0, 4).tolist() == [9, 2, 1, 6, 0, 8, 5, 3, 7, 4, 9, 2]
    assert plan.epoch_order(10, 0, 1, 4).tolist() == [6, 0, 8, 9, 5, 7, 2, 1, 3, 4, 6, 0]
    assert plan.epoch_order(10, 0, 0, 4, drop_last=True).tolist() == [9, 2, 1, 6, 0, 8, 5, 3]
    assert plan.stream_shard_order(6, 0, 0).tolist() == [3, 5, 2, 1, 4, 0]
    assert plan.stream_shard_order(6, 0, 1).tolist() == [4, 2, 1, 0, 3, 5]
    assert plan.stream_shard_order(6, 1, 0).tolist() == [1, 3, 5, 4, 0, 2]


def test_every_shuffle_window_has_a_seed_of_its_own():
    """A window's shuffle seed depends on the seed, epoch, rank, worker and window: no two windows of any of
    these share one (two that did would shuffle alike), and it is the registered WINDOW stream."""
    from sharding import seeds

    def window_seeds(seed=0, epoch=0, rank=0, worker=0, **kw):
        args = dict(batch_size=2, world_size=2, num_workers=2, window_steps=1) | kw
        out = plan.stream_windows([5, 7, 4, 6], seed, epoch, rank=rank, worker=worker, **args)
        return [w.seed for w in out]

    base = window_seeds()
    assert len(base) > 2 and len(set(base)) == len(base)
    for change in ({"seed": 1}, {"epoch": 1}, {"rank": 1}, {"worker": 1}):
        assert set(window_seeds(**change)).isdisjoint(base), change
    assert base[0] == seeds.derive(0, 0, 0, 0, 0, seeds.WINDOW)


def test_stream_windows_pad_by_default():
    def steps(**kw):
        out = plan.stream_windows([5, 7, 4, 6], 0, 0, 2, 0, 2, 0, 1, 2, **kw)
        return [s for w in out for s in w.steps]

    # 22 samples, global batch 4: 6 steps padded, 5 with drop_last
    assert steps() == steps(drop_last=False) == list(range(6)) and steps(drop_last=True) == list(range(5))


def test_pad_or_cut_refuses_an_empty_sequence_by_name():
    with pytest.raises(ValueError, match="^cannot pad an empty sequence$"):
        plan.pad_or_cut(np.zeros(0, np.int64), 3)
    with pytest.raises(ValueError, match="^global batch must be >= 1, got 0$"):
        plan.steps_per_epoch(10, 0)
    assert (plan.steps_per_epoch(10, 4), plan.steps_per_epoch(10, 4, drop_last=True)) == (3, 2), "pads by default"
    assert plan.pad_or_cut(np.arange(3), 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
