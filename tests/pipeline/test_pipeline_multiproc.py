"""A real 2-process run: `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.indexed_shards import key_of, split_ids
from helpers.launch import free_port

SCRIPT = Path(__file__).with_name("multirank_script.py")


@pytest.mark.slow
def test_two_process_accelerate_launch(tiny_shards, tmp_path, subprocess_env):
    out = tmp_path / "ranks.json"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        "--shards",
        str(tiny_shards),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    proc = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    steps = ranks[0]["steps_per_epoch"]
    assert steps == 3  # ceil(21 / (4 * 2))
    for r in ranks:
        assert r["train_counts"] == [steps, steps] and r["batch_sizes"] == [4]
    for epoch in range(2):  # exact epoch across the 2 real ranks: all 21 train samples, 3 repeats (24 slots)
        keys = [k for r in ranks for batch in r["train_keys"][epoch] for k in batch]
        assert set(keys) == {key_of(g) for g in split_ids("train")} and len(keys) == 24
    assert ranks[0]["train_keys"][0] != ranks[0]["train_keys"][1]  # reshuffled per epoch
    for split in ("val", "test"):
        keys = [k for r in ranks for k in r[f"{split}_keys"]]
        assert sorted(keys) == sorted(key_of(g) for g in split_ids(split))  # exactly once
        for r in ranks:
            assert r[f"{split}_steps"][0] == r[f"{split}_steps"][1]
