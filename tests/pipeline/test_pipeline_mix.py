"""Several collections in one run: the mixing plan's arithmetic, then real loaders and worker processes.

The oracles are counts computed here from the contract (docs/pipeline.md, "Several collections"):
each collection makes exactly its share n_i of an epoch's steps x G draws, every sample of it floor or
ceil of k n_i / N_i times after k epochs, every stratum an equal share, and the order depends on
(seed, epoch, G) alone.
"""

from __future__ import annotations

import math
import tempfile
import uuid
from collections import Counter
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.collection import CollectionError
from pipeline.loader import LoaderError, LoaderStateError, build_loader
from pipeline.mix import Mix, allocate

from helpers.indexed_shards import image_index, key_of, write_shards
from test_pipeline_stream import check_batch

PROPERTY = settings(max_examples=150, derandomize=True, deadline=None)
LOADER_PROPERTY = settings(max_examples=20, derandomize=True, deadline=None)


# --------------------------------------------------------------------------- the arithmetic


def test_allocate_by_hand():
    assert allocate(10, [1, 1, 1]).tolist() == [4, 3, 3]  # the remainder goes to the earliest
    assert allocate(7, [0.1, 0.2, 0.7]).tolist() == [1, 1, 5]  # 0.7 1.4 4.9: largest remainders 0.9, 0.7
    assert allocate(1216, [1, 1]).tolist() == [608, 608]
    assert allocate(32, [1, 2]).tolist() == [11, 21]  # 10.67, 21.33
    assert allocate(5, [1, 0]).tolist() == [5, 0]
    assert allocate(3, [0.1, 0.1, 0.1]).tolist() == [1, 1, 1]  # 0.1 is not exact in binary, the thirds are
    for bad in ([0, 0], [1, -1], []):
        with pytest.raises(ValueError):
            allocate(4, bad)


@PROPERTY
@given(total=st.integers(0, 10_000), weights=st.lists(st.floats(0.01, 100), min_size=1, max_size=6))
def test_allocate_is_exact_and_within_one(total, weights):
    share = allocate(total, weights)
    assert share.sum() == total
    for s, w in zip(share.tolist(), weights):
        exact = Fraction(total) * Fraction(w) / sum(Fraction(x) for x in weights)
        assert math.floor(exact) <= s <= math.ceil(exact)


def counts_of(orders: list[np.ndarray], n: int) -> np.ndarray:
    return np.bincount(np.concatenate(orders), minlength=n)


def floor_ceil(draws: int, members: int) -> set[int]:
    return {draws // members, -(-draws // members)}


mixes = st.fixed_dictionaries(
    {
        "sizes": st.lists(st.integers(1, 40), min_size=1, max_size=4),
        "weights": st.lists(st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0]), min_size=4, max_size=4),
        "batch": st.integers(1, 16),
        "epochs": st.integers(1, 5),
        "drop_last": st.booleans(),
        "seed": st.integers(0, 3),
    }
)


@PROPERTY
@given(m=mixes)
def test_each_collection_makes_its_share_and_covers_its_samples_evenly(m):
    sizes, weights = m["sizes"], m["weights"][: len(m["sizes"])]
    mix = Mix.unbalanced(sizes, weights)
    g, n = m["batch"], sum(sizes)
    steps = n // g if m["drop_last"] else -(-n // g)
    if steps == 0:
        return
    share = allocate(steps * g, weights)
    off = np.concatenate([[0], np.cumsum(sizes)])
    orders = []
    for epoch in range(m["epochs"]):
        order = mix.epoch_order(m["seed"], epoch, g, m["drop_last"])
        assert len(order) == steps * g  # whole global batches, every slot a draw
        which = np.searchsorted(off, order, side="right") - 1
        assert np.bincount(which, minlength=len(sizes)).tolist() == share.tolist()  # exactly n_i, every epoch
        orders.append(order)
    seen = counts_of(orders, n)
    for i, size in enumerate(sizes):
        assert set(seen[off[i] : off[i + 1]].tolist()) <= floor_ceil(m["epochs"] * int(share[i]), size)


