"""Shard URLs -> host batches for one rank: `build_loader(...)` returns a `ShardLoader`.

Per worker process the stream is a `webdataset.DataPipeline`:

    shard list (this rank/worker's share) -> open URL (pipeline.urls) ->
    read samples (pipeline.fast_tar) -> [train: sample shuffle buffer] ->
    Batcher (copies pixels straight into a batch slot in shared memory)

Reading samples, fastest first:
1. local raw shards (or remote ones in `cache_dir`): validated once per loader
   by a full header walk in the loader's process (`build_index`: checksums, npy
   headers, labels, counts) into an offset index; workers then mmap the shard
   and take each sample as a zero-copy view (re-walked if the file's size or
   mtime changed);
2. streamed raw shards (http, pipe): `fast_tar.raw_samples` walks the tar headers itself;
3. png shards, or `fast=False`: webdataset's generic tar iterator + decode.

The loader is a `webdataset.WebLoader` (a `torch.utils.data.DataLoader`) with
`batch_size=None`; a worker copies each sample once, from the page cache into a
slot of a shared-memory `BatchRing`, and sends only a small `SlotRef`. The main
process hands out a zero-copy `Batch` over the slot; the slot is reused only
after every tensor, view and `.numpy()` array over it is gone (a consumer that
keeps batches makes workers fall back to fresh buffers, never to waiting). With
`pin_memory=True` on a CUDA machine the slot is instead copied into pinned
memory (the copy pinning needs anyway) and freed at once.

**Train** (exact batch count per rank). `steps_per_epoch = ceil(train_samples /
(batch_size * world_size))`, from the manifest, identical on every rank. The
shard sequence is infinite: cycle c is a permutation of all train shards seeded
by (seed, epoch, c), the same on every rank; the R*W reader slots (R ranks x W
workers) deal positions round-robin (slot s reads positions s, s+RW, ...), so a
slot is never empty even with fewer shards than slots, and one epoch reads about
each sample once. Samples go through a shuffle buffer seeded by (seed, epoch,
rank, worker); only full batches are made; `WebLoader.with_epoch(steps)` cuts
the infinite stream to exactly `steps_per_epoch` batches. `set_epoch(e)`
reshuffles deterministically; the same seed gives the same batches (for a fixed
`num_workers`).

**Val/test** (exactly once across ranks). The split's samples, in manifest
order, are numbered 0..N-1; rank r owns [N*r//R, N*(r+1)//R) and worker w of W
owns the w-th contiguous part of that. A reader opens only the shards that
overlap its range and keeps the samples in it, so every sample is seen by
exactly one (rank, worker) for any N, R, W (more ranks than shards, odd counts,
idle workers). Batches are not shuffled; the last batch of each worker may be
partial, so `steps_per_epoch` (= sum over workers of ceil(n_w / batch_size))
may differ across ranks: evaluation must not run a collective per batch.

**Rank splitting and devices are this package's job.** Pass `rank` and
`world_size` (e.g. `accelerator.process_index`, `accelerator.num_processes`);
do *not* hand the loader to `accelerate.prepare()` (it does not wrap a
WebLoader, and for a wrapped iterable DataLoader it would read on rank 0 and
broadcast). Move batches with `batch.to(device, non_blocking=True)`.

**Corrupt shards.** Train: a shard that fails to open or parse is skipped with a
`RuntimeWarning` and counted; samples it yielded before the fault were already
validated and are kept. Read `loader.corrupt_shards` (a `CorruptReport`:
`.shards`, `.samples_lost`, `.events` [(url, reason)]), counted across worker
processes. `strict=True` raises `ShardFormatError` instead. Val/test always
raise `ShardFormatError` naming the shard (also when a shard holds a different
number of samples than the manifest says).

**Memory** per rank, independent of the dataset size: the batch ring,
workers x (prefetch_factor + 2) x batch bytes in shared memory (batch bytes =
B x 89,401 B for 299^2 images, x2 with masks: 22.9 MB at B=256, so 183 MB for
2 workers at the default prefetch 2), plus batches the consumer keeps, plus the
shuffle buffers. For local (or cached) shards the shuffle buffer holds
zero-copy views into the mmapped page cache, so it costs no private memory
(only evictable page cache) and the offset index ~150 B per sample; for
streamed remote shards it holds shuffle_buffer x sample bytes per worker
(179 MB at the default 2000 without masks).
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.batch import Batch
from pipeline.fast_tar import Sample, ShardFormatError, index_samples, map_file, read_samples
from pipeline.urls import join_url, local_path, open_url
from sharding.manifest import Manifest, ManifestError, load_manifest

TRAIN = "train"


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass
class CorruptReport:
    """Corrupt shards skipped in train streams so far (all epochs, all workers)."""

    shards: int = 0
    samples_lost: int = 0  # manifest count minus samples read before the fault
    events: list[tuple[str, str]] = field(default_factory=list)  # (url, reason), the first MAX_EVENTS


class _CorruptCounter:
    """Counts shared with worker processes (multiprocessing Values + an event queue)."""

    #: Events kept for the report. The queue is a pipe that nobody may read for a whole run:
    #: unbounded, a bad shard met every epoch would fill it and block the next `add` for good.
    MAX_EVENTS = 100

    def __init__(self) -> None:
        ctx = mp.get_context()
        self.shards = ctx.Value("q", 0)
        self.samples = ctx.Value("q", 0)
        self.queue = ctx.SimpleQueue()
        self.events: list[tuple[str, str]] = []

    def add(self, url: str, lost: int, reason: str) -> None:
        with self.shards.get_lock():
            self.shards.value += 1
            keep = self.shards.value <= self.MAX_EVENTS
        with self.samples.get_lock():
            self.samples.value += max(0, lost)
        if keep:
            self.queue.put((url, reason))

    def report(self) -> CorruptReport:
        while not self.queue.empty():
            self.events.append(self.queue.get())
        return CorruptReport(self.shards.value, self.samples.value, list(self.events))


@dataclass
class StreamSpec:
    """Everything a worker needs (picklable)."""

    urls: list[str]
    counts: list[int]
    encoding: str
    image_size: int
    num_classes: int
    masks: bool
    batch_size: int
    rank: int
    world_size: int
    seed: int
    train: bool
    shuffle_buffer: int
    cache_dir: str | None
    strict: bool
    fast: bool = True
    allow_pipe: bool | None = None
    index: dict | None = None  # url -> ShardIndex for local raw shards (see build_index)
    sha256: list[str] | None = None  # the manifest's digests, checked once when indexing; None skips the check


@dataclass
class ShardIndex:
    """A local raw shard validated once (checksums, npy headers, labels): sample offsets, or the error."""

    size: int
    mtime_ns: int
    entries: list | None  # [(key, label, image offset, mask offset)]
    error: str | None = None


def build_index(spec: StreamSpec) -> dict[str, ShardIndex]:
    """Index the local raw shards of `spec` once in the loader's process (one header walk per shard).

    Workers then read each sample with one mmap view and one copy, with no tar
    parsing per epoch; a shard whose size or mtime changed since is walked again.
    With `spec.sha256`, each shard is also hashed against the manifest (about
    1 s per GB, once per loader): a flipped pixel or label digit is a valid tar
    to any reader, and only the digest tells it from the data that was built.
    """
    index: dict[str, ShardIndex] = {}
    if not spec.fast or spec.encoding != "raw":
        return index
    for i, url in enumerate(spec.urls):
        path = local_path(url)
        if path is None:
            continue
        try:
            st = os.stat(path)
            with open(path, "rb") as fh:
                mapped = map_file(fh)
            if mapped is None:
                raise ShardFormatError("empty or not a regular file")
            if spec.sha256 is not None and hashlib.sha256(mapped).hexdigest() != spec.sha256[i]:
                raise ShardFormatError("sha256 differs from the manifest's (bit rot or an edited shard; "
                                       "`python -m sharding verify` lists every damaged shard, a rebuild with "
                                       "--force restores them)")
            entries = index_samples(mapped, image_size=spec.image_size, num_classes=spec.num_classes,
                                    masks=spec.masks)
            index[url] = ShardIndex(st.st_size, st.st_mtime_ns, entries)
        except (ShardFormatError, OSError) as exc:
            try:
                st = os.stat(path)
                index[url] = ShardIndex(st.st_size, st.st_mtime_ns, None, f"{type(exc).__name__}: {exc}")
            except OSError:
                pass  # missing file: the reader reports it
    return index


def eval_ranges(total: int, rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, int]:
    """Global sample range [lo, hi) of a (rank, worker) in an eval split of `total` samples."""
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    n = hi - lo
    return lo + n * worker // num_workers, lo + n * (worker + 1) // num_workers


class _ShardList(IterableDataset):
    """First pipeline stage: this (rank, worker)'s shards as {url, count, lo, hi} dicts."""

    def __init__(self, spec: StreamSpec, epoch: int, worker: int, num_workers: int):
        super().__init__()
        self.spec, self.epoch, self.worker, self.num_workers = spec, epoch, worker, num_workers

    def __iter__(self):
        spec = self.spec
        n = len(spec.urls)
        if spec.train:
            slots = spec.world_size * self.num_workers
            slot = spec.rank * self.num_workers + self.worker
            cycle, pos = 0, 0
            while True:
                order = random.Random(_seed(spec.seed, self.epoch, cycle, 0x5EED)).sample(range(n), n)
                for i in order:
                    if pos % slots == slot:
                        yield {"url": spec.urls[i], "count": spec.counts[i], "lo": 0, "hi": spec.counts[i],
                               "sha256": spec.sha256[i] if spec.sha256 else None}
                    pos += 1
                cycle += 1
        else:
            lo, hi = eval_ranges(sum(spec.counts), spec.rank, spec.world_size, self.worker, self.num_workers)
            start = 0
            for i, (url, count) in enumerate(zip(spec.urls, spec.counts)):
                a, b = max(lo, start), min(hi, start + count)
                if a < b:
                    yield {"url": url, "count": count, "lo": a - start, "hi": b - start,
                           "sha256": spec.sha256[i] if spec.sha256 else None}
                start += count


