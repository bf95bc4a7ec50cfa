"""Per-worker batch makers: they execute an epoch plan (`pipeline.plan`) and nothing else decides order.

- `IndexedStream`: the global plan over local (or cached) raw shards. Each batch
  is one vectorised address computation over the offset index, then one
  `memmove` per sample from the mmapped page cache into the batch memory (a ring
  slot): no tar parsing, no per-sample objects.
- `SequentialStream`: the stream plan (train) and eval ranges over any shards
  (http, pipe, png, generic), reading each shard front to back.

Both run inside DataLoader workers (or in-process with 0 workers) and yield a
`SlotRef` or a `Batch` per step, in step order for the worker.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline import mix as mixing
from pipeline import plan, provenance
from pipeline.fast_tar import Sample, ShardFormatError, map_file
from pipeline.provenance import Provenance
from pipeline.read import CorruptCounter, ReadSpec, ShardIndex, no_readable_samples, read_segment, skip_or_raise
from pipeline.ring import BatchMemory, BatchRing


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


@dataclass
class EpochSpan:
    """Which epochs an iteration makes, and the step the first one starts at (mid-epoch resume)."""

    epochs: list[int]
    start: int = 0

    def first_step(self, epoch: int) -> int:
        return self.start if epoch == self.epochs[0] else 0

    def roles(self, worker: int, num_workers: int, steps: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, first step, plan role of `worker`) for each epoch of the span."""
        before = 0
        for epoch in self.epochs:
            first = self.first_step(epoch)
            yield epoch, first, plan.worker_role(worker, num_workers, before, first)
            before += steps - first


# --------------------------------------------------------------------------- global plan


