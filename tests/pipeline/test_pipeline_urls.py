"""Shard URLs: http(s) from a real local server, cache, pipe:, secure mode, cloud scheme mapping."""

from __future__ import annotations

import functools
import http.server
import multiprocessing
import os
import threading

import pytest

from pipeline.loader import build_loader
from pipeline.urls import ALLOW_PIPE_ENV, cache_path, expand_urls, normalize_url, open_url
from sharding.manifest import load_manifest

from helpers.indexed_shards import key_of, split_ids
from test_pipeline_stream import check_batch


@pytest.fixture()
def http_base(tiny_shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_shards))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_http_shards_eval_and_train(http_base, num_workers):
    seen = []
    for rank in range(2):
        loader = build_loader(http_base, "val", batch_size=2, rank=rank, world_size=2, num_workers=num_workers)
        seen += [g for b in loader for g in check_batch(b)]
    assert sorted(seen) == sorted(split_ids("val"))
    train = build_loader(http_base, "train", batch_size=4, num_workers=num_workers, shuffle_buffer=4)
    assert len(list(train)) == train.steps_per_epoch == 6


def test_http_cache_reads_local_disk_afterwards(http_base, tiny_shards, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    loader = build_loader(http_base, "test", batch_size=2, num_workers=0, cache_dir=cache)
    first = [k for b in loader for k in b.keys]
    assert not list(cache.glob(".*tmp*"))
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    # epoch 2 reads local disk: the network is no longer touched
    import urllib.request

    def no_network(*a, **k):
        raise AssertionError("network used despite the cache")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    again = build_loader(
        http_base, "test", batch_size=2, num_workers=0, cache_dir=cache, manifest=load_manifest(tiny_shards)
    )
    assert [k for b in again for k in b.keys] == first


def test_pipe_urls_and_secure_mode(tiny_shards, monkeypatch):
    url = f"pipe:cat {tiny_shards}/test-000000.tar"
    with open_url(url) as fh:
        assert fh.read() == (tiny_shards / "test-000000.tar").read_bytes()
    with pytest.raises(PermissionError):
        open_url(url, allow_pipe=False)
    monkeypatch.setenv(ALLOW_PIPE_ENV, "0")
    with pytest.raises(PermissionError, match=ALLOW_PIPE_ENV):
        open_url(url)
    with pytest.raises(PermissionError):
        open_url("gs://bucket/train-000000.tar")


def test_secure_mode_is_not_a_skippable_train_shard(tiny_shards, monkeypatch):
    loader = build_loader(tiny_shards, "train", batch_size=2, num_workers=0)
    loader.urls = [f"pipe:cat {u}" for u in loader.urls]
    monkeypatch.setenv(ALLOW_PIPE_ENV, "0")
    for plan in ("global", "stream"):  # fetching into a cache, or reading front to back
        loader.plan = plan
        with pytest.raises(PermissionError):
            list(loader)


def test_failing_pipe_raises():
    with pytest.raises(OSError, match="exit status"), open_url("pipe:exit 3") as fh:
        fh.read()


def test_file_urls_and_schemes(tiny_shards):
    loader = build_loader(f"file:{tiny_shards}", "test", batch_size=5, num_workers=0)
    assert sorted(g for b in loader for g in check_batch(b)) == sorted(split_ids("test"))
    assert normalize_url("gs://b/k/x.tar") == "pipe:gsutil cat gs://b/k/x.tar"
    assert normalize_url("s3://b/k/x.tar") == "pipe:aws s3 cp s3://b/k/x.tar -"
    assert normalize_url("/a/b.tar") == "/a/b.tar"
    assert expand_urls("s3://b/train-{000000..000002}.tar") == [f"s3://b/train-00000{i}.tar" for i in range(3)]


def test_altered_download_never_enters_the_cache(tiny_shards, tmp_path):
    """The server's copy of a shard differs from the manifest (one label digit): with a cache, the download is
    hashed before it is kept, so training skips and counts the shard and evaluation raises naming it."""
    import shutil
    import warnings

    from pipeline.fast_tar import ShardFormatError

    from helpers.archives import read_members

    served = tmp_path / "served"
    shutil.copytree(tiny_shards, served)
    for name in ("train-000001.tar", "val-000000.tar"):
        path = served / name
        member = next(m for m, _ in read_members(path) if m.name.endswith(".cls"))
        data = bytearray(path.read_bytes())
        data[member.offset_data] = ord(str((int(chr(data[member.offset_data])) + 1) % 4))
        path.write_bytes(bytes(data))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    cache = tmp_path / "cache"
    manifest = load_manifest(tiny_shards)  # the manifest the user trusts
    try:
        train = build_loader(
            base, "train", batch_size=4, num_workers=0, shuffle_buffer=4, cache_dir=cache, manifest=manifest
        )
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            keys = [k for b in train for k in b.keys]
        assert train.corrupt_shards.shards >= 1
        assert all("train-000001.tar" in url and "sha256" in reason for url, reason in train.corrupt_shards.events)
        assert not {key_of(g) for g in range(7, 12)} & set(keys)  # the altered shard's samples
        with pytest.raises(ShardFormatError, match="val-000000.tar.*sha256"):
            list(build_loader(base, "val", batch_size=2, num_workers=0, cache_dir=cache, manifest=manifest))
        cached = sorted(p.name for p in cache.iterdir() if p.name != ".locks")
        assert len(cached) == 3 and not any(n.startswith(".") for n in cached)  # 3 intact train shards only
        unchecked = build_loader(
            base,
            "val",
            batch_size=2,
            num_workers=0,
            manifest=manifest,
            cache_dir=tmp_path / "cache2",
            verify_checksums=False,
        )
        assert len([k for b in unchecked for k in b.keys]) == 7  # what the check prevents: read as valid
    finally:
        server.shutdown()
        server.server_close()


def test_cache_is_keyed_by_content_so_a_rebuilt_shard_is_not_served_stale(tmp_path):
    import hashlib

    shard = tmp_path / "train-000000.tar"
    url, cache = f"pipe:cat {shard}", tmp_path / "cache"
    shard.write_bytes(b"old build")
    with open_url(url, cache_dir=cache, sha256=hashlib.sha256(b"old build").hexdigest()) as fh:
        assert fh.read() == b"old build"
    shard.write_bytes(b"new build, same name")  # the shards were rebuilt; the manifest has the new digest
    with open_url(url, cache_dir=cache, sha256=hashlib.sha256(b"new build, same name").hexdigest()) as fh:
        assert fh.read() == b"new build, same name"
    assert len([p for p in cache.iterdir() if p.name != ".locks"]) == 2


def _fetch(url: str, cache: str, sha256: str) -> tuple[int, bytes]:
    with open_url(url, cache_dir=cache, sha256=sha256) as fh:
        return os.fstat(fh.fileno()).st_ino, fh.read()


def test_racing_processes_download_a_shard_once_and_share_one_copy(tiny_shards, tmp_path):
    """4 processes (ranks of one node) open the same remote shard with a cold cache while the server is slow:
    one download, every process reads the same verified file (one inode), no temporary left."""
    from helpers.http import serve

    shard = load_manifest(tiny_shards).split("train").shards[0]
    cache = tmp_path / "cache"
    with serve(tiny_shards, delay_s=0.5) as (base, counts), multiprocessing.get_context("spawn").Pool(4) as pool:
        got = pool.starmap(_fetch, [(base + shard.name, str(cache), shard.sha256)] * 4)
    assert counts[f"/{shard.name}"] == 1, counts
    assert len({inode for inode, _ in got}) == 1
    assert {data for _, data in got} == {(tiny_shards / shard.name).read_bytes()}
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [
        cache_path(base + shard.name, cache, shard.sha256).name
    ]
    assert not list(cache.glob(".*tmp*"))


def test_a_cached_copy_is_never_replaced(tiny_shards, tmp_path):
    from helpers.http import serve

    shard = load_manifest(tiny_shards).split("train").shards[0]
    with serve(tiny_shards) as (base, counts):
        url = base + shard.name
        first = _fetch(url, str(tmp_path), shard.sha256)
        target = cache_path(url, tmp_path, shard.sha256)
        os.remove(target.parent / ".locks" / f"{target.name}.lock")  # even without its lock file
        assert _fetch(url, str(tmp_path), shard.sha256) == first
    assert counts[f"/{shard.name}"] == 1
