"""`make gpu-check`: its dry run works end to end on the CPU, and a failing stage is recorded, not fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tools import gpu_check


@pytest.mark.slow
def test_the_dry_run_runs_every_stage_and_records_its_figures(tmp_path, subprocess_env, repo_root):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.gpu_check", "--dry-run", "--work", str(tmp_path / "work"), "--out", str(out)],
        cwd=repo_root,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "gpu_check.json").read_text())
    names = ["phantom", "shards", "pipeline_bench", "train_bench_no", "train", "gpu_tests"]
    assert r["plan"] == names and list(r["stages"]) == names and r["ok"] and r["dry_run"]
    for name, stage in r["stages"].items():
        assert stage["ok"] and stage["figures"] and stage["seconds"] >= 0, name
        assert (out / "logs" / f"{name}.log").is_file()
    f = {name: stage["figures"] for name, stage in r["stages"].items()}
    assert f["phantom"]["films"] == 32 and sum(f["shards"]["samples"].values()) == 32
    assert f["pipeline_bench"]["img_per_s"]["workers_1"]["radstream"] > 0
    bench = f["train_bench_no"]
    assert all(bench["img_per_s"][k] > 0 for k in ("model_only", "radstream", "original"))
    assert set(bench["augment"]) == {"kornia", "torch"} and bench["settings"]["precision"] == "no"
    assert [e["epoch"] for e in f["train"]["epochs"]] == [0] and f["train"]["best_model"]
    assert f["gpu_tests"]["skipped"] == 1 and f["gpu_tests"]["failures"] == 0  # no CUDA here: one module skip
    summary = (out / "gpu_check.md").read_text()
    assert "all stages ok" in summary and all(f"| {name} | yes |" in summary for name in names)


def _fake(name: str, code: str, timeout_s: int = 30, figures=lambda: {"x": 1}) -> gpu_check.Stage:
    return gpu_check.Stage(name, [sys.executable, "-c", code], figures, timeout_s)


def test_a_failing_stage_is_recorded_and_the_next_ones_still_run(tmp_path, monkeypatch):
    pid_file = tmp_path / "grandchild.pid"
    hang = (
        "import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    stages = [
        _fake("first", "print('fine')"),
        _fake("crashes", "import sys; print('boom'); sys.exit(3)"),
        _fake("hangs", hang, timeout_s=2),
        _fake("no_figures", "pass", figures=lambda: json.loads("{")),
        _fake("last", "pass"),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda *a: stages)
    monkeypatch.setattr(
        gpu_check,
        "machine",
        lambda: {"device": "cpu", "cuda": None, "cpu_count": 1, "python": "3", "platform": "-", "versions": {}},
    )
    rc = gpu_check.main(["--dry-run", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert rc == 1
    r = json.loads((tmp_path / "o" / "gpu_check.json").read_text())
    got = r["stages"]
    assert list(got) == ["first", "crashes", "hangs", "no_figures", "last"] and not r["ok"]
    assert got["first"]["ok"] and got["last"]["ok"] and got["first"]["figures"] == {"x": 1}
    assert got["crashes"]["rc"] == 3 and "exit 3" in got["crashes"]["error"] and "boom" in got["crashes"]["error"]
    assert got["hangs"]["rc"] is None and "timed out after 2 s" in got["hangs"]["error"]
    assert "figures unreadable: JSONDecodeError" in got["no_figures"]["error"]
    assert "FAILED" in (tmp_path / "o" / "gpu_check.md").read_text()
    # the timeout killed the stage's whole process group, its own children too
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a killed child not yet reaped by its (dead) parent is a zombie
        return fh.read().split(")")[-1].split()[0] != "Z"


def test_the_gpu_plan_refuses_a_machine_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_the_gpu_plan_has_every_stage_the_issue_names(tmp_path):
    stages = gpu_check.plan(gpu_check.Sizes(), gpu_check.Paths(tmp_path / "w", tmp_path / "o"), 16)
    names = [s.name for s in stages]
    assert names == [
        "phantom",
        "shards",
        "pipeline_bench",
        "train_bench_bf16",
        "train_bench_fp16",
        "train_bench_bf16_compile",
        "train",
        "gpu_tests",
    ]
    argv = {s.name: s.argv for s in stages}
    assert "--full-size" in argv["phantom"] and argv["phantom"][-2:] == ["--workers", "16"]
    assert argv["pipeline_bench"][argv["pipeline_bench"].index("--workers") + 1 :][:3] == ["1", "4", "8"]
    for name in ("train_bench_bf16", "train_bench_fp16", "train_bench_bf16_compile"):
        a = argv[name]
        assert a[a.index("--image-size") + 1] == "299" and "--channels-last" in a
        assert ("--compile" in a) == name.endswith("compile")
    assert "--raw" in argv["train_bench_bf16"]  # the original feed once
    assert "--mixed_precision" in argv["train"] and "bf16" in argv["train"] and "train.epochs=2" in argv["train"]
    assert argv["gpu_tests"][3:6] == ["-m", "gpu", "tests/gpu"]


def _no_machine(monkeypatch) -> None:
    monkeypatch.setattr(
        gpu_check,
        "machine",
        lambda: {"device": "cpu", "cuda": None, "cpu_count": 1, "python": "3", "platform": "-", "versions": {}},
    )


def test_the_overall_deadline_stops_the_running_stage_and_skips_the_rest(tmp_path, monkeypatch):
    stages = [_fake("quick", "pass"), _fake("slow", "import time; time.sleep(30)"), _fake("later", "pass")]
    monkeypatch.setattr(gpu_check, "plan", lambda *a: stages)
    _no_machine(monkeypatch)
    began = time.monotonic()
    rc = gpu_check.main(["--dry-run", "--deadline-s", "2", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert rc == 1 and time.monotonic() - began < 15
    got = json.loads((tmp_path / "o" / "gpu_check.json").read_text())["stages"]
    assert got["quick"]["ok"]
    assert got["slow"]["rc"] is None and "timed out after" in got["slow"]["error"]
    assert not got["later"]["ok"] and "overall deadline of 2 s" in got["later"]["error"]
    assert "overall deadline" in (tmp_path / "o" / "gpu_check.md").read_text()


def test_missing_packages_stop_the_check_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "DEPENDENCIES", {"json": "json", "no_such_module_for_radstream": "no-such-pkg"})
    monkeypatch.setattr(gpu_check, "plan", lambda *a: pytest.fail("a stage ran"))
    assert gpu_check.main(["--dry-run", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing packages: no-such-pkg" in err and "pip install no-such-pkg" in err
    assert not (tmp_path / "o").exists()


def test_every_dependency_is_here():
    assert gpu_check.missing_dependencies(gpu_check.DEPENDENCIES) == []
    assert gpu_check.compile_unavailable() is None  # this CPU's Python and torch support Dynamo


def test_compile_stages_are_skipped_with_the_reason_where_compile_cannot_run(tmp_path, monkeypatch):
    stages = [_fake("plain", "pass"), gpu_check.Stage("compiled", [sys.executable, "-c", "1", "--compile"], dict, 30)]
    monkeypatch.setattr(gpu_check, "plan", lambda *a: stages)
    monkeypatch.setattr(gpu_check, "compile_unavailable", lambda: "torch.compile needs Triton for CUDA")
    _no_machine(monkeypatch)
    assert gpu_check.main(["--dry-run", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 0
    got = json.loads((tmp_path / "o" / "gpu_check.json").read_text())["stages"]
    assert got["compiled"]["ok"] and got["compiled"]["skipped"] == "skipped: torch.compile needs Triton for CUDA"
    assert (
        "| compiled | yes | 0 | skipped: torch.compile needs Triton for CUDA |"
        in (tmp_path / "o" / "gpu_check.md").read_text()
    )