@PROPERTY
@given(m=mixes, strata=st.lists(st.integers(0, 3), min_size=160, max_size=160))
def test_balanced_strata_share_each_collection_equally(m, strata):
    sizes, weights = m["sizes"], m["weights"][: len(m["sizes"])]
    off = np.concatenate([[0], np.cumsum(sizes)])
    ids = np.array(strata[: off[-1]], np.int64)
    mix = Mix(tuple(sizes), tuple(weights), tuple(ids[off[i] : off[i + 1]] for i in range(len(sizes))))
    g, n = m["batch"], off[-1]
    steps = n // g if m["drop_last"] else -(-n // g)
    if steps == 0:
        return
    share = allocate(steps * g, weights)
    k = m["epochs"]
    seen = counts_of([mix.epoch_order(m["seed"], e, g, m["drop_last"]) for e in range(k)], n)
    for i in range(len(sizes)):
        mine = ids[off[i] : off[i + 1]]
        present = np.unique(mine)
        for s in present:  # each stratum floor/ceil of k n_i / S, each member floor/ceil of its stratum's draws / M
            members = off[i] + np.flatnonzero(mine == s)
            drawn = int(seen[members].sum())
            assert drawn in floor_ceil(k * int(share[i]), len(present))
            assert set(seen[members].tolist()) <= floor_ceil(drawn, len(members))


def test_the_worked_example_of_docs_pipeline():
    """docs/pipeline.md's arithmetic: A 1,000 films and B 200, weight 1 each, G = 64."""
    mix = Mix.unbalanced([1000, 200], [1, 1])
    assert mix.steps(64) == 19 and mix.draws(64).tolist() == [608, 608]
    first = counts_of([mix.epoch_order(0, 0, 64)], 1200)
    assert Counter(first[:1000].tolist()) == {1: 608, 0: 392}
    assert Counter(first[1000:].tolist()) == {4: 8, 3: 192}
    five = counts_of([mix.epoch_order(0, e, 64) for e in range(5)], 1200)
    assert Counter(five[:1000].tolist()) == {4: 40, 3: 960}
    assert Counter(five[1000:].tolist()) == {16: 40, 15: 160}
    classes = np.repeat(np.arange(4), [50, 150, 200, 600])  # A's classes; B one stratum
    balanced = Mix((1000, 200), (1, 1), (classes, np.zeros(200, np.int64)))
    drawn = counts_of([balanced.epoch_order(0, 0, 64)], 1200)[:1000]
    assert [int(drawn[classes == c].sum()) for c in range(4)] == [152] * 4


def test_the_order_depends_on_seed_and_epoch_only():
    mix = Mix.unbalanced([30, 10, 5], [1, 1, 2])
    a = mix.epoch_order(0, 2, 8)
    assert np.array_equal(a, Mix.unbalanced([30, 10, 5], [1, 1, 2]).epoch_order(0, 2, 8))
    assert not np.array_equal(a, mix.epoch_order(0, 3, 8))
    assert not np.array_equal(a, mix.epoch_order(1, 2, 8))
    assert mix.cursors(3, 8) == [3 * int(x) for x in allocate(48, [1, 1, 2])]


def test_a_collection_with_nothing_readable_gives_its_draws_to_the_others():
    mix = Mix.unbalanced([6, 4], [1, 1])
    order = mix.epoch_order(0, 0, 5, valid=np.arange(6))  # collection 1's samples 6..9 are unreadable
    assert len(order) == 10 and order.max() < 6
    assert order.dtype == np.int64  # sample indices, whatever the empty collection contributes


# --------------------------------------------------------------------------- real loaders

