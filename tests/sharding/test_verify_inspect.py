"""verify catches corruption and names the shard; inspect prints a summary and writes a grid."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from sharding.manifest import load_manifest
from sharding.verify import verify

from helpers.shard_edits import rewrite_json


def _run(args, python_exe, env, cwd):
    return subprocess.run([python_exe, "-m", "sharding", *args], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.mark.slow
def test_verify_ok_then_flipped_byte_names_the_shard(built_raw, tmp_path, python_exe, subprocess_env, repo_root):
    copy = tmp_path / "s"
    shutil.copytree(built_raw, copy)
    run = _run(["verify", "--shards", str(copy)], python_exe, subprocess_env, repo_root)
    assert run.returncode == 0 and run.stdout.startswith("OK"), run.stderr
    shard = copy / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0x01  # inside the first image's pixels
    shard.write_bytes(bytes(data))
    run = _run(["verify", "--shards", str(copy)], python_exe, subprocess_env, repo_root)
    assert run.returncode == 1
    assert "val-000000.tar" in run.stderr and "sha256" in run.stderr and "Traceback" not in run.stderr


def test_verify_decodes_samples_even_when_hashes_match(built_raw, tmp_path):
    """A shard re-hashed into the manifest but with a bad sample still fails (decode check)."""
    import dataclasses
    import hashlib

    from sharding.manifest import write_manifest

    copy = tmp_path / "s"
    shutil.copytree(built_raw, copy)
    m = load_manifest(copy)
    shard = copy / m.split("test").shards[0].name
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    info = dataclasses.replace(m.split("test").shards[0], sha256=hashlib.sha256(bytes(data)).hexdigest())
    splits = dict(m.splits)
    splits["test"] = dataclasses.replace(m.split("test"), shards=(info,))
    write_manifest(dataclasses.replace(m, splits=splits), copy)
    result = verify(copy)
    assert not result.ok and any("test-000000.tar" in p and "sha256" in p for p in result.problems)


@pytest.mark.slow
def test_verify_missing_shard_and_missing_manifest(built_raw, tmp_path, python_exe, subprocess_env, repo_root):
    copy = tmp_path / "s"
    shutil.copytree(built_raw, copy)
    (copy / "train-000001.tar").unlink()
    result = verify(copy)
    assert result.problems == ["train/train-000001.tar: missing"]
    run = _run(["verify", "--shards", str(tmp_path / "nothing")], python_exe, subprocess_env, repo_root)
    assert run.returncode == 2 and "build the shards first" in run.stderr and "Traceback" not in run.stderr


def test_verify_png_with_masks(built_png_masks):
    result = verify(built_png_masks)
    assert result.ok, result.problems
    assert result.samples == 48


@pytest.mark.slow
def test_inspect_prints_summary_and_writes_grid(built_png_masks, tmp_path, python_exe, subprocess_env, repo_root):
    out = tmp_path / "grid.png"
    run = _run(
        ["inspect", "--shards", str(built_png_masks), "--out", str(out), "--per-class", "3"],
        python_exe,
        subprocess_env,
        repo_root,
    )
    assert run.returncode == 0, run.stderr
    assert "Viral Pneumonia" in run.stdout and "scanned 48 = written 48 + skipped 0" in run.stdout
    with Image.open(out) as img:
        assert img.width >= 3 * 160 and img.height >= 4 * 160
        pixels = np.asarray(img.convert("RGB"))
        assert ((pixels == (0, 255, 0)).all(-1)).any()  # mask outlines drawn
    by_file = _run(
        [
            "inspect",
            "--shards",
            str(built_png_masks / "manifest.json"),
            "--out",
            str(tmp_path / "g2.png"),
            "--per-class",
            "3",
        ],
        python_exe,
        subprocess_env,
        repo_root,
    )
    assert by_file.returncode == 0, by_file.stderr  # the manifest file itself names the set, as for verify
    assert (tmp_path / "g2.png").read_bytes() == out.read_bytes()


def test_build_stores_each_films_phash_and_verify_checks_it(built_raw, tmp_path):
    import json

    from sharding.dedup import phash, phash_hex
    from sharding.verify import decode_member, iter_samples

    m = load_manifest(built_raw)
    samples = list(iter_samples(built_raw / m.split("test").shards[0].name))
    for s in samples:
        assert json.loads(s["json"])["phash"] == phash_hex(phash(decode_member("image.npy", s["image.npy"])[0]))
    copy = tmp_path / "s"
    shutil.copytree(built_raw, copy)
    rewrite_json(copy, "test", lambda meta: {**meta, "phash": phash_hex(int(meta["phash"], 16) ^ 1)})
    result = verify(copy)
    assert not result.ok and len(result.problems) == len(samples)
    assert all("test-000000.tar" in p and "do not match their phash" in p for p in result.problems)


def test_verify_catches_a_flipped_byte_that_only_the_shard_digest_sees(built_raw, tmp_path):
    """A byte in the tar's end-of-archive padding: every sample still decodes and matches its own sha256, so
    only the whole-file sha256 against the manifest can tell this shard from the one that was built."""
    copy = tmp_path / "s"
    shutil.copytree(built_raw, copy)
    shard = copy / load_manifest(copy).split("val").shards[0].name
    data = bytearray(shard.read_bytes())
    assert data[-1] == 0
    data[-1] = 1
    shard.write_bytes(bytes(data))
    result = verify(copy)
    assert not result.ok and len(result.problems) == 1
    assert shard.name in result.problems[0] and "sha256" in result.problems[0]
    assert "sample" not in result.problems[0], "no sample is damaged"
