"""Atomic replacement: a build killed with SIGKILL mid-way leaves the previous set (or nothing)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time

import pytest

from sharding.build import build_shards, run_build
from sharding.manifest import load_manifest
from sharding.outdir import recover as _recover
from sharding.verify import verify


def tree_digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _start_and_kill_after_first_shard(raw, out, seed, python_exe, env, cwd, workers="1"):
    cmd = [
        python_exe,
        "-m",
        "sharding",
        "build",
        "--raw",
        str(raw),
        "--out",
        str(out),
        "--shard-size",
        "4",
        "--seed",
        str(seed),
        "--workers",
        workers,
        "--quiet",
        "--force",
        "--shard-delay-s",
        "0.5",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, f"build ended before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "no shard appeared within 60 s"
            tmp = [p for p in out.parent.glob(f".{out.name}.build-*") if p.is_dir()]
            if tmp and any(p.name.endswith(".tar") for p in tmp[0].iterdir()):
                break
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return tmp[0]


@pytest.mark.slow
def test_kill_9_keeps_previous_set_and_rerun_is_byte_identical(
    phantom_raw, tmp_path, python_exe, subprocess_env, repo_root
):
    out = tmp_path / "shards"
    build_shards(phantom_raw, out, shard_size=4, seed=1, workers=1, progress=False)
    previous = tree_digest(out)

    leftover = _start_and_kill_after_first_shard(phantom_raw, out, 0, python_exe, subprocess_env, repo_root)
    assert leftover.exists()  # the killed build really was mid-way
    assert tree_digest(out) == previous  # the previous complete set, untouched
    assert load_manifest(out).seed == 1 and verify(out).ok

    report = run_build(phantom_raw, out, shard_size=4, seed=0, workers=1, progress=False)
    assert not report.noop
    build_shards(phantom_raw, tmp_path / "clean", shard_size=4, seed=0, workers=1, progress=False)
    assert tree_digest(out) == tree_digest(tmp_path / "clean")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # leftovers cleaned


@pytest.mark.slow
def test_kill_9_first_build_leaves_nothing(phantom_raw, tmp_path, python_exe, subprocess_env, repo_root):
    out = tmp_path / "shards"
    _start_and_kill_after_first_shard(phantom_raw, out, 0, python_exe, subprocess_env, repo_root)
    assert not out.exists()
    build_shards(phantom_raw, out, shard_size=4, workers=1, progress=False)
    assert verify(out).ok
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_set_caught_between_the_two_renames_is_restored(built_raw, tmp_path):
    import shutil

    out = tmp_path / "shards"
    shutil.copytree(built_raw, tmp_path / ".shards.old-999999999")  # a pid that cannot be alive
    _recover(out)
    assert out.is_dir() and verify(out).ok
    assert tree_digest(out) == tree_digest(built_raw)


def test_the_staging_sweep_drops_dead_shard_writes_and_keeps_shards(tmp_path):
    """A retried task's dead attempt (a Ray worker killed mid-write) leaves `.<shard>.tmp-<pid>` behind."""
    from sharding.outdir import sweep_partials

    for name in ("train-000000.tar", ".train-000001.tar.tmp-4242", ".val-000000.tar.tmp-7", "manifest.json"):
        (tmp_path / name).write_bytes(b"x")
    sweep_partials(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "train-000000.tar"]


def test_a_shard_the_driver_cannot_see_whole_is_refused_naming_the_shared_folder(tmp_path):
    """A worker on a node whose --out is not the driver's writes somewhere else: the build stops, nothing swapped."""
    from sharding.outdir import OutputFolderError, check_written

    (tmp_path / "train-000000.tar").write_bytes(b"x" * 10)
    check_written(tmp_path / "train-000000.tar", 10)
    with pytest.raises(OutputFolderError, match=r"train-000001.tar .*no such file.*same path on every node"):
        check_written(tmp_path / "train-000001.tar", 10)
    with pytest.raises(OutputFolderError, match=r"\(10 bytes\) but the driver sees 3 bytes"):
        (tmp_path / "val-000000.tar").write_bytes(b"abc")
        check_written(tmp_path / "val-000000.tar", 10)