#: Three collections: ids 0.. (a), 1000.. (b), 2000.. (c); test ids never collide with train ids.
A = {"train": [7, 5, 9], "val": [4], "test": [2]}
B = {"train": [4, 4], "val": [3], "test": [2]}
C = {"train": [3], "val": [1], "test": [1]}


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("collections")
    write_shards(root / "a", A)
    write_shards(root / "b", B, start=1000)
    write_shards(root / "c", C, start=2000)
    return root


def mix_of(root: Path, weights=(1.0, 2.0, 0.5)) -> list[dict]:
    return [{"path": str(root / n), "weight": w} for n, w in zip("abc", weights)]


def collection_of(g: int) -> str:
    return "abc"[g // 1000]


def check_mixed(b, mixed: bool = True) -> list[int]:
    """check_batch for a batch of a mixed set: its keys are `collection/key`, its collections each sample's."""
    ids = check_batch(replace(b, keys=[k.split("/", 1)[-1] for k in b.keys]), masks=True)
    assert b.collections == [collection_of(g) for g in ids]
    assert b.keys == [f"{collection_of(g)}/{key_of(g)}" if mixed else key_of(g) for g in ids]
    return ids


def epoch(loader, epoch: int = 0) -> list[list[int]]:
    """One epoch's batches as sample ids, each batch checked against its samples (pixels, key, label, json)."""
    loader.set_epoch(epoch)
    out = []
    for b in loader:
        ids = check_mixed(b, loader.collections.mixed)
        out.append(ids)
    assert len(out) == loader.steps_per_epoch
    return out


def rank_epochs(spec, world: int, workers: int, batch: int, epochs: int = 1, **kw) -> list[list[list[int]]]:
    """[epoch][step] -> the global batch's sample ids, ranks concatenated."""
    loaders = [
        build_loader(spec, "train", batch_size=batch, rank=r, world_size=world, num_workers=workers, **kw)
        for r in range(world)
    ]
    out = []
    for e in range(epochs):
        per_rank = [epoch(loader, e) for loader in loaders]
        assert len({len(r) for r in per_rank}) == 1  # the same number of full batches on every rank
        assert all(len(b) == batch for r in per_rank for b in r)
        out.append([[g for r in per_rank for g in r[s]] for s in range(len(per_rank[0]))])
    return out


def test_three_collections_exact_shares_for_any_workers_and_rank_split(three):
    spec = mix_of(three)
    n, g = 21 + 8 + 3, 8
    share = dict(zip("abc", allocate(-(-n // g) * g, [1.0, 2.0, 0.5]).tolist()))
    assert share == {"a": 9, "b": 18, "c": 5}  # 32 draws: 9.14, 18.29, 4.57; the spare one to c
    reference = rank_epochs(spec, 1, 0, 8, epochs=3)
    for batches in reference:
        assert Counter(collection_of(x) for b in batches for x in b) == share
    assert rank_epochs(spec, 1, 2, 8, epochs=3) == reference  # workers change nothing
    assert rank_epochs(spec, 2, 1, 4, epochs=3) == reference  # 2 x 4 == 1 x 8
    assert rank_epochs(spec, 4, 2, 2, epochs=3) == reference  # 4 x 2 too
    seen = Counter(x for ep in reference for b in ep for x in b)
    for name, size, base in (("a", 21, 0), ("b", 8, 1000), ("c", 3, 2000)):
        counts = {seen[base + i] for i in range(size)}
        assert counts <= {3 * share[name] // size, -(-3 * share[name] // size)}, name


def test_mid_epoch_resume_with_other_workers_continues_exactly(three):
    spec = mix_of(three)
    whole = build_loader(spec, "train", batch_size=4, num_workers=0, balance="source")
    whole.set_epoch(1)
    expected = [b.indices.tolist() for b in whole]
    first = build_loader(spec, "train", batch_size=4, num_workers=2, balance="source")
    first.set_epoch(1)
    it = iter(first)
    got = [next(it).indices.tolist() for _ in range(3)]
    state = first.state_dict()
    del it
    assert state["mix"] == {
        "collections": [["a", 1.0], ["b", 2.0], ["c", 0.5]],
        "balance": "source",
        "epoch_samples": None,
    }
    assert state["cursors"] == {"a": 9, "b": 18, "c": 5}  # where each collection's sequence stood when epoch 1 began
    again = build_loader(spec, "train", batch_size=4, num_workers=1, balance="source")
    again.load_state_dict(state)
    got += [b.indices.tolist() for b in again]
    assert got == expected


@pytest.mark.parametrize(
    "change, named",
    [({"weights": (1.0, 2.0, 1.0)}, "mix"), ({"balance": "class"}, "mix"), ({"epoch_samples": 40}, "mix")],
)
def test_a_state_from_another_mix_is_refused(three, change, named):
    loader = build_loader(mix_of(three), "train", batch_size=4, num_workers=0)
    state = loader.state_dict()
    weights = change.pop("weights", (1.0, 2.0, 0.5))
    other = build_loader(mix_of(three, weights), "train", batch_size=4, num_workers=0, **change)
    with pytest.raises(LoaderStateError, match=rf"^cannot resume this loader from that state: .*{named}: state has"):
        other.load_state_dict(state)


def test_a_single_collection_state_is_refused_by_a_mix(three):
    single = build_loader(three / "a", "train", batch_size=4, num_workers=0)
    mixed = build_loader(mix_of(three), "train", batch_size=4, num_workers=0)
    with pytest.raises(LoaderStateError, match="shards: state has"):
        mixed.load_state_dict(single.state_dict())


def test_one_collection_as_a_list_keeps_the_single_plan(three):
    """A one-item list without balancing or epoch_samples is the seed's plan: same batches as the path."""
    path = [b.indices.tolist() for b in build_loader(three / "a", "train", batch_size=4, num_workers=0)]
    listed = build_loader([{"path": str(three / "a"), "weight": 3}], "train", batch_size=4, num_workers=0)
    assert not listed.mixed and "mix" not in listed.state_dict()
    assert [b.indices.tolist() for b in listed] == path


def test_epoch_samples_sets_the_epoch_length(three):
    loader = build_loader(mix_of(three), "train", batch_size=4, num_workers=0, epoch_samples=10)
    assert loader.steps_per_epoch == 3
    ids = [g for b in epoch(loader) for g in b]
    assert Counter(collection_of(g) for g in ids) == dict(zip("abc", allocate(12, [1, 2, 0.5]).tolist()))


def test_eval_splits_read_every_collection_once(three):
    for world, workers in ((1, 0), (2, 2), (3, 1)):
        ids = []
        for rank in range(world):
            loader = build_loader(mix_of(three), "val", batch_size=2, rank=rank, world_size=world, num_workers=workers)
            for b in loader:
                ids += check_mixed(b)
        assert sorted(ids) == sorted([21, 22, 23, 24] + [1008, 1009, 1010] + [2003])
    # one process reads them in the manifest's order, collection by collection: the train weights play no part
    loader = build_loader(mix_of(three), "val", batch_size=2, num_workers=0)
    assert [g for b in loader for g in check_mixed(b)] == [21, 22, 23, 24, 1008, 1009, 1010, 2003]


@pytest.mark.parametrize("balance", ["class", "source", "source_class"])
def test_balancing_gives_each_stratum_an_equal_share(three, balance):
    loader = build_loader(three / "a", "train", batch_size=6, num_workers=2, balance=balance)
    keys = {
        "class": lambda g: g % 4,
        "source": lambda g: g % 3,  # helpers.indexed_shards: site-(g % 3)
        "source_class": lambda g: (g % 3, g % 4),
    }[balance]
    strata = {keys(g) for g in range(21)}
    assert len(loader.strata().names) == len(strata)
    for e in range(3):
        drawn = Counter(keys(g) for b in epoch(loader, e) for g in b)
        assert set(drawn) == strata
        assert max(drawn.values()) - min(drawn.values()) <= 1  # 24 draws over the strata, +-1


def test_balancing_needs_random_access(http_root, three):
    root, base = http_root
    name = uuid.uuid4().hex
    write_shards(root / name, {"train": [5, 5]})
    with pytest.raises(LoaderError) as refused:
        build_loader(f"{base}{name}/", "train", batch_size=2, balance="class")
    assert str(refused.value) == (
        "balance='class' needs every train shard's class and source before the epoch starts: "
        "streamed shards give them only as they are read. Use local shards, or set a cache_dir"
    )


def test_streamed_collections_mix_exactly_over_http(http_root):
    root, base = http_root
    name = uuid.uuid4().hex
    write_shards(root / name / "a", A)
    write_shards(root / name / "b", B, start=1000)
    write_shards(root / name / "c", C, start=2000)
    spec = [{"path": f"{base}{name}/{n}/", "weight": w} for n, w in zip("abc", (1.0, 2.0, 0.5))]
    share = {"a": 9, "b": 18, "c": 5}
    for world, workers, batch in ((1, 0, 8), (2, 2, 4), (4, 1, 2)):
        epochs = rank_epochs(spec, world, workers, batch, epochs=3, shuffle_buffer=6)
        for batches in epochs:
            assert Counter(collection_of(x) for b in batches for x in b) == share
        seen = Counter(x for ep in epochs for b in ep for x in b)
        for n, size, base_id in (("a", 21, 0), ("b", 8, 1000), ("c", 3, 2000)):
            assert {seen[base_id + i] for i in range(size)} <= {3 * share[n] // size, -(-3 * share[n] // size)}


#: Any mix of 2 or 3 small collections on any layout: R <= 8, W in {0, 1, 2, 4}, B <= 6.
LAYOUTS = {
    "sizes": st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3), min_size=2, max_size=3),
    "weights": st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=3, max_size=3),
    "world": st.integers(1, 8),
    "workers": st.sampled_from([0, 1, 2, 4]),
    "batch": st.integers(1, 6),
}


def write_collections(root: Path, sizes, weights, base: str | None = None) -> list[dict]:
    """Collections a, b, c of train shards of `sizes` (ids 0.., 1000.., 2000..): their spec, local or at `base`."""
    spec = []
    for i, layout in enumerate(sizes):
        write_shards(root / "abc"[i], {"train": layout}, start=1000 * i)
        path = str(root / "abc"[i]) if base is None else f"{base}{'abc'[i]}/"
        spec.append({"path": path, "weight": weights[i]})
    return spec


def assert_exact_shares(epochs, sizes, weights, global_batch) -> None:
    """Each epoch draws exactly its share from each collection (ids // 1000 name them)."""
    n = sum(map(sum, sizes))
    share = allocate(-(-n // global_batch) * global_batch, weights[: len(sizes)]).tolist()
    for batches in epochs:
        drawn = Counter(x // 1000 for b in batches for x in b)
        assert [drawn[i] for i in range(len(sizes))] == share


@pytest.mark.slow
@LOADER_PROPERTY
@given(**LAYOUTS, balance=st.sampled_from(["none", "class", "source"]))
def test_mixed_loaders_match_the_plan_for_any_layout(sizes, weights, world, workers, batch, balance):
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_collections(Path(tmp), sizes, weights)
        got = rank_epochs(spec, world, workers, batch, epochs=2, balance=balance)
        reference = rank_epochs(spec, 1, 0, batch * world, epochs=2, balance=balance)
        assert got == reference
        assert_exact_shares(got, sizes, weights, batch * world)


@pytest.mark.slow
@LOADER_PROPERTY
@given(**LAYOUTS, buffer=st.integers(1, 20))
def test_streamed_mixes_are_exact_for_any_layout(http_root, sizes, weights, world, workers, batch, buffer):
    """Over HTTP the order depends on the layout, the shares and the coverage do not."""
    root, base = http_root
    name = uuid.uuid4().hex
    spec = write_collections(root / name, sizes, weights, f"{base}{name}/")
    epochs = rank_epochs(spec, world, workers, batch, epochs=3, shuffle_buffer=buffer)
    assert_exact_shares(epochs, sizes, weights, batch * world)
    g, n = batch * world, sum(map(sum, sizes))
    share = allocate(-(-n // g) * g, weights[: len(sizes)]).tolist()
    seen = Counter(x for ep in epochs for b in ep for x in b)
    for i, layout in enumerate(sizes):
        size = sum(layout)
        assert {seen[1000 * i + j] for j in range(size)} <= {3 * share[i] // size, -(-3 * share[i] // size)}


# --------------------------------------------------------------------------- classes and refusals


def test_classes_are_matched_by_name(tmp_path):
    write_shards(tmp_path / "a", {"train": [8]})
    write_shards(tmp_path / "b", {"train": [6]}, start=1000, classes=("Normal", "COVID"))
    spec = [str(tmp_path / "a"), str(tmp_path / "b")]
    loader = build_loader(spec, "train", batch_size=2, num_workers=0)
    classes = loader.collections.classes
    assert classes == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    for b in loader:
        for g, label in zip(map(image_index, b.images), b.labels.tolist()):
            name = classes[g % 4] if g < 1000 else ("Normal", "COVID")[g % 2]
            assert classes[label] == name
    pinned = build_loader(
        spec, "train", batch_size=2, num_workers=0, classes=["Viral Pneumonia", "Normal", "Lung_Opacity", "COVID"]
    )
    assert pinned.collections.classes == ["Viral Pneumonia", "Normal", "Lung_Opacity", "COVID"]
    b = next(iter(pinned))
    assert [pinned.collections.classes[x] for x in b.labels.tolist()] == [
        ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"][g % 4] if g < 1000 else ("Normal", "COVID")[g % 2]
        for g in map(image_index, b.images)
    ]


def test_an_unmatched_class_is_refused_by_name(tmp_path):
    write_shards(tmp_path / "a", {"train": [4]})
    write_shards(tmp_path / "b", {"train": [4]}, start=1000, classes=("Normal", "Tuberculosis"))
    with pytest.raises(CollectionError, match=r"collection 'b' .* has classes \['Tuberculosis'\] that match none"):
        build_loader([str(tmp_path / "a"), str(tmp_path / "b")], "train", batch_size=2)


@pytest.mark.parametrize(
    "items, message",
    [
        ([{"path": "A", "weight": 0}], r"collection 'A': weight must be a finite number > 0, got 0.0"),
        ([{"path": "A", "weight": -1}], r"weight must be a finite number > 0, got -1.0"),
        ([{"path": "A", "weight": "x"}], r"collection 0: weight 'x' is not a number"),
        ([{"path": "A"}, {"path": "B", "name": "A"}], r"collection names must differ; \['A'\] appear more than once"),
        ([{"weight": 1}], r"collection 0: .* needs a `path`"),
        ([{"path": "A", "wieght": 1}], r"unknown keys \['wieght'\]"),
        ([], "no collection given"),
    ],
)
def test_bad_collection_lists_are_refused(tmp_path, items, message):
    for item in items:
        if "path" in item:
            write_shards(tmp_path / item["path"], {"train": [2]})
            item["path"] = str(tmp_path / item["path"])
    with pytest.raises(CollectionError, match=message):
        build_loader(items, "train", batch_size=2)


def test_an_empty_collection_is_refused(tmp_path):
    write_shards(tmp_path / "a", {"train": [4]})
    write_shards(tmp_path / "b", {"train": [], "val": [2]}, start=1000)
    with pytest.raises(
        LoaderError, match=r"split 'train' of collection 'b' .* has no samples: .* leave it out of the mix"
    ):
        build_loader([str(tmp_path / "a"), str(tmp_path / "b")], "train", batch_size=2)
