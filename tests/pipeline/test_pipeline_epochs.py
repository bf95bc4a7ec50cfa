"""The train epoch contract through real loaders and worker processes, local and over HTTP.

Every sample once per epoch plus fewer than one global batch of repeats; the
same number of full batches on every rank; the global plan's order independent
of the worker count and of how the global batch is split into ranks; mid-epoch
resume from a state dict.
"""

from __future__ import annotations

import re
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.loader import LoaderStateError, build_loader

from helpers.indexed_shards import split_ids, write_shards
from test_pipeline_stream import check_batch

LOADER_PROPERTY = settings(max_examples=25, derandomize=True, deadline=None)
layouts = st.lists(st.integers(1, 30), min_size=1, max_size=6)


def epoch_ids(root, world_size: int, num_workers: int, batch_size: int, epoch: int = 0, **kw) -> list[list[list[int]]]:
    """[rank][step] -> sample ids of one epoch, every batch checked (key, label, pixels, mask agree)."""
    out = []
    for rank in range(world_size):
        loader = build_loader(
            root, "train", batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers, **kw
        )
        loader.set_epoch(epoch)
        batches = []
        for b in loader:
            ids = check_batch(b, masks=b.masks is not None)
            assert b.indices.tolist() == ids  # train ids start at 0: a sample's index is its id
            batches.append(ids)
        assert len(batches) == loader.steps_per_epoch == len(loader)
        assert all(len(b) == batch_size for b in batches)
        out.append(batches)
    return out


def assert_exact_epoch(per_rank, layout, batch_size):
    n, g = sum(layout), batch_size * len(per_rank)
    steps = -(-n // g)
    assert [len(r) for r in per_rank] == [steps] * len(per_rank)  # equal steps on every rank
    seen = Counter(i for r in per_rank for b in r for i in b)
    assert set(seen) == split_ids("train", {"train": layout})  # every sample
    assert sum(seen.values()) - n < g  # fewer than G repeats


def global_batches(per_rank) -> list[list[int]]:
    return [[i for r in per_rank for i in r[s]] for s in range(len(per_rank[0]))]


@pytest.mark.slow
@LOADER_PROPERTY
@given(layout=layouts, world=st.integers(1, 8), workers=st.sampled_from([0, 1, 2, 4]), batch=st.integers(1, 8))
def test_exact_epoch_local_global_plan(layout, world, workers, batch):
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), {"train": layout}, masks=True)
        assert_exact_epoch(epoch_ids(tmp, world, workers, batch), layout, batch)


@pytest.mark.slow
@LOADER_PROPERTY
@given(
    layout=layouts,
    world=st.integers(1, 8),
    workers=st.sampled_from([0, 1, 2, 4]),
    batch=st.integers(1, 8),
    buffer=st.integers(1, 40),
)
def test_exact_epoch_streamed_over_http(http_root, layout, world, workers, batch, buffer):
    root, base = http_root
    name = uuid.uuid4().hex
    write_shards(root / name, {"train": layout}, masks=True)
    per_rank = epoch_ids(f"{base}{name}/", world, workers, batch, shuffle_buffer=buffer)
    assert_exact_epoch(per_rank, layout, batch)


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """10 shards of 20: enough to see whether batches mix shards."""
    root = tmp_path_factory.mktemp("mixed")
    write_shards(root, {"train": [20] * 10, "val": [3]}, masks=False)
    return root


@pytest.mark.parametrize("stream", [False, True], ids=["global", "stream(fast=False)"])
def test_exact_epoch_small_layouts(tiny_shards, stream):
    for world, workers, batch in [(1, 0, 3), (2, 2, 4), (3, 1, 2), (8, 2, 1), (5, 0, 7)]:
        per_rank = epoch_ids(tiny_shards, world, workers, batch, fast=not stream, shuffle_buffer=5)
        assert_exact_epoch(per_rank, [7, 5, 6, 3], batch)


def test_drop_last_cuts_to_whole_global_batches(tiny_shards):
    per_rank = epoch_ids(tiny_shards, 2, 1, 4, drop_last=True)
    ids = [i for r in per_rank for b in r for i in b]
    assert len(ids) == len(set(ids)) == 16  # 21 samples, G = 8: two global batches, no repeat


def test_order_does_not_depend_on_workers(mixed_shards):
    runs = [global_batches(epoch_ids(mixed_shards, 2, w, 8, seed=3)) for w in (0, 1, 3)]
    assert runs[0] == runs[1] == runs[2]


def test_same_global_batches_for_2x16_and_4x8(mixed_shards):
    two = global_batches(epoch_ids(mixed_shards, 2, 1, 16, seed=1))
    four = global_batches(epoch_ids(mixed_shards, 4, 2, 8, seed=1))
    assert two == four


@pytest.mark.parametrize("fast", [True, False], ids=["global", "stream"])
def test_consecutive_epochs_through_the_same_workers(mixed_shards, fast):
    """iter_epochs: the DataLoader's round-robin continues across epoch boundaries (steps stay in order)."""

    def loader():
        return build_loader(mixed_shards, "train", batch_size=8, num_workers=2, fast=fast, shuffle_buffer=16)

    one_by_one = []
    for epoch in range(3):  # 25 steps an epoch: an odd count, or a misordered boundary would hide
        single = loader()
        single.set_epoch(epoch)
        one_by_one += _keys(single)
    assert _keys(loader().iter_epochs(3)) == one_by_one


