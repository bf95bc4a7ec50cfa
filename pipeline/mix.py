"""Several collections (and strata) in one epoch: the mixing plan. Pure functions of numbers, no I/O.

The contract (docs/pipeline.md, "Several collections") for collections of N_i samples with weights w_i,
global batch G = batch_size x world_size:

- an epoch has `steps = ceil(E / G)` global batches (floor with `drop_last`), E = sum(N_i) or
  `epoch_samples`; each of its D = steps x G slots is a draw (no padding repeats);
- collection i makes n_i of the D draws, D x w_i / sum(w) rounded by largest remainder (exact
  fractions, ties to the earlier collection), so the n_i add up to D exactly;
- a collection's draws continue one sequence across epochs: epoch e takes its positions
  [e n_i, (e+1) n_i). Position p belongs to stratum p mod S_i (strata in sorted order; one stratum
  without balancing), and a stratum hands out its samples pass after pass, each pass a fresh permutation
  (seeded by seed, collection, stratum, pass). After k epochs a stratum has made floor or ceil of
  k n_i / S_i draws and each of its M samples floor or ceil of (its draws) / M;
- the epoch's draws of all collections are shuffled together by (seed, epoch): the global order depends
  on (seed, epoch, G) only, so ranks and workers only slice it, as in `pipeline.plan`.

The state of the whole mix after epoch e is its cursors e x n_i: a function of the epoch, which is why a
loader state needs no more than (epoch, step) to resume, and checks the cursors to refuse another mix.

Streamed collections (read front to back) follow the same arithmetic with shards instead of samples:
a collection's sequence is its shards concatenated in a fresh order per pass, and a reader's share of
each collection comes from one seeded interleaving of the epoch's D slots (`stream_windows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from pipeline import plan
from sharding import seeds


def allocate(total: int, weights: Sequence[float]) -> np.ndarray:
    """int64 shares of `total` proportional to `weights` that add up to `total` exactly (largest remainder)."""
    w = [Fraction(x) for x in weights]  # exact: a float weight is a binary fraction
    if total < 0 or not w or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"cannot share {total} draws by weights {list(weights)}")
    exact = [total * x / sum(w) for x in w]
    share = np.array([int(x) for x in exact], np.int64)  # floor: every term is >= 0
    rest = total - int(share.sum())
    by_remainder = sorted(range(len(w)), key=lambda i: (-(exact[i] - share[i]), i))
    share[by_remainder[:rest]] += 1
    return share


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def stratum_draws(members: np.ndarray, start: int, count: int, key: tuple[int, ...]) -> np.ndarray:
    """Draws [start, start + count) of a stratum: its `members` pass after pass, each pass permuted by `key`."""
    m = len(members)
    out = np.empty(count, np.int64)
    done = 0
    while done < count:
        passes, offset = divmod(start + done, m)
        perm = members[seeds.rng(*key, passes, seeds.MIX_DRAWS).permutation(m)]
        take = min(count - done, m - offset)
        out[done : done + take] = perm[offset : offset + take]
        done += take
    return out


def collection_draws(strata: list[np.ndarray], start: int, count: int, key: tuple[int, ...]) -> np.ndarray:
    """Positions [start, start + count) of a collection's sequence: position p from stratum p mod S."""
    s = len(strata)
    parts = []
    for j, members in enumerate(strata):
        lo, hi = ceil_div(start - j, s), ceil_div(start + count - j, s)  # draws of stratum j in the range
        parts.append(stratum_draws(members, lo, hi - lo, (*key, j)))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Mix:
    """What a mixed epoch depends on besides (seed, epoch, G): the collections' sizes, weights and strata.

    Samples are numbered collection by collection (`offsets`); `strata[i]` gives each sample of
    collection i its stratum (0 for all without balancing).
    """

    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    strata: tuple[np.ndarray, ...]
    epoch_samples: int | None = None

    @classmethod
    def unbalanced(cls, sizes: Sequence[int], weights: Sequence[float], epoch_samples: int | None = None) -> Mix:
        return cls(tuple(sizes), tuple(weights), tuple(np.zeros(n, np.int64) for n in sizes), epoch_samples)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def steps(self, global_batch: int, drop_last: bool = False) -> int:
        return plan.steps_per_epoch(self.epoch_samples or sum(self.sizes), global_batch, drop_last)

    def pools(self, valid: np.ndarray | None = None) -> list[list[np.ndarray]]:
        """Per collection, per non-empty stratum (sorted), its readable samples' indices."""
        off = self.offsets
        ok = None
        if valid is not None:
            ok = np.zeros(off[-1], bool)
            ok[np.asarray(valid, np.int64)] = True
        out = []
        for i, strata in enumerate(self.strata):
            idx = np.arange(off[i], off[i + 1], dtype=np.int64)
            if ok is not None:
                strata, idx = strata[ok[idx]], idx[ok[idx]]
            out.append([idx[strata == s] for s in np.unique(strata)])
        return out

    def draws(self, global_batch: int, drop_last: bool = False, valid: np.ndarray | None = None) -> np.ndarray:
        """n_i: each collection's draws per epoch (a collection with nothing readable gets none)."""
        return self.sampler(global_batch, drop_last, valid).draws

    def sampler(self, global_batch: int, drop_last: bool = False, valid: np.ndarray | None = None) -> MixSampler:
        """What every epoch of this mix shares (pools, draws), computed once: `MixSampler.order(seed, epoch)`."""
        pools = self.pools(valid)
        weights = [w if any(len(p) for p in strata) else 0.0 for w, strata in zip(self.weights, pools)]
        return MixSampler(pools, allocate(self.steps(global_batch, drop_last) * global_batch, weights))

    def epoch_order(
        self, seed: int, epoch: int, global_batch: int, drop_last: bool = False, valid: np.ndarray | None = None
    ) -> np.ndarray:
        """int64 [steps * G]: the sample of every slot of every global batch of `epoch`."""
        return self.sampler(global_batch, drop_last, valid).order(seed, epoch)

    def cursors(self, epoch: int, global_batch: int, drop_last: bool = False) -> list[int]:
        """Each collection's draws before `epoch`: where its sequence stands when the epoch starts."""
        return [epoch * int(x) for x in self.draws(global_batch, drop_last)]

    def collection_of(self, indices: np.ndarray) -> np.ndarray:
        """The collection of each sample index."""
        return np.searchsorted(self.offsets, np.asarray(indices, np.int64), side="right") - 1


