"""`python -m tools.bench_build`: the three executors over the same films, byte-identical, with figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("ray", reason="the dev extra installs ray")


@pytest.mark.slow
def test_the_build_benchmark_times_three_executors_on_identical_output(subprocess_env, tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "tools.bench_build", "--films", "40", "--repeats", "1", "--shard-size", "16"]
    proc = subprocess.Popen(
        cmd + ["--json", str(out)],
        env=subprocess_env,
        cwd=tmp_path,
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the benchmark stops the Ray cluster it started, then exits
        proc.communicate(timeout=60)
        raise
    assert proc.returncode == 0, stderr
    rows = json.loads(out.read_text())
    assert [r["executor"] for r in rows] == ["local", "ray (own instance)", "ray (running cluster)"]
    assert all(r["identical"] and r["films"] == 40 and r["img_per_s"] > 0 for r in rows)
    assert rows[0]["vs_local_wall"] == 1.0 and "ray (running cluster)" in stdout