class _ReadShards:
    """Pipeline stage: shard dicts -> validated Samples, with the corrupt-shard policy."""

    def __init__(self, spec: StreamSpec, counter: _CorruptCounter | None):
        self.spec, self.counter = spec, counter

    def __call__(self, shards):
        spec = self.spec
        empty_run = 0
        limit = 3 * max(1, len(spec.urls)) + spec.world_size * 8
        for shard in shards:
            got = 0
            for sample in self._one(shard):
                got += 1
                yield sample
            if spec.train:  # guard: an all-corrupt/empty train set must not spin forever
                empty_run = 0 if got else empty_run + 1
                if empty_run > limit:
                    raise RuntimeError(f"no readable train samples in {empty_run} consecutive shards; last {shard['url']}")

    def _one(self, shard) -> Iterator[Sample]:
        spec = self.spec
        url, lo, hi, count = shard["url"], shard["lo"], shard["hi"], shard["count"]
        seen = 0
        stream = None
        try:
            indexed = self._indexed(url)
            if indexed is not None:
                if indexed.error is not None:
                    raise ShardFormatError(indexed.error)
                if len(indexed.entries) != count:
                    raise ShardFormatError(f"holds {len(indexed.entries)} samples, the manifest says {count}")
                yield from self._from_index(url, indexed.entries, lo, hi)
                return
            stream = open_url(url, cache_dir=spec.cache_dir, allow_pipe=spec.allow_pipe, sha256=shard.get("sha256"))
            samples = read_samples(stream, encoding=spec.encoding, image_size=spec.image_size,
                                   num_classes=spec.num_classes, masks=spec.masks, fast=spec.fast)
            for sample in samples:
                if seen >= count:
                    raise ShardFormatError(f"holds more samples than the manifest's {count}")
                if lo <= seen < hi:
                    yield sample
                seen += 1
                if seen >= hi and hi < count:
                    return  # rest of the shard belongs to another rank/worker
            if seen != count:
                raise ShardFormatError(f"holds {seen} samples, the manifest says {count}")
        except PermissionError:
            raise  # secure mode refusing a pipe: URL is a configuration error, never a skippable shard
        except (ShardFormatError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if not spec.train or spec.strict:
                raise ShardFormatError(f"shard {url}: {exc}") from exc
            warnings.warn(f"skipping corrupt shard {url} after {seen} samples: {reason}", RuntimeWarning, stacklevel=2)
            if self.counter is not None:
                self.counter.add(url, count - seen, reason)
        finally:
            if stream is not None:
                stream.close()


    def _indexed(self, url: str) -> ShardIndex | None:
        index = self.spec.index
        entry = index.get(url) if index else None
        if entry is None:
            return None
        try:
            st = os.stat(local_path(url))
        except OSError:
            return None
        return entry if (st.st_size, st.st_mtime_ns) == (entry.size, entry.mtime_ns) else None

    def _from_index(self, url: str, entries, lo: int, hi: int) -> Iterator[Sample]:
        spec = self.spec
        with open(local_path(url), "rb") as fh:
            mapped = map_file(fh)
        if mapped is None:
            raise ShardFormatError("empty or not a regular file")
        arr = np.frombuffer(mapped, np.uint8)
        pixels = spec.image_size * spec.image_size
        shape = (1, spec.image_size, spec.image_size)
        for key, label, image, mask in entries[lo:hi]:
            yield Sample(key, label, arr[image : image + pixels].reshape(shape),
                         arr[mask : mask + pixels].reshape(shape) if mask >= 0 else None)


class _Shuffle:
    """Pipeline stage: webdataset's sample shuffle buffer with a (seed, epoch, rank, worker) rng."""

    def __init__(self, bufsize: int, seed: int):
        self.bufsize, self.seed = bufsize, seed

    def __call__(self, samples):
        if self.bufsize <= 1:
            return samples
        return wds.filters._shuffle(iter(samples), self.bufsize, self.bufsize, random.Random(self.seed))


class BatchRing:
    """Batch buffers in shared memory, reused across batches (the worker -> main hand-over).

    Fresh shared memory per batch (what a DataLoader does when a worker returns a
    tensor) costs a page fault and a page zeroing per 4 KiB on every batch; on
    small VMs that alone caps a worker below 10k img/s. Instead each worker owns
    `slots` buffers here; it fills a free slot, marks it busy and sends only a
    `SlotRef` (slot, count, labels, keys); the main process copies the slot out
    (into pinned memory when asked: the copy pinning needs anyway) and frees it.
    A worker never has more than `prefetch_factor` batches in flight, so
    `slots = prefetch_factor + 1` means it never waits in steady state.
    """

    def __init__(self, workers: int, slots: int, batch_size: int, image_size: int, masks: bool):
        shape = (workers * slots, batch_size, 1, image_size, image_size)
        self.slots = slots
        self.images = _shared_uint8(shape)
        self.masks = _shared_uint8(shape) if masks else None
        self.busy = mp.get_context().RawArray("b", workers * slots)

    def acquire(self, worker: int, wait_s: float = 0.05) -> int | None:
        """A free slot of `worker`, or None after `wait_s` (the caller then allocates a fresh batch)."""
        first = worker * self.slots
        deadline = time.monotonic() + wait_s
        while True:
            for slot in range(first, first + self.slots):
                if not self.busy[slot]:
                    return slot
            if time.monotonic() > deadline:
                return None
            time.sleep(0.0002)


class _SlotRelease:
    """Frees a ring slot once every tensor/array handed out over it is gone."""

    def __init__(self, ring: BatchRing, slot: int, parts: int):
        self.ring, self.slot, self.parts = ring, slot, parts

    def __call__(self) -> None:
        self.parts -= 1
        if self.parts == 0:
            self.ring.busy[self.slot] = 0


def _slot_tensor(src: torch.Tensor, release: _SlotRelease) -> torch.Tensor:
    """A zero-copy tensor over ring memory whose storage's death (all views, .numpy() arrays) calls `release`."""
    cbuf = (ctypes.c_uint8 * src.numel()).from_address(src.data_ptr())
    weakref.finalize(cbuf, release)
    return torch.from_numpy(np.frombuffer(cbuf, np.uint8).reshape(src.shape))


@dataclass
class SlotRef:
    slot: int
    count: int
    labels: list[int]
    keys: list[str]


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class Batcher:
    """Pipeline stage: Samples -> host `Batch` (or `SlotRef` into a `BatchRing` inside a worker).

    Pixels are copied once, straight from the read buffer (an mmap view for
    local shards) into the batch memory.
    """

    def __init__(self, batch_size: int, image_size: int, masks: bool, partial: bool, ring: BatchRing | None = None):
        self.batch_size, self.image_size, self.masks, self.partial = batch_size, image_size, masks, partial
        self.ring = ring

    def __call__(self, samples):
        info = get_worker_info()
        ring = self.ring if info is not None else None
        made = 0
        buf: list[Sample] = []
        for sample in samples:
            buf.append(sample)
            if len(buf) == self.batch_size:
                yield self._make(buf, ring, info.id if ring is not None else 0, made)
                made += 1
                buf = []
        if buf and self.partial:
            yield self._make(buf, ring, info.id if ring is not None else 0, made)

    def _make(self, buf: list[Sample], ring: BatchRing | None, worker: int, made: int):
        n = len(buf)
        shape = (n, 1, self.image_size, self.image_size)
        slot = ring.acquire(worker) if ring is not None else None
        if slot is not None:
            images = ring.images[slot, :n]
            masks = ring.masks[slot, :n] if self.masks else None
        elif ring is not None:  # every slot still held by the consumer: a fresh shared batch, as DataLoader does
            images = _shared_uint8(shape)
            masks = _shared_uint8(shape) if self.masks else None
        else:
            images = torch.from_numpy(np.empty(shape, np.uint8))
            masks = torch.from_numpy(np.empty(shape, np.uint8)) if self.masks else None
        out = images.numpy()
        for i, s in enumerate(buf):
            np.copyto(out[i], s.image)
        if masks is not None:
            mout = masks.numpy()
            for i, s in enumerate(buf):
                np.copyto(mout[i], s.mask)
        labels = [s.label for s in buf]
        keys = [s.key for s in buf]
        if slot is not None:
            ring.busy[slot] = 1
            return SlotRef(slot, n, labels, keys)
        return Batch(images=images, labels=torch.tensor(labels, dtype=torch.int64), keys=keys, masks=masks)


def _copy_out(src: torch.Tensor, pin: bool) -> torch.Tensor:
    if pin:
        dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        np.copyto(dst.numpy(), src.numpy())
        return dst
    return torch.from_numpy(np.array(src.numpy()))  # numpy's allocator reuses warm pages; torch.clone does not


def _from_ring(items, ring: BatchRing, pin: bool) -> Iterator[Batch]:
    """SlotRefs -> Batches: pinned copies (then the slot is free at once), else zero-copy slot views.

    A zero-copy batch keeps its slot until every tensor, view and `.numpy()` array
    over it is gone; a consumer that holds many batches makes the worker fall back
    to fresh buffers instead of waiting, so nothing can deadlock.
    """
    for item in items:
        if isinstance(item, Batch):
            yield item.pin_memory() if pin else item
            continue
        slot, n = item.slot, item.count
        labels = torch.tensor(item.labels, dtype=torch.int64)
        if pin:
            images = _copy_out(ring.images[slot, :n], pin)
            masks = _copy_out(ring.masks[slot, :n], pin) if ring.masks is not None else None
            ring.busy[slot] = 0
            labels = labels.pin_memory()
        else:
            release = _SlotRelease(ring, slot, 1 if ring.masks is None else 2)
            images = _slot_tensor(ring.images[slot, :n], release)
            masks = _slot_tensor(ring.masks[slot, :n], release) if ring.masks is not None else None
        yield Batch(images=images, labels=labels, keys=item.keys, masks=masks)


class RankStream(IterableDataset):
    """The per-rank stream; builds one `webdataset.DataPipeline` per worker at iteration time."""

    def __init__(self, spec: StreamSpec, counter: _CorruptCounter | None = None):
        super().__init__()
        self.spec, self.counter, self.epoch = spec, counter, 0
        self.ring: BatchRing | None = None

    def pipeline(self) -> wds.DataPipeline:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        spec = self.spec
        stages = [_ShardList(spec, self.epoch, worker, num_workers), _ReadShards(spec, self.counter)]
        if spec.train:
            stages.append(_Shuffle(spec.shuffle_buffer, _seed(spec.seed, self.epoch, spec.rank, worker, 0x5A3)))
        stages.append(Batcher(spec.batch_size, spec.image_size, spec.masks, partial=not spec.train, ring=self.ring))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.pipeline())


