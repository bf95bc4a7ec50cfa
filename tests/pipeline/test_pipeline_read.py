"""`pipeline/read.py` unit by unit: segment reads, the corrupt-shard policy, the offset index, and the small helpers.

Written from the mutants of `pipeline/read.py` that the end-to-end tests let live (docs/testing.md): the loader
tests see these only through whole epochs; these pin each function's own values and messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline.fast_tar import ShardFormatError
from pipeline.read import (
    CorruptCounter,
    ManifestError,
    ReadSpec,
    ShardRef,
    build_index,
    index_shard,
    load_shard_manifest,
    localize,
    no_readable_samples,
    random_access,
    read_segment,
    skip_or_raise,
    split_digest,
    split_shards,
)
from sharding.writer import encode_sample, write_shard

from helpers.indexed_shards import image_index, make_image, make_mask

SIZE = 8
N = 5


def _spec(**kw) -> ReadSpec:
    return ReadSpec(**{"encoding": "raw", "image_size": SIZE, "num_classes": 4, "masks": False, "train": False, **kw})


def _shard(path: Path, n: int = N, masks: bool = False) -> Path:
    samples = [
        encode_sample(f"k{g}", make_image(g, SIZE), g % 4, {}, "raw", mask=make_mask(g, SIZE) if masks else None)
        for g in range(n)
    ]
    write_shard(path, samples)
    return path


def _truncated(tmp_path: Path, keep: int) -> Path:
    """A shard cut 100 bytes into the first member of sample `keep` (the samples before it whole)."""
    whole = _shard(tmp_path / "whole.tar")
    with tarfile.open(whole) as tf:
        start = next(m.offset for m in tf.getmembers() if m.name.startswith(f"k{keep}."))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: start + 100])
    return cut


# --- segment reads ---------------------------------------------------------------------------------------------------


def test_every_segment_reads_exactly_its_samples(tmp_path):
    url = str(_shard(tmp_path / "a.tar"))
    for lo in range(N + 1):
        for hi in range(lo, N + 1):
            got = list(read_segment(_spec(), url, N, lo, hi, None, None))
            assert [s.key for s in got] == [f"k{g}" for g in range(lo, hi)], (lo, hi)
            assert [image_index(s.image) for s in got] == list(range(lo, hi))


@pytest.mark.parametrize(
    "count,message",
    [
        (N - 1, f"holds more samples than the manifest's {N - 1}"),
        (N + 1, f"holds {N} samples, the manifest says {N + 1}"),
    ],
)
def test_a_shard_holding_another_count_than_the_manifests_is_refused_in_evaluation(tmp_path, count, message):
    url = str(_shard(tmp_path / "a.tar"))
    with pytest.raises(ShardFormatError) as refused:
        list(read_segment(_spec(), url, count, 0, count, None, None))
    assert str(refused.value) == f"shard {url}: {message}"


def test_training_keeps_the_samples_read_before_a_fault_and_counts_the_rest_lost(tmp_path):
    url = str(_truncated(tmp_path, keep=3))
    counter = CorruptCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(read_segment(_spec(train=True), url, N, 1, 5, None, counter))
    # k2's members are whole, but a sample is complete only when the next key starts: k3's header is cut
    assert [s.key for s in got] == ["k1"]
    report = counter.report()
    assert (report.shards, report.samples_lost) == (1, 3)
    ((where, reason),) = report.events
    assert where == url and reason.startswith("ShardFormatError: truncated shard")
    (warning,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert str(warning.message) == f"skipping corrupt shard {url} (3 samples lost): {reason}"


def test_strict_training_and_evaluation_raise_naming_the_shard(tmp_path):
    url = str(_truncated(tmp_path, keep=2))
    for spec in (_spec(train=True, strict=True), _spec(train=False)):
        with pytest.raises(ShardFormatError, match=f"^shard {url}: truncated shard"):
            list(read_segment(spec, url, N, 0, N, None, CorruptCounter()))


def test_a_missing_shard_is_a_lost_segment_in_training(tmp_path):
    counter = CorruptCounter()
    with pytest.warns(RuntimeWarning, match="3 samples lost"):
        assert list(read_segment(_spec(train=True), str(tmp_path / "gone.tar"), N, 1, 4, None, counter)) == []
    assert (counter.report().shards, counter.report().samples_lost) == (1, 3)


# --- the corrupt-shard policy and its counter -------------------------------------------------------------------------


def test_skip_or_raise_by_hand():
    exc = ShardFormatError("bad bytes")
    for spec in (_spec(train=False), _spec(train=True, strict=True)):
        with pytest.raises(ShardFormatError) as refused:
            skip_or_raise(spec, None, "u.tar", 4, exc)
        assert str(refused.value) == "shard u.tar: bad bytes" and refused.value.__cause__ is exc
    counter = CorruptCounter()
    with pytest.warns(RuntimeWarning) as caught:
        skip_or_raise(_spec(train=True), counter, "u.tar", 4, exc)
    assert str(caught[0].message) == "skipping corrupt shard u.tar (4 samples lost): ShardFormatError: bad bytes"
    assert counter.report().events == [("u.tar", "ShardFormatError: bad bytes")]
    with pytest.warns(RuntimeWarning):
        skip_or_raise(_spec(train=True), None, "u.tar", 4, exc)  # no counter: warned only


def test_the_counter_sums_shards_and_lost_samples_and_keeps_the_first_events_in_order():
    counter = CorruptCounter()
    for i in range(CorruptCounter.MAX_EVENTS + 3):
        counter.add(f"s{i}", 2 if i % 2 else -1, f"r{i}")  # a negative count (nothing planned) adds nothing
    report = counter.report()
    assert report.shards == CorruptCounter.MAX_EVENTS + 3
    assert report.samples_lost == 2 * ((CorruptCounter.MAX_EVENTS + 3) // 2)
    assert report.events == [(f"s{i}", f"r{i}") for i in range(CorruptCounter.MAX_EVENTS)]
    assert counter.report().events == report.events  # a second report keeps what the first drained
    assert CorruptCounter().report().events == [] and CorruptCounter().report().shards == 0


def test_no_readable_samples_says_how_many_shards_and_what_to_run():
    assert str(no_readable_samples(3)) == (
        "no readable train samples: all 3 train shards are corrupt or unreachable (see the warnings above; "
        "`python -m sharding verify` checks them)"
    )


# --- the offset index ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masks", [False, True])
def test_the_index_holds_each_samples_key_label_and_pixel_offsets(tmp_path, masks):
    path = _shard(tmp_path / "a.tar", masks=masks)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    index = index_shard(str(path), _spec(masks=masks), N, sha)
    assert index.error is None and index.path == str(path)
    st = os.stat(path)
    assert (index.size, index.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert index.keys == [f"k{g}" for g in range(N)]
    assert index.labels.dtype == np.int64 and index.labels.tolist() == [g % 4 for g in range(N)]
    data = path.read_bytes()
    for g in range(N):
        image = np.frombuffer(data, np.uint8, count=SIZE * SIZE, offset=int(index.image_offsets[g]))
        assert np.array_equal(image.reshape(1, SIZE, SIZE), make_image(g, SIZE))
        if masks:
            mask = np.frombuffer(data, np.uint8, count=SIZE * SIZE, offset=int(index.mask_offsets[g]))
            assert np.array_equal(mask.reshape(1, SIZE, SIZE), make_mask(g, SIZE))
    if not masks:
        assert index.mask_offsets.tolist() == [-1] * N
    assert len(index.provenance) == N


def test_index_errors_are_recorded_with_their_reason(tmp_path):
    good = _shard(tmp_path / "a.tar")
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    missing = index_shard(str(tmp_path / "gone.tar"), _spec(), N, None)
    assert (missing.path, missing.size, missing.mtime_ns) == (str(tmp_path / "gone.tar"), -1, -1)
    assert missing.error.startswith("FileNotFoundError: ") and missing.stale()
    assert missing.keys is None
    assert index_shard(str(empty), _spec(), N, None).error == "ShardFormatError: empty or not a regular file"
    assert index_shard(str(good), _spec(), N + 1, None).error == (
        f"ShardFormatError: holds {N} samples, the manifest says {N + 1}"
    )
    assert index_shard(str(good), _spec(), N, "0" * 64).error == (
        "ShardFormatError: sha256 differs from the manifest's (bit rot or an edited shard; `python -m sharding "
        "verify` lists every damaged shard, a rebuild with --force restores them)"
    )
    assert index_shard(str(good), _spec(), N, None).error is None  # no digest: not hashed
    cut = index_shard(str(_truncated(tmp_path, keep=2)), _spec(), N, None)
    assert cut.error.startswith("ShardFormatError: truncated shard") and cut.size > 0


def test_an_index_goes_stale_when_its_file_changes_size_or_time_or_goes(tmp_path):
    path = _shard(tmp_path / "a.tar")
    index = index_shard(str(path), _spec(), N, None)
    assert not index.stale()
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert index.stale()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not index.stale()
    with open(path, "ab") as fh:
        fh.write(bytes(512))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same time, another size
    assert index.stale()
    path.unlink()
    assert index.stale()


def test_build_index_reuses_fresh_entries_and_hashes_each_shard_against_its_own_digest(tmp_path):
    paths = [str(_shard(tmp_path / f"{i}.tar", n=N - i)) for i in range(3)]
    digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
    counts = [N - i for i in range(3)]
    first = build_index(paths, _spec(), counts, digests)
    assert [i.error for i in first] == [None, None, None] and [len(i.keys) for i in first] == counts
    again = build_index(paths, _spec(), counts, digests, previous=first)
    assert all(a is b for a, b in zip(again, first))
    wrong = build_index(paths, _spec(), counts, [digests[0], "0" * 64, digests[2]])
    assert [i.error is None for i in wrong] == [True, False, True]
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    moved = [paths[0], paths[2], paths[1]]
    redone = build_index(moved, _spec(), [counts[0], counts[2], counts[1]], None, previous=first)
    assert redone[0] is first[0] and redone[1] is not first[1] and redone[2] is not first[2]
    assert [i.path for i in redone] == moved and [len(i.keys) for i in redone] == [N, N - 2, N - 1]


# --- small helpers ---------------------------------------------------------------------------------------------------


def test_shard_refs_qualify_keys_by_their_collection():
    mixed, plain = ShardRef("u", collection="nih"), ShardRef("u")
    assert mixed.film_key("k7") == "nih/k7" and mixed.shard_key("nih/k7") == "k7"
    assert plain.film_key("k7") == "k7" and plain.shard_key("k7") == "k7"


def test_split_shards_and_digest_follow_the_manifest(tiny_shards):
    manifest = load_shard_manifest(tiny_shards)
    refs = split_shards(manifest, tiny_shards, "train")
    info = manifest.split("train").shards
    assert [r.url for r in refs] == [str(tiny_shards / s.name) for s in info]
    assert [(r.sha256, r.samples) for r in refs] == [(s.sha256, s.samples) for s in info]
    assert all(r.sha256 is None for r in split_shards(manifest, tiny_shards, "train", verify=False))
    digest = split_digest(manifest, "train")
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert digest != split_digest(manifest, "val")
    text = json.dumps([[s.name, s.samples, s.sha256] for s in info])
    assert digest == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_random_access_needs_fast_raw_shards_each_local_or_cached(tmp_path):
    local, remote = str(tmp_path / "a.tar"), "http://example.invalid/a.tar"
    assert random_access([local], _spec())
    assert random_access([local, remote], _spec(cache_dir=str(tmp_path)))
    assert not random_access([local, remote], _spec())
    assert not random_access([local], _spec(fast=False))
    assert not random_access([local], _spec(encoding="png"))
    assert random_access([], _spec())


def test_localize_downloads_remote_shards_and_records_each_failure(tmp_path, http_root):
    root, base = http_root
    shard = _shard(root / "read_a.tar")
    sha = hashlib.sha256(shard.read_bytes()).hexdigest()
    local = str(_shard(tmp_path / "local.tar"))
    cache = tmp_path / "cache"
    urls = [local, base + "read_a.tar", base + "read_missing.tar", base + "read_a.tar"]
    paths, failures = localize(urls, _spec(cache_dir=str(cache)), [None, sha, None, "0" * 64])
    assert paths[0] == local and Path(paths[1]).read_bytes() == shard.read_bytes()
    assert str(cache) in paths[1] and paths[2] == "" and paths[3] == ""
    assert sorted(failures) == [2, 3]
    assert failures[2].startswith(("HTTPError", "OSError", "FileNotFoundError")) and "404" in failures[2]
    assert "sha256" in failures[3]


def test_a_remote_manifest_that_cannot_be_read_names_the_url(http_root):
    _, base = http_root
    with pytest.raises(ManifestError) as refused:
        load_shard_manifest(base + "read_nowhere")
    assert str(refused.value).startswith(f"cannot read manifest {base}read_nowhere/manifest.json: ")


@pytest.mark.parametrize("form", ["folder", "file URL"])
def test_a_local_set_without_a_manifest_says_how_to_build_it(tmp_path, form):
    shards = tmp_path / "no set"
    shards.mkdir()
    with pytest.raises(ManifestError) as refused:
        load_shard_manifest(shards if form == "folder" else f"file:{shards}")
    assert str(refused.value) == (
        f"no shard manifest at {shards / 'manifest.json'}; build the shards first: "
        f"python -m sharding build --raw data/raw --out {shards}"
    )


def _cut_in_second_member(tmp_path: Path, g: int) -> Path:
    """A shard cut in the middle of sample g's second member (its first is whole, so sample g-1 is complete)."""
    whole = _shard(tmp_path / "whole2.tar")
    with tarfile.open(whole) as tf:
        second = [m for m in tf.getmembers() if m.name.startswith(f"k{g}.")][1]
    cut = tmp_path / "cut2.tar"
    cut.write_bytes(whole.read_bytes()[: second.offset_data + 10])
    return cut


