"""Real `accelerate launch train/main.py` runs on tiny phantom shards (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sharding.manifest import load_manifest
from train.checkpoint import load_checkpoint

from helpers.launch import TINY, free_port
from helpers.procs import start_group

pytestmark = pytest.mark.slow


def launch_cmd(nproc: int, extra_launch: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no"]
    if nproc == 1:
        cmd += ["--cpu", "--num_processes", "1"]
    else:
        # The shipped 2-CPU-process config, so the file users copy is the one tested.
        assert nproc == 2
        cmd += ["--config_file", "configs/accelerate/cpu_2proc.yaml", "--main_process_port", str(free_port())]
    cmd += extra_launch or ["--mixed_precision", "no"]
    return cmd + ["train/main.py", "--config", "configs/demo.yaml"]


def run_train(overrides, env, cwd, nproc=1, extra_launch=None, timeout=420):
    return subprocess.run(
        launch_cmd(nproc, extra_launch) + TINY + overrides,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_single_process_run_writes_everything(tmp_path, phantom_shards, subprocess_env, repo_root):
    out = tmp_path / "run"
    run = run_train(
        [f"data.shards={phantom_shards}", f"train.output_dir={out}", "train.epochs=2", "data.image_size=64"],
        subprocess_env,
        repo_root,
        extra_launch=["--mixed_precision", "bf16"],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "img_per_s", "data_wait_frac"):
        assert all(isinstance(r[key], float) for r in rows), key
    models = out / "models"
    for name in ("best_model.pth", "best_model.safetensors", "best_model.json", "checkpoint.pth"):
        assert (models / name).is_file(), name
    info = json.loads((models / "best_model.json").read_text())
    assert info["classes"] == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    assert info["image_size"] == 64 and info["config"]["train"]["epochs"] == 2
    state = torch.load(models / "best_model.pth", weights_only=True)
    st = load_file(str(models / "best_model.safetensors"))
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    assert all(torch.equal(state[k], st[k]) for k in state)
    assert "mixed precision bf16" in run.stdout
    assert (out / "config.yaml").read_text().count("image_size: 64") == 1
    report = json.loads((out / "report.json").read_text())
    test_counts = load_manifest(phantom_shards).split("test").class_counts
    assert [report["per_class"][c]["support"] for c in report["classes"]] == list(test_counts)
    for fig in ("confusion_matrix.png", "roc.png", "training_curves.png", "reliability.png", "gradcam.png"):
        assert (out / fig).stat().st_size > 1000, fig
    assert "lung_share" in report and 0.0 <= report["lung_share"]["all"]["mean"] <= 1.0
    lo, hi = report["ci95"]["accuracy"]
    assert lo <= report["accuracy"] <= hi and report["classes_evaluated"] == info["classes"]
    # results per source (the phantom's metadata sheets), and the single-source warning in the markdown
    assert sum(m["support"] for m in report["per_source"].values()) == report["samples"]
    assert "Lung_Opacity" in report["single_source_classes"]
    assert "came from a single source in training" in (out / "report.md").read_text()
    # operating points chosen on validation are frozen in the card and applied to test
    assert set(info["operating_points"]) == set(report["operating_points"]) == set(info["classes"])
    for name, by_point in report["operating_points"].items():
        assert by_point["youden"]["threshold"] == info["operating_points"][name]["youden"]["threshold"]
    # the test films checked against the training and validation films (the build grouped exact copies only)
    overlap = report["training_overlap"]
    assert overlap["checked"] and overlap["reference_splits"] == ["train", "val"] and overlap["exact"] == 0
    train_val = sum(load_manifest(phantom_shards).split(s).samples for s in ("train", "val"))
    assert overlap["reference_films"] == train_val
    assert "### Test films against the training films" in (out / "report.md").read_text()
    assert not [p for p in out.rglob(".*tmp*")], "temporary files left behind"
    # a fresh run in that folder would overwrite its model: refused, one line, nothing touched
    before = {p: p.read_bytes() for p in (out / "models").iterdir()}
    again = run_train([f"data.shards={phantom_shards}", f"train.output_dir={out}"], subprocess_env, repo_root)
    assert again.returncode != 0 and "exit status 2" in again.stderr  # the launcher reports the script's exit 2
    assert "already holds a run" in again.stderr and "train.resume=auto" in again.stderr
    assert {p: p.read_bytes() for p in (out / "models").iterdir()} == before and no_traceback_from_us(again.stderr)


def test_early_stopping_after_patience_keeps_best_epoch(tmp_path, phantom_shards, subprocess_env, repo_root):
    out = tmp_path / "run"
    # min_delta larger than any possible change: epoch 0 is best, then exactly `patience` bad epochs.
    run = run_train(
        [
            f"data.shards={phantom_shards}",
            f"train.output_dir={out}",
            "train.epochs=10",
            "train.patience=2",
            "train.min_delta=100",
            "eval.test_at_end=false",
        ],
        subprocess_env,
        repo_root,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["epoch"] for r in metrics(out)] == [0, 1, 2]
    assert "early stop" in run.stdout
    info = json.loads((out / "models" / "best_model.json").read_text())
    assert info["epoch"] == 0
    best = torch.load(out / "models" / "best_model.pth", weights_only=True)
    last = load_checkpoint(out / "models" / "checkpoint.pth")
    assert last["epoch"] == 2
    assert not torch.equal(best["fc.weight"], last["model"]["fc.weight"]), "best model must be epoch 0's weights"


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training progress")


def test_killed_run_resumes_to_identical_weights(tmp_path, phantom_shards, subprocess_env, repo_root):
    common = [f"data.shards={phantom_shards}", "train.epochs=4", "eval.test_at_end=false", "train.seed=7"]
    full = tmp_path / "full"
    run = run_train(common + [f"train.output_dir={full}"], subprocess_env, repo_root)
    assert run.returncode == 0, run.stderr[-3000:]

    part = tmp_path / "part"
    cmd = launch_cmd(1, ["--mixed_precision", "no"]) + TINY + common + [f"train.output_dir={part}", "train.resume=auto"]
    proc = start_group(cmd, subprocess_env, repo_root)
    try:
        ckpt = part / "models" / "checkpoint.pth"
        # The checkpoint is replaced atomically, so reading it while training runs is safe.
        _wait_for(lambda: ckpt.exists() and load_checkpoint(ckpt)["epoch"] >= 1, 300, proc)
        time.sleep(0.3)  # now inside epoch 2
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert load_checkpoint(part / "models" / "checkpoint.pth")["epoch"] in (1, 2)
    resumed = subprocess.run(cmd, env=subprocess_env, cwd=repo_root, capture_output=True, text=True, timeout=420)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert [r["epoch"] for r in metrics(part)] == [0, 1, 2, 3]
    a = load_checkpoint(full / "models" / "checkpoint.pth")["model"]
    b = load_checkpoint(part / "models" / "checkpoint.pth")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run's final weights differ from the uninterrupted run"
    best_a = torch.load(full / "models" / "best_model.pth", weights_only=True)
    best_b = torch.load(part / "models" / "best_model.pth", weights_only=True)
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_kill_mid_epoch_resumes_mid_epoch_to_identical_weights(tmp_path, phantom_shards, subprocess_env, repo_root):
    """train.checkpoint_every_steps: a run killed (-9) inside epoch 0 resumes at the next global batch, covers
    the epoch exactly (coverage carried in the checkpoint) and ends with the uninterrupted run's weights.
    The shards are given as a file: URL (one manifest loader for local and remote)."""
    common = [
        f"data.shards=file:{phantom_shards}",
        "train.epochs=2",
        "eval.test_at_end=false",
        "train.seed=3",
        "train.batch_size=4",
        "train.checkpoint_every_steps=3",
        "data.num_workers=1",
    ]
    full = tmp_path / "full"
    run = run_train(common + [f"train.output_dir={full}"], subprocess_env, repo_root)
    assert run.returncode == 0, run.stderr[-3000:]

    part = tmp_path / "part"
    cmd = launch_cmd(1, ["--mixed_precision", "no"]) + TINY + common + [f"train.output_dir={part}", "train.resume=auto"]
    proc = start_group(cmd, subprocess_env, repo_root)
    ckpt = part / "models" / "checkpoint.pth"
    try:  # the run's first checkpoint is the one after step 3 of epoch 0, ~6 steps before the epoch's end
        _wait_for(ckpt.exists, 300, proc)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    state = load_checkpoint(ckpt)
    assert state["mid_epoch"] and state["epoch"] == 0 and state["loader"]["step"] % 3 == 0, state["loader"]
    assert not (part / "metrics.jsonl").exists()
    resumed = subprocess.run(cmd, env=subprocess_env, cwd=repo_root, capture_output=True, text=True, timeout=420)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch 0, step {state['loader']['step']} (mid-epoch)" in resumed.stdout
    train_samples = load_manifest(phantom_shards).split("train").samples
    assert [(r["epoch"], r["train_samples_seen"]) for r in metrics(part)] == [(0, train_samples), (1, train_samples)]
    a = load_checkpoint(full / "models" / "checkpoint.pth")["model"]
    b = load_checkpoint(ckpt)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run's final weights differ from the uninterrupted run"


def test_two_processes_equal_steps_rank0_writes(tmp_path, phantom_shards, subprocess_env, repo_root):
    """Also early stopping across ranks: min_delta no change can meet makes epoch 1 the `patience`-th bad one;
    both ranks must stop there together (a rank going on alone would hang in its next collective).
    With TensorBoard on, as in configs/default.yaml: ending the trackers once destroyed the process group
    before the test report gathered over it (both ranks died, no report)."""
    out = tmp_path / "run"
    run = run_train(
        [
            f"data.shards={phantom_shards}",
            f"train.output_dir={out}",
            "train.epochs=5",
            "train.patience=1",
            "train.min_delta=100",
            "logging.tensorboard=true",
        ],
        subprocess_env,
        repo_root,
        nproc=2,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["epoch"] for r in metrics(out)] == [0, 1] and run.stdout.count("early stop") == 1
    assert "2 process(es)" in run.stdout
    assert run.stdout.count("epoch   0 ") == 1, "only rank 0 prints"
    train_samples = load_manifest(phantom_shards).split("train").samples
    for row in metrics(out):
        assert len(row["rank_steps"]) == 2 and row["rank_steps"][0] == row["rank_steps"][1]
        assert row["rank_steps"][0] == -(-train_samples // 16)
        # exact epoch across the 2 ranks: every train sample once, fewer repeats than a global batch
        assert row["train_samples_seen"] == train_samples
        assert row["train_samples_repeated"] == row["rank_steps"][0] * 16 - train_samples < 16
    report = json.loads((out / "report.json").read_text())
    test_split = load_manifest(phantom_shards).split("test")
    assert report["samples"] == test_split.samples
    assert [report["per_class"][c]["support"] for c in report["classes"]] == list(test_split.class_counts)
    keys = [json.loads(line)["key"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == test_split.samples, "each test sample exactly once across the 2 ranks"
    # the card and the report say how the model was trained: as launched, not as configured
    card = json.loads((out / "models" / "best_model.json").read_text())
    assert (card["precision"], card["processes"]) == ("no", 2)
    assert (
        "batch 8 per device × 2 processes (global batch 16), fp32 (no mixed precision)"
        in (out / "report.md").read_text()
    )
    events = [p for p in (out / "tb").rglob("events.out.tfevents.*")]
    assert len(events) == 1 and events[0].stat().st_size > 0, "rank 0 alone logs to TensorBoard"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "tb" not in p.parts)
    assert files == sorted(
        [
            "config.yaml",
            "metrics.jsonl",
            "models/best_model.json",
            "models/best_model.pth",
            "models/best_model.safetensors",
            "models/checkpoint.pth",
            "report.json",
            "report.md",
            "predictions.jsonl",
            "confusion_matrix.png",
            "roc.png",
            "training_curves.png",
            "reliability.png",
            "gradcam.png",
        ]
        + (["failures.png"] if any(report["failures"].values()) else [])
        + (["copies.png"] if report["training_overlap"]["copies"] else [])
    )
    external_evaluation_two_ranks(out, subprocess_env, repo_root)


def external_evaluation_two_ranks(run: Path, env, cwd) -> None:
    """`--shards OTHER --split all` on a class subset: every film once across 2 ranks, into RUN/external/NAME/."""
    from sharding.build import build_shards
    from sharding.phantom import PhantomSpec, generate

    raw = generate(run.parent / "other_raw", PhantomSpec(counts=(5, 0, 7, 0), seed=3))
    no_test = build_shards(raw, run.parent / "no_test", classes=["Normal", "COVID"], shard_size=4, progress=False)
    trained_on = copy_training_films(run, raw)  # + 1 exact and 1 near copy of training films: 14 films
    other = run.parent / "other_hospital"
    manifest = build_shards(raw, other, classes=["Normal", "COVID"], include_masks=True, shard_size=4, progress=False)
    cmd = launch_cmd(2)[:-3] + ["-m", "evaluation", "--run", str(run), "--shards", str(other), "--split", "all"]
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:-2000]
    folder = run / "external" / "other_hospital"
    report = json.loads((folder / "report.json").read_text())
    assert report["samples"] == 14 and report["split"] == "all"
    supports = {c: report["per_class"][c]["support"] for c in report["classes"]}
    assert supports == {"COVID": 6, "Lung_Opacity": 0, "Normal": 8, "Viral Pneumonia": 0}, "mapped by name"
    # the copies of training films are found (exact and near), and the results are given without them
    overlap = report["training_overlap"]
    assert overlap["checked"] and (overlap["exact"], overlap["near"]) == (1, 1)
    own_manifest = load_manifest(load_config_shards(run))
    assert overlap["reference_films"] == own_manifest.split("train").samples + own_manifest.split("val").samples
    assert {k: (c["reference_key"], c["kind"]) for k, c in overlap["copies"].items()} == trained_on
    assert overlap["without_copies"]["samples"] == 12 and overlap["different_label"] == 0
    assert "**2 of 14 films (14%) copy training or validation films**" in (folder / "report.md").read_text()
    assert report["figures"]["copies"] == "copies.png" and "![copies](copies.png)" in (folder / "report.md").read_text()
    assert (folder / "copies.png").stat().st_size > 0
    assert any("2 external films copy training or validation films" in s for s in report["limitations"])
    assert report["classes_evaluated"] == ["COVID", "Normal"]
    keys = [json.loads(line)["key"] for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == sum(manifest.split(s).samples for s in manifest.splits)
    assert set(report["probes"]) == {"lungs_blanked", "lungs_only"}
    assert done.stdout.count("other_hospital (all): accuracy") == 1, "rank 0 alone prints"
    # the run's own report lists the external result, in json and markdown
    own = json.loads((run / "report.json").read_text())
    assert own["external"]["other_hospital"]["samples"] == 14 and own["external"]["other_hospital"]["copies"] == 2
    assert "[other_hospital](external/other_hospital/report.md)" in (run / "report.md").read_text()
    assert not any("No external test" in s for s in own["limitations"])
    assert report["external_test"]["name"] == "other_hospital" and "No external test" not in str(report["limitations"])
    # a copy of the run's own shards is the run's own set (train split digest in the card); another set is not
    import shutil

    from evaluation.run import main as evaluate_main
    from evaluation.run import same_shard_set

    own_copy = shutil.copytree(load_config_shards(run), run.parent / "moved_shards")
    assert same_shard_set(str(own_copy), run) and not same_shard_set(str(other), run)
    # a class the model does not know: one line naming it, exit 2, nothing written
    renamed = shutil.copytree(other, run.parent / "renamed")
    data = json.loads((renamed / "manifest.json").read_text())
    data["classes"] = ["Normal", "Tuberculosis"]
    (renamed / "manifest.json").write_text(json.dumps(data))
    assert evaluate_main(["--run", str(run), "--shards", str(renamed)]) == 2
    assert not (run / "external" / "renamed").exists()
    # --train-shards naming shards the model was not trained on: not checked, and the report says why
    args = ["--run", str(run), "--shards", str(other), "--split", "all", "--name", "unchecked"]
    assert evaluate_main(args + ["--train-shards", str(other)]) == 0
    unchecked = json.loads((run / "external" / "unchecked" / "report.json").read_text())
    assert not unchecked["training_overlap"]["checked"]
    assert "not the ones the model was trained on" in unchecked["training_overlap"]["reason"]
    assert any("not checked against the training films" in s for s in unchecked["limitations"])
    # a split without films (this set's test split is empty): one line, exit 2
    assert no_test.split("test").samples == 0
    no_test_dir = str(run.parent / "no_test")
    assert evaluate_main(["--run", str(run), "--shards", no_test_dir, "--split", "test", "--name", "empty"]) == 2
    assert not (run / "external" / "empty").exists()


def copy_training_films(run: Path, raw: Path) -> dict[str, tuple[str, str]]:
    """Put one COVID training film as is and one Normal training film resized to 320 px into the phantom `raw`
    (masks borrowed from a film there); returns {new key: (training key, exact|near)}."""
    import shutil

    from PIL import Image

    from sharding.verify import decode_member, iter_samples

    first: dict[str, tuple[str, np.ndarray]] = {}
    for tar in sorted(load_config_shards(run).glob("train-*.tar")):
        for sample in iter_samples(tar):
            cls = json.loads(sample["json"])["class"]
            first.setdefault(cls, (sample["__key__"], decode_member("image.npy", sample["image.npy"])[0]))
    copies = {}
    for cls, kind in (("COVID", "exact"), ("Normal", "near")):
        key, pixels = first[cls]
        image = Image.fromarray(pixels)
        (image if kind == "exact" else image.resize((320, 320), Image.Resampling.BICUBIC)).save(
            raw / cls / "images" / f"{cls}-copy.png"
        )
        shutil.copy(raw / cls / "masks" / f"{cls}-1.png", raw / cls / "masks" / f"{cls}-copy.png")
        copies[f"{cls}-copy"] = (key, kind)
    return copies


def load_config_shards(run: Path) -> Path:
    from train.config import load_config

    return Path(load_config(run / "config.yaml").data.shards)


def no_traceback_from_us(stderr: str) -> bool:
    """accelerate's launcher prints its own traceback when a child fails; ours must not appear."""
    return (
        'train/main.py", line' not in stderr
        and "pipeline/" not in stderr
        and "sharding/" not in stderr.split("error")[-1]
    )


