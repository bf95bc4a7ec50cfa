"""Corrupt shards and hostile members through the real loader (issue 7, guarantees 4 and 7).

Invariants: a corrupt train shard is skipped, counted and warned about (strict:
raises naming it); an eval shard raises naming it; no yielded sample ever
carries a label other than the one written for its key; nothing loops forever
(each read runs under an alarm); nothing in a shard is ever unpickled; `pipe:`
commands never run with RADSTREAM_ALLOW_PIPE=0.
"""

from __future__ import annotations

import gc
import hashlib
import json
import pickle
import random
import shutil
import signal
import tarfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.fast_tar import ShardFormatError
from pipeline.loader import build_loader
from pipeline.urls import ALLOW_PIPE_ENV, open_url

from helpers.archives import read_members, write_members
from helpers.indexed_shards import image_index, key_of, label_of, split_ids

TIMEOUT_S = 60


@contextmanager
def deadline(seconds: int = TIMEOUT_S):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""

    def boom(signum, frame):
        raise TimeoutError(f"read did not finish within {seconds} s: an infinite loop or a hang")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_labels(batches, pixels: bool = True) -> list[str]:
    """No sample carries a label other than the one written for its key; pixels belong to the key too."""
    keys = []
    for b in batches:
        for i, key in enumerate(b.keys):
            g = int(key[1:])
            assert key == key_of(g)
            assert int(b.labels[i]) == label_of(g), f"silent wrong label for {key}"
            if pixels:
                assert image_index(b.images[i].numpy()) == g, f"pixels of another sample under {key}"
            keys.append(key)
    return keys


def _flips(seed):
    def corrupt(path: Path) -> None:
        data = bytearray(path.read_bytes())
        rng = random.Random(seed)
        for _ in range(8):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))

    return corrupt


def _drop_cls(path: Path) -> None:
    members = read_members(path)
    first = members[0][0].name.split(".")[0]
    write_members(path, [(m, d) for m, d in members if m.name != first + ".cls"])


CORRUPT = {  # corruptions the reader must detect: the shard is lost, never misread
    "header_flip": None,  # filled below: a flipped byte inside the 2nd tar header
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "truncated_at_block": lambda p: p.write_bytes(p.read_bytes()[: 512 * 4]),
    "missing_member": _drop_cls,
    "zero_length": lambda p: p.write_bytes(b""),
    "not_a_tar": lambda p: p.write_bytes(b"PK\x03\x04" + b"not a tar at all " * 200),
}


def _header_flip(path: Path) -> None:
    with tarfile.open(path) as tf:
        second = tf.getmembers()[1]
    data = bytearray(path.read_bytes())
    data[second.offset + 100] ^= 0x04  # inside the mode field: checksum mismatch
    path.write_bytes(bytes(data))


CORRUPT["header_flip"] = _header_flip
SHARD = "train-000001.tar"  # 5 samples (LAYOUT train [7, 5, 6, 3])


def corrupt_copy(src: Path, dst: Path, kind, shard: str = SHARD) -> Path:
    shutil.copytree(src, dst)
    (CORRUPT[kind] if isinstance(kind, str) else kind)(dst / shard)
    return dst


