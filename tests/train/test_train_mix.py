"""Several collections in one real run: `accelerate launch` on 2 gloo ranks over two phantom collections.

The second collection is the phantom's own label CSV with every film moved to another site (`hospital_b`)
and only two of the four classes: a collection that lacks classes, matched to the run's by name.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.mix import allocate
from sharding.build import build_shards
from sharding.manifest import load_manifest

from helpers.launch import TINY, train_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site_b(phantom_raw, tmp_path_factory) -> Path:
    """Shards of the phantom's COVID and Normal films, relabelled as coming from `hospital_b` (no patient ids: the
    phantom's few patients would put every film in one split)."""
    root = phantom_raw  # the dataset folder itself
    with open(root / "labels.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] in ("COVID", "Normal")]
    table = tmp_path_factory.mktemp("site_b") / "labels.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "source"])
        writer.writeheader()
        writer.writerows({"path": r["path"], "label": r["label"], "source": "hospital_b"} for r in rows)
    out = tmp_path_factory.mktemp("shards_b")
    build_shards(root, out, labels=table, include_masks=True, shard_size=5, workers=1, seed=0, progress=False)
    return out


def run(overrides: list[str], env, cwd, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(nproc) + overrides, env=env, cwd=cwd, capture_output=True, text=True, timeout=420)


def test_two_ranks_two_collections_balanced_by_source(tmp_path, phantom_shards, site_b, subprocess_env, repo_root):
    out = tmp_path / "run"
    shards = f"data.shards=[{{path: {phantom_shards}, name: db}}, {{path: {site_b}, weight: 0.5}}]"
    done = run([shards, "data.balance=source", f"train.output_dir={out}", "train.epochs=2"], subprocess_env, repo_root)
    assert done.returncode == 0, done.stderr[-3000:]
    manifests = {"db": load_manifest(phantom_shards), site_b.name: load_manifest(site_b)}
    sizes = {n: m.split("train").samples for n, m in manifests.items()}
    tests = {n: m.split("test").samples for n, m in manifests.items()}
    assert min(tests.values()) > 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {n: c["size"] for n, c in lines[0]["collections"].items()} == sizes
    global_batch = 2 * 8
    steps = -(-sum(sizes.values()) // global_batch)
    draws = dict(zip(sizes, allocate(steps * global_batch, [1.0, 0.5]).tolist()))
    for row in lines:
        assert row["rank_steps"] == [steps, steps]
        got = row["collections"]
        assert {n: c["drawn"] for n, c in got.items()} == draws  # 2:1 of the epoch's draws, every epoch
        assert all(c["distinct"] <= min(c["drawn"], c["size"]) for c in got.values())
        assert list(got[site_b.name]["strata"]) == ["hospital_b"]
        per_source = [s["drawn"] for s in got["db"]["strata"].values()]
        assert len(per_source) >= 3 and max(per_source) - min(per_source) <= 1  # balanced by source
        assert set(row["val_collections"]) == set(sizes)
    assert f"{site_b.name}: {draws[site_b.name]} drawn" in done.stdout  # the epoch summary's mix line
    report = json.loads((out / "report.json").read_text())
    assert {n: v["support"] for n, v in report["per_collection"].items()} == tests
    assert report["samples"] == sum(tests.values())  # pooled
    assert all(k.split("/", 1)[0] in sizes for k in report["per_source"])  # collection/source
    assert f"{site_b.name}/hospital_b" in report["per_source"]
    assert "### Results per collection (test)" in (out / "report.md").read_text()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["shards"] == [
        {"name": "db", "path": str(phantom_shards), "weight": 1.0},
        {"name": site_b.name, "path": str(site_b), "weight": 0.5},
    ]
    card = json.loads((out / "models" / "best_model.json").read_text())
    assert [(c["name"], c["weight"], c["train"]) for c in card["collections"]] == [
        ("db", 1.0, sizes["db"]),
        (site_b.name, 0.5, sizes[site_b.name]),
    ]


@pytest.mark.parametrize(
    "shards, message",
    [
        ("[{{path: {a}}}, {{path: {b}, weight: 0}}]", "weight must be a finite number > 0, got 0.0"),
        (
            "[{{path: {a}, name: x}}, {{path: {b}, name: x}}]",
            "collection names must differ; ['x'] appear more than once",
        ),
        ("[{{path: {a}}}, {{path: {odd}}}]", "has classes ['Tuberculosis'] that match none of"),
        ("[{{path: {a}}}, {{path: {empty}}}]", "has no samples"),
    ],
    ids=["weight", "duplicate-name", "unmatched-class", "empty"],
)
def test_bad_collections_stop_before_training(
    tmp_path, phantom_shards, site_b, shards, message, subprocess_env, repo_root
):
    from helpers.indexed_shards import write_shards

    odd, empty = tmp_path / "odd", tmp_path / "empty"
    write_shards(odd, {"train": [4], "val": [2], "test": [2]}, classes=("Normal", "Tuberculosis"), size=299)
    write_shards(empty, {"train": [], "val": [2], "test": [2]}, size=299)
    value = shards.format(a=phantom_shards, b=site_b, odd=odd, empty=empty)
    cmd = [sys.executable, "train/main.py", "--config", "configs/demo.yaml", *TINY]  # no launcher: its own exit code
    cmd += [f"data.shards={value}", f"train.output_dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, env=subprocess_env, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()[-1]) < 600  # one line, not a traceback
    assert not (tmp_path / "run" / "models").exists()
