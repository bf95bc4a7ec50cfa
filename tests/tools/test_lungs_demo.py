"""`python -m tools.lungs_demo` (`make lungs-demo`): the table by hand; a tiny real run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tools.lungs_demo import table


def test_the_table_by_hand():
    seg = [{"set": "internal test", "films": 80, "dice": {"mean": 0.9712, "ci95": [0.969, 0.9731]}}]
    seg[0]["iou"] = {"mean": 0.944, "ci95": [0.94, 0.948]}
    crop = [
        {"masks": "drawn", "films": 400, "balanced_accuracy": 0.88, "ci95": [0.84, 0.91], "lung_share": 0.41},
        {
            "masks": "predicted by the segmenter",
            "films": 400,
            "balanced_accuracy": 0.87,
            "ci95": None,
            "lung_share": None,
        },
    ]
    text = table(seg, crop)
    assert "| internal test | 80 | 0.971 (0.969–0.973) | 0.944 (0.940–0.948) |" in text
    assert "| drawn | 400 | 0.88 (0.84–0.91) | 0.41 |" in text
    assert "| predicted by the segmenter | 400 | 0.87 | — |" in text


@pytest.mark.slow
def test_a_tiny_demo_runs_end_to_end(tmp_path, subprocess_env):
    cmd = [sys.executable, "-m", "tools.lungs_demo", "--out", str(tmp_path / "demo"), "--per-class", "12"]
    cmd += ["--site-per-class", "6", "--lung-size", "32", "--lung-epochs", "2", "--image-size", "64", "--epochs", "1"]
    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "demo" / "lungs.json").read_text())
    assert [r["films"] for r in result["segmenter"]] == [4, 4, 24]
    assert [r["masks"] for r in result["crop"]] == ["drawn", "predicted by the segmenter"]
    assert all(r["films"] == 24 and 0.0 <= r["balanced_accuracy"] <= 1.0 for r in result["crop"])
    assert "| unseen site (hospital-x.example) | 24 |" in done.stdout
