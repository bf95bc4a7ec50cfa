"""Ranks agree on files only rank 0 writes (issue 19), with real 2-process gloo runs.

- ranks that see different run folders (node-local disks) stop at start, every rank with the message;
- resume is rank 0's decision: ranks handed different checkpoints all resume from rank 0's;
- a failed rank-0 save ends every rank at once with its cause, instead of a wait for train.timeout_s.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from train.checkpoint import load_checkpoint

from helpers.launch import train_cmd
from helpers.procs import limit_file_size

pytestmark = pytest.mark.slow

#: Per-rank values through OmegaConf's env resolver: the launcher sets RANK in each process.
PER_RANK = "${oc.env:RANK}"


def run(overrides: list[str], env, cwd, timeout: int = 300, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(2) + overrides, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec
    )


def test_ranks_seeing_different_run_folders_stop_at_start(tmp_path, phantom_shards, subprocess_env, repo_root):
    """Node-local disks, simulated by a per-rank train.output_dir: before, each rank resumed from and
    evaluated what its own folder held (rank 1 found no best model and skipped the report's gather)."""
    began = time.monotonic()
    done = run(
        [
            f"data.shards={phantom_shards}",
            f"train.output_dir={tmp_path}/node{PER_RANK}",
            "train.epochs=1",
            "train.timeout_s=60",
        ],
        subprocess_env,
        repo_root,
    )
    elapsed = time.monotonic() - began
    assert done.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): train.output_dir={tmp_path}/node{rank} is not the same folder" in done.stderr, (
            done.stderr[-3000:]
        )
    assert "rank 1 on " in done.stderr and "filesystem shared by all nodes" in done.stderr
    assert not (tmp_path / "node0" / "metrics.jsonl").exists(), "nothing trained"
    assert not list(tmp_path.rglob(".radstream-run-token*"))
    assert elapsed < 60, f"stopped after {elapsed:.0f} s"


def test_resume_is_rank0s_decision(tmp_path, phantom_shards, subprocess_env, repo_root):
    """Rank 0 is handed the epoch-2 checkpoint, rank 1 the epoch-1 one (what node-local disks do to
    `resume=auto`): both must resume from rank 0's, at epoch 2, and train the same steps."""
    out = tmp_path / "run"
    common = [f"data.shards={phantom_shards}", f"train.output_dir={out}", "eval.test_at_end=false"]
    common += ["train.patience=100", "train.timeout_s=60"]
    saved = tmp_path / "saved"
    saved.mkdir()
    first = run(common + ["train.epochs=1"], subprocess_env, repo_root)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copy(out / "models" / "checkpoint.pth", saved / "ck1.pth")
    second = run(common + ["train.epochs=2", "train.resume=auto"], subprocess_env, repo_root)
    assert second.returncode == 0, second.stderr[-3000:]
    shutil.copy(out / "models" / "checkpoint.pth", saved / "ck0.pth")
    assert [load_checkpoint(saved / f"ck{r}.pth")["epoch"] for r in (0, 1)] == [1, 0]  # last epoch done
    third = run(common + ["train.epochs=3", f"train.resume={saved}/ck{PER_RANK}.pth"], subprocess_env, repo_root)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resumed from {saved}/ck0.pth at epoch 2" in third.stdout, third.stdout[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[2]["rank_steps"][0] == rows[2]["rank_steps"][1]
    assert load_checkpoint(out / "models" / "checkpoint.pth")["epoch"] == 2


def test_rank0_save_failure_ends_every_rank_with_its_cause(tmp_path, phantom_shards, subprocess_env, repo_root):
    """ResNet18's weights (~45 MB) cannot be written under a 4 MB file-size limit: rank 0's first best-model
    save fails. Rank 1 must stop with that cause at once, not wait in a barrier for train.timeout_s."""
    out = tmp_path / "run"
    timeout_s = 300
    began = time.monotonic()
    done = run(
        [f"data.shards={phantom_shards}", f"train.output_dir={out}", "train.epochs=3", f"train.timeout_s={timeout_s}"],
        subprocess_env,
        repo_root,
        preexec=limit_file_size(4 << 20),
    )
    elapsed = time.monotonic() - began
    assert done.returncode != 0
    assert "error (rank 0): File too large" in done.stderr, done.stderr[-3000:]
    assert "error (rank 1): rank 0 failed while saving epoch 0" in done.stderr, done.stderr[-3000:]
    assert "File too large" in done.stderr.split("error (rank 1)")[1].splitlines()[0]
    assert elapsed < timeout_s / 3, f"{elapsed:.0f} s"
    assert not (out / "models" / "best_model.pth").exists()
    assert not [p for p in Path(out).rglob(".*tmp*")], "a temporary was left"


def test_cold_cache_over_http_downloads_each_shard_once(tmp_path, phantom_shards, subprocess_env, repo_root):
    """2 ranks stream the shards from a real local HTTP server into one empty data.cache_dir: every rank
    trains on the global plan, each shard is fetched once, and the cache holds one verified copy of each,
    the test report's metadata reads (sources, copies of training films) included: they use the loader's
    cache key (before, they cached a second, unverified copy of every shard they read)."""
    from sharding.manifest import load_manifest

    from helpers.http import serve

    out, cache = tmp_path / "run", tmp_path / "cache"
    manifest = load_manifest(phantom_shards)
    with serve(phantom_shards) as (base, counts):
        done = run(
            [f"data.shards={base}", f"data.cache_dir={cache}", f"train.output_dir={out}", "train.epochs=1"],
            subprocess_env,
            repo_root,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "report.json").exists() and "(global shuffle)" in done.stdout, "cached shards take the global plan"
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["rank_steps"][0] == row["rank_steps"][1] > 0
    assert row["train_samples_seen"] == manifest.split("train").samples
    shards = [s for split in ("train", "val", "test") for s in manifest.split(split).shards]
    assert {f"/{s.name}": counts[f"/{s.name}"] for s in shards} == {f"/{s.name}": 1 for s in shards}
    cached = sorted(p for p in cache.iterdir() if not p.name.startswith("."))
    assert len(cached) == len(shards) and not list(cache.glob(".*tmp*"))
    digests = {s.sha256 for s in shards}
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in cached} == digests
