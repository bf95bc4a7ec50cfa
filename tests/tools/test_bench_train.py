"""`python -m tools.bench_train` on CPU: every feed measured, ratios from the figures, data wait tells who waits."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import fields

import pytest
import torch

from pipeline.batch import Batch
from tools import bench_train as bench


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads per op spin against other processes (4x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = ["--image-size", "32", "--batch-size", "4", "--workers", "0", "--steps", "4", "--warmup", "1"]


def _run(tmp_path, shards, *extra) -> dict:
    out = tmp_path / "bench.json"
    assert bench.main(["--shards", str(shards), *TINY, "--augment-seconds", "0.2", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_measures_every_feed_on_a_tiny_phantom(tmp_path, phantom_shards, phantom_raw, capsys):
    r = _run(tmp_path, phantom_shards, "--raw", str(phantom_raw))
    for key in ("img_per_s", "data_wait_frac", "peak_mem_bytes"):
        assert set(r[key]) == set(bench.FEEDS)
    rate = r["img_per_s"]
    assert all(rate[f] > 0 for f in bench.FEEDS)
    assert all(0.0 <= r["data_wait_frac"][f] <= 1.0 for f in bench.FEEDS)
    assert all(r["peak_mem_bytes"][f] is None for f in bench.FEEDS)  # CPU: no device memory figure
    ratios = r["ratios"]
    assert ratios["radstream_vs_model_only"] == pytest.approx(rate["radstream"] / rate["model_only"])
    assert ratios["radstream_vs_original"] == pytest.approx(rate["radstream"] / rate["original"])
    # the ceiling: radstream cannot beat a batch already on the device (beyond the noise of 4 tiny steps)
    assert rate["model_only"] * 1.5 >= rate["radstream"], rate
    assert set(r["augment"]) == {"kornia", "torch"} and all(v > 0 for v in r["augment"].values())
    assert r["augment_check"]["max_abs_diff"] <= 2e-4  # the two warps give the same pixels
    assert {f.name for f in fields(bench.Settings)} <= set(r["settings"])
    assert r["settings"]["image_size"] == 32 and r["settings"]["precision"] == "no"
    assert r["device"] == "cpu" and r["torch"] == torch.__version__
    assert "| radstream |" in capsys.readouterr().out


@pytest.mark.slow
def test_original_is_skipped_with_a_reason_without_raw_films(tmp_path, phantom_shards):
    r = _run(tmp_path, phantom_shards, "--no-channels-last", "--warp", "torch")
    assert r["img_per_s"]["original"] is None and "--raw" in r["skipped"]["original"]
    assert r["ratios"]["radstream_vs_original"] is None
    assert r["settings"]["channels_last"] is False and r["settings"]["warp"] == "torch"


def _batches(delay: float, first_delay: float = 0.0):
    def gen():
        time.sleep(first_delay)  # a loader's start-up (worker processes): the warmup's, not the window's
        while True:
            time.sleep(delay)
            yield Batch(images=torch.zeros(2, 1, 4, 4, dtype=torch.uint8), labels=torch.zeros(2), keys=["a", "b"])

    return gen()


def test_data_wait_is_the_share_of_the_window_blocked_on_the_loader():
    settings = bench.Settings(shards="-", steps=5, warmup=1)
    cpu = torch.device("cpu")
    starved = bench.measure(lambda b: time.sleep(0.002), _batches(0.03), cpu, settings)
    fed = bench.measure(lambda b: time.sleep(0.03), _batches(0.0, first_delay=0.5), cpu, settings)
    assert starved.data_wait_frac > 0.8 and fed.data_wait_frac < 0.2
    assert starved.steps == fed.steps == 5
    assert fed.img_per_s == pytest.approx(10 / fed.seconds)


def test_measure_pulls_exactly_warmup_plus_steps_batches():
    pulled = []
    batches = (pulled.append(i) or b for i, b in zip(itertools.count(), _batches(0.0)))
    bench.measure(lambda b: None, batches, torch.device("cpu"), bench.Settings(shards="-", steps=3, warmup=2))
    assert len(pulled) == 5