@dataclass(frozen=True)
class MixSampler:
    """A mix's per-collection strata (readable samples) and draws per epoch: each epoch's order from them."""

    pools: list[list[np.ndarray]]
    draws: np.ndarray

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """int64 [steps * G]: the sample of every slot of every global batch of `epoch`."""
        n = self.draws
        parts = [collection_draws(p, epoch * int(n[i]), int(n[i]), (seed, i)) for i, p in enumerate(self.pools)]
        order = np.concatenate(parts)
        return order[seeds.rng(seed, epoch, seeds.MIX_ORDER).permutation(len(order))]


def composition(
    counts: np.ndarray, collection: np.ndarray, stratum: np.ndarray, num_collections: int, num_strata: int
) -> dict[str, np.ndarray]:
    """Draws and distinct samples per collection and per (collection, stratum), from how often each sample was
    drawn (`counts`, int [N]). `collection` and `stratum` give each sample its collection and its stratum
    (an index into the strata's names; -1 for an unreadable sample, never drawn).

    Returns int64 arrays: drawn [C], distinct [C], drawn_strata [C, S], distinct_strata [C, S].
    """
    counts = np.asarray(counts, np.int64)
    keep = stratum >= 0
    flat = collection[keep] * num_strata + stratum[keep]
    cells = num_collections * num_strata

    def table(weights: np.ndarray) -> np.ndarray:
        return np.bincount(flat, weights=weights[keep], minlength=cells).astype(np.int64).reshape(-1, num_strata)

    drawn, distinct = table(counts), table((counts > 0).astype(np.int64))
    return {"drawn": drawn.sum(1), "distinct": distinct.sum(1), "drawn_strata": drawn, "distinct_strata": distinct}


# --------------------------------------------------------------------------- streamed collections


@dataclass(frozen=True)
class StreamMix:
    """A streamed mixed epoch's inputs: each collection's shard sample counts and its draws per epoch."""

    collections: list[list[int]]
    draws: np.ndarray

    @property
    def steps_draws(self) -> int:
        return int(self.draws.sum())


def interleave(draws: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """int64 [D]: which collection each slot of a streamed mixed epoch draws from (n_i slots each)."""
    labels = np.repeat(np.arange(len(draws), dtype=np.int64), draws)
    return labels[seeds.rng(seed, epoch, seeds.MIX_ORDER).permutation(len(labels))]


def pass_segments(
    counts: Sequence[int], first_shard: int, first_index: int, key: tuple[int, ...], start: int, stop: int
) -> list[plan.Segment]:
    """Positions [start, stop) of a streamed collection's sequence (its shards, in a fresh order per pass)."""
    total = sum(counts)
    out: list[plan.Segment] = []
    a = start
    while a < stop:
        passes, p = divmod(a, total)
        order = seeds.rng(*key, passes, seeds.MIX_SHARD_ORDER).permutation(len(counts))
        take = min(stop - a, total - p)
        for seg in plan.segments((p, p + take), order, list(counts)):
            out.append(plan.Segment(first_shard + seg.shard, seg.lo, seg.hi, first_index + seg.first))
        a += take
    return out


def stream_windows(
    collections: Sequence[Sequence[int]],
    draws: np.ndarray,
    seed: int,
    epoch: int,
    batch_size: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    window_steps: int,
    start: int = 0,
) -> list[plan.Window]:
    """The windows plan worker `worker` of a rank reads in a streamed mixed epoch, from step `start` on.

    `collections[i]` are collection i's shard sample counts (shards numbered collection by collection) and
    `draws` its n_i. The epoch's slots are dealt like `plan.stream_windows` deals them (contiguous pieces
    per rank and worker); a window's slots of collection i are the next ones of that collection's
    sequence, so every collection makes exactly n_i draws per epoch whatever the layout.
    """
    steps = int(sum(draws)) // (batch_size * world_size)
    slots = interleave(draws, seed, epoch)
    before = np.zeros((len(draws), len(slots) + 1), np.int64)  # slots of each collection before a position
    for i in range(len(draws)):
        before[i, 1:] = np.cumsum(slots == i)
    shard_base = np.concatenate([[0], np.cumsum([len(c) for c in collections])])
    index_base = np.concatenate([[0], np.cumsum([sum(c) for c in collections])])
    windows = []
    for k, chunk, (a, b) in plan.worker_windows(steps, batch_size, rank, worker, num_workers, window_steps, start):
        segs = []
        for i, counts in enumerate(collections):
            lo, hi = epoch * int(draws[i]) + before[i, a], epoch * int(draws[i]) + before[i, b]
            segs += pass_segments(counts, int(shard_base[i]), int(index_base[i]), (seed, i), int(lo), int(hi))
        windows.append(plan.Window(chunk, tuple(segs), seeds.derive(seed, epoch, rank, worker, k, seeds.WINDOW)))
    return windows


__all__ = [
    "Mix",
    "MixSampler",
    "StreamMix",
    "allocate",
    "collection_draws",
    "composition",
    "interleave",
    "pass_segments",
    "stratum_draws",
    "stream_windows",
]