class ShardLoader:
    """Iterable of host `Batch`es for one rank (see the module docstring for the semantics).

    Attributes: `steps_per_epoch` (batches per epoch on this rank), `num_samples`,
    `manifest`, `split`, `corrupt_shards` (a `CorruptReport`).
    """

    def __init__(self, stream: RankStream, manifest: Manifest, split: str, *, num_workers: int,
                 pin_memory: bool, prefetch_factor: int = 2):
        spec = stream.spec
        self.stream, self.manifest, self.split = stream, manifest, split
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.batch_size = spec.batch_size
        if spec.train:
            self.steps_per_epoch = math.ceil(sum(spec.counts) / (spec.batch_size * spec.world_size))
            self.num_samples = self.steps_per_epoch * spec.batch_size
        else:
            workers = max(1, num_workers)
            total = sum(spec.counts)
            sizes = [hi - lo for lo, hi in (eval_ranges(total, spec.rank, spec.world_size, w, workers)
                                            for w in range(workers))]
            self.steps_per_epoch = sum(math.ceil(n / spec.batch_size) for n in sizes)
            self.num_samples = sum(sizes)
        self.epoch = 0
        self._index: dict[str, ShardIndex] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically by (seed, epoch, rank, worker) for the next iteration."""
        self.epoch = int(epoch)
        self.stream.epoch = int(epoch)

    @property
    def corrupt_shards(self) -> CorruptReport:
        counter = self.stream.counter
        return counter.report() if counter is not None else CorruptReport()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        pin = self.pin_memory and torch.cuda.is_available()
        if self._index is None:
            self._index = build_index(self.stream.spec)
        stream = copy.copy(self.stream)
        stream.spec = replace(stream.spec, index=self._index)
        ring, kwargs = None, {}
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
            spec = stream.spec
            # a fresh ring per iteration: a still-running iterator of a previous epoch keeps its own
            ring = BatchRing(self.num_workers, self.prefetch_factor + 2, spec.batch_size, spec.image_size, spec.masks)
            stream.ring = ring
        loader = wds.WebLoader(stream, batch_size=None, shuffle=False, num_workers=self.num_workers,
                               pin_memory=False, persistent_workers=False, **kwargs)
        if stream.spec.train:
            loader = loader.with_epoch(nbatches=self.steps_per_epoch)
        if ring is None:
            return _release_on_error(b.pin_memory() if pin else b for b in loader)
        return _release_on_error(_from_ring(loader, ring, pin))


def _release_on_error(batches: Iterator[Batch]) -> Iterator[Batch]:
    """Re-raise a loader error without keeping the failed DataLoader alive.

    The traceback's finished frames hold the DataLoader iterator. Left there, it
    dies in a later gc pass, after multiprocessing has finalized its queues, so
    the "stop" message never reaches the workers and each one costs the 5 s join
    timeout. Clearing those frames' locals shuts the workers down now.
    """
    try:
        yield from batches
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)
        raise


def _load_manifest(shards: str | Path) -> Manifest:
    path = local_path(str(shards))
    if path is not None:
        return load_manifest(path)
    url = join_url(shards, "manifest.json")
    try:
        with open_url(url) as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read manifest {url}: {exc}") from None
    return Manifest.from_dict(data)


def build_loader(
    shards: str | Path,
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    shuffle_buffer: int = 2000,
    cache_dir: str | Path | None = None,
    strict: bool = False,
    pin_memory: bool = False,
    manifest: Manifest | None = None,
    fast: bool = True,
    allow_pipe: bool | None = None,
    prefetch_factor: int = 2,
    verify_checksums: bool = True,
) -> ShardLoader:
    """A `ShardLoader` over `split` of the shards at `shards` (folder, file:, http(s)://, gs://, s3:// prefix).

    `fast=False` forces webdataset's generic decode path; `allow_pipe=False`
    (or env RADSTREAM_ALLOW_PIPE=0) refuses pipe:/gs:/s3 URLs. `verify_checksums`
    hashes each local raw shard once against the manifest before reading it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    manifest = manifest if manifest is not None else _load_manifest(shards)
    info = manifest.split(split)
    base = local_path(str(shards))
    base = str(base) if base is not None else str(shards)
    train = split == TRAIN
    if train and info.samples == 0:
        raise ValueError(f"split {split!r} has no samples")
    spec = StreamSpec(
        urls=manifest.shard_urls(split, base), counts=[s.samples for s in info.shards],
        encoding=manifest.encoding, image_size=manifest.image_size, num_classes=len(manifest.classes),
        masks=manifest.masks, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
        train=train, shuffle_buffer=shuffle_buffer if train else 0,
        cache_dir=None if cache_dir is None else str(cache_dir), strict=strict, fast=fast, allow_pipe=allow_pipe,
        sha256=[s.sha256 for s in info.shards] if verify_checksums else None,
    )
    counter = _CorruptCounter() if train else None
    return ShardLoader(RankStream(spec, counter), manifest, split, num_workers=num_workers,
                       pin_memory=pin_memory, prefetch_factor=prefetch_factor)


__all__ = ["BatchRing", "Batcher", "SlotRef", "CorruptReport", "RankStream", "ShardLoader", "StreamSpec", "build_loader", "eval_ranges"]
