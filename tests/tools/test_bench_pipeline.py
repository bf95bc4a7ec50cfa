"""Smoke test of `python -m tools.bench_pipeline`: end to end on tiny data, writing the documented JSON schema."""

from __future__ import annotations

import json

import pytest

from tools import bench_pipeline as bench


@pytest.mark.slow
def test_bench_smoke(tiny_shards, phantom_raw, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(
        [
            "--shards",
            str(tiny_shards),
            "--raw",
            str(phantom_raw),
            "--workers",
            "0",
            "--batch-size",
            "4",
            "--batches",
            "2",
            "--warmup",
            "1",
            "--shuffle",
            "8",
            "--no-peers",
            "--augment-seconds",
            "0.2",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    row = data["img_per_s"]["workers_0"]
    assert set(row) == set(bench.METHODS)
    assert row["radstream"] > 0 and row["memmap_bound"] > 0 and row["litdata"] is None
    assert row["radstream_mixed"] > 0  # the 4 train shards as 3 collections, in the same run
    assert data["ratios"]["workers_0"]["mixed_vs_radstream"] == row["radstream_mixed"] / row["radstream"]
    assert data["augment"]["batch_per_s"] > 0 and data["machine"]["cpu_count"]
    assert "| radstream |" in capsys.readouterr().out
