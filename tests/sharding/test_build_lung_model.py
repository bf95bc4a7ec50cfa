"""`sharding build --lung-model`: predicted masks for the films that lack one, marked, deterministic, refused well."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from sharding.build import BuildError, build_shards, run_build
from sharding.contract import SPLITS
from sharding.manifest import load_manifest
from sharding.phantom import PhantomSpec, generate
from sharding.preprocess import load_image
from sharding.segmenter import LungUNet, SegmenterSpec, load_segmenter, prepare, save_segmenter
from sharding.verify import iter_samples, verify


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """A random-init segmenter calibrated so that about half of a film's pixels are lungs: (path, sha256)."""
    out = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    spec = SegmenterSpec(size=32, width=4, depth=3)
    model = LungUNet(spec.width, spec.depth).eval()
    films = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 1, 32, 32), dtype=np.uint8))
    with torch.no_grad():
        model.head.bias -= model(prepare(films, spec)).median()
    path = out / "lungs.safetensors"
    return path, save_segmenter(model, spec, path)


@pytest.fixture(scope="module")
def raw_half_masked(tmp_path_factory):
    """The phantom (8 films a class) with the masks of COVID and Normal removed: the others keep drawn masks."""
    raw = generate(tmp_path_factory.mktemp("raw"), PhantomSpec(counts=(8, 8, 8, 8), seed=0))
    for name in ("COVID", "Normal"):
        shutil.rmtree(raw / name / "masks")
    return raw


def _samples(shards):
    m = load_manifest(shards)
    for split in SPLITS:
        for shard in m.split(split).shards:
            yield from iter_samples(shards / shard.name)


def test_films_without_a_mask_get_the_segmenters_and_say_whose(tmp_path, raw_half_masked, segmenter):
    path, sha = segmenter
    out = tmp_path / "s"
    m = build_shards(raw_half_masked, out, lung_model=path, shard_size=8, workers=1, progress=False)
    assert m.masks and m.build["options"]["lung_model"] == sha and m.build["options"]["include_masks"]
    assert m.counts["masks_predicted"] == 16 == len(m.mask_issues)
    seg = load_segmenter(path)
    seen = {"predicted": 0, "drawn": 0}
    for sample in _samples(out):
        meta = json.loads(sample["json"])
        mask = np.load(io.BytesIO(sample["mask.npy"]))[0]
        assert meta["mask_missing"] is False
        if meta["class"] in ("COVID", "Normal"):
            assert meta["mask_predicted_by"] == sha
            film = load_image(raw_half_masked / meta["path"])[0]
            assert np.array_equal(mask, seg.predict(film)), "the mask is the segmenter's on the stored film"
            assert 0 < mask.mean() < 1
            seen["predicted"] += 1
        else:
            assert "mask_predicted_by" not in meta
            seen["drawn"] += 1
    assert seen == {"predicted": 16, "drawn": 16}
    result = verify(out)
    assert result.problems == [] and result.samples == 32


#: Two forked workers for 32 films, from a parent whose torch thread pool is up: a forked child used to hang.
TWO_WORKERS = """
import sys, torch
from sharding import build
torch.set_num_threads(2)
torch.randn(512, 512) @ torch.randn(512, 512)
build.MIN_PER_WORKER = 1
build.build_shards(sys.argv[1], sys.argv[2], lung_model=sys.argv[3], shard_size=8, workers=2, progress=False)
"""


def test_the_same_bytes_with_one_worker_or_two_and_a_new_segmenter_rebuilds(
    tmp_path, raw_half_masked, segmenter, repo_root, subprocess_env
):
    path, _ = segmenter
    one, two = tmp_path / "one", tmp_path / "two"
    build_shards(raw_half_masked, one, lung_model=path, shard_size=8, workers=1, progress=False)
    cmd = [sys.executable, "-c", TWO_WORKERS, str(raw_half_masked), str(two), str(path)]
    env = dict(subprocess_env, OMP_NUM_THREADS="2")
    done = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in sorted(p.name for p in one.iterdir()):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert run_build(raw_half_masked, one, lung_model=path, workers=1, shard_size=8, progress=False).noop
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_segmenter(LungUNet(4, 3), SegmenterSpec(size=32, width=4, depth=3), other)
    report = run_build(raw_half_masked, one, lung_model=other, workers=1, shard_size=8, progress=False)
    assert not report.noop, "another segmenter means other masks: the fingerprint holds its digest"