def test_epochs_differ_and_repeat(mixed_shards):
    e0 = global_batches(epoch_ids(mixed_shards, 1, 0, 10, epoch=0))
    assert e0 == global_batches(epoch_ids(mixed_shards, 1, 0, 10, epoch=0))
    assert e0 != global_batches(epoch_ids(mixed_shards, 1, 0, 10, epoch=1))


def test_batches_mix_samples_from_across_the_split(mixed_shards):
    """A global shuffle: a batch of 20 draws from most of the 10 shards (~8.8 expected), not from a few."""
    batches = epoch_ids(mixed_shards, 1, 2, 20)[0]
    shards_per_batch = [len({i // 20 for i in b}) for b in batches]
    assert min(shards_per_batch) >= 6, shards_per_batch


# --------------------------------------------------------------------------- mid-epoch resume


def _keys(batches) -> list[list[str]]:
    return [list(b.keys) for b in batches]


@pytest.mark.parametrize("workers_before,workers_after", [(2, 0), (0, 3), (1, 1)])
def test_resume_mid_epoch_with_other_workers(mixed_shards, workers_before, workers_after):
    def loader(workers):
        return build_loader(mixed_shards, "train", batch_size=6, rank=1, world_size=2, num_workers=workers, seed=9)

    full = loader(workers_before)
    full.set_epoch(2)
    expected = _keys(full)
    first = loader(workers_before)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["step"] == 5
    del it, head
    resumed = loader(workers_after)
    resumed.load_state_dict(state)
    assert resumed.start_step == 5
    assert _keys(resumed) == expected[5:]
    resumed.set_epoch(3)  # the next epoch starts from its beginning
    assert len(_keys(resumed)) == resumed.steps_per_epoch


def test_resume_streamed_needs_the_same_layout(tiny_shards):
    def loader(workers):
        return build_loader(tiny_shards, "train", batch_size=2, num_workers=workers, fast=False, shuffle_buffer=4)

    expected = _keys(loader(2))
    for done in (3, 4):  # odd and even: the resumed iteration's first batch comes from worker 0 either way
        first = loader(2)
        it = iter(first)
        for _ in range(done):
            next(it)
        state = first.state_dict()
        del it
        resumed = loader(2)
        resumed.load_state_dict(state)
        assert _keys(resumed) == expected[done:]
    with pytest.raises(LoaderStateError, match="layout.*same ranks and data workers"):
        loader(1).load_state_dict(state)


def test_mismatched_state_is_refused(tiny_shards, mixed_shards):
    state = build_loader(tiny_shards, "train", batch_size=4, num_workers=0, seed=1).state_dict()
    with pytest.raises(LoaderStateError, match="shards"):
        build_loader(mixed_shards, "train", batch_size=4, num_workers=0, seed=1).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="global_batch"):
        build_loader(tiny_shards, "train", batch_size=2, num_workers=0, seed=1).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="seed"):
        build_loader(tiny_shards, "train", batch_size=4, num_workers=0, seed=2).load_state_dict(state)
    # same global batch from another rank layout is fine on the global plan
    build_loader(tiny_shards, "train", batch_size=2, rank=1, world_size=2, num_workers=0, seed=1).load_state_dict(state)


@pytest.mark.parametrize(
    "key,other",
    [
        ("version", 0),
        ("split", "val"),
        ("seed", 2),
        ("global_batch", 8),
        ("drop_last", True),
        ("shards", "0123456789abcdef"),
        ("plan", "stream"),
        ("layout", [1, 3]),
    ],
)
def test_each_compared_key_of_a_state_is_refused_alone(tiny_shards, key, other):
    """One key changed at a time: the loader refuses the state and names that key (and no other)."""
    fast = key != "layout"  # the worker layout is compared on the stream plan only
    loader = build_loader(tiny_shards, "train", batch_size=4, num_workers=1, seed=1, fast=fast)
    state = loader.state_dict()
    assert state["plan"] == ("global" if fast else "stream") and state.get(key, other) != other
    with pytest.raises(LoaderStateError, match=re.escape(f": {key}: state has {other!r}, this loader has")) as err:
        loader.load_state_dict({**state, key: other})
    assert str(err.value).count("state has") == 1
    loader.load_state_dict(state)  # the unchanged state is accepted


def test_corrupt_train_shard_keeps_steps_and_counts_its_samples(mixed_shards, tmp_path):
    import shutil
    import warnings

    root = tmp_path / "s"
    shutil.copytree(mixed_shards, root)
    (root / "train-000003.tar").write_bytes(b"\x00" * 1024)
    for stream in (False, True):
        loader = build_loader(root, "train", batch_size=8, num_workers=2, fast=not stream)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = [check_batch(b, masks=False) for b in loader]
        assert len(batches) == loader.steps_per_epoch == 25
        seen = {i for b in batches for i in b}
        assert seen == set(range(200)) - set(range(60, 80))  # everything but the lost shard
        report = loader.corrupt_shards
        assert report.samples_lost == 20 and report.shards >= 1