@pytest.mark.parametrize("verify", [True, False], ids=["checksum", "reader-only"])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_train_shard_skipped_counted_warned(tiny_shards, tmp_path, kind, fast, verify):
    """With the manifest checksum off, the reader's own structural checks must still catch each one."""
    root = corrupt_copy(tiny_shards, tmp_path / "s", kind)
    loader = build_loader(
        root, "train", batch_size=4, num_workers=0, shuffle_buffer=4, fast=fast, verify_checksums=verify
    )
    with deadline(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    assert len(batches) == loader.steps_per_epoch  # same step count whatever is lost
    keys = check_labels(batches)
    report = loader.corrupt_shards
    assert report.shards >= 1 and report.samples_lost >= 1
    assert all(SHARD in url for url, _ in report.events)
    assert any(SHARD in str(w.message) and "skipping corrupt shard" in str(w.message) for w in caught)
    lost = {key_of(g) for g in range(7, 12)}  # the corrupt shard's samples (ids 7..11)
    good = {key_of(g) for g in split_ids("train")} - lost
    assert set(keys) <= good | lost and set(keys) & good


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_train_shard_strict_raises_naming_it(tiny_shards, tmp_path, kind):
    root = corrupt_copy(tiny_shards, tmp_path / "s", kind)
    with deadline(), pytest.raises(ShardFormatError, match=SHARD):
        list(build_loader(root, "train", batch_size=4, num_workers=0, shuffle_buffer=4, strict=True))


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_eval_shard_raises_naming_it(tiny_shards, tmp_path, kind):
    root = corrupt_copy(tiny_shards, tmp_path / "s", kind, shard="val-000000.tar")
    with deadline(), pytest.raises(ShardFormatError, match="val-000000.tar"):
        list(build_loader(root, "val", batch_size=2, num_workers=0))


def test_corrupt_eval_shard_raises_naming_it_from_a_worker_and_shuts_down_promptly(tiny_shards, tmp_path):
    """The worker's error reaches the caller naming the shard, and dropping the failed loader does not
    wait out DataLoader's 5 s worker-join timeout (the failed iterator used to die late, in a gc pass)."""
    root = corrupt_copy(tiny_shards, tmp_path / "s", "truncated", shard="val-000000.tar")
    start = time.monotonic()
    with deadline(), pytest.raises(ShardFormatError, match="val-000000.tar"):
        list(build_loader(root, "val", batch_size=2, num_workers=1))
    gc.collect()
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("seed", range(16))
def test_random_byte_flips_never_a_wrong_label_never_a_hang(tiny_shards, tmp_path, seed):
    """The reader alone (checksums off): flips may land in pixels (undetectable by a tar reader: the
    manifest sha256 is the guard, see the next test), headers or labels; whatever is read must still
    belong together, except a flip landing in a .cls payload, which only the sha256 can catch."""
    root = corrupt_copy(tiny_shards, tmp_path / "s", _flips(seed))
    loader = build_loader(root, "train", batch_size=4, num_workers=0, shuffle_buffer=4, verify_checksums=False)
    with deadline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert len(batches) == loader.steps_per_epoch
    data = (root / SHARD).read_bytes()
    original = (tiny_shards / SHARD).read_bytes()
    changed = [i for i in range(len(data)) if data[i] != original[i]]
    cls_spans = [
        (m.offset_data, m.offset_data + m.size) for m, _ in read_members(tiny_shards / SHARD) if m.name.endswith(".cls")
    ]
    pixel_spans = [
        (m.offset_data, m.offset_data + m.size) for m, _ in read_members(tiny_shards / SHARD) if m.name.endswith(".npy")
    ]
    touched_cls = any(a <= i < b for i in changed for a, b in cls_spans)
    touched_px = any(a <= i < b for i in changed for a, b in pixel_spans)
    if touched_cls:
        pytest.skip("flip inside a .cls payload: only the manifest sha256 (verify) can detect it")
    check_labels(batches, pixels=not touched_px)  # a flipped pixel is silent too (sha256 again): labels hold


@pytest.mark.parametrize("seed", range(8))
def test_random_byte_flips_with_checksums_lose_the_whole_shard_never_a_sample(tiny_shards, tmp_path, seed):
    """The default loader hashes each local shard against the manifest: any flip, in a label digit or a
    pixel included, costs the whole shard (skipped, counted) and never yields one of its samples."""
    root = corrupt_copy(tiny_shards, tmp_path / "s", _flips(seed))
    loader = build_loader(root, "train", batch_size=4, num_workers=0, shuffle_buffer=4)
    with deadline(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    assert len(batches) == loader.steps_per_epoch
    keys = check_labels(batches)
    assert not {key_of(g) for g in range(7, 12)} & set(keys)  # the flipped shard's samples (ids 7..11)
    report = loader.corrupt_shards  # one skip each time the epoch's shard cycle reaches it, 5 samples each
    assert report.shards >= 1 and report.samples_lost == 5 * report.shards
    assert {url.rsplit("/", 1)[-1] for url, _ in report.events} == {SHARD}
    assert all("sha256 differs" in reason for _, reason in report.events)
    assert any("sha256 differs" in str(w.message) and SHARD in str(w.message) for w in caught)


def _flip_first_label(path: Path) -> None:
    member = next(m for m, _ in read_members(path) if m.name.endswith(".cls"))
    data = bytearray(path.read_bytes())
    old = int(data[member.offset_data : member.offset_data + member.size])
    data[member.offset_data : member.offset_data + member.size] = str((old + 1) % 4).encode()
    path.write_bytes(bytes(data))


def test_flipped_label_digit_is_caught_by_the_checksum_not_by_a_tar_reader(tiny_shards, tmp_path):
    """A '1' -> '2' inside a .cls payload is a valid shard to any reader: only the manifest's sha256
    tells. `verify` reports it, and the loader (checksums on, the default) refuses to read it."""
    from sharding.verify import verify

    root = corrupt_copy(tiny_shards, tmp_path / "s", _flip_first_label, shard="val-000000.tar")
    result = verify(root)
    assert not result.ok and any("val-000000.tar" in p and "sha256" in p for p in result.problems), result.problems
    with deadline(), pytest.raises(ShardFormatError, match="val-000000.tar.*sha256 differs"):
        list(build_loader(root, "val", batch_size=2, num_workers=0))
    unchecked = [b for b in build_loader(root, "val", batch_size=2, num_workers=0, verify_checksums=False)]
    with pytest.raises(AssertionError, match="silent wrong label"):
        check_labels(unchecked)  # what the checksum prevents


# --------------------------------------------------------------------------- nothing executes from data


class Payload:
    """Unpickling this creates `marker` (the classic __reduce__ code-execution trick)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _with_hostileread_members(src: Path, dst: Path, marker: Path, shard: str) -> None:
    shutil.copytree(src, dst)
    members = read_members(dst / shard)
    payload = pickle.dumps(Payload(marker))
    out = []
    for m, d in members:  # each sample's hostile members right beside its own (same key, contiguous)
        out.append((m, d))
        stem, ext = m.name.split(".", 1)
        if ext == "cls":
            for suffix in ("pickle", "pyd", "pth", "pkl"):
                out.append((tarfile.TarInfo(f"{stem}.{suffix}"), payload))
    write_members(dst / shard, out)
    _refresh_manifest_digest(dst, shard)  # a hostile shard set comes with a manifest that matches it


def _refresh_manifest_digest(root: Path, shard: str) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    data = (root / shard).read_bytes()
    for split in manifest["splits"].values():
        for info in split["shards"]:
            if info["name"] == shard:
                info["sha256"], info["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("split,shard", [("train", SHARD), ("val", "val-000000.tar")])
def test_pickle_members_are_never_unpickled(tiny_shards, tmp_path, fast, split, shard):
    marker = tmp_path / "executed"
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload really works when unpickled...
    assert marker.exists()
    marker.unlink()
    root = tmp_path / "s"
    _with_hostileread_members(tiny_shards, root, marker, shard)
    loader = build_loader(root, split, batch_size=2, num_workers=0, shuffle_buffer=4, strict=True, fast=fast)
    with deadline():
        keys = check_labels(list(loader))
    assert not marker.exists(), "a shard member was unpickled"  # ...and reading the shard never does
    if split == "val":
        assert sorted(int(k[1:]) for k in keys) == sorted(split_ids("val"))  # unknown members ignored, no loss


def test_pipe_commands_never_run_in_secure_mode(tiny_shards, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv(ALLOW_PIPE_ENV, "0")
    with pytest.raises(PermissionError, match=ALLOW_PIPE_ENV):
        open_url(f"pipe:touch {marker}; cat {tiny_shards}/test-000000.tar")
    loader = build_loader(tiny_shards, "test", batch_size=2, num_workers=0)
    loader.urls = [f"pipe:touch {marker}; cat {u}" for u in loader.urls]
    with deadline(), pytest.raises(PermissionError):
        list(loader)
    assert not marker.exists()
    for url in ("s3://bucket/x.tar", "gs://bucket/x.tar"):  # both map to pipes
        with pytest.raises(PermissionError):
            open_url(url)


def test_corrupt_shard_log_is_bounded():
    """Nobody drains the event pipe during a run: a bad shard met every epoch must not fill it and block."""
    from pipeline.read import CorruptCounter as _CorruptCounter

    counter = _CorruptCounter()
    n = _CorruptCounter.MAX_EVENTS * 20
    with deadline(30):  # unbounded, this blocked for good once the pipe buffer was full (~600 events here)
        for i in range(n):
            counter.add(f"shard-{i % 3}.tar", 5, "sha256 differs from the manifest's " + "x" * 60)
    report = counter.report()
    assert (report.shards, report.samples_lost) == (n, 5 * n)
    assert len(report.events) == _CorruptCounter.MAX_EVENTS
