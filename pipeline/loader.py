"""`build_loader(...)` -> `ShardLoader`: host batches of one split for one rank, exact epochs, resumable.

The contracts have their page in docs/pipeline.md; in short:

**Train**: every rank yields exactly `steps_per_epoch` full batches of each epoch.
- One collection: a permutation of all N samples padded to whole global batches (G = batch_size x
  world_size; fewer than G repeats, or `drop_last`) (`pipeline.plan`). Local or cached raw shards
  shuffle globally by (seed, epoch), the same for any `num_workers` and for 2 x 16 as for 4 x 8;
  streamed shards (http, pipe, s3/gs without `cache_dir`, png, `fast=False`) take contiguous pieces
  per (rank, worker), shuffled in windows of `shuffle_buffer` samples (a block shuffle).
- Several collections, `balance` or `epoch_samples`: the mixing plan (`pipeline.mix`), exact shares per
  collection and stratum, draws continuing across epochs.
`set_epoch(e)` picks the epoch; `state_dict()` / `load_state_dict()` resume it at the next global batch
(with any `num_workers` on the global plan; `pipeline.resume` says what a state must share).

**Val/test**: each sample exactly once across ranks; ranks may differ in batch count, so evaluation
must not run a collective per batch.

**Rank splitting and devices are this package's job.** Pass `rank` and `world_size`; do *not* hand
the loader to `accelerate.prepare()`. Move batches with `batch.to(device, non_blocking=True)`;
`pin_memory=True` pins them on CUDA.

**Corrupt shards.** Train: a shard that fails its checksum, index walk or read is skipped with a
`RuntimeWarning` and counted (`loader.corrupt_shards`); steps per epoch do not change. `strict=True`
raises `ShardFormatError` instead. Val/test always raise it, naming the shard.

**Memory** per rank, independent of the dataset size: the batch ring, workers x (prefetch_factor + 2)
x batch bytes of /dev/shm (B x 89,401 B for 299^2 images, x2 with masks: 22.9 MB at B=256;
`loader.shared_memory_bytes`, or `shared_memory=False` for none); the global plan's table (~100 B per
sample) over the mmapped page cache; on the stream plan one window of `shuffle_buffer` samples per
worker (179 MB at 2000 without masks).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from pipeline import plan
from pipeline.batch import Batch
from pipeline.collection import Collection, CollectionSet, open_collections
from pipeline.fast_tar import ShardFormatError
from pipeline.mix import Mix, StreamMix
from pipeline.read import (
    CorruptCounter,
    CorruptReport,
    ReadSpec,
    ShardIndex,
    build_index,
    load_shard_manifest,
    localize,
    no_readable_samples,
    random_access,
    skip_or_raise,
)
from pipeline.resume import STATE_VERSION, LoaderError, LoaderStateError, check_resumable
from pipeline.ring import BatchRing, from_ring, release_on_error, ring_bytes
from pipeline.strata import BALANCE, Strata, strata_of
from pipeline.streams import EpochSpan, IndexedStream, SampleTable, SequentialStream, ShardSet
from pipeline.urls import local_path
from sharding.manifest import Manifest

TRAIN = "train"


class ShardLoader:
    """Iterable of host `Batch`es for one rank (see the module docstring for the semantics).

    Attributes: `steps_per_epoch` (batches per epoch on this rank), `num_samples`,
    `manifest`, `split`, `plan` ("global", "stream" or "eval"), `corrupt_shards`.
    """

    def __init__(
        self,
        collections: CollectionSet,
        split: str,
        spec: ReadSpec,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        shuffle_buffer: int,
        drop_last: bool,
        verify_checksums: bool,
        pin_memory: bool,
        prefetch_factor: int,
        shared_memory: bool,
        balance: str,
        epoch_samples: int | None,
    ):
        self.collections, self.split, self.spec = collections, split, spec
        self.manifest = collections.manifest
        self.urls = collections.urls(split)
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.seed, self.drop_last = seed, drop_last
        self.sha256 = collections.sha256(split) if verify_checksums else None
        self.pin_memory, self.prefetch_factor, self.shared_memory = pin_memory, prefetch_factor, shared_memory
        self.balance, self.epoch_samples = balance, epoch_samples
        self.counts = [c for counts in collections.counts(split) for c in counts]
        self.sizes = collections.sizes(split)
        self.offsets = np.cumsum([0, *self.sizes])  # int64: each collection's first sample index
        self.window_steps = max(1, math.ceil(shuffle_buffer / batch_size))
        total = sum(self.counts)
        if spec.train:
            self.plan = "global" if random_access(self.urls, spec) else "stream"
            if self.plan == "stream" and balance != "none":
                raise LoaderError(
                    f"balance={balance!r} needs every train shard's class and source before the epoch starts: "
                    "streamed shards give them only as they are read. Use local shards, or set a cache_dir"
                )
            self.steps_per_epoch = plan.steps_per_epoch(epoch_samples or total, batch_size * world_size, drop_last)
            if self.steps_per_epoch == 0:
                raise LoaderError(
                    f"drop_last with {epoch_samples or total} train samples per epoch < global batch "
                    f"{batch_size * world_size}: an epoch would have no step"
                )
            self.num_samples = self.steps_per_epoch * batch_size
        else:
            self.plan = "eval"
            self.steps_per_epoch = plan.eval_steps(total, rank, world_size, num_workers, batch_size)
            self.num_samples = sum(
                hi - lo
                for lo, hi in (
                    plan.eval_range(total, rank, world_size, w, max(1, num_workers)) for w in range(max(1, num_workers))
                )
            )
        # one collection, unbalanced, one pass per epoch: the seed's plan (`pipeline.plan`); else `pipeline.mix`
        self.mixed = spec.train and (collections.mixed or balance != "none" or epoch_samples is not None)
        self.epoch = 0
        self.counter = CorruptCounter() if spec.train else None
        self._start = 0  # first step of the next iteration (mid-epoch resume)
        self._done = 0  # global batches of the current epoch handed out
        self._index: list[ShardIndex] | None = None
        self._table: tuple[list[ShardIndex], SampleTable] | None = None
        self._strata: Strata | None = None

    # -- epochs and resume

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the next iteration (its permutation is seeded by (seed, epoch))."""
        if int(epoch) != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        """Where this rank is: epoch and global batches done, plus what the order depends on."""
        state = {
            "version": STATE_VERSION,
            "split": self.split,
            "epoch": self.epoch,
            "step": self._done,
            "seed": self.seed,
            "global_batch": self.batch_size * self.world_size,
            "drop_last": self.drop_last,
            "shards": self.collections.digest(self.split),
            "plan": self.plan,
        }
        if self.plan == "stream":  # its order depends on the rank and worker layout
            state["layout"] = [self.world_size, max(1, self.num_workers)]
        if self.mixed:  # the mix's sequences continue across epochs: where each stands when this epoch began
            state["mix"] = {
                "collections": [[c.name, c.weight] for c in self.collections.collections],
                "balance": self.balance,
                "epoch_samples": self.epoch_samples,
            }
            state["cursors"] = dict(zip(self.collections.names, self.nominal_mix().cursors(self.epoch, *self._g())))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue epoch `state['epoch']` at global batch `state['step']` on the next iteration."""
        check_resumable(state, self.state_dict(), self.steps_per_epoch)
        self.epoch, self._start, self._done = int(state["epoch"]), int(state["step"]), int(state["step"])

    def _g(self) -> tuple[int, bool]:
        return self.batch_size * self.world_size, self.drop_last

    def nominal_mix(self) -> Mix:
        """The mix by sizes and weights alone (no strata, every shard readable): its draws and cursors."""
        weights = [c.weight for c in self.collections.collections]
        return Mix.unbalanced(self.sizes, weights, self.epoch_samples)

    @property
    def start_step(self) -> int:
        """The step the next iteration starts at (non-zero right after a mid-epoch `load_state_dict`)."""
        return self._start

    @property
    def corrupt_shards(self) -> CorruptReport:
        return self.counter.report() if self.counter is not None else CorruptReport()

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def shared_memory_bytes(self) -> int:
        """Bytes of /dev/shm this loader's batch ring takes while it iterates (0 without one)."""
        return ring_bytes(*self._ring_shape()) if self.num_workers and self.shared_memory else 0

    def _ring_shape(self) -> tuple[int, int, int, int, bool]:
        """(workers, slots each, batch, image side, masks): a slot per prefetched batch, one filling, one in use."""
        return self.num_workers, self.prefetch_factor + 2, self.batch_size, self.spec.image_size, self.spec.masks

    # -- iteration

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_epochs(1)

    def iter_epochs(self, count: int) -> Iterator[Batch]:
        """`count` consecutive epochs from the current one through the same workers (benchmarks)."""
        span = EpochSpan(list(range(self.epoch, self.epoch + count)), self._start)
        self._start, self._done = 0, span.start
        ring = None
        if self.shared_memory_bytes:  # a fresh ring per iteration: a still-running earlier iterator keeps its own
            ring = BatchRing(*self._ring_shape())
        dataset = self._dataset(span, ring)
        kwargs = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        loader = wds.WebLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=False,
            persistent_workers=False,
            **kwargs,
        )
        pin = self.pin_memory and torch.cuda.is_available()
        return release_on_error(
            self._in_order(
                self.collections.label(from_ring(loader, ring, pin), self.offsets, pin, mapped=self.plan == "global"),
                span,
            )
        )

    def _in_order(self, batches: Iterator[Batch], span: EpochSpan) -> Iterator[Batch]:
        """Train: check each batch is the next step (the plan's promise) and track progress for state_dict."""
        if not self.spec.train:
            yield from batches
            return
        expected = ((e, s) for e in span.epochs for s in range(span.first_step(e), self.steps_per_epoch))
        for batch in batches:
            epoch, step = next(expected, (None, None))
            if batch.step != step:
                raise RuntimeError(f"loader yielded step {batch.step} where step {step} was due: workers out of order")
            self.epoch, self._done = epoch, step + 1
            yield batch

    def _dataset(self, span: EpochSpan, ring: BatchRing | None):
        if self.plan == "global":
            table, valid = self._global_table()
            return IndexedStream(
                table,
                valid,
                n=sum(self.counts),
                seed=self.seed,
                batch_size=self.batch_size,
                rank=self.rank,
                world_size=self.world_size,
                drop_last=self.drop_last,
                image_size=self.spec.image_size,
                masks=self.spec.masks,
                span=span,
                ring=ring,
                mix=self.strata().mix if self.mixed else None,
            )
        index = None
        if self.spec.fast and self.spec.encoding == "raw" and all(local_path(u) is not None for u in self.urls):
            self._index = build_index(
                [str(local_path(u)) for u in self.urls], self.spec, self.counts, self.sha256, self._index
            )
            index = self._index
        shards = ShardSet(self.urls, self.counts, self.sha256, index)
        mix = None
        if self.mixed and self.spec.train:
            mix = StreamMix(self.collections.counts(self.split), self.nominal_mix().draws(*self._g()))
        return SequentialStream(
            shards,
            self.spec,
            self.counter,
            seed=self.seed,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            window_steps=self.window_steps,
            drop_last=self.drop_last,
            span=span,
            ring=ring,
            mix=mix,
        )

    def strata(self) -> Strata:
        """Each train sample's collection and stratum (`balance`), and the mix built on them (global plan).

        Streamed shards have no strata before they are read: there every collection is one stratum.
        """
        if self._strata is None:
            weights = [c.weight for c in self.collections.collections]
            if self.plan != "global":
                self._strata = Strata.unbalanced(self.sizes, weights, self.epoch_samples)
            else:
                table, valid = self._global_table()
                labels = table.labels  # already in the shared label space
                sources = [p.source for p in table.provenance]
                names = [self.collections.classes[i] if i >= 0 else "" for i in labels.tolist()]
                self._strata = strata_of(self.balance, self.sizes, weights, self.epoch_samples, names, sources, valid)
        return self._strata

    def _global_table(self) -> tuple[SampleTable, np.ndarray | None]:
        """Index (and cache) every train shard; corrupt ones are skipped (counted) or raised (strict)."""
        paths, failures = localize(self.urls, self.spec, self.sha256)
        self._index = build_index(paths, self.spec, self.counts, self.sha256, self._index)
        for i, reason in failures.items():
            self._index[i].error = reason
        bad = [i for i, ix in enumerate(self._index) if ix.error is not None]
        for i in bad:
            skip_or_raise(self.spec, self.counter, self.urls[i], self.counts[i], ShardFormatError(self._index[i].error))
        if self._table is None or any(a is not b for a, b in zip(self._table[0], self._index)):
            table = self.collections.in_shared_space(SampleTable.from_index(self._index, self.counts), self.sizes)
            self._table = (list(self._index), table)
        if not bad:
            return self._table[1], None
        ends = np.cumsum(self.counts)
        valid = np.concatenate(
            [np.arange(ends[i] - c, ends[i]) for i, c in enumerate(self.counts) if i not in bad]
            or [np.zeros(0, np.int64)]
        )
        if len(valid) == 0:
            raise no_readable_samples(len(self.urls))
        return self._table[1], valid