@dataclass
class SampleTable:
    """Every train sample's shard, byte offsets, label, key and provenance, from the offset index (flat arrays)."""

    paths: list[str]
    stats: list[tuple[int, int]]  # (size, mtime_ns) per shard when indexed
    shard_of: np.ndarray  # int64 [N]
    image_offsets: np.ndarray  # int64 [N]
    mask_offsets: np.ndarray  # int64 [N]
    labels: np.ndarray  # int64 [N]
    keys: list[str]
    provenance: list[Provenance]

    @classmethod
    def from_index(cls, index: list[ShardIndex], counts: list[int]) -> SampleTable:
        n = sum(counts)
        shard_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        image, mask, labels = np.zeros(n, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        keys = [""] * n
        origins = [provenance.NONE] * n
        start = 0
        for ix, count in zip(index, counts):
            if ix.error is None:
                image[start : start + count] = ix.image_offsets
                mask[start : start + count] = ix.mask_offsets
                labels[start : start + count] = ix.labels
                keys[start : start + count] = ix.keys
                origins[start : start + count] = ix.provenance
            start += count
        stats = [(ix.size, ix.mtime_ns) for ix in index]
        return cls([ix.path for ix in index], stats, shard_of, image, mask, labels, keys, origins)


class _ShardMaps:
    """The worker's mmaps of the shards it touched, by base address (kept open for the iteration)."""

    def __init__(self, table: SampleTable):
        self.table = table
        self.bases = np.zeros(len(table.paths), np.int64)
        self.sizes = np.array([size for size, _ in table.stats], np.int64)
        self._keep: list[np.ndarray] = []

    def _map(self, shard: int) -> None:
        path = self.table.paths[shard]
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if (st.st_size, st.st_mtime_ns) != self.table.stats[shard]:
                raise ShardFormatError(
                    f"shard {path} changed after it was indexed (size or mtime differ): "
                    "do not rewrite shards under a running loader"
                )
            mapped = map_file(fh)
        arr = np.frombuffer(mapped, np.uint8)
        self._keep.append(arr)
        self.bases[shard] = arr.ctypes.data

    def gather(self, indices: np.ndarray, out: torch.Tensor, offsets: np.ndarray) -> None:
        """Copy the `indices` samples' pixels (at `offsets`) into consecutive rows of `out`."""
        shards = self.table.shard_of[indices]
        for shard in np.unique(shards[self.bases[shards] == 0]):
            self._map(int(shard))
        row = out[0].numel()
        at = offsets[indices]
        outside = (at < 0) | (at > self.sizes[shards] - row)  # not at + row: an absurd offset would wrap
        if outside.any():  # memmove from outside the mapping would read other memory or crash the process
            i = int(np.argmax(outside))
            raise ShardFormatError(
                f"sample {int(indices[i])} lies outside {self.table.paths[shards[i]]} ({row} bytes at {int(at[i])} "
                f"of {int(self.sizes[shards[i]])}): the offset index is stale or marks it unreadable"
            )
        src = self.bases[shards] + at
        dst = out.data_ptr() + row * np.arange(len(indices), dtype=np.int64)
        memmove = ctypes.memmove
        for d, s in zip(dst.tolist(), src.tolist()):
            memmove(d, s, row)


class IndexedStream(IterableDataset):
    """Global plan: rank `rank`'s batches of each epoch, worker w making steps w, w+W, ..."""

    def __init__(
        self,
        table: SampleTable,
        valid: np.ndarray | None,
        *,
        n: int,
        seed: int,
        batch_size: int,
        rank: int,
        world_size: int,
        drop_last: bool,
        image_size: int,
        masks: bool,
        span: EpochSpan,
        ring: BatchRing | None = None,
        mix: mixing.Mix | None = None,
    ):
        super().__init__()
        self.table, self.valid, self.n, self.seed = table, valid, n, seed
        self.batch_size, self.rank, self.world_size, self.drop_last = batch_size, rank, world_size, drop_last
        self.image_size, self.masks, self.span, self.ring, self.mix = image_size, masks, span, ring, mix
        g = batch_size * world_size
        self.steps = plan.steps_per_epoch(n, g, drop_last) if mix is None else mix.steps(g, drop_last)
        # each epoch's global order (`pipeline.plan.epoch_order`, or the mix's), worked out once here in the
        # main process rather than once per worker
        mixer = mix.sampler(g, drop_last, valid) if mix is not None else None
        self.orders = [
            mixer.order(seed, epoch) if mixer is not None else plan.epoch_order(n, seed, epoch, g, drop_last, valid)
            for epoch in span.epochs
        ]

    def __iter__(self):
        worker, num_workers = _worker()
        ring = self.ring if get_worker_info() is not None else None
        maps = _ShardMaps(self.table)
        t = self.table
        for (_, first, role), order in zip(self.span.roles(worker, num_workers, self.steps), self.orders):
            mine = plan.rank_batches(order, self.rank, self.batch_size, self.world_size)
            for step in plan.worker_steps(self.steps, role, num_workers, first):
                idx = mine[step]
                mem = BatchMemory(len(idx), self.image_size, self.masks, ring, worker)
                maps.gather(idx, mem.images, t.image_offsets)
                if mem.masks is not None:
                    maps.gather(idx, mem.masks, t.mask_offsets)
                yield mem.finish(t.labels[idx], [t.keys[i] for i in idx], idx, step, [t.provenance[i] for i in idx])


# --------------------------------------------------------------------------- stream plan and eval


@dataclass(frozen=True)
class ShardSet:
    """A split's shards as the readers see them (picklable)."""

    urls: list[str]
    counts: list[int]
    sha256: list[str] | None
    index: list[ShardIndex] | None = None  # local raw shards, validated once (else read front to back)


class SequentialStream(IterableDataset):
    """Shards read front to back: the stream plan for train, contiguous exact-once ranges for eval."""

    def __init__(
        self,
        shards: ShardSet,
        spec: ReadSpec,
        counter: CorruptCounter | None,
        *,
        seed: int,
        batch_size: int,
        rank: int,
        world_size: int,
        window_steps: int,
        drop_last: bool,
        span: EpochSpan,
        ring: BatchRing | None = None,
        mix: mixing.StreamMix | None = None,
    ):
        super().__init__()
        self.shards, self.spec, self.counter, self.seed = shards, spec, counter, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.window_steps, self.drop_last, self.span, self.ring, self.mix = window_steps, drop_last, span, ring, mix

    def __iter__(self):
        worker, num_workers = _worker()
        ring = self.ring if get_worker_info() is not None else None
        if self.spec.train:
            g = self.batch_size * self.world_size
            steps = (
                plan.steps_per_epoch(sum(self.shards.counts), g, self.drop_last)
                if self.mix is None
                else self.mix.steps_draws // g
            )
            for epoch, first, role in self.span.roles(worker, num_workers, steps):
                yield from self._train_epoch(epoch, first, role, num_workers, ring, worker)
        else:
            yield from self._eval(worker, num_workers, ring)

    # -- reading

    def _segment(self, seg: plan.Segment) -> Iterator[tuple[int, Sample]]:
        """(split index, sample) of one segment, from the offset index when there is one."""
        s = self.shards
        url, count = s.urls[seg.shard], s.counts[seg.shard]
        ix = s.index[seg.shard] if s.index is not None else None
        if ix is not None and ix.error is not None:
            skip_or_raise(self.spec, self.counter, url, seg.hi - seg.lo, ShardFormatError(ix.error))
            return
        if ix is not None and not ix.stale():
            samples = _indexed_samples(ix, seg.lo, seg.hi, self.spec.image_size)
        else:
            samples = read_segment(
                self.spec, url, count, seg.lo, seg.hi, s.sha256[seg.shard] if s.sha256 else None, self.counter
            )
        for i, sample in enumerate(samples):
            yield seg.first + i, sample

    def _batch(self, items: list[tuple[int, Sample]], ring: BatchRing | None, worker: int, step: int):
        mem = BatchMemory(len(items), self.spec.image_size, self.spec.masks, ring, worker)
        out = mem.images.numpy()
        for i, (_, s) in enumerate(items):
            np.copyto(out[i], s.image)
        if mem.masks is not None:
            mout = mem.masks.numpy()
            for i, (_, s) in enumerate(items):
                np.copyto(mout[i], s.mask)
        labels = np.fromiter((s.label for _, s in items), np.int64, len(items))
        indices = np.fromiter((g for g, _ in items), np.int64, len(items))
        return mem.finish(labels, [s.key for _, s in items], indices, step, [s.provenance for _, s in items])

    # -- eval: each sample once

    def _eval(self, worker: int, num_workers: int, ring: BatchRing | None):
        counts = self.shards.counts
        lo, hi = plan.eval_range(sum(counts), self.rank, self.world_size, worker, num_workers)
        segments = plan.segments((lo, hi), np.arange(len(counts)), counts) if hi > lo else []
        buf, made = [], 0
        for seg in segments:
            for item in self._segment(seg):
                buf.append(item)
                if len(buf) == self.batch_size:
                    yield self._batch(buf, ring, worker, made)
                    buf, made = [], made + 1
        if buf:
            yield self._batch(buf, ring, worker, made)

    # -- train: windows of the stream plan

    def _windows(self, epoch: int, start: int, role: int, num_workers: int) -> list[plan.Window]:
        layout = (self.batch_size, self.rank, self.world_size, role, num_workers, self.window_steps)
        if self.mix is not None:
            return mixing.stream_windows(self.mix.collections, self.mix.draws, self.seed, epoch, *layout, start)
        return plan.stream_windows(self.shards.counts, self.seed, epoch, *layout, self.drop_last, start)

    def _train_epoch(self, epoch: int, start: int, role: int, num_workers: int, ring: BatchRing | None, worker: int):
        windows = self._windows(epoch, start, role, num_workers)
        spare: list[tuple[int, Sample]] = []  # samples of an earlier window, for a window that read nothing
        for window in windows:
            items = [item for seg in window.segments for item in self._segment(seg)]
            need = len(window.steps) * self.batch_size
            if items:
                perm = np.random.default_rng(window.seed).permutation(len(items))
                items = [items[i] for i in plan.pad_or_cut(perm, need)]  # short only after a corrupt shard
                spare = items[: self.batch_size]
            else:
                items = (
                    [spare[i] for i in plan.pad_or_cut(np.arange(len(spare)), need)] if spare else self._rescue(need)
                )
            for j, step in enumerate(window.steps):
                if step >= start:
                    yield self._batch(items[j * self.batch_size : (j + 1) * self.batch_size], ring, worker, step)

    def _rescue(self, need: int) -> list[tuple[int, Sample]]:
        """Samples for a window whose shards were all unreadable: the first readable ones of the split."""
        found: list[tuple[int, Sample]] = []
        first = 0
        for shard, count in enumerate(self.shards.counts):
            found += self._segment(plan.Segment(shard, 0, count, first))
            first += count
            if len(found) >= need:
                break
        if not found:
            raise no_readable_samples(len(self.shards.counts))
        return [found[i] for i in plan.pad_or_cut(np.arange(len(found)), need)]


def _indexed_samples(ix: ShardIndex, lo: int, hi: int, image_size: int) -> Iterator[Sample]:
    with open(ix.path, "rb") as fh:
        mapped = map_file(fh)
    if mapped is None:
        raise ShardFormatError(f"shard {ix.path}: empty or not a regular file")
    arr = np.frombuffer(mapped, np.uint8)
    pixels = image_size * image_size
    shape = (1, image_size, image_size)
    for i in range(lo, hi):
        image, mask = int(ix.image_offsets[i]), int(ix.mask_offsets[i])
        yield Sample(
            ix.keys[i],
            int(ix.labels[i]),
            arr[image : image + pixels].reshape(shape),
            arr[mask : mask + pixels].reshape(shape) if mask >= 0 else None,
            ix.provenance[i],
        )
