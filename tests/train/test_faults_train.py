"""Faults around real training runs (issue 7, guarantees 2, 3, 7, 8, 9).

- kill -9 during a checkpoint / best-model write and at a seeded random point mid-epoch: every file in
  place loads, `resume=auto` continues, the final weights equal the uninterrupted run's;
- a dead rank in a 2-process gloo run: the launcher exits non-zero within a bound, no partial best model;
- a stalled (SIGSTOP) rank: the survivor gives up after train.timeout_s with one clear line;
- a checkpoint carrying a pickled object is refused by load_checkpoint, by resume and by predict;
- unwritable output folder, file-size limit (disk full) while writing checkpoints: a clear error, exit != 0,
  previous files intact, no temporaries left;
- a scaled-down soak: RSS flat, fds stable, equal steps per epoch.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.checkpoint import CheckpointError, load_best_model, load_checkpoint

from helpers.launch import train_cmd as launch
from helpers.procs import limit_file_size as _limit_file_size
from helpers.procs import start_group

pytestmark = pytest.mark.slow

BEST = ("best_model.pth", "best_model.safetensors", "best_model.json")


def temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob(".*tmp*"))


def assert_files_loadable(out: Path) -> None:
    """Whatever is in place is complete: the checkpoint and every best-model file load."""
    models = out / "models"
    if (models / "checkpoint.pth").exists():
        state = load_checkpoint(models / "checkpoint.pth")
        assert {"model", "optimizer", "epoch"} <= set(state)
    for name in ("best_model.pth", "best_model.safetensors"):
        if (models / name).exists():
            load_best_model(models / name)  # through the loader users use: digests checked against the card
    if (models / "best_model.json").exists():
        json.loads((models / "best_model.json").read_text())
    if (out / "metrics.jsonl").exists():
        [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_until(cmd, env, cwd, predicate, timeout: float = 300, poll: float = 0.002):
    """Start a run in its own process group; SIGKILL the group as soon as predicate() holds."""
    proc = start_group(cmd, env, cwd)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if predicate():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                raise AssertionError(f"run ended before the kill point: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("kill point never reached")
            time.sleep(poll)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return proc


def test_kill_during_checkpoint_write_and_mid_epoch_then_resume_equals_uninterrupted(
    tmp_path, phantom_shards, subprocess_env, repo_root
):
    rng = random.Random(11)
    common = [
        f"data.shards={phantom_shards}",
        "train.epochs=5",
        "eval.test_at_end=false",
        "train.seed=5",
        "train.patience=10",
    ]
    full = tmp_path / "full"
    ref = subprocess.run(
        launch() + common + [f"train.output_dir={full}"],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    part = tmp_path / "part"
    models = part / "models"
    cmd = launch() + common + [f"train.output_dir={part}", "train.resume=auto"]

    # 1) kill while a model file is being written: the first temporary after epoch 0's files exist
    def writing() -> bool:
        names = os.listdir(models) if models.is_dir() else []
        return "checkpoint.pth" in names and any(n.startswith(".") and ".tmp-" in n for n in names)

    run_until(cmd, subprocess_env, repo_root, writing)
    caught = [n for n in os.listdir(models) if ".tmp-" in n]
    assert caught, "the kill did not land inside a write"
    assert_files_loadable(part)

    # 2) kill at a seeded random point inside the epoch after the resumed run's first checkpoint
    ckpt = models / "checkpoint.pth"
    after = load_checkpoint(ckpt)["epoch"]
    mtime0 = ckpt.stat().st_mtime_ns
    wait = rng.uniform(0.05, 1.0)
    marks: list[float] = []

    def mid_epoch() -> bool:
        if not marks and ckpt.stat().st_mtime_ns != mtime0:
            marks.append(time.monotonic())
        return bool(marks) and time.monotonic() - marks[0] > wait

    run_until(cmd, subprocess_env, repo_root, mid_epoch)
    assert_files_loadable(part)
    assert load_checkpoint(ckpt)["epoch"] > after  # the resumed run really made progress before the kill

    # 3) resume to the end: equal to the uninterrupted run, no temporaries left
    resumed = subprocess.run(cmd, env=subprocess_env, cwd=repo_root, capture_output=True, text=True, timeout=420)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert [json.loads(x)["epoch"] for x in (part / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]
    a = load_checkpoint(full / "models" / "checkpoint.pth")["model"]
    b = load_checkpoint(models / "checkpoint.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ from the uninterrupted run"
    for name in ("best_model.pth", "best_model.safetensors"):
        x, _ = load_best_model(full / "models" / name)
        y, _ = load_best_model(models / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name
    assert (
        json.loads((full / "models" / "best_model.json").read_text())["epoch"]
        == json.loads((models / "best_model.json").read_text())["epoch"]
    )
    assert temporaries(part) == [], "stale temporaries of the killed writer were not cleaned"


def _rank_pid(launcher_pid: int, rank: int, timeout: float = 120) -> int:
    """The train/main.py process of `rank` under the launcher (RANK=<rank> in /proc/<pid>/environ)."""
    from helpers.procs import children as _children

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack = list(_children(launcher_pid))
        while stack:
            pid = stack.pop()
            stack.extend(_children(pid))
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and any(c.endswith(b"train/main.py") for c in cmd):
                return pid
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} process not found")


def test_dead_rank_fails_the_run_within_bound_no_partial_best_model(
    tmp_path, phantom_shards, subprocess_env, repo_root
):
    out = tmp_path / "run"
    cmd = launch(2) + [
        f"data.shards={phantom_shards}",
        f"train.output_dir={out}",
        "train.epochs=50",
        "train.patience=100",
        "train.timeout_s=20",
        "eval.test_at_end=false",
    ]
    proc = start_group(cmd, subprocess_env, repo_root, stdout=subprocess.PIPE)
    try:
        victim = _rank_pid(proc.pid, 0)  # rank 0: the only writer
        deadline = time.monotonic() + 300
        while not (out / "models" / "checkpoint.pth").exists():  # the group is formed and training
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(random.Random(3).uniform(0.1, 1.0))
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError("the surviving rank hung after its peer died") from None
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert elapsed < 60, f"took {elapsed:.0f} s to fail"
    print(stderr[-1500:])
    assert "SIGKILL" in stderr or "Signal 9" in stderr, stderr[-3000:]  # the launcher names the dead rank's fate
    assert_files_loadable(out)
    # epoch 0's three best-model files were complete before its checkpoint (written last) existed
    assert [n for n in BEST if (out / "models" / n).exists()] == list(BEST)
    # the next run cleans whatever the killed writer left (a stale temporary planted as proof) and carries on
    stale = out / "models" / ".checkpoint.pth.tmp-999999"
    stale.write_bytes(b"half a checkpoint")
    epoch = load_checkpoint(out / "models" / "checkpoint.pth")["epoch"]
    again = subprocess.run(
        launch()
        + [
            f"data.shards={phantom_shards}",
            f"train.output_dir={out}",
            f"train.epochs={epoch + 2}",
            "train.patience=100",
            "train.resume=auto",
            "eval.test_at_end=false",
        ],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'models' / 'checkpoint.pth'} at epoch {epoch + 1}" in again.stdout
    assert temporaries(out) == [] and not stale.exists()
    assert_files_loadable(out)


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_object_checkpoint_refused_everywhere(tmp_path, phantom_shards, phantom_raw, subprocess_env, repo_root):
    marker = tmp_path / "executed"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()  # the payload works when unpickled
    marker.unlink()
    out = tmp_path / "run"
    models = out / "models"
    models.mkdir(parents=True)
    evil = models / "checkpoint.pth"
    torch.save({"model": Payload(marker), "epoch": 0}, evil)
    # 1) the library
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()
    # 2) training resume (auto picks it up)
    run = subprocess.run(
        launch()
        + [
            f"data.shards={phantom_shards}",
            f"train.output_dir={out}",
            "train.epochs=1",
            "train.resume=auto",
            "eval.test_at_end=false",
        ],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0 and "error (rank 0): refusing to load" in run.stderr, run.stderr[-3000:]
    assert not marker.exists()
    assert not (models / "best_model.pth").exists()  # refused before any training
    # 3) prediction
    torch.save({"conv1.weight": Payload(marker)}, models / "best_model.pth")
    (models / "best_model.json").write_text(
        json.dumps({"classes": ["a", "b", "c", "d"], "image_size": 32, "config": {}})
    )
    image = next((phantom_raw / "COVID" / "images").iterdir())
    pred = subprocess.run(
        [sys.executable, "-m", "evaluation.predict", "--model", str(models / "best_model.pth"), str(image)],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pred.returncode == 2 and "refusing to load" in pred.stderr, pred.stderr[-3000:]
    assert not marker.exists()


def test_unwritable_output_dir_is_a_clear_error(tmp_path, phantom_shards, subprocess_env, repo_root):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = subprocess.run(
        launch() + [f"data.shards={phantom_shards}", f"train.output_dir={blocker / 'run'}", "train.epochs=1"],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert "is not writable" in run.stderr and 'train/main.py", line' not in run.stderr, run.stderr[-3000:]


def test_disk_full_while_writing_checkpoints_keeps_previous_files(tmp_path, phantom_shards, subprocess_env, repo_root):
    out = tmp_path / "run"
    common = [f"data.shards={phantom_shards}", f"train.output_dir={out}", "eval.test_at_end=false", "train.seed=3"]
    first = subprocess.run(
        launch() + common + ["train.epochs=1"],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (out / "models").iterdir()}
    # ResNet18 weights are ~45 MB: a 4 MB limit lets everything else run and every model write fail
    full = subprocess.run(
        launch() + common + ["train.epochs=2", "train.resume=auto"],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(4 << 20),
    )
    assert full.returncode != 0
    assert "File too large" in full.stderr and "intact" in full.stderr, full.stderr[-3000:]
    assert 'train/main.py", line' not in full.stderr, full.stderr[-3000:]
    after = {p.name: p.read_bytes() for p in (out / "models").iterdir()}
    assert after == before, "a previous model file was changed or a temporary was left"
    assert temporaries(out) == []
    assert_files_loadable(out)
    again = subprocess.run(
        launch() + common + ["train.epochs=2", "train.resume=auto"],
        env=subprocess_env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    assert load_checkpoint(out / "models" / "checkpoint.pth")["epoch"] == 1


def test_soak_scaled_down(tmp_path, phantom_shards, subprocess_env):
    from helpers.soak import soak, table

    result = soak(
        str(phantom_shards),
        str(tmp_path / "soak"),
        epochs=5,
        image_size=32,
        batch_size=8,
        num_workers=1,
        baseline_epoch=2,
        poll=0.1,
        env=subprocess_env,
        timeout=600,
        extra=["data.shuffle_buffer=16", "eval.batch_size=16"],
    )
    print(table(result))
    assert result["returncode"] == 0, result["problems"]
    assert [s["epoch"] for s in result["epochs"]] == [0, 1, 2, 3, 4]
    assert result["ok"], result["problems"]
    assert result["rss_growth"] < 0.05
    most = [s["fds_max"] for s in result["epochs"][2:]]
    assert max(most) <= most[0] + 2, most  # no fd leak
    assert len({tuple(s["steps"]) for s in result["epochs"]}) == 1


def test_stalled_rank_times_out_the_survivor_with_a_clear_error(tmp_path, phantom_shards, subprocess_env, repo_root):
    """A peer that is alive but stuck (SIGSTOP: a hung NFS read, a wedged driver) is what the process-group
    timeout is for: the launcher cannot see it die, so the survivor must give up after `train.timeout_s`."""
    import threading

    out = tmp_path / "run"
    timeout_s = 10
    cmd = launch(2) + [
        f"data.shards={phantom_shards}",
        f"train.output_dir={out}",
        "train.epochs=50",
        "train.patience=100",
        f"train.timeout_s={timeout_s}",
        "eval.test_at_end=false",
    ]
    proc = start_group(cmd, subprocess_env, repo_root)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    victim = None
    try:
        victim = _rank_pid(proc.pid, 1)
        deadline = time.monotonic() + 300
        while not (out / "models" / "checkpoint.pth").exists():  # the group is formed and training
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        while not any("error (rank 0)" in line for line in lines):
            assert time.monotonic() - stopped_at < timeout_s + 60, (
                "the survivor waited on the stalled peer past its timeout:\n" + "".join(lines)[-3000:]
            )
            time.sleep(0.1)
        elapsed = time.monotonic() - stopped_at
        # the launcher would now give the stopped rank 30 s to obey SIGTERM; let it obey at once
        os.kill(victim, signal.SIGCONT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    stderr = "".join(lines)
    print(f"survivor gave up {elapsed:.1f} s after the stall (train.timeout_s={timeout_s})")
    assert proc.returncode != 0
    assert timeout_s - 1 <= elapsed < timeout_s + 30, f"the survivor gave up {elapsed:.0f} s after the stall"
    assert (
        f"error (rank 0): a peer process stopped answering and the collective gave up after "
        f"train.timeout_s={timeout_s} s" in stderr
    ), stderr[-3000:]
    assert "[rank0]: Traceback" not in stderr, stderr[-3000:]  # one clear line, not a gloo traceback
    assert_files_loadable(out)
