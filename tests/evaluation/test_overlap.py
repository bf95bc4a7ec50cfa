"""External films checked against training films: exact and near copies (evaluation/audits/overlap.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid

import numpy as np
import pytest

from evaluation.audits.overlap import FilmHashes, film_hashes, find_copies, not_copied, overlap_summary, reference_films
from evaluation.report.overlap_section import internal_overlap_section, overlap_limitation, overlap_lines
from pipeline.read import split_digest
from sharding.dedup import hamming, near_pairs, near_pairs_between, phash
from sharding.manifest import ManifestError, load_manifest
from sharding.verify import decode_member, iter_samples
from train.config import Config


def test_near_pairs_between_equals_brute_force():
    rng = np.random.default_rng(0)
    base = [int(x) for x in rng.integers(0, 2**63, size=40)]
    hashes = [b << 192 | b << 128 | b << 64 | b for b in base]
    others = [h ^ (1 << int(rng.integers(0, 256))) for h in hashes[:15]] + [hashes[3], hashes[3] ^ 0b111]
    got = sorted(near_pairs_between(hashes, others, distance=3))
    want = sorted(
        (i, j, hamming(a, b)) for i, a in enumerate(hashes) for j, b in enumerate(others) if hamming(a, b) <= 3
    )
    assert got == want and len(want) >= 17
    assert near_pairs_between([], others, 3) == [] and near_pairs_between(hashes, [], 3) == []
    # the within-set version still gives each pair once, i < j
    assert sorted(near_pairs(hashes[:5] + [hashes[0]], 0)) == [(0, 5)]


def test_exact_copies_win_and_the_closest_near_copy_is_kept():
    ref = FilmHashes(["t0", "t1", "t2"], ["A", "B", "B"], ["s0", "s1", "s2"], [0b0, 0b1111, 0b111])
    films = FilmHashes(["a", "b", "c", "d"], ["B", "B", "A", "B"], ["s1", "x", "y", "z"], [0b1111, 0b11111, FAR, 0])
    copies = find_copies(films, ref, distance=2)
    assert {k: (c["reference_key"], c["kind"], c["bits"]) for k, c in copies.items()} == {
        "a": ("t1", "exact", 0),  # same pixels, even though near t2 as well
        "b": ("t1", "near", 1),  # 1 bit from t1, 2 from t2: the closest
        "d": ("t0", "near", 0),  # same hash, different pixels: near, 0 bits
    }
    assert (copies["d"]["class"], copies["d"]["reference_class"]) == ("B", "A"), "a copy labelled differently"
    assert find_copies(films, ref, distance=None) == {"a": copies["a"]}, "None: exact copies only"
    assert not_copied(["a", "b", "c", "d"], copies).tolist() == [False, False, True, False]
    summary = overlap_summary(copies, 4, ref, ("train", "val"), 2)
    assert (summary["exact"], summary["near"], summary["different_label"], summary["reference_films"]) == (1, 2, 1, 3)


FAR = (2**64 - 1) << 192  # 64 bits from 0 and from the small hashes above


def _external(overlap: dict, rest: dict | None = None) -> dict:
    ci = {"accuracy": [0.5, 0.9], "balanced_accuracy": [0.5, 0.9], "macro_f1": [0.5, 0.9]}
    head = {"samples": 10, "classes_evaluated": ["A", "B"], "accuracy": 0.8, "balanced_accuracy": 0.8}
    report = {**head, "macro_f1": 0.8, "ci95": ci, "training_overlap": overlap, "external_test": {"name": "x"}}
    if rest is not None:
        overlap["without_copies"] = {**head, **rest, "macro_f1": 0.7, "ci95": ci}
    return report


def test_the_report_says_what_was_found_and_what_was_not():
    base = {"checked": True, "films": 10, "reference_films": 50, "reference_splits": ["train", "val"]}
    base |= {"near_distance": 6, "exact": 0, "near": 0, "different_label": 0, "copies": {}}
    none = "\n".join(overlap_lines(_external(dict(base))))
    assert "no copy of the 50 train and val films found among the 10 films" in none and "not detected" in none
    assert overlap_limitation(_external(dict(base))) is None
    copy = {"reference_key": "t1", "kind": "near", "bits": 2, "class": "A", "reference_class": "B"}
    two = base | {"exact": 1, "near": 1, "different_label": 1, "copies": {"a": copy, "b": copy}}
    report = _external(dict(two), {"samples": 8, "classes_evaluated": ["A"], "accuracy": 0.75})
    text = "\n".join(overlap_lines(report))
    assert "**2 of 10 films (20%) copy training or validation films**" in text and "1 of them labelled" in text
    assert "| without the copies | 8 | A | 0.75 (0.50–0.90) |" in text, "a class gone without the copies shows"
    assert "| 1 | `a` | A | `t1` | B | near | 2 |" in text and "![copies]" not in text, "no figure, no link"
    with_figure = {**report, "figures": {"copies": "copies.png"}}
    assert "![copies](copies.png)" in "\n".join(overlap_lines(with_figure))
    assert "2 external films copy training or validation films" in overlap_limitation(report)
    every = _external(dict(two, films=2))
    assert "this is no independent test" in "\n".join(overlap_lines(every))
    expected = "Every one of the external films copies a training or validation film: this is no independent test."
    assert overlap_limitation(every) == expected
    # an internal report on the val split, checked against the train split alone
    one = base | {"near": 1, "reference_splits": ["train"], "copies": {"a": copy}}
    internal = _external(dict(one), {"samples": 9, "classes_evaluated": ["A"], "accuracy": 0.75})
    internal = {k: v for k, v in internal.items() if k != "external_test"} | {"split": "val"}
    assert overlap_limitation(internal).startswith("1 val film copies a training film:")
    assert "section 1 gives them" in overlap_limitation(internal) and "--near-dup-distance" in overlap_limitation(
        internal
    )
    section = internal_overlap_section(internal)
    assert section[0] == "### Val films against the training films" and "copies a training film**" in section[2]
    assert internal_overlap_section(report) == [], "an external report shows it in section 5 instead"
    unchecked = _external({"checked": False, "reason": "gone"})
    assert "**not checked**: gone" in "\n".join(overlap_lines(unchecked)) and "not checked" in overlap_limitation(
        unchecked
    )


def test_film_hashes_read_sha_and_phash_from_real_shards(phantom_shards):
    tars = sorted(phantom_shards.glob("val-*.tar"))
    got = film_hashes([str(t) for t in tars])
    want = {}
    for tar in tars:
        for s in iter_samples(tar):
            pixels = decode_member("image.npy", s["image.npy"])[0]
            want[s["__key__"]] = (json.loads(s["json"])["sha256"], phash(pixels))
    assert got.keys == sorted(want) and len(got.keys) > 0
    assert [(s, p) for s, p in zip(got.sha256, got.phash)] == [want[k] for k in got.keys]
    assert set(got.classes) <= {"COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"} and all(got.classes)
    # a set against itself: every film is its own exact copy
    assert {c["kind"] for c in find_copies(got, got, 6).values()} == {"exact"}


def test_reference_films_are_the_models_training_and_validation_films(phantom_shards, tmp_path):
    manifest = load_manifest(phantom_shards)
    films, splits = reference_films(Config(), str(phantom_shards), split_digest(manifest, "train"))
    assert (
        splits == ("train", "val")
        and len(films.keys) == manifest.split("train").samples + manifest.split("val").samples
    )
    with pytest.raises(
        ManifestError,
        match=r"not the ones the model was trained on \(their train split differs "
        r"from best_model.json's train_digest\)$",
    ):
        reference_films(Config(), str(phantom_shards), "0123456789abcdef")
    with pytest.raises((ManifestError, OSError)):
        reference_films(Config(), str(tmp_path / "gone"), "")


def test_copies_grid_shows_each_copy_beside_the_film_it_copies(phantom_shards):
    from evaluation.audits.overlap import COPY_LABEL, COPY_TILE, copies_grid

    films = film_hashes([str(t) for t in sorted(phantom_shards.glob("val-*.tar"))])
    copies = find_copies(films, films, 6)  # every film its own exact copy
    grid = np.asarray(copies_grid(copies, films, films).convert("L"))
    rows = min(len(copies), 10)
    assert grid.shape == (rows * (COPY_TILE + 4) + 4, COPY_LABEL + 2 * (COPY_TILE + 4))
    left = grid[4 : 4 + COPY_TILE, COPY_LABEL : COPY_LABEL + COPY_TILE]
    right = grid[4 : 4 + COPY_TILE, COPY_LABEL + COPY_TILE + 4 : COPY_LABEL + 2 * COPY_TILE + 4]
    assert left.std() > 10 and np.array_equal(left, right), "the same film on both sides"
    assert copies_grid({}, films, films) is None


def _loader_predictions(shards, split: str):
    """The films of `split` as the eval loader delivers them (keys, labels, provenance, positions)."""
    from pipeline.loader import build_loader
    from train.predictions import Predictions

    batches = list(build_loader(shards, split, batch_size=5, num_workers=2, train=False))
    labels = np.concatenate([b.labels.numpy() for b in batches])
    return Predictions(
        [k for b in batches for k in b.keys],
        labels,
        np.eye(4, dtype=np.float32)[labels],
        0.0,
        [p for b in batches for p in b.provenance],
        np.concatenate([b.indices.numpy() for b in batches]),
    )


def test_predicted_films_are_what_a_read_of_the_shards_gives(phantom_shards):
    """The prediction pass's provenance replaces a second read: same keys, classes, hashes, sources, shards."""
    from evaluation.audits.overlap import predicted_films
    from pipeline.read import split_shards

    manifest = load_manifest(phantom_shards)
    refs = {s: split_shards(manifest, phantom_shards, s) for s in ("train", "val")}
    preds = [_loader_predictions(phantom_shards, s) for s in ("train", "val")]
    from train.predictions import Predictions

    got = predicted_films(Predictions.concat(preds), list(manifest.classes), [refs["train"], refs["val"]])
    want = film_hashes(refs["train"] + refs["val"])
    assert got == want and len(got.keys) == sum(manifest.split(s).samples for s in ("train", "val"))
    assert len(set(got.shards)) == len(refs["train"]) + len(refs["val"]) > 2
    # a split without shards contributes nothing; predictions that do not fit the splits are refused whole
    assert predicted_films(Predictions.concat(preds), list(manifest.classes), [[], refs["train"], refs["val"]]) == want
    n = len(got.keys)
    with pytest.raises(RuntimeError, match=rf"^{n} predictions for {n - len(preds[1].keys)} films in the evaluated"):
        predicted_films(Predictions.concat(preds), list(manifest.classes), [refs["train"]])
    old = Predictions.concat(preds)
    old.provenance[3] = old.provenance[3]._replace(phash=None)  # a film from shards built before version 3
    assert predicted_films(old, list(manifest.classes), [refs["train"], refs["val"]]) is None


