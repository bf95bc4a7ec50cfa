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
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.batch import Batch


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


class BatchMemory:
    """Where one batch is assembled: a ring slot inside a worker, else fresh (shared) memory."""

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

    def finish(self, labels: np.ndarray, keys: list[str], indices: np.ndarray, step: int) -> SlotRef | Batch:
        """The filled batch as a SlotRef (ring slot) or a Batch (own memory)."""
        if self.slot is not None:
            self.ring.busy[self.slot] = 1
            return SlotRef(self.slot, len(keys), labels, keys, indices, step)
        return Batch(
            images=self.images,
            labels=torch.from_numpy(np.asarray(labels, np.int64)),
            keys=keys,
            masks=self.masks,
            indices=torch.from_numpy(np.asarray(indices, np.int64)),
            step=step,
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
        yield Batch(images=images, labels=labels, keys=item.keys, masks=masks, indices=indices, step=item.step)
