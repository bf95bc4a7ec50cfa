"""Exact multi-rank semantics, determinism and corrupt-shard policy of pipeline.loader."""

from __future__ import annotations

import math
import shutil
import warnings

import numpy as np
import pytest
import torch

from pipeline.fast_tar import ShardFormatError
from pipeline.loader import build_loader

from helpers.indexed_shards import (
    LAYOUT,
    image_index,
    key_of,
    label_of,
    make_mask,
    provenance_of,
    split_ids,
    write_shards,
)


def check_batch(batch, masks=True):
    """Every sample's key, label, pixels, mask and provenance (from its json) belong together."""
    assert batch.images.dtype == torch.uint8 and batch.images.ndim == 4 and batch.images.shape[1] == 1
    assert batch.labels.dtype == torch.int64 and len(batch.keys) == batch.images.shape[0] == batch.labels.shape[0]
    ids = []
    for i, key in enumerate(batch.keys):
        g = image_index(batch.images[i].numpy())
        assert key == key_of(g) and int(batch.labels[i]) == label_of(g)
        assert batch.provenance[i] == provenance_of(g) and batch.sources[i] == provenance_of(g).source
        if masks:
            assert np.array_equal(batch.masks[i].numpy(), make_mask(g, batch.images.shape[-1]))
        ids.append(g)
    return ids


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_exactly_once_across_ranks(tiny_shards, split, world_size, num_workers):
    seen: list[int] = []
    for rank in range(world_size):
        loader = build_loader(
            tiny_shards, split, batch_size=2, rank=rank, world_size=world_size, num_workers=num_workers
        )
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch == len(loader)
        ids = [g for b in batches for g in check_batch(b)]
        assert len(ids) == loader.num_samples
        seen += ids
    assert sorted(seen) == sorted(split_ids(split))  # each sample exactly once


