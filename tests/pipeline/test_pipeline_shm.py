"""Shared memory: the batch ring's size is known before it is built, a ring that cannot fit is refused in one
line with the fixes, and `shared_memory=False` gives the same batches without touching /dev/shm."""

from __future__ import annotations

import hashlib

import pytest

from pipeline.loader import build_loader
from pipeline.ring import ring_bytes, shm_problem
from train.trainer import shared_memory_problem

from helpers.indexed_shards import SIZE


def shm_mappings() -> dict[str, range]:
    """torch's shared storages this process has mapped (/dev/shm/torch_...; multiprocessing's few-byte
    semaphores and arenas are not batch memory), with their address ranges."""
    with open("/proc/self/maps") as fh:
        lines = [line.split(None, 5) for line in fh if "/dev/shm/torch_" in line]
    return {f[-1].strip(): range(*(int(a, 16) for a in f[0].split("-"))) for f in lines}


def batches_digest(loader) -> tuple[str, set[str], list[bool]]:
    """A digest of every batch (keys, labels, pixels, masks), the /dev/shm files mapped while holding one, and
    whether each batch's pixels and masks lie in one of them."""
    h, mapped, in_shm = hashlib.sha256(), set(), []
    for batch in loader:
        maps = shm_mappings()
        mapped |= set(maps)
        tensors = [batch.images] + ([batch.masks] if batch.masks is not None else [])
        in_shm.append(all(any(t.data_ptr() in r for r in maps.values()) for t in tensors))
        h.update(repr((batch.keys, batch.labels.tolist(), batch.step)).encode())
        h.update(batch.images.numpy().tobytes())
        h.update(batch.masks.numpy().tobytes() if batch.masks is not None else b"-")
    return h.hexdigest(), mapped, in_shm


@pytest.mark.parametrize("split,plan", [("train", "global"), ("train", "stream"), ("val", "eval")])
def test_without_shared_memory_the_same_batches_and_no_dev_shm(tiny_shards, split, plan):
    def loader(shared: bool):
        fast = plan != "stream"  # the exact (tarfile) path streams shard by shard
        return build_loader(tiny_shards, split, batch_size=4, num_workers=2, seed=3, shared_memory=shared, fast=fast)

    ringed, plain = loader(True), loader(False)
    assert ringed.plan == plain.plan == plan
    assert ringed.shared_memory_bytes == ring_bytes(2, 4, 4, SIZE, True) == 2 * 4 * 4 * SIZE * SIZE * 2
    assert plain.shared_memory_bytes == 0
    before = set(shm_mappings())
    with_ring, ring_maps, ring_views = batches_digest(ringed)
    without, plain_maps, plain_views = batches_digest(plain)
    assert with_ring == without
    assert len(ring_maps - before) == 2, "one ring of images and one of masks, made before the workers start"
    assert ring_views == [True] * len(ringed), "every batch is a view of the ring (no copy through a pipe)"
    assert plain_views == [False] * len(plain)
    assert not plain_maps - before - ring_maps, "shared_memory=False mapped /dev/shm"


def test_no_workers_no_ring(tiny_shards):
    assert build_loader(tiny_shards, "train", batch_size=4, num_workers=0).shared_memory_bytes == 0


def test_shm_problem_names_need_free_and_fixes():
    mb = 1 << 20
    assert shm_problem(64 * mb, 64 * mb, "x") is None
    assert shm_problem(10**12, None, "x") is None  # nothing to measure: no refusal
    msg = shm_problem(732 * mb, 64 * mb, "1 rank(s) x (train 732 MB)")
    assert "need 732 MB of shared memory on this node (1 rank(s) x (train 732 MB)) but /dev/shm has 64 MB free" in msg
    for fix in ("--shm-size=2g", "--ipc=host", "data.num_workers", "data.shared_memory=false"):
        assert fix in msg


def test_preflight_counts_every_local_rank_and_loader(tiny_shards):
    """The figure the trainer checks: local ranks x (train ring + val ring), against the free space given."""
    loaders = {
        "train": build_loader(tiny_shards, "train", batch_size=4, num_workers=2),
        "val": build_loader(tiny_shards, "val", batch_size=8, num_workers=1, masks=False),
    }
    per_rank = ring_bytes(2, 4, 4, SIZE, True) + ring_bytes(1, 4, 8, SIZE, False)
    assert loaders["val"].shared_memory_bytes == ring_bytes(1, 4, 8, SIZE, False)
    assert shared_memory_problem(loaders, 8, 8 * per_rank) is None
    msg = shared_memory_problem(loaders, 8, 8 * per_rank - 1)
    assert msg is not None and "8 rank(s) x (train " in msg and "val " in msg
    assert (
        shared_memory_problem({"train": build_loader(tiny_shards, "train", batch_size=4, num_workers=0)}, 8, 0) is None
    )