def test_strict_accepts_missing_masks_that_the_segmenter_fills(tmp_path, raw_half_masked, segmenter):
    with pytest.raises(BuildError, match="--strict"):
        build_shards(raw_half_masked, tmp_path / "a", include_masks=True, strict=True, workers=1, progress=False)
    build_shards(raw_half_masked, tmp_path / "b", lung_model=segmenter[0], strict=True, workers=1, progress=False)
    again = run_build(raw_half_masked, tmp_path / "b", lung_model=segmenter[0], strict=True, workers=1, progress=False)
    assert again.noop


def test_a_drawn_mask_that_is_broken_stays_a_problem_to_fix(tmp_path, raw_half_masked, segmenter):
    """Only films that come without a mask are filled: a corrupt drawn mask is not papered over."""
    raw = tmp_path / "raw"
    shutil.copytree(raw_half_masked, raw)
    broken = raw / "Lung_Opacity" / "masks" / "Lung_Opacity-1.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(BuildError, match="Lung_Opacity-1.png \\(mask\\)"):
        build_shards(raw, tmp_path / "strict", lung_model=segmenter[0], strict=True, workers=1, progress=False)
    m = build_shards(raw, tmp_path / "s", lung_model=segmenter[0], workers=1, progress=False)
    assert m.counts["masks_predicted"] == 16 and len(m.mask_issues) == 17
    meta = next(json.loads(s["json"]) for s in _samples(tmp_path / "s") if s["__key__"] == "Lung_Opacity-1")
    assert meta["mask_missing"] is True and "mask_predicted_by" not in meta


def test_without_a_segmenter_the_options_are_as_they_always_were(tmp_path, raw_half_masked):
    m = build_shards(raw_half_masked, tmp_path / "s", include_masks=True, workers=1, progress=False)
    assert "lung_model" not in m.build["options"] and "masks_predicted" not in m.counts
    assert "torch" not in m.build["versions"]


def test_a_worker_that_finds_another_file_says_what_to_restore(segmenter):
    from sharding import encode
    from sharding.encode import SampleError

    encode._segmenter.cache_clear()
    with pytest.raises(SampleError, match="cannot load the lung model.*put the file the build started with back"):
        encode._segmenter(str(segmenter[0]), "0" * 64)


def test_a_file_that_is_not_a_segmenter_is_refused_before_the_scan(tmp_path, repo_root, subprocess_env):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"\x80\x04junk")
    cmd = [sys.executable, "-m", "sharding", "build", "--raw", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]
    run = subprocess.run(
        cmd + ["--lung-model", str(bad)], cwd=repo_root, env=subprocess_env, capture_output=True, text=True
    )
    assert run.returncode == 2 and "not a safetensors file" in run.stderr, run.stderr
    assert not (tmp_path / "o").exists()


def test_the_summary_says_the_masks_were_predicted(tmp_path, raw_half_masked, segmenter, repo_root, subprocess_env):
    cmd = [sys.executable, "-m", "sharding", "build", "--raw", str(raw_half_masked), "--out", str(tmp_path / "o")]
    cmd += ["--lung-model", str(segmenter[0]), "--workers", "1", "--quiet"]
    run = subprocess.run(cmd, cwd=repo_root, env=subprocess_env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"16 mask(s) predicted by the lung segmenter {segmenter[1][:12]}" in run.stdout
    assert "no mask file" not in run.stdout


def test_with_a_segmenter_a_node_must_also_match_torch_and_its_cpu_kernels():
    from sharding.executor import runtime_facts

    plain, with_segmenter = runtime_facts(), runtime_facts(segmenter=True)
    assert "torch" not in plain and "torch cpu kernels" not in plain
    from importlib.metadata import version

    assert with_segmenter["torch"] == version("torch") and with_segmenter["safetensors"] == version("safetensors")
    assert with_segmenter["torch cpu kernels"] == torch.backends.cpu.get_cpu_capability()
    assert {k: v for k, v in with_segmenter.items() if k in plain} == plain
