"""The worker -> main-process hand-over: batch buffers in shared memory, reused across batches.

Fresh shared memory per batch (what a DataLoader does when a worker returns a
tensor) costs a page fault and a page zeroing per 4 KiB on every batch; on small
VMs that alone caps a worker below 10k img/s. Instead each worker owns `slots`
buffers in a `BatchRing`; it fills a free slot, marks it busy and sends only a
`SlotRef` (slot, labels, keys, sample indices, step). The main process hands out a
zero-copy `Batch` over the slot; the slot is reused only after every tensor, view
and `.numpy()` array over it is gone (a consumer that keeps batches makes workers
fall back to fresh buffers, never to waiting). With `pin=True` (CUDA) the slot is
instead copied into pinned memory, the copy pinning needs anyway, and freed at once.

**Where /dev/shm is small** (Docker's and Kubernetes' default is 64 MB) the ring may
not fit: `ring_bytes` sizes it before it is built and `shm_problem` says so in one
line with the fixes. Without a ring (`shared_memory=False` in the loader) a worker
sends each batch as a `HostBatch` of ordinary numpy arrays, pickled through its
pipe: no shared memory at all, at the cost of a copy.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
import shutil
import time
import traceback
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.batch import Batch
from pipeline.provenance import Provenance

SHM_DIR = "/dev/shm"


def ring_bytes(workers: int, slots: int, batch_size: int, image_size: int, masks: bool) -> int:
    """Bytes of shared memory a `BatchRing` of these dimensions takes."""
    return workers * slots * batch_size * image_size * image_size * (2 if masks else 1)


def shm_free(path: str = SHM_DIR) -> int | None:
    """Free bytes in the shared-memory filesystem, or None where there is none to measure."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def shm_problem(need: int, free: int | None, detail: str) -> str | None:
    """Why rings of `need` bytes (per node; `detail` says whose) do not fit in `free`; None when they do."""
    if free is None or need <= free:
        return None
    mb = 1 << 20
    return (
        f"the batch rings need {need / mb:,.0f} MB of shared memory on this node ({detail}) but {SHM_DIR} has "
        f"{free / mb:,.0f} MB free. Fixes: give the container more (docker run --shm-size={_suggest(need)} or "
        "--ipc=host; on Kubernetes mount an emptyDir with medium: Memory at /dev/shm), or lower "
        "data.num_workers, eval.batch_size or train.batch_size, or set data.shared_memory=false (batches "
        "through pipes in ordinary memory: no /dev/shm needed, a little slower)"
    )


def _suggest(need: int) -> str:
    """A --shm-size with headroom: twice the need, in whole GB."""
    return f"{max(1, math.ceil(2 * need / (1 << 30)))}g"


def shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class BatchRing:
    """`workers x slots` batch buffers (images, masks) in shared memory, with a busy flag each.

    A worker never has more than `prefetch_factor` batches in flight, so
    `slots = prefetch_factor + 1` means it never waits in steady state.
    """

    def __init__(self, workers: int, slots: int, batch_size: int, image_size: int, masks: bool):
        shape = (workers * slots, batch_size, 1, image_size, image_size)
        self.slots = slots
        self.images = shared_uint8(shape)
        self.masks = shared_uint8(shape) if masks else None
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


@dataclass
class SlotRef:
    """What a worker sends for a batch it wrote into ring slot `slot`."""

    slot: int
    count: int
    labels: np.ndarray
    keys: list[str]
    indices: np.ndarray
    step: int
    provenance: list[Provenance]


@dataclass
class HostBatch:
    """A batch in ordinary numpy memory: what a worker without a ring sends (pickled, no shared memory)."""

    images: np.ndarray
    masks: np.ndarray | None
    labels: np.ndarray
    keys: list[str]
    indices: np.ndarray
    step: int
    provenance: list[Provenance]

    def to_batch(self) -> Batch:
        return Batch(
            images=torch.from_numpy(self.images),
            labels=torch.from_numpy(np.asarray(self.labels, np.int64)),
            keys=self.keys,
            masks=None if self.masks is None else torch.from_numpy(self.masks),
            indices=torch.from_numpy(np.asarray(self.indices, np.int64)),
            step=self.step,
            provenance=self.provenance,
        )