def test_bad_inputs_fail_clearly(tmp_path, phantom_shards, subprocess_env, repo_root):
    missing = run_train(
        [f"data.shards={tmp_path / 'nothing'}", f"train.output_dir={tmp_path / 'r1'}"], subprocess_env, repo_root
    )
    assert missing.returncode != 0
    assert "python -m sharding build" in missing.stderr and no_traceback_from_us(missing.stderr)
    wrong = run_train(
        [f"data.shards={phantom_shards}", f"train.output_dir={tmp_path / 'r2'}", "data.stored_size=256"],
        subprocess_env,
        repo_root,
    )
    assert wrong.returncode != 0 and "image size: manifest 299 vs config data.stored_size 256" in wrong.stderr
    bad_cfg = subprocess.run(
        [sys.executable, "train/main.py", "--config", "configs/demo.yaml", "train.epochs=zero"],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad_cfg.returncode == 2 and "train.epochs" in bad_cfg.stderr and "Traceback" not in bad_cfg.stderr


def test_mask_lungs_run_with_a_step_cap_reports_to_the_end(tmp_path, phantom_shards, subprocess_env, repo_root):
    """data.mask_lungs needs masks in every forward (Grad-CAM included), and a capped epoch counts its cap."""
    out = tmp_path / "run"
    run = run_train(
        [
            f"data.shards={phantom_shards}",
            f"train.output_dir={out}",
            "train.epochs=1",
            "data.mask_lungs=true",
            "train.max_steps_per_epoch=2",
        ],
        subprocess_env,
        repo_root,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert metrics(out)[0]["rank_steps"] == [2]
    report = json.loads((out / "report.json").read_text())
    from sharding.manifest import load_manifest

    expected = load_manifest(phantom_shards).split("test").samples
    assert sum(c["support"] for c in report["per_class"].values()) == expected and (out / "gradcam.png").exists()


def test_a_robust_recipe_run_crops_augments_and_selects_by_the_worst_source(
    tmp_path, phantom_shards, subprocess_env, repo_root
):
    """data.crop=lungs, acquisition keys and the worst-source monitor together, to the report (issue 23)."""
    out = tmp_path / "run"
    recipe = ["data.crop=lungs", "acquisition.gamma=0.3", "acquisition.noise=0.03", "acquisition.zoom=0.1"]
    run = run_train(
        [f"data.shards={phantom_shards}", f"train.output_dir={out}", "train.epochs=2", "train.max_steps_per_epoch=2"]
        + recipe
        + ["train.monitor=val_worst_source_balanced_accuracy"],
        subprocess_env,
        repo_root,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = metrics(out)
    assert all(r["val_worst_source"] == "all" for r in rows)  # every source has < 10 validation films here
    assert all(r["val_worst_source_balanced_accuracy"] == r["val_balanced_accuracy"] for r in rows)
    card = json.loads((out / "models" / "best_model.json").read_text())
    assert card["monitor"] == "val_worst_source_balanced_accuracy" and card["config"]["data"]["crop"] == "lungs"
    assert card["config"]["acquisition"]["gamma"] == 0.3
    report = json.loads((out / "report.json").read_text())
    assert report["probes"]["lungs_blanked"]["samples"] == report["samples"]  # probes ran on the cropped films
    assert report["lung_share"] and (out / "gradcam.png").exists()  # Grad-CAM on the cropped films and masks


def test_corrupt_val_shard_during_training_is_one_line_exit_2(tmp_path, phantom_shards, subprocess_env, repo_root):
    """A val shard that fails its checksum, read by a loader worker: one line naming the shard, exit 2."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(phantom_shards, shards)
    val = shards / "val-000000.tar"
    data = bytearray(val.read_bytes())
    data[len(data) // 2] ^= 0xFF
    val.write_bytes(bytes(data))
    run = run_train(
        [f"data.shards={shards}", f"train.output_dir={tmp_path / 'run'}", "train.epochs=1", "data.num_workers=1"],
        subprocess_env,
        repo_root,
    )
    assert run.returncode != 0 and "exit status 2" in run.stderr, run.stderr[-3000:]  # the launcher wraps our 2
    lines = [line for line in run.stderr.splitlines() if line.startswith("error (rank 0)")]
    assert len(lines) == 1 and "val-000000.tar" in lines[0] and "sharding verify" in lines[0], run.stderr[-3000:]
    assert no_traceback_from_us(run.stderr), run.stderr[-3000:]


def test_other_collections_train_with_the_demo_config_unchanged(tmp_path, phantom_raw, subprocess_env, repo_root):
    """(a) DICOM films with a label CSV (patients from the CSV), (b) a two-class folder set: each builds, trains
    and evaluates with `configs/demo.yaml` and nothing but data.shards changed (the test suite's usual tiny
    sizes aside); class names and count from the manifest. (c), the Kaggle layout with metadata sheets, is the
    phantom every other run here trains on."""
    import shutil

    from sharding.build import build_shards
    from sharding.phantom import PhantomSpec, generate

    # 30 films a class, 3 a patient: patient groups still fill val and test
    dicoms = generate(tmp_path / "dcm", PhantomSpec(counts=(30, 30, 30, 30), seed=1, format="dicom"))
    folders = tmp_path / "folders"
    for name, src in (("effusion", "Lung_Opacity"), ("clear", "Normal")):
        shutil.copytree(phantom_raw / src / "images", folders / name)
    cases = {
        "dicom_csv": (
            dicoms,
            {"labels": dicoms / "labels.csv"},
            ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"],
        ),
        "two_folders": (folders, {}, ["clear", "effusion"]),
    }
    for name, (raw, options, classes) in cases.items():
        shards = tmp_path / f"shards_{name}"
        manifest = build_shards(raw, shards, shard_size=16, workers=1, progress=False, **options)
        assert list(manifest.classes) == classes
        out = tmp_path / f"run_{name}"
        run = run_train(
            [f"data.shards={shards}", f"train.output_dir={out}", "train.epochs=1"], subprocess_env, repo_root
        )
        assert run.returncode == 0, (name, run.stderr[-3000:])
        card = json.loads((out / "models" / "best_model.json").read_text())
        assert card["classes"] == classes and card["stored_size"] == 299
        assert metrics(out)[0]["train_samples_seen"] == manifest.split("train").samples
        report = json.loads((out / "report.json").read_text())  # and evaluated: the test report
        assert report["classes"] == classes and report["samples"] == manifest.split("test").samples > 0