def test_film_hashes_decode_the_image_when_the_json_has_no_phash(phantom_shards, tmp_path):
    import shutil

    from helpers.shard_edits import rewrite_json

    copy = tmp_path / "s"
    shutil.copytree(phantom_shards, copy)
    rewrite_json(copy, "train", lambda meta: {k: v for k, v in meta.items() if k != "phash"})
    tars = sorted(copy.glob("train-*.tar"))
    assert '"phash"' not in tars[0].read_bytes().decode("latin-1") and '"phash"' in tars[1].read_bytes().decode(
        "latin-1"
    )
    assert film_hashes([str(t) for t in tars]).phash == film_hashes(sorted(phantom_shards.glob("train-*.tar"))).phash


def test_a_mixed_sets_films_are_named_collection_slash_key_and_read_back(tmp_path):
    """Two collections whose keys collide: their films stay apart (`collection/key`), and reading a film's
    image finds it under its key inside its own shard; the reference films of a mixed run are every
    collection's train and val films, once the run's train digest matches."""
    from evaluation.audits.overlap import film_images
    from pipeline.collection import open_collections

    from helpers.indexed_shards import image_index, write_shards

    layout = {"train": [3], "val": [2], "test": [2]}
    write_shards(tmp_path / "a", layout)
    write_shards(tmp_path / "b", layout, start=0)  # the same keys s00000.. as a
    from dataclasses import replace

    spec = [str(tmp_path / "a"), {"path": str(tmp_path / "b"), "weight": 0.5}]
    data = open_collections(spec)
    films = film_hashes(data.split_shards("test"))
    assert films.keys == ["a/s00005", "a/s00006", "b/s00005", "b/s00006"]
    images = film_images(films, ["b/s00006", "a/s00005"])
    assert {k: image_index(v) for k, v in images.items()} == {"b/s00006": 6, "a/s00005": 5}
    config = Config()
    reference, splits = reference_films(config, spec, data.digest("train"), exclude=("test",))
    assert splits == ("train", "val") and len(reference.keys) == 10 and reference.keys[0] == "a/s00000"
    with pytest.raises(ManifestError, match="not the ones the model was trained on"):
        reference_films(config, [str(tmp_path / "a"), str(tmp_path / "b")], data.digest("train"))  # other weight
    # a first collection that lacks classes: the run's pinned classes are the label space
    write_shards(tmp_path / "c", layout, start=100, classes=("Normal", "COVID"))
    pinned = replace(config, data=replace(config.data, classes=["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]))
    mixed = [str(tmp_path / "c"), str(tmp_path / "a")]
    digest = open_collections(mixed, pinned.data.classes).digest("train")
    assert len(reference_films(pinned, mixed, digest)[0].keys) == 10  # train and val of both


def test_training_overlap_finds_copied_training_films_and_reports_the_rest_without_them(phantom_shards, tmp_path):
    """Evaluated films: forty unseen films, the test split, and two training films passed off as new ones. The
    two, and only they, are exact copies; the results without them are the classification report of the other
    films, with the run's resamples and seed; the copies figure shows them. Moved training shards are reported
    as not checked, with the fix."""
    from dataclasses import replace

    from evaluation.audits.overlap import training_overlap
    from evaluation.statistics.metrics import classification_report
    from evaluation.statistics.registry import SUMMARY_NAMES
    from train.predictions import Predictions

    manifest = load_manifest(phantom_shards)
    classes = list(manifest.classes)
    test = film_hashes([str(t) for t in sorted(phantom_shards.glob("test-*.tar"))])
    train = film_hashes([str(t) for t in sorted(phantom_shards.glob("train-*.tar"))])
    pick = [0, 5]
    new = range(40)  # films seen nowhere, so that the results without the copies have intervals to compare
    films = FilmHashes(
        [f"new-{i}" for i in new] + test.keys + [train.keys[i] for i in pick],
        [classes[i % len(classes)] for i in new] + test.classes + [train.classes[i] for i in pick],
        [hashlib.sha256(b"new-%d" % i).hexdigest() for i in new] + test.sha256 + [train.sha256[i] for i in pick],
        list(new) + test.phash + [train.phash[i] for i in pick],
        [test.shards[0]] * len(new) + test.shards + [train.shards[i] for i in pick],
    )
    n = len(films.keys)
    labels = np.array([classes.index(c) for c in films.classes])
    probs = np.random.default_rng(0).dirichlet(np.ones(len(classes)), n).astype(np.float32)
    preds = Predictions(films.keys, labels, probs, 0.5)
    config = Config()
    # few resamples and a seed of its own, so that the intervals tell both settings apart (asserted below)
    config = replace(
        config,
        eval=replace(config.eval, overlap_distance=None, bootstrap_resamples=5),
        train=replace(config.train, seed=11),
    )
    digest = split_digest(manifest, "train")
    out, grid = training_overlap(config, str(phantom_shards), digest, films, preds, classes, exclude=("test",))
    copied = [train.keys[i] for i in pick]
    assert out["checked"] is True and out["films"] == n and out["reference_splits"] == ["train", "val"]
    assert out["reference_films"] == manifest.split("train").samples + manifest.split("val").samples
    assert (out["exact"], out["near"], out["near_distance"], out["different_label"]) == (2, 0, None, 0)
    assert sorted(out["copies"]) == sorted(copied)
    assert {c["reference_key"] for c in out["copies"].values()} == set(copied)
    rest = classification_report(labels[:-2], probs[:-2], classes, bootstrap=5, seed=11)
    for other in ({"seed": 11}, {"bootstrap": 5}):  # the default resamples, the default seed
        assert classification_report(labels[:-2], probs[:-2], classes, **other)["ci95"] != rest["ci95"]
    assert out["without_copies"] == {k: rest[k] for k in ("samples", "classes_evaluated", *SUMMARY_NAMES, "ci95")}
    assert out["without_copies"]["samples"] == n - 2
    assert grid is not None and grid.size[0] > 0
    gone, none = training_overlap(config, str(tmp_path / "moved"), digest, films, preds, classes, exclude=("test",))
    assert none is None and gone["checked"] is False and set(gone) == {"checked", "reason"}
    assert gone["reason"].startswith(f"the training films at {tmp_path / 'moved'} could not be used (")
    assert gone["reason"].endswith("); if they moved, pass --train-shards PATH")


def test_training_overlap_near_copies_the_models_digest_the_excluded_splits_and_no_copies(phantom_shards):
    """A near copy is found within `eval.overlap_distance` (and its distance reported); shards whose train split
    is not the model's are refused; an excluded split is not a reference; without copies there is no
    "without copies" report and no figure."""
    from dataclasses import replace

    from evaluation.audits.overlap import training_overlap
    from train.predictions import Predictions

    manifest = load_manifest(phantom_shards)
    classes = list(manifest.classes)
    test = film_hashes([str(t) for t in sorted(phantom_shards.glob("test-*.tar"))])
    train = film_hashes([str(t) for t in sorted(phantom_shards.glob("train-*.tar"))])
    # test film 0 given training film 3's pHash with two bits flipped (its pixels, and so its sha256, differ)
    near = FilmHashes(test.keys, test.classes, test.sha256, [train.phash[3] ^ 0b101] + test.phash[1:], test.shards)

    model = split_digest(manifest, "train")

    def run(films, distance, digest=None, exclude=("test",)):
        n = len(films.keys)
        labels = np.array([classes.index(c) for c in films.classes])
        preds = Predictions(films.keys, labels, np.full((n, len(classes)), 0.25, np.float32), 0.5)
        config = replace(Config(), eval=replace(Config().eval, overlap_distance=distance, bootstrap_resamples=0))
        return training_overlap(config, str(phantom_shards), digest or model, films, preds, classes, exclude=exclude)

    out, grid = run(near, 4)
    assert out["near_distance"] == 4 and out["exact"] == 0 and out["near"] >= 1 and grid is not None
    copy = out["copies"][test.keys[0]]
    assert (copy["kind"], copy["reference_key"], copy["bits"]) == ("near", train.keys[3], 2)
    out, grid = run(test, None)
    assert (out["exact"], out["copies"], grid) == (0, {}, None) and "without_copies" not in out
    assert out["reference_splits"] == ["train", "val"]
    out, _ = run(test, None, exclude=("val",))
    assert out["reference_splits"] == ["train"] and out["reference_films"] == manifest.split("train").samples
    refused, none = run(test, None, digest="0" * 64)
    assert none is None and refused["checked"] is False
    assert "are not the ones the model was trained on" in refused["reason"]


def _served(http_root, phantom_shards):
    """A copy of the phantom shards of its own, served over HTTP: its URL (ending in /) and its folder."""
    root, base = http_root
    name = uuid.uuid4().hex
    shutil.copytree(phantom_shards, root / name)
    return f"{base}{name}/", root / name


def _remote_films(http_root, phantom_shards, split):
    """`split`'s shards served over HTTP: their ShardRefs, with the manifest's sha256."""
    from pipeline.read import split_shards

    return split_shards(load_manifest(phantom_shards), _served(http_root, phantom_shards)[0], split)


def test_remote_films_are_read_through_the_cache_and_the_copies_figure_rows_are_labelled(
    http_root, phantom_shards, tmp_path
):
    """Hashes, images and the figure read remote shards through `cache_dir` (one verified copy each); each row
    of the figure is numbered in report order and names the kind of copy (and a near copy's distance)."""
    from evaluation.audits.overlap import copies_rows

    refs = _remote_films(http_root, phantom_shards, "val")
    cache = tmp_path / "cache"
    films = film_hashes(refs, str(cache))
    assert len(list(cache.rglob("*.tar"))) == len(refs)
    local = film_hashes([str(t) for t in sorted(phantom_shards.glob("val-*.tar"))])
    assert (films.keys, films.sha256, films.phash) == (local.keys, local.sha256, local.phash)
    copies = {
        films.keys[1]: {"reference_key": films.keys[0], "kind": "near", "bits": 3, "class": "", "reference_class": ""},
        films.keys[0]: {"reference_key": films.keys[0], "kind": "exact", "bits": 0, "class": "", "reference_class": ""},
    }
    for shard in cache.rglob("*.tar"):
        shard.unlink()  # read again: into the cache, from the server
    rows = copies_rows(copies, films, films, str(cache))
    assert [label for label, _ in rows] == ["1. exact", "2. near 3 bits"]
    pixels = {
        k: decode_member("image.npy", s["image.npy"])[0]
        for t in sorted(phantom_shards.glob("val-*.tar"))
        for s in iter_samples(t)
        for k in [s["__key__"]]
    }
    assert all(np.array_equal(a, pixels[films.keys[0]]) for a in rows[0][1])
    assert np.array_equal(rows[1][1][0], pixels[films.keys[1]])
    assert len(list(cache.rglob("*.tar"))) >= 1


def test_film_hashes_trust_the_stored_phash_skip_imageless_samples_and_read_json_less_shards(tmp_path):
    """The build's pHash is taken as stored (no decode); a sample without an image is skipped and the rest
    still read; a shard from another writer without json gives an empty class and sha256 and the pHash of
    its pixels; without `perceptual` no pHash is read."""
    from helpers.archives import rewrite_tar
    from helpers.indexed_shards import make_image, provenance_of, write_shards

    write_shards(tmp_path, {"train": [4]})
    shard = tmp_path / "train-000000.tar"
    films = film_hashes([str(shard)])
    assert films.phash == [provenance_of(g).phash for g in range(4)]  # made-up hashes: read, not recomputed
    assert film_hashes([str(shard)], perceptual=False).phash == []
    rewrite_tar(shard, lambda members: [(m, d) for m, d in members if m.name != "s00000.image.npy"])
    assert film_hashes([str(shard)]).keys == ["s00001", "s00002", "s00003"]
    rewrite_tar(shard, lambda members: [(m, d) for m, d in members if not m.name.endswith(".json")])
    bare = film_hashes([str(shard)])
    assert bare.classes == ["", "", ""] and bare.sha256 == ["", "", ""]
    assert bare.phash == [phash(make_image(g)[0]) for g in (1, 2, 3)] and bare.sources == ["unknown"] * 3


def test_the_closest_near_copy_wins_and_the_first_of_equals_and_exact_copies_stay():
    """Film 0 is 5 bits from A and 3 bits from B and C: B (the first of the two closest); film 1 is an exact
    copy of A and 1 bit from D: it stays exact."""
    film = FilmHashes(["f0", "f1"], ["x", "x"], ["s0", "sa"], [0, 0b111110000])
    reference = FilmHashes(
        ["A", "B", "C", "D"], ["x"] * 4, ["sa", "sb", "sc", "sd"], [0b11111, 0b111, 0b111000, 0b111110001]
    )
    got = find_copies(film, reference, 6)
    assert (got["f0"]["reference_key"], got["f0"]["kind"], got["f0"]["bits"]) == ("B", "near", 3)
    assert (got["f1"]["reference_key"], got["f1"]["kind"]) == ("A", "exact")


def test_not_copied_is_a_boolean_mask_even_when_empty():
    assert not_copied([], {}).dtype == bool and not_copied(["a", "b"], {"b": {}}).tolist() == [True, False]


def test_the_reference_films_and_both_sides_of_the_copies_figure_are_read_through_the_cache(
    http_root, phantom_shards, tmp_path
):
    """Remote training films are hashed through `data.cache_dir`, and the figure reads the evaluated film and
    the film it copies, from shards of their own, through the cache too (one verified copy of each shard)."""
    from dataclasses import replace

    from evaluation.audits.overlap import copies_grid

    manifest = load_manifest(phantom_shards)
    cache = tmp_path / "refs"
    config = replace(Config(), data=replace(Config().data, cache_dir=str(cache)))
    reference, splits = reference_films(config, _served(http_root, phantom_shards)[0], split_digest(manifest, "train"))
    assert splits == ("train", "val")
    assert len(reference.keys) == manifest.split("train").samples + manifest.split("val").samples
    shards = len(manifest.split("train").shards) + len(manifest.split("val").shards)
    assert len(list(cache.rglob("*.tar"))) == shards

    films = film_hashes(_remote_films(http_root, phantom_shards, "test"), str(tmp_path / "films"))
    copy = {"reference_key": reference.keys[0], "kind": "exact", "bits": 0, "class": "", "reference_class": ""}
    figure = tmp_path / "figure"
    assert copies_grid({films.keys[0]: copy}, films, reference, str(figure)) is not None
    assert len(list(figure.rglob("*.tar"))) == 2  # the test film's shard and the training film's


def test_training_overlap_reads_remote_shards_through_the_cache_and_verifies_their_digests(
    http_root, phantom_shards, tmp_path
):
    """With `data.cache_dir`, the figure's films come through the cache too (the copied film's own shard joins
    the reference shards there), and a reference shard whose bytes differ from the manifest's sha256 is refused."""
    from dataclasses import replace

    from evaluation.audits.overlap import training_overlap
    from train.predictions import Predictions

    good, _ = _served(http_root, phantom_shards)
    bad, folder = _served(http_root, phantom_shards)
    with open(folder / "train-000000.tar", "r+b") as fh:  # the last byte of the end-of-archive padding
        fh.seek(-1, 2)
        fh.write(b"\1")
    manifest = load_manifest(phantom_shards)
    classes = list(manifest.classes)
    other = film_hashes(_remote_films(http_root, phantom_shards, "train"), None)  # a training film, served apart
    films = FilmHashes(other.keys[:1], other.classes[:1], other.sha256[:1], other.phash[:1], other.shards[:1])
    preds = Predictions(films.keys, np.array([classes.index(films.classes[0])]), np.full((1, 4), 0.25), 0.5)
    cache = tmp_path / "cache"
    config = replace(Config(), data=replace(Config().data, cache_dir=str(cache)))
    config = replace(config, eval=replace(config.eval, overlap_distance=None, bootstrap_resamples=0))
    digest = split_digest(manifest, "train")

    out, grid = training_overlap(config, good, digest, films, preds, classes, exclude=("test",))
    assert out["exact"] == 1 and grid is not None
    reference_shards = len(manifest.split("train").shards) + len(manifest.split("val").shards)
    assert len(list(cache.rglob("*.tar"))) == reference_shards + 1

    refused, none = training_overlap(config, bad, digest, films, preds, classes, exclude=("test",))
    assert none is None and refused["checked"] is False and "sha256" in refused["reason"]
    unverified = replace(config, data=replace(config.data, verify_checksums=False, cache_dir=str(tmp_path / "u")))
    read, _ = training_overlap(unverified, bad, digest, films, preds, classes, exclude=("test",))
    assert read["checked"] is True and read["exact"] == 1  # data.verify_checksums=false: the bytes are not hashed
