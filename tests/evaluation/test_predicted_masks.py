"""A collection without masks, end to end (issue 23): a segmenter fitted on drawn masks, `sharding build
--lung-model` on the maskless films, a lung-cropped model that names the segmenter, its external report with
the lung share, the probes and the predicted-masks limitation, and prediction on the image files that crops
exactly as the evaluation did."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from sharding.build import build_shards
from sharding.phantom import PhantomSpec, generate
from train.lungs import WEIGHTS
from train.lungs import main as lungs_main

pytestmark = pytest.mark.slow

RECIPE = [
    "data.image_size=64",
    "data.num_workers=0",
    "data.crop=lungs",
    "train.epochs=1",
    "train.batch_size=16",
    "optim.warmup_epochs=0",
    "eval.gradcam_per_class=2",
    "eval.bootstrap_resamples=200",
    "logging.progress=false",
]


def test_a_maskless_collection_gets_lung_share_probes_and_cropped_prediction(
    tmp_path, phantom_shards, subprocess_env, repo_root
):
    seg = tmp_path / "seg"
    fit = ["fit", "--shards", str(phantom_shards), "--out", str(seg), "--size", "32", "--width", "8"]
    assert lungs_main([*fit, "--epochs", "12", "--batch-size", "8", "--num-workers", "0"]) == 0
    sha = json.loads((seg / "lungs.json").read_text())["sha256"]

    site = generate(tmp_path / "site", PhantomSpec(counts=(6, 6, 6, 6), seed=3, site="hospital-x.example"))
    for cls in site.iterdir():
        if (cls / "masks").is_dir():
            shutil.rmtree(cls / "masks")
    ext = tmp_path / "ext"
    m = build_shards(site, ext, lung_model=seg / WEIGHTS, shard_size=8, workers=1, progress=False)
    assert m.counts["masks_predicted"] == 24

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "train/main.py", "--config", "configs/demo.yaml"]
    cmd += [f"data.shards={phantom_shards}", f"train.output_dir={run}", f"data.lung_model={seg / WEIGHTS}", *RECIPE]
    done = subprocess.run(cmd, env=subprocess_env, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((run / "models" / "best_model.json").read_text())
    assert card["segmenter"] == {"path": str(seg / WEIGHTS), "sha256": sha}

    evaluate = [sys.executable, "-m", "evaluation", "--run", str(run), "--shards", str(ext), "--split", "all"]
    done = subprocess.run(evaluate, env=subprocess_env, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run / "external" / "ext" / "report.json").read_text())
    assert report["lung_share"]["all"]["n"] > 0 and report["lung_share"]["all"]["mean"] is not None
    assert {"lungs_blanked", "lungs_only"} <= set(report["probes"])
    said = [s for s in report["limitations"] if "predicted by the segmenter" in s]
    assert said and said[0].startswith(
        f"The lung masks of 24 films of these shards were predicted by the segmenter {sha[:12]}"
    )
    assert not any("carry no lung masks" in s for s in report["limitations"])

    files = [site / "COVID" / "images" / "COVID-1.png", site / "Normal" / "images" / "Normal-2.png"]
    out = tmp_path / "pred.json"
    predict = [sys.executable, "-m", "evaluation.predict", "--model", str(run / "models" / "best_model.pth")]
    done = subprocess.run(
        [*predict, *map(str, files), "--json", str(out)],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = {}
    for line in (run / "external" / "ext" / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        evaluated[row["key"]] = row["probs"]
    classes = card["classes"]
    for row in json.loads(out.read_text())["predictions"]:
        key = row["file"].rsplit("/", 1)[1].removesuffix(".png")
        assert [row[c] for c in classes] == pytest.approx(evaluated[key], abs=1e-4), key

    done = subprocess.run(
        [*predict, "--export", "onnx"], env=subprocess_env, cwd=repo_root, capture_output=True, text=True
    )
    assert done.returncode == 2 and "serve it with python -m evaluation.predict" in done.stderr

    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(seg / WEIGHTS, moved)
    done = subprocess.run([*predict, str(files[0])], env=subprocess_env, cwd=repo_root, capture_output=True, text=True)
    assert done.returncode == 2 and "--lung-model PATH" in done.stderr
    done = subprocess.run(
        [*predict, str(files[0]), "--lung-model", str(moved)], env=subprocess_env, cwd=repo_root, capture_output=True
    )
    assert done.returncode == 0