class BatchMemory:
    """Where one batch is assembled: a ring slot inside a worker, fresh shared memory when every slot is
    held, else ordinary memory (no ring: no workers, or shared memory turned off)."""

    def __init__(self, n: int, image_size: int, masks: bool, ring: BatchRing | None, worker: int):
        shape = (n, 1, image_size, image_size)
        self.ring, self.slot = ring, ring.acquire(worker) if ring is not None else None
        if self.slot is not None:
            self.images = ring.images[self.slot, :n]
            self.masks = ring.masks[self.slot, :n] if masks else None
        elif ring is not None:  # every slot still held by the consumer: a fresh shared batch, as DataLoader does
            self.images = shared_uint8(shape)
            self.masks = shared_uint8(shape) if masks else None
        else:
            self.images = torch.from_numpy(np.empty(shape, np.uint8))
            self.masks = torch.from_numpy(np.empty(shape, np.uint8)) if masks else None

    def finish(
        self, labels: np.ndarray, keys: list[str], indices: np.ndarray, step: int, origins: list[Provenance]
    ) -> SlotRef | Batch | HostBatch:
        """The filled batch as a SlotRef (ring slot), a Batch (fresh shared memory) or a HostBatch (no ring)."""
        if self.slot is not None:
            self.ring.busy[self.slot] = 1
            return SlotRef(self.slot, len(keys), labels, keys, indices, step, origins)
        if self.ring is None:
            masks = None if self.masks is None else self.masks.numpy()
            return HostBatch(self.images.numpy(), masks, labels, keys, indices, step, origins)
        return Batch(
            images=self.images,
            labels=torch.from_numpy(np.asarray(labels, np.int64)),
            keys=keys,
            masks=self.masks,
            indices=torch.from_numpy(np.asarray(indices, np.int64)),
            step=step,
            provenance=origins,
        )


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


def _copy_out(src: torch.Tensor, pin: bool) -> torch.Tensor:
    if pin:
        dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        np.copyto(dst.numpy(), src.numpy())
        return dst
    return torch.from_numpy(np.array(src.numpy()))  # numpy's allocator reuses warm pages; torch.clone does not


def from_ring(items, ring: BatchRing | None, pin: bool) -> Iterator[Batch]:
    """SlotRefs -> Batches: pinned copies (then the slot is free at once), else zero-copy slot views.

    A zero-copy batch keeps its slot until every tensor, view and `.numpy()` array
    over it is gone; a consumer that holds many batches makes the worker fall back
    to fresh buffers instead of waiting, so nothing can deadlock.
    """
    for item in items:
        if isinstance(item, HostBatch):
            item = item.to_batch()
        if isinstance(item, Batch):
            yield item.pin_memory() if pin else item
            continue
        slot, n = item.slot, item.count
        labels = torch.from_numpy(np.asarray(item.labels, np.int64))
        indices = torch.from_numpy(np.asarray(item.indices, np.int64))
        if pin:
            images = _copy_out(ring.images[slot, :n], pin)
            masks = _copy_out(ring.masks[slot, :n], pin) if ring.masks is not None else None
            ring.busy[slot] = 0
            labels, indices = labels.pin_memory(), indices.pin_memory()
        else:
            release = _SlotRelease(ring, slot, 1 if ring.masks is None else 2)
            images = _slot_tensor(ring.images[slot, :n], release)
            masks = _slot_tensor(ring.masks[slot, :n], release) if ring.masks is not None else None
        yield Batch(
            images=images,
            labels=labels,
            keys=item.keys,
            masks=masks,
            indices=indices,
            step=item.step,
            provenance=item.provenance,
        )


def release_on_error(batches: Iterator[Batch]) -> Iterator[Batch]:
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
