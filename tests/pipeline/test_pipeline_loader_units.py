"""`ShardLoader`'s own numbers and state by hand: argument refusals, epoch sizes, the state dict, the ring's bytes.

Written from the mutants of `pipeline/loader.py` (docs/testing.md): the epoch tests check whole epochs through
workers; these pin each figure the loader reports against a count done by hand on the tiny shard set
(train shards of 7, 5, 6 and 3 samples: 21; val 5 and 2: 7; images 16 px with masks).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import webdataset as wds

from pipeline.loader import LoaderError, build_loader
from pipeline.read import split_digest
from pipeline.resume import STATE_VERSION
from pipeline.streams import EpochSpan


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"rank": 2, "world_size": 2}, "need 0 <= rank < world_size, got rank=2, world_size=2"),
        ({"rank": -1, "world_size": 2}, "need 0 <= rank < world_size, got rank=-1, world_size=2"),
        ({"rank": 0, "world_size": 0}, "need 0 <= rank < world_size, got rank=0, world_size=0"),
        ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
        ({"balance": "site"}, "balance must be one of ['none', 'class', 'source', 'source_class'], got 'site'"),
        ({"epoch_samples": 0}, "epoch_samples must be >= 1 (or None: every sample once), got 0"),
    ],
)
def test_each_bad_argument_is_refused_with_the_whole_message(tiny_shards, kwargs, message):
    with pytest.raises(LoaderError) as refused:
        build_loader(tiny_shards, "train", **{"batch_size": 4, "num_workers": 0, **kwargs})
    assert str(refused.value) == message


def test_the_edges_of_each_range_are_accepted(tiny_shards):
    for kwargs in ({"batch_size": 1}, {"rank": 1, "world_size": 2}, {"epoch_samples": 1}, {"balance": "source_class"}):
        loader = build_loader(tiny_shards, "train", **{"batch_size": 4, "num_workers": 0, **kwargs})
        assert loader.steps_per_epoch >= 1


@pytest.mark.parametrize(
    "kwargs,steps",
    [
        ({}, 3),  # 21 samples, global batch 8: ceil(21 / 8)
        ({"drop_last": True}, 2),  # floor(21 / 8)
        ({"epoch_samples": 9}, 2),  # ceil(9 / 8)
        ({"epoch_samples": 8, "drop_last": True}, 1),
        ({"epoch_samples": 33}, 5),
    ],
)
def test_train_epoch_sizes_by_hand(tiny_shards, kwargs, steps):
    for rank in (0, 1):
        loader = build_loader(tiny_shards, "train", batch_size=4, rank=rank, world_size=2, num_workers=0, **kwargs)
        assert (loader.steps_per_epoch, len(loader), loader.num_samples) == (steps, steps, 4 * steps)
        assert loader.plan == "global"


@pytest.mark.parametrize("epoch_samples", [None, 7])
def test_an_epoch_without_a_step_is_refused_naming_the_counts(tiny_shards, epoch_samples):
    with pytest.raises(LoaderError) as refused:
        build_loader(
            tiny_shards,
            "train",
            batch_size=16,
            world_size=2,
            num_workers=0,
            drop_last=True,
            epoch_samples=epoch_samples,
        )
    n = epoch_samples or 21
    assert str(refused.value) == (
        f"drop_last with {n} train samples per epoch < global batch 32: an epoch would have no step"
    )


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_eval_sizes_are_what_each_rank_yields_and_add_up_to_the_split(tiny_shards, workers):
    total = 0
    for rank in range(2):
        loader = build_loader(tiny_shards, "val", batch_size=2, rank=rank, world_size=2, num_workers=workers)
        batches = list(loader)
        assert loader.plan == "eval"
        assert loader.num_samples == sum(len(b.labels) for b in batches)
        assert loader.steps_per_epoch == len(batches) == len(loader)
        total += loader.num_samples
    assert total == 7
    assert build_loader(tiny_shards, "train", batch_size=4, num_workers=0, train=False).plan == "eval"


def test_the_state_dict_by_hand(tiny_shards):
    loader = build_loader(tiny_shards, "train", batch_size=4, rank=1, world_size=2, num_workers=0, seed=3)
    loader.set_epoch(2)
    want = {
        "version": STATE_VERSION,
        "split": "train",
        "epoch": 2,
        "step": 0,
        "seed": 3,
        "global_batch": 8,
        "drop_last": False,
        "shards": split_digest(loader.manifest, "train"),
        "plan": "global",
    }
    assert loader.state_dict() == want
    streamed = build_loader(tiny_shards, "train", batch_size=4, world_size=2, num_workers=0, seed=3, fast=False)
    streamed.set_epoch(2)
    assert streamed.state_dict() == {**want, "plan": "stream", "layout": [2, 1]}
    three = build_loader(tiny_shards, "train", batch_size=4, world_size=2, num_workers=3, seed=3, fast=False)
    assert three.state_dict()["layout"] == [2, 3]


def test_a_mixed_state_says_where_each_collection_stood_when_the_epoch_began(tiny_shards):
    loader = build_loader(tiny_shards, "train", batch_size=4, world_size=2, num_workers=0, epoch_samples=9)
    name = loader.collections.names[0]
    for epoch in range(4):
        loader.set_epoch(epoch)
        state = loader.state_dict()
        assert state["mix"] == {"collections": [[name, 1.0]], "balance": "none", "epoch_samples": 9}
        assert state["cursors"] == {name: epoch * 2 * 8}  # two steps of eight draws per epoch
    assert "mix" not in build_loader(tiny_shards, "train", batch_size=4, num_workers=0).state_dict()


def test_a_resumed_step_holds_for_its_epoch_only(tiny_shards):
    loader = build_loader(tiny_shards, "train", batch_size=4, num_workers=0)
    loader.load_state_dict({**loader.state_dict(), "epoch": 1, "step": 2})
    assert (loader.epoch, loader.start_step) == (1, 2)
    loader.set_epoch(1)
    assert loader.start_step == 2
    assert [b.step for b in loader] == [2, 3, 4, 5]  # 21 samples, global batch 4: six steps
    assert loader.state_dict()["step"] == 6 and loader.start_step == 0
    loader.load_state_dict({**loader.state_dict(), "epoch": 1, "step": 2})
    loader.set_epoch(2)
    assert loader.start_step == 0 and [b.step for b in loader] == [0, 1, 2, 3, 4, 5]


def test_the_batch_rings_bytes_by_hand(tiny_shards):
    def ring(**kw):
        return build_loader(tiny_shards, "train", batch_size=4, **kw).shared_memory_bytes

    # workers x (prefetch_factor + 2) slots x batch x 16 x 16 pixels x 2 (images and masks)
    assert ring(num_workers=2, prefetch_factor=2) == 2 * 4 * 4 * 256 * 2
    assert ring(num_workers=3, prefetch_factor=1) == 3 * 3 * 4 * 256 * 2
    assert ring(num_workers=2, prefetch_factor=2, masks=False) == 2 * 4 * 4 * 256
    assert ring(num_workers=0) == 0 and ring(num_workers=2, shared_memory=False) == 0


@pytest.mark.parametrize("workers,prefetch", [(0, None), (1, 3), (2, 1)])
def test_the_dataloader_gets_the_prefetch_and_leaves_order_and_pinning_to_the_loader(
    tiny_shards, monkeypatch, workers, prefetch
):
    """The ring has a slot per batch DataLoader prefetches: the two must agree (DataLoader's default is 2)."""
    made = []

    class Spy(wds.WebLoader):
        def __init__(self, dataset, **kwargs):
            made.append(kwargs)
            super().__init__(dataset, **kwargs)

    monkeypatch.setattr(wds, "WebLoader", Spy)
    loader = build_loader(tiny_shards, "train", batch_size=4, num_workers=workers, prefetch_factor=prefetch or 2)
    assert [b.step for b in loader] == list(range(6))
    fixed = {"batch_size": None, "shuffle": False, "num_workers": workers, "pin_memory": False}
    assert made == [{**fixed, "persistent_workers": False, **({"prefetch_factor": prefetch} if workers else {})}]


def test_the_documented_defaults(tiny_shards):
    loader = build_loader(tiny_shards, "train", batch_size=4)
    assert (loader.num_workers, loader.seed, loader.window_steps, loader.prefetch_factor) == (2, 0, 500, 2)
    assert (loader.pin_memory, loader.shared_memory, loader.drop_last, loader.balance) == (False, True, False, "none")
    assert loader.spec.allow_pipe is None and loader.spec.fast and loader.sha256 is not None


@pytest.mark.parametrize("allow_pipe", [False, True])
def test_the_pipe_policy_reaches_every_read(tiny_shards, allow_pipe):
    assert build_loader(tiny_shards, "train", batch_size=4, allow_pipe=allow_pipe).spec.allow_pipe is allow_pipe


def test_the_shuffle_window_is_the_buffer_in_whole_batches_and_at_least_one(tiny_shards):
    def window(buffer: int) -> int:
        return build_loader(tiny_shards, "train", batch_size=4, num_workers=0, shuffle_buffer=buffer).window_steps

    assert [window(b) for b in (1, 4, 5, 8, 9, 100)] == [1, 1, 2, 2, 3, 25]


def test_drop_last_on_the_stream_plan_reads_whole_batches_of_distinct_samples(tiny_shards):
    from helpers.indexed_shards import image_index

    loader = build_loader(tiny_shards, "train", batch_size=4, num_workers=0, fast=False, drop_last=True)
    drawn = [image_index(img) for batch in loader for img in batch.images]
    assert loader.plan == "stream" and len(loader) == 5  # 21 samples: 5 whole batches, one left over
    assert len(drawn) == len(set(drawn)) == 20 and set(drawn) <= set(range(21))


def test_the_stream_plans_order_is_pinned(tiny_shards):
    """The unmixed stream plan's batches (seed 3, one process, pixels encode each sample's index). Every ordering
    property is tested elsewhere; this list catches a silent change of the order itself (say, an unmixed set
    routed through the mixing plan), which would stop users' runs reproducing. Change it deliberately."""
    from helpers.indexed_shards import image_index

    loader = build_loader(tiny_shards, "train", batch_size=4, num_workers=0, seed=3, fast=False)
    assert loader.plan == "stream"
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        orders.append([[image_index(img) for img in batch.images] for batch in loader])
    assert orders == [
        [[2, 1, 15, 5], [6, 11, 16, 20], [8, 18, 4, 17], [14, 9, 13, 19], [10, 1, 12, 0], [3, 7, 0, 2]],
        [[19, 0, 1, 20], [12, 18, 4, 19], [15, 7, 18, 20], [2, 9, 16, 13], [14, 6, 11, 5], [8, 3, 17, 10]],
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the batches are pinned: tests/gpu")
def test_pin_memory_without_cuda_gives_the_same_batches_unpinned(tiny_shards):
    def batches(pin: bool) -> list:
        loader = build_loader(tiny_shards, "train", batch_size=4, num_workers=1, seed=3, pin_memory=pin)
        return [(b.keys, b.labels.tolist(), b.images.numpy().tobytes(), b.masks.numpy().tobytes()) for b in loader]

    assert batches(True) == batches(False)


@pytest.mark.parametrize(
    "steps,message",
    [
        ([0, 2], "loader yielded step 2 where step 1 was due: workers out of order"),
        ([0, 1, 2, 3, 4, 5, 6], "loader yielded step 6 where step None was due: workers out of order"),
    ],
)
def test_a_batch_out_of_the_plans_order_is_refused(tiny_shards, steps, message):
    """The train loader's own check that workers deliver steps 0, 1, ... and no more (6 a train epoch here)."""
    loader = build_loader(tiny_shards, "train", batch_size=4, num_workers=0)
    delivered = loader._in_order(iter(SimpleNamespace(step=s) for s in steps), EpochSpan([0], 0))
    with pytest.raises(RuntimeError) as refused:
        list(delivered)
    assert str(refused.value) == message


def test_strata_without_balancing_and_on_the_stream_plan_are_one_per_collection(tiny_shards):
    for fast in (True, False):
        loader = build_loader(tiny_shards, "train", batch_size=4, num_workers=0, epoch_samples=9, fast=fast)
        strata = loader.strata()
        assert strata.names == ["all"] and strata.collection.tolist() == [0] * 21
        assert strata.stratum.tolist() == [0] * 21
        assert (strata.mix.sizes, strata.mix.weights, strata.mix.epoch_samples) == ((21,), (1.0,), 9)


def test_class_strata_name_every_class_and_leave_unreadable_films_out(tiny_shards, tmp_path):
    import shutil
    import warnings

    from sharding.contract import CLASSES

    strata = build_loader(tiny_shards, "train", batch_size=4, num_workers=0, balance="class").strata()
    assert strata.names == sorted(CLASSES)
    assert [strata.names[s] for s in strata.stratum.tolist()] == [CLASSES[g % 4] for g in range(21)]
    root = tmp_path / "s"
    shutil.copytree(tiny_shards, root)
    (root / "train-000001.tar").write_bytes(bytes(1024))  # samples 7-11 unreadable
    loader = build_loader(root, "train", batch_size=4, num_workers=0, balance="class")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strata = loader.strata()
    assert strata.names == sorted(CLASSES)
    assert strata.stratum.tolist()[7:12] == [-1] * 5 and min(strata.stratum.tolist()[:7]) >= 0


@pytest.mark.parametrize("split,shards,batches", [("train", 4, 6), ("val", 2, 2)])  # the global and eval plans
def test_every_shard_is_indexed_once_across_epochs_and_again_only_when_it_changes(
    tiny_shards, tmp_path, monkeypatch, split, shards, batches
):
    import os
    import shutil

    import pipeline.read as read

    root = tmp_path / "s"
    shutil.copytree(tiny_shards, root)
    walked = []
    real = read.index_shard
    monkeypatch.setattr(read, "index_shard", lambda path, *a: walked.append(os.path.basename(path)) or real(path, *a))
    loader = build_loader(root, split, batch_size=4, num_workers=0)
    names = [f"{split}-00000{i}.tar" for i in range(shards)]
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert len(list(loader)) == batches
    assert sorted(walked) == names
    st = os.stat(root / names[1])
    os.utime(root / names[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert len(list(loader)) == batches
    assert sorted(walked[:shards]) == names and walked[shards:] == [names[1]]


def test_an_epoch_reads_the_shards_as_they_are_now(tmp_path):
    """Every shard rewritten with other pixels between epochs: the second epoch reads the new ones."""
    import os

    from helpers.indexed_shards import image_index, write_shards

    root = tmp_path / "s"
    write_shards(root, {"train": [4, 4], "val": [2]})
    loader = build_loader(root, "train", batch_size=4, num_workers=0, verify_checksums=False)
    first = sorted(image_index(img) for b in loader for img in b.images)
    assert first == list(range(8))
    write_shards(root, {"train": [4, 4], "val": [2]}, start=100)
    for path in root.glob("train-*.tar"):
        os.utime(path, ns=(1, 1))
    again = sorted(image_index(img) for b in loader for img in b.images)
    assert again == list(range(100, 108))


def test_no_readable_train_shard_is_refused_naming_how_many(tiny_shards, tmp_path):
    import shutil
    import warnings

    from pipeline.read import NoReadableSamplesError

    root = tmp_path / "s"
    shutil.copytree(tiny_shards, root)
    for path in root.glob("train-*.tar"):
        path.write_bytes(bytes(1024))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoReadableSamplesError, match="all 4 train shards are corrupt or unreachable"):
            list(build_loader(root, "train", batch_size=4, num_workers=0))
