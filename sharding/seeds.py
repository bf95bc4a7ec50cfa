"""Every seeded random stream in radstream, derived one way: numpy's SeedSequence over (seed, ..., salt).

A salt names a stream, so no two streams share draws; the other parts say what the
stream varies with. Determinism and exact resume depend on this table:

- `SPLIT_GROUPS` (seed): the order among equal-size duplicate groups, hence each film's split
  (`sharding.split.assign`);
- `WRITE_ORDER` (seed, split index): the order of the samples in a split's shards (`sharding.split.shuffled`);
- `EPOCH_PERMUTATION` (seed, epoch): the global train permutation of local/cached shards
  (`pipeline.plan.epoch_order`);
- `SHARD_ORDER` (seed, epoch): the shard order of a streamed train epoch (`pipeline.plan.stream_shard_order`);
- `WINDOW` (seed, epoch, rank, worker, window): the permutation inside a streamed shuffle window
  (`pipeline.plan.stream_windows`);
- `MIX_DRAWS` (seed, collection, stratum, pass): the permutation of a stratum's samples for one pass through
  them, in a mixed epoch plan (`pipeline.mix`): the draws continue across epochs, so no epoch varies it;
- `MIX_SHARD_ORDER` (seed, collection, pass): a streamed collection's shard order for one pass through it
  (`pipeline.mix.stream_windows`);
- `MIX_ORDER` (seed, epoch): how a mixed epoch interleaves its collections' draws (`pipeline.mix`);
- `STEP_TORCH` (seed, epoch, rank, step): torch's global RNG for one training step, e.g. dropout
  (`train.loop.train_one_epoch`);
- `STEP_AUGMENT` (seed, epoch, rank, step): the augmentation generator of one step, flips and angles
  (`train.loop.train_one_epoch`);
- `BOOTSTRAP` (seed): the stratified resamples behind the report's intervals
  (`evaluation.statistics.bootstrap`);
- `OPERATING` (seed): the resamples behind the operating points' test intervals
  (`evaluation.statistics.operating.apply`);
- `SOURCES` (seed): the resamples behind the per-source intervals (`evaluation.audits.sources`).

Model initialisation takes `accelerate.utils.set_seed(seed)` (Python, numpy, torch)
before the model is built. The phantom generator keeps its own pinned scheme
(`sharding.phantom`: its pixels are pinned by a digest test).
"""

from __future__ import annotations

import numpy as np

SPLIT_GROUPS = 0x5917
WRITE_ORDER = 0x5A4D
EPOCH_PERMUTATION = 0x5EED
SHARD_ORDER = 0x5A0D
WINDOW = 0x5A3
STEP_TORCH = 0x70C0
STEP_AUGMENT = 0x70C1
BOOTSTRAP = 0xB007
OPERATING = 0x0B5E
SOURCES = 0x50C5
MIX_DRAWS = 0x3D1
MIX_SHARD_ORDER = 0x3D2
MIX_ORDER = 0x3D3


def _entropy(parts: tuple[int, ...]) -> list[int]:
    return [int(p) if int(p) >= 0 else int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]  # SeedSequence wants >= 0


def rng(*parts: int) -> np.random.Generator:
    """A numpy Generator for the stream named by `parts` (seed first, salt last)."""
    return np.random.default_rng(_entropy(parts))


def derive(*parts: int) -> int:
    """A 63-bit integer seed (torch generators, a window's permutation) from the same SeedSequence."""
    return int(np.random.SeedSequence(_entropy(parts)).generate_state(1, np.uint64)[0]) >> 1
