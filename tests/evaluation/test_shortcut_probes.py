"""The shortcut probe on real trained models: a marker phantom must flag, the clean phantom must not.

Two real `accelerate launch` runs of the demo recipe at 32 px on 120 films per class, one on the clean
phantom and one whose films carry a class-correlated corner tag (`--markers`). Flips are off so a tag
stays in its class's corner. Measured: lungs-blanked balanced accuracy 0.25 (0.15-0.39) clean vs
0.75 (0.65-0.85) markers; the bar is chance + 0.1 = 0.35 on the interval's lower end.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sharding.build import build_shards
from sharding.phantom import PhantomSpec, generate

pytestmark = pytest.mark.slow

#: Films per class: 120 gives a test split of ~48 films, enough for the marker model's probe interval to clear
#: chance + 0.1 (at 80, 32 test films, it sat on the bar: 0.47 (0.34-0.59), flagged or not by float rounding
#: and library versions).
PER_CLASS = 120

RECIPE = [
    "data.image_size=32",
    "data.num_workers=0",
    "data.hflip_p=0",
    "train.epochs=10",
    "train.batch_size=16",
    "optim.warmup_epochs=0",
    "eval.gradcam_per_class=0",
    "eval.bootstrap_resamples=500",
    "logging.progress=false",
]


def _train(tmp_path, markers: bool, env, cwd) -> dict:
    name = "markers" if markers else "clean"
    raw = generate(tmp_path / f"raw_{name}", PhantomSpec(counts=(PER_CLASS,) * 4, seed=0, markers=markers))
    shards = tmp_path / f"shards_{name}"
    build_shards(raw, shards, include_masks=True, shard_size=100, workers=1, progress=False)
    out = tmp_path / f"run_{name}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["train/main.py", "--config", "configs/demo.yaml", f"data.shards={shards}", f"train.output_dir={out}"]
    run = subprocess.run(cmd + RECIPE, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def test_lungs_blanked_probe_flags_the_marker_model_and_not_the_clean_one(tmp_path, subprocess_env, repo_root):
    clean = _train(tmp_path, False, subprocess_env, repo_root)
    markers = _train(tmp_path, True, subprocess_env, repo_root)
    for report in (clean, markers):
        assert report["accuracy"] > 0.6, "both models learned the task"
        assert report["probes"]["lungs_blanked"]["chance"]["balanced_accuracy"] == 0.25
    blanked_clean = clean["probes"]["lungs_blanked"]
    blanked_markers = markers["probes"]["lungs_blanked"]
    assert blanked_markers["balanced_accuracy"] - blanked_clean["balanced_accuracy"] >= 0.2
    assert blanked_markers["shortcut"] and not blanked_clean["shortcut"]
    assert blanked_clean["ci95"]["balanced_accuracy"][0] <= 0.25 + 0.1 < blanked_markers["ci95"]["balanced_accuracy"][0]