def test_a_segment_stops_at_its_end_without_reading_further(tmp_path):
    """Samples past `hi` belong to another reader: a fault there is not this segment's."""
    url = str(_cut_in_second_member(tmp_path, 2))
    assert [s.key for s in read_segment(_spec(), url, N, 0, 2, None, None)] == ["k0", "k1"]
    with pytest.raises(ShardFormatError):
        list(read_segment(_spec(), url, N, 0, 3, None, None))


def test_samples_lost_after_two_were_read(tmp_path):
    url = str(_truncated(tmp_path, keep=3))
    counter = CorruptCounter()
    with pytest.warns(RuntimeWarning, match=r"\(3 samples lost\)") as caught:
        got = list(read_segment(_spec(train=True), url, N, 0, N, None, counter))
    assert [s.key for s in got] == ["k0", "k1"] and counter.report().samples_lost == 3
    # the warning points at the code that iterates the segment, not at pipeline/read.py (exactly which caller
    # frame is not pinned: mutation testing's trampolines add frames)
    assert not caught[0].filename.endswith(os.path.join("pipeline", "read.py"))


def test_a_segment_honours_the_pipe_policy_and_the_generic_path(tmp_path, monkeypatch):
    shard = _shard(tmp_path / "a.tar")
    with pytest.raises(PermissionError):
        list(read_segment(_spec(train=True, allow_pipe=False), f"pipe:cat {shard}", N, 0, N, None, None))
    assert len(list(read_segment(_spec(allow_pipe=True), f"pipe:cat {shard}", N, 0, N, None, None))) == N
    import pipeline.samples as samples

    generic = []
    real = samples.generic_samples
    monkeypatch.setattr(samples, "generic_samples", lambda *a, **k: generic.append(1) or real(*a, **k))
    assert [s.key for s in read_segment(_spec(fast=False), str(shard), N, 0, N, None, None)] == [
        f"k{g}" for g in range(N)
    ]
    assert generic == [1]
    list(read_segment(_spec(), str(shard), N, 0, N, None, None))
    assert generic == [1]  # the fast path did not use it