def test_eval_png_generic_path(tiny_png_shards):
    seen = []
    for rank in range(2):
        for b in build_loader(tiny_png_shards, "val", batch_size=3, rank=rank, world_size=2, num_workers=0):
            seen += check_batch(b)
    assert sorted(seen) == sorted(split_ids("val"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_equal_batch_counts_full_batches(tiny_shards, num_workers):
    n = sum(LAYOUT["train"])
    for world_size in (1, 2, 3):
        expected = math.ceil(n / (4 * world_size))
        for rank in range(world_size):
            loader = build_loader(
                tiny_shards,
                "train",
                batch_size=4,
                rank=rank,
                world_size=world_size,
                num_workers=num_workers,
                shuffle_buffer=8,
            )
            assert loader.steps_per_epoch == len(loader) == expected
            batches = list(loader)
            assert len(batches) == expected
            for b in batches:
                assert len(b) == 4
                assert set(check_batch(b)) <= split_ids("train")


def test_train_stream_plan_same_for_raw_and_png(tiny_shards, tiny_png_shards):
    """The stream plan (generic decode) is a function of the layout, not of the encoding."""

    def keys(root, fast):
        loader = build_loader(root, "train", batch_size=3, num_workers=0, seed=5, fast=fast, shuffle_buffer=4)
        assert loader.plan == "stream"
        return [k for b in loader for k in b.keys]

    assert keys(tiny_shards, False) == keys(tiny_png_shards, True)
    assert build_loader(tiny_shards, "train", batch_size=3).plan == "global"


def test_train_covers_the_split_in_one_epoch_single_rank(tiny_shards):
    loader = build_loader(tiny_shards, "train", batch_size=3, num_workers=0, shuffle_buffer=1)
    ids = [g for b in loader for g in check_batch(b)]
    assert len(ids) == loader.num_samples == 21 and set(ids) == split_ids("train")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shuffle_deterministic_and_changes_with_epoch(tiny_shards, num_workers):
    def epoch_keys(seed, epoch, rank=0):
        loader = build_loader(
            tiny_shards,
            "train",
            batch_size=4,
            num_workers=num_workers,
            seed=seed,
            shuffle_buffer=8,
            rank=rank,
            world_size=2,
        )
        loader.set_epoch(epoch)
        return [k for b in loader for k in b.keys]

    a = epoch_keys(0, 0)
    assert a == epoch_keys(0, 0)
    assert a != epoch_keys(0, 1)
    assert a != epoch_keys(1, 0)
    assert a != epoch_keys(0, 0, rank=1)


def test_set_epoch_on_same_loader(tiny_shards):
    loader = build_loader(tiny_shards, "train", batch_size=4, num_workers=0, seed=3, shuffle_buffer=8)
    first = [k for b in loader for k in b.keys]
    loader.set_epoch(1)
    second = [k for b in loader for k in b.keys]
    loader.set_epoch(0)
    assert [k for b in loader for k in b.keys] == first != second


def _corrupt_copy(src, dst, shard="train-000001.tar", split_mid=True):
    shutil.copytree(src, dst)
    path = dst / shard
    data = bytearray(path.read_bytes())
    # overwrite the 3rd tar header (inside the shard, after some good samples) with garbage
    start = 512 * 3 + len(data) // 3
    start -= start % 512
    data[start : start + 512] = b"\x13" * 512
    path.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_train_shard_skipped_counted(tiny_shards, tmp_path, num_workers):
    root = _corrupt_copy(tiny_shards, tmp_path / "s")
    loader = build_loader(root, "train", batch_size=4, num_workers=num_workers, shuffle_buffer=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    assert len(batches) == loader.steps_per_epoch
    for b in batches:
        check_batch(b)
    report = loader.corrupt_shards
    assert report.shards >= 1 and report.samples_lost >= 1
    assert all("train-000001.tar" in url for url, _ in report.events)
    if num_workers == 0:
        assert any("train-000001.tar" in str(w.message) for w in caught)


def test_corrupt_train_shard_strict_raises(tiny_shards, tmp_path):
    root = _corrupt_copy(tiny_shards, tmp_path / "s")
    loader = build_loader(root, "train", batch_size=4, num_workers=0, strict=True, shuffle_buffer=4)
    with pytest.raises(ShardFormatError, match="train-000001.tar"):
        list(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_eval_shard_raises(tiny_shards, tmp_path, num_workers):
    root = _corrupt_copy(tiny_shards, tmp_path / "s", shard="val-000000.tar")
    loader = build_loader(root, "val", batch_size=2, num_workers=num_workers)
    with pytest.raises(ShardFormatError, match="val-000000.tar"):
        list(loader)


def test_truncated_eval_shard_raises(tiny_shards, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(tiny_shards, root)
    path = root / "val-000001.tar"
    path.write_bytes(path.read_bytes()[: 512 * 5])
    with pytest.raises(ShardFormatError, match="val-000001.tar"):
        list(build_loader(root, "val", batch_size=2, num_workers=0))


def test_all_train_shards_corrupt_does_not_hang(tmp_path):
    root = tmp_path / "s"
    write_shards(root, {"train": [2, 2], "val": [1]}, masks=False)
    for p in root.glob("train-*.tar"):
        p.write_bytes(b"\x01" * 2048)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no readable train samples"):
            list(build_loader(root, "train", batch_size=2, num_workers=0))


def test_no_masks(tmp_path):
    root = tmp_path / "s"
    write_shards(root, {"train": [3], "val": [3]}, masks=False)
    batches = list(build_loader(root, "val", batch_size=2, num_workers=0))
    assert all(b.masks is None for b in batches)
    assert sorted(g for b in batches for g in check_batch(b, masks=False)) == [3, 4, 5]


def test_bad_arguments(tiny_shards):
    with pytest.raises(ValueError):
        build_loader(tiny_shards, "val", batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError):
        build_loader(tiny_shards, "val", batch_size=0)


def test_index_is_rechecked_when_a_shard_changes(tmp_path):
    root = tmp_path / "s"
    write_shards(root, {"train": [4, 4], "val": [5]}, masks=True)
    loader = build_loader(root, "val", batch_size=2, num_workers=0)
    assert sorted(g for b in loader for g in check_batch(b)) == [8, 9, 10, 11, 12]
    assert loader._index  # local raw shards were indexed once
    # rewrite the shard (same layout, new mtime): the stale index is not trusted, the shard is walked again
    import os

    path = root / "val-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data)
    os.utime(path, ns=(1, 1))
    assert sorted(g for b in loader for g in check_batch(b)) == [8, 9, 10, 11, 12]
    path.write_bytes(data[:1024])  # now truncated: the walk reports it, naming the shard
    with pytest.raises(ShardFormatError, match="val-000000.tar"):
        list(loader)


def test_ring_slots_are_reused_only_when_free(tiny_shards):
    """Zero-copy batches over shared slots: contents stay right whether the consumer drops or keeps them."""
    loader = build_loader(tiny_shards, "train", batch_size=2, num_workers=2, shuffle_buffer=4, prefetch_factor=1)
    loader.steps_per_epoch = 40  # many more batches than slots
    kept_arrays, kept_ids = [], []
    for i, batch in enumerate(loader):
        ids = check_batch(batch)  # dropped right after: its slot is recycled
        if i % 5 == 0:  # keep only a numpy view of some: the slot must not be recycled under it
            kept_arrays.append(batch.images.numpy())
            kept_ids.append(ids)
    for arr, ids in zip(kept_arrays, kept_ids):
        assert [image_index(a) for a in arr] == ids


@pytest.mark.parametrize(
    "offset,message_end",
    [(-1, "(256 bytes at -1 of "), ("end", "(256 bytes at "), (2**63 - 10, f"(256 bytes at {2**63 - 10} of ")],
)
def test_a_pixel_offset_outside_its_shard_is_refused_not_read(tiny_shards, offset, message_end):
    """The global plan copies pixels by address from the mapped shard: a stale or unreadable row of the table
    must raise, not read other memory or crash the process."""
    from pipeline.streams import _ShardMaps

    table, _ = build_loader(tiny_shards, "train", batch_size=4, num_workers=0)._global_table()
    offsets = table.image_offsets.copy()
    size = table.stats[0][0]
    offsets[1] = size - 255 if offset == "end" else offset  # one byte short of a 16 x 16 image; past int64 wrap
    maps, out = _ShardMaps(table), torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    maps.gather(np.array([0, 2]), out, offsets)  # rows inside the shard are read
    assert out.sum() > 0
    with pytest.raises(ShardFormatError) as refused:
        maps.gather(np.array([0, 1]), out, offsets)
    assert str(refused.value).startswith(f"sample 1 lies outside {table.paths[0]} {message_end}")
    assert str(refused.value).endswith(f"of {size}): the offset index is stale or marks it unreadable")