def check_arguments(
    batch_size: int, rank: int, world_size: int, num_workers: int, balance: str, epoch_samples: int | None
) -> None:
    """`build_loader`'s numbers and choices, before any shard is opened (LoaderError naming the argument)."""
    if batch_size < 1:
        raise LoaderError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if num_workers < 0:
        raise LoaderError(f"num_workers must be >= 0, got {num_workers}")
    if balance not in BALANCE:
        raise LoaderError(f"balance must be one of {list(BALANCE)}, got {balance!r}")  # strata.BALANCE
    if epoch_samples is not None and epoch_samples < 1:
        raise LoaderError(f"epoch_samples must be >= 1 (or None: every sample once), got {epoch_samples}")


def build_loader(
    shards: str | Path | Sequence | CollectionSet,
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    shuffle_buffer: int = 2000,
    drop_last: bool = False,
    cache_dir: str | Path | None = None,
    strict: bool = False,
    pin_memory: bool = False,
    manifest: Manifest | None = None,
    fast: bool = True,
    allow_pipe: bool | None = None,
    prefetch_factor: int = 2,
    verify_checksums: bool = True,
    masks: bool | None = None,
    train: bool | None = None,
    shared_memory: bool = True,
    balance: str = "none",
    epoch_samples: int | None = None,
    classes: Sequence[str] | None = None,
) -> ShardLoader:
    """A `ShardLoader` over `split` of the shards at `shards` (folder, file:, http(s)://, gs://, s3:// prefix).

    `shards` may also be several collections (a list of paths or of dicts with `path`, `weight`, `name`, or a
    `CollectionSet`; `classes` pins their label order). `balance` (none, class, source, source_class) gives
    each stratum of a collection an equal share of its draws and `epoch_samples` sets a train epoch's
    length; either, or several collections, select the mixing plan (`pipeline.mix`).
    `shuffle_buffer`: the stream plan's shuffle window (samples per worker). `drop_last` cuts each train
    epoch to whole global batches instead of padding. `fast=False` forces webdataset's generic decode;
    `allow_pipe=False` (or RADSTREAM_ALLOW_PIPE=0) refuses pipe:/gs:/s3 URLs. `verify_checksums` hashes
    each local (or cached) raw shard once against its manifest. `masks`: None yields them when the shards
    have them, False leaves them unread. `train`: None gives the train split the training order and the
    others the evaluation order (each sample once across ranks); False reads train in evaluation order.
    `shared_memory=False`: no batch ring in /dev/shm (batches pickled in ordinary memory).
    """
    check_arguments(batch_size, rank, world_size, num_workers, balance, epoch_samples)
    collections = (
        shards
        if isinstance(shards, CollectionSet)
        else open_collections(shards, classes, None if manifest is None else [manifest])
    )
    train = split == TRAIN if train is None else train
    collections.check_split(split, train, masks)
    first = collections.manifest
    spec = ReadSpec(
        encoding=first.encoding,
        image_size=first.image_size,
        num_classes=max(len(m.classes) for m in collections.manifests),
        masks=collections.masks and masks is not False,
        train=train,
        strict=strict,
        fast=fast,
        cache_dir=None if cache_dir is None else str(cache_dir),
        allow_pipe=allow_pipe,
    )
    return ShardLoader(
        collections,
        split,
        spec,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        drop_last=drop_last,
        verify_checksums=verify_checksums,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        shared_memory=shared_memory,
        balance=balance,
        epoch_samples=epoch_samples,
    )


__all__ = [
    "BALANCE",
    "Collection",
    "CollectionSet",
    "LoaderError",
    "LoaderStateError",
    "ShardLoader",
    "Strata",
    "build_loader",
    "load_shard_manifest",
]
