"""The epoch plan: which sample each rank gets at each step. Pure functions of numbers, no I/O.

Everything that makes batches deterministic lives here; readers and workers only
execute a plan. Two plans, one contract (the train split):

- an epoch is a sequence of `steps` global batches of G = batch_size x world_size
  samples; every sample of the split appears once, and the sequence is padded to a
  multiple of G with repeats from its own start (fewer than G repeats), or cut to
  a multiple of G with `drop_last`;
- every rank takes exactly `steps` full batches of `batch_size`.

**Global plan** (local or cached raw shards, random access through the offset
index): a uniform permutation of the N sample indices seeded by (seed, epoch).
Global batch s is `order[s*G : (s+1)*G]`; rank r takes the r-th slice of B. The
order is a function of (seed, epoch, G) only: 2 ranks x 16 and 4 ranks x 8 see the
same global batches, and the number of loader workers changes nothing.

**Stream plan** (http, pipe, png or generic shards, read front to back): the
shard order is permuted per epoch and the concatenated samples (padded like
above) are dealt to ranks as contiguous pieces, each rank's piece to its workers
as contiguous sub-pieces (worker w makes the rank's steps w, w+W, ...). A reader
shuffles its sub-piece in windows of about `shuffle_buffer` samples (an exact
permutation of each window): a block shuffle, with coverage still exact. Its order
depends on the rank and worker counts, so a stream-plan resume needs the same ones.

Seeds come from `sharding.seeds` (its table says which stream each salt drives).
Eval splits are not shuffled: `eval_range` gives each (rank, worker) a contiguous
range, so each sample is read exactly once for any counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sharding import seeds


def steps_per_epoch(n: int, global_batch: int, drop_last: bool = False) -> int:
    """Global batches in a train epoch of `n` samples: ceil(n / G), or floor with `drop_last`."""
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1, got {global_batch}")
    return n // global_batch if drop_last else math.ceil(n / global_batch)


def pad_or_cut(seq: np.ndarray, length: int) -> np.ndarray:
    """`seq` cycled from its start up to `length` items (or its first `length`)."""
    if len(seq) == 0:
        raise ValueError("cannot pad an empty sequence")
    return np.resize(seq, length)


def epoch_order(
    n: int, seed: int, epoch: int, global_batch: int, drop_last: bool = False, valid: np.ndarray | None = None
) -> np.ndarray:
    """Global plan: int64 [steps * G], the sample index of every slot of every global batch.

    `valid` (sorted sample indices) restricts the permutation to readable samples
    (a corrupt shard's samples are lost); the step count still follows `n`, so every
    rank keeps the same number of steps whatever a rank finds unreadable.
    """
    steps = steps_per_epoch(n, global_batch, drop_last)
    pool = np.arange(n, dtype=np.int64) if valid is None else np.asarray(valid, dtype=np.int64)
    perm = seeds.rng(seed, epoch, seeds.EPOCH_PERMUTATION).permutation(pool)
    return pad_or_cut(perm, steps * global_batch)


def rank_batches(order: np.ndarray, rank: int, batch_size: int, world_size: int) -> np.ndarray:
    """int64 [steps, batch_size]: rank `rank`'s slice of each global batch of `order`."""
    return order.reshape(-1, world_size, batch_size)[:, rank, :]


def worker_steps(steps: int, role: int, num_workers: int, start: int = 0) -> range:
    """The steps s >= start with s = role (mod W), in order: what plan worker `role` of W makes."""
    return range(start + (role - start) % num_workers, steps, num_workers)


def worker_role(worker: int, num_workers: int, before: int, first: int) -> int:
    """The plan role a loader worker plays in an epoch, so that batches arrive in step order.

    torch's DataLoader asks its workers in turn across a whole iteration: its i-th
    batch comes from worker i % W. An epoch whose first step `first` is the
    iteration's batch number `before` therefore needs worker w to make the steps s
    with before + s - first = w (mod W).
    """
    return (worker - before + first) % num_workers


def eval_range(total: int, rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, int]:
    """Sample range [lo, hi) of a (rank, worker) in an eval split of `total` samples."""
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    n = hi - lo
    return lo + n * worker // num_workers, lo + n * (worker + 1) // num_workers


def eval_steps(total: int, rank: int, world_size: int, num_workers: int, batch_size: int) -> int:
    """Batches a rank yields in an eval split (each worker's last batch may be partial)."""
    workers = max(1, num_workers)
    sizes = (hi - lo for lo, hi in (eval_range(total, rank, world_size, w, workers) for w in range(workers)))
    return sum(math.ceil(n / batch_size) for n in sizes)


@dataclass(frozen=True)
class Segment:
    """Samples [lo, hi) of shard `shard`, read front to back; `first` is the split index of sample lo."""

    shard: int
    lo: int
    hi: int
    first: int


@dataclass(frozen=True)
class Window:
    """Stream plan: the samples one reader reads, shuffles and cuts into the batches of `steps`."""

    steps: tuple[int, ...]
    segments: tuple[Segment, ...]
    seed: int  # of the permutation inside the window


def stream_shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return seeds.rng(seed, epoch, seeds.SHARD_ORDER).permutation(num_shards)


def segments(positions: tuple[int, int], order: np.ndarray, counts: list[int]) -> list[Segment]:
    """Positions [a, b) of the epoch's padded concatenation -> shard segments (wrapping past the end)."""
    n = sum(counts)
    starts = np.cumsum([0] + [counts[i] for i in order])
    firsts = np.cumsum([0] + list(counts))
    out: list[Segment] = []
    a, b = positions
    while a < b:
        p = a % n
        k = int(np.searchsorted(starts, p, side="right")) - 1
        shard = int(order[k])
        lo = p - int(starts[k])
        take = min(b - a, counts[shard] - lo)
        out.append(Segment(shard, lo, lo + take, int(firsts[shard]) + lo))
        a += take
    return out


def stream_windows(
    counts: list[int],
    seed: int,
    epoch: int,
    batch_size: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    window_steps: int,
    drop_last: bool = False,
    start: int = 0,
) -> list[Window]:
    """Stream plan: the windows plan worker `worker` of a rank reads this epoch, from step `start` on.

    Windows before `start` are left out; the first window kept may hold steps
    before `start`, which the reader makes and drops (at most `window_steps`).
    """
    steps = steps_per_epoch(sum(counts), batch_size * world_size, drop_last)
    order = stream_shard_order(len(counts), seed, epoch)
    return [
        Window(chunk, tuple(segments(span, order, counts)), seeds.derive(seed, epoch, rank, worker, i, seeds.WINDOW))
        for i, chunk, span in worker_windows(steps, batch_size, rank, worker, num_workers, window_steps, start)
    ]


def worker_windows(
    steps: int, batch_size: int, rank: int, worker: int, num_workers: int, window_steps: int, start: int
) -> Iterator[tuple[int, tuple[int, ...], tuple[int, int]]]:
    """(index, steps, positions [a, b) in the epoch's sequence) of each window plan worker `worker` of a rank
    reads on the stream plan: the rank's piece is contiguous, the worker's sub-piece follows the sub-pieces of
    the workers before it, and windows ending before `start` are left out."""
    mine = list(worker_steps(steps, worker, num_workers))
    before = sum(len(worker_steps(steps, w, num_workers)) for w in range(worker))
    base = (rank * steps + before) * batch_size
    for i in range(0, len(mine), window_steps):
        chunk = tuple(mine[i : i + window_steps])
        if chunk[-1] >= start:
            a = base + i * batch_size
            yield i, chunk, (a, a + len(chunk) * batch_size)