def test_a_shard_ref_opens_with_its_digest_and_the_pipe_policy(tmp_path, http_root):
    root, base = http_root
    shard = _shard(root / "ref_a.tar")
    good = hashlib.sha256(shard.read_bytes()).hexdigest()
    with ShardRef(base + "ref_a.tar", good).open(cache_dir=str(tmp_path / "c1")) as fh:
        assert fh.read() == shard.read_bytes()
    with pytest.raises(ShardFormatError, match="sha256"):
        ShardRef(base + "ref_a.tar", "0" * 64).open(cache_dir=str(tmp_path / "c2"))
    with pytest.raises(PermissionError):
        ShardRef(f"pipe:cat {shard}").open(allow_pipe=False)


def test_split_shards_of_a_file_url_are_the_plain_paths_the_loader_reads(tiny_shards):
    manifest = load_shard_manifest(tiny_shards)
    refs = split_shards(manifest, f"file://{tiny_shards}", "val")
    assert [r.url for r in refs] == [str(tiny_shards / s.name) for s in manifest.split("val").shards]


def test_localize_without_digests_and_under_the_pipe_policy(tmp_path, http_root):
    root, base = http_root
    shard = _shard(root / "read_b.tar")
    paths, failures = localize([base + "read_b.tar"], _spec(cache_dir=str(tmp_path / "c")), None)
    assert failures == {} and Path(paths[0]).read_bytes() == shard.read_bytes()
    with pytest.raises(PermissionError):
        localize([f"pipe:cat {shard}"], _spec(cache_dir=str(tmp_path / "c"), allow_pipe=False), None)


def test_an_empty_shard_indexes_to_empty_int64_tables(tmp_path):
    path = tmp_path / "none.tar"
    write_shard(path, [])
    index = index_shard(str(path), _spec(), 0, None)
    assert index.error is None and index.keys == [] and index.provenance == []
    for table in (index.labels, index.image_offsets, index.mask_offsets):
        assert table.dtype == np.int64 and table.shape == (0,)


def test_a_shard_that_fails_its_walk_is_remembered_until_it_changes(tmp_path):
    """The error entry keeps the file's path, size and time: an unchanged bad shard is not walked again."""
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    short = tmp_path / "short.tar"
    short.write_bytes(_shard(tmp_path / "a.tar").read_bytes()[:700])
    for path in (empty, short):
        index = index_shard(str(path), _spec(), N, None)
        st = os.stat(path)
        assert index.error is not None
        assert (index.path, index.size, index.mtime_ns) == (str(path), st.st_size, st.st_mtime_ns)
        assert not index.stale()
