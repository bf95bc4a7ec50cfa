"""build: splits, leakage safety, determinism, no-op, bad inputs, interoperability."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import tarfile

import numpy as np
import pytest
from PIL import Image

from sharding import build as build_mod
from sharding.build import BuildError, build_shards, run_build
from sharding.contract import CLASSES, DATASET_DIR, IMAGE_SIZE, SPLITS
from sharding.manifest import load_manifest
from sharding.phantom import PhantomSpec, generate
from sharding.verify import iter_samples, verify


def tree_digest(root):
    """{relative path: sha256} of every file under root (hidden ones included)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _samples(shards):
    m = load_manifest(shards)
    for split in SPLITS:
        for shard in m.split(split).shards:
            for sample in iter_samples(shards / shard.name):
                yield split, shard.name, sample


def test_manifest_layout_and_counts(built_raw):
    m = load_manifest(built_raw)
    assert m.classes == CLASSES and m.image_size == IMAGE_SIZE and m.encoding == "raw" and not m.masks
    assert set(m.splits) == set(SPLITS)
    names = sorted(p.name for p in built_raw.iterdir())
    assert names == sorted(["manifest.json"] + [s.name for sp in SPLITS for s in m.split(sp).shards])
    for split in SPLITS:
        for i, shard in enumerate(m.split(split).shards):
            assert shard.name == f"{split}-{i:06d}.tar"
            assert re.fullmatch(r"[0-9a-f]{64}", shard.sha256)
            assert shard.samples <= 8
    assert m.counts["scanned"] == m.counts["written"] + m.counts["skipped"] == 48
    assert m.shard_urls("train", "/x")[0] == "/x/train-000000.tar"
    assert m.build["fingerprint"] and m.build["options"]["shard_size"] == 8


def test_split_proportions_per_class_within_one(built_raw):
    m = load_manifest(built_raw)
    totals = np.sum([m.split(s).class_counts for s in SPLITS], axis=0)
    for split, frac in zip(SPLITS, (0.8, 0.1, 0.1)):
        for c, got in enumerate(m.split(split).class_counts):
            assert abs(got - frac * totals[c]) <= 1, (split, CLASSES[c], got, totals[c])


def test_no_duplicate_group_crosses_splits_and_json_meta(built_raw, phantom_raw):
    m = load_manifest(built_raw)
    split_of_sha: dict[str, set] = {}
    split_of_key = {}
    for split, _, sample in _samples(built_raw):
        meta = json.loads(sample["json"])
        assert meta["split"] == split
        assert (phantom_raw / meta["path"]).is_file() and "source" in meta
        assert meta["orig_size"] == [299, 299] and meta["orig_mode"] == "L"
        split_of_sha.setdefault(meta["sha256"], set()).add(split)
        split_of_key[sample["__key__"]] = split
    assert all(len(s) == 1 for s in split_of_sha.values())
    assert len(split_of_sha) < 48, "the phantom has exact duplicates: they must collapse to one hash"
    assert m.duplicate_groups
    for g in m.duplicate_groups:
        assert {split_of_key[k] for k in g["members"]} == {g["split"]}


def test_every_train_shard_mixes_classes(built_raw):
    m = load_manifest(built_raw)
    for shard in m.split("train").shards:
        assert sum(1 for c in shard.class_counts if c) >= 2, shard


def test_byte_identical_rebuild_with_one_and_two_workers(phantom_raw, built_raw, tmp_path, monkeypatch):
    build_shards(phantom_raw, tmp_path / "a", shard_size=8, workers=1, progress=False)
    monkeypatch.setattr(build_mod, "MIN_PER_WORKER", 1)  # use the process pool even for 48 images
    build_shards(phantom_raw, tmp_path / "b", shard_size=8, workers=2, progress=False)
    assert tree_digest(tmp_path / "a") == tree_digest(built_raw) == tree_digest(tmp_path / "b")


def test_other_seed_other_split(phantom_raw, built_raw, tmp_path):
    m = build_shards(phantom_raw, tmp_path / "s1", shard_size=8, seed=1, workers=1, progress=False)
    assert m.seed == 1
    assert tree_digest(tmp_path / "s1") != tree_digest(built_raw)


def test_noop_rebuild_force_and_changed_input(raw_copy, tmp_path):
    out = tmp_path / "shards"
    first = run_build(raw_copy, out, shard_size=8, workers=1, progress=False)
    assert not first.noop
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    digest = tree_digest(out)
    again = run_build(raw_copy, out, shard_size=8, workers=1, progress=False)
    assert again.noop and again.manifest == first.manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    forced = run_build(raw_copy, out, shard_size=8, workers=1, progress=False, force=True)
    assert not forced.noop and tree_digest(out) == digest
    assert not run_build(raw_copy, out, shard_size=4, workers=1, progress=False).noop  # other options
    img = raw_copy / "COVID" / "images" / "COVID-1.png"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    assert not run_build(raw_copy, out, shard_size=4, workers=1, progress=False).noop  # touched input
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_raw_parent_or_dataset_folder_give_the_same_shards(phantom_raw, built_raw, tmp_path):
    build_shards(phantom_raw.parent, tmp_path / "p", shard_size=8, workers=1, progress=False)
    assert tree_digest(tmp_path / "p") == tree_digest(built_raw)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_skipped_listed_and_reconciled(raw_copy, tmp_path):
    covid = raw_copy / "COVID"
    good = (covid / "images" / "COVID-3.png").read_bytes()
    (covid / "images" / "zero.png").write_bytes(b"")
    (covid / "images" / "truncated.png").write_bytes(good[: len(good) // 2])
    (raw_copy / "Normal" / "images" / "notes.txt").write_text("not an image")
    (raw_copy / "Pneumothorax" / "images").mkdir(parents=True)
    (raw_copy / "Pneumothorax" / "images" / "P-1.png").write_bytes(good)
    (covid / "masks" / "COVID-1.png").unlink()
    (covid / "masks" / "COVID-2.png").write_bytes(_png_bytes(np.full((128, 256), 255, np.uint8)))
    # an RGBA and a 16-bit image in another size are converted, not skipped
    rgba = np.zeros((320, 320, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(raw_copy / "Normal" / "images" / "rgba.png")
    Image.fromarray((np.arange(400 * 400).reshape(400, 400) % 4096).astype(np.uint16)).save(
        raw_copy / "Normal" / "images" / "deep.png"
    )

    out = tmp_path / "shards"
    m = build_shards(raw_copy, out, include_masks=True, shard_size=8, workers=1, progress=False)
    reasons = {s["path"]: s["reason"] for s in m.skipped}
    assert set(reasons) == {
        "COVID/images/zero.png",
        "COVID/images/truncated.png",
        "Normal/images/notes.txt",
        "Pneumothorax/images/P-1.png",
    }
    assert "0 bytes" in reasons["COVID/images/zero.png"]
    assert "not a decodable image" in reasons["Normal/images/notes.txt"]
    assert "0x" not in reasons["Normal/images/notes.txt"]  # no memory addresses: the manifest is deterministic
    assert "unknown class" in reasons["Pneumothorax/images/P-1.png"]
    assert m.counts["scanned"] == 48 + 6 == m.counts["written"] + m.counts["skipped"]
    assert m.counts["written"] == 50
    issues = {i["path"]: i["reason"] for i in m.mask_issues}
    assert "no mask file" in issues["COVID/images/COVID-1.png"]
    assert "aspect" in issues["COVID/images/COVID-2.png"]
    seen = {}
    for _, _, sample in _samples(out):
        meta = json.loads(sample["json"])
        mask = np.load(io.BytesIO(sample["mask.png" if "mask.png" in sample else "mask.npy"]))
        seen[meta["path"]] = (meta, mask)
    meta, mask = seen["COVID/images/COVID-1.png"]
    assert meta["mask_missing"] is True and mask.shape == (1, 299, 299) and mask.max() == 0
    meta, mask = seen["COVID/images/COVID-3.png"]
    assert meta["mask_missing"] is False and set(np.unique(mask)) == {0, 1}
    assert seen["Normal/images/deep.png"][0]["orig_mode"].startswith("I")
    assert seen["Normal/images/rgba.png"][0]["orig_size"] == [320, 320]
    assert verify(out).ok

    with pytest.raises(BuildError, match="--strict: 8 input"):
        build_shards(raw_copy, tmp_path / "strict", include_masks=True, workers=1, strict=True, progress=False)
    assert not (tmp_path / "strict").exists()
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(BuildError, match="--strict: 8 input"):  # an unchanged set is no pass for --strict
        build_shards(raw_copy, out, include_masks=True, shard_size=8, workers=1, strict=True, progress=False)
    assert (out / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_strict_and_no_class_folders_exit_2_without_traceback(
    raw_copy, tmp_path, python_exe, subprocess_env, repo_root
):
    (raw_copy / "COVID" / "images" / "zero.png").write_bytes(b"")
    base = [python_exe, "-m", "sharding", "build", "--out", str(tmp_path / "s"), "--quiet", "--workers", "1"]
    run = subprocess.run(
        base + ["--raw", str(raw_copy), "--strict"], capture_output=True, text=True, env=subprocess_env, cwd=repo_root
    )
    assert run.returncode == 2 and "zero.png" in run.stderr and "Traceback" not in run.stderr
    empty = tmp_path / "empty"
    (empty / "stuff").mkdir(parents=True)
    run = subprocess.run(
        base + ["--raw", str(empty)], capture_output=True, text=True, env=subprocess_env, cwd=repo_root
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    for name in CLASSES + (DATASET_DIR, str(empty)):
        assert name in run.stderr


def test_refuses_to_replace_a_folder_that_is_not_a_shard_set(phantom_raw, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    with pytest.raises(BuildError, match="refusing"):
        build_shards(phantom_raw, out, workers=1, progress=False)
    assert (out / "thesis.tex").exists()


def test_near_duplicates_across_classes_grouped_and_reported(tmp_path):
    raw = generate(tmp_path / "raw", PhantomSpec(counts=(12,) * 4, seed=0, near_dup_fraction=0.1))
    m = build_shards(raw, tmp_path / "s", shard_size=8, near_dup_distance=6, workers=1, progress=False)
    near = [g for g in m.duplicate_groups if g["kind"] == "near"]
    assert near and all(g["mixed_labels"] for g in near)
    keys = {}
    for split, _, sample in _samples(tmp_path / "s"):
        keys[sample["__key__"]] = split
    for g in near:
        assert {keys[k] for k in g["members"]} == {g["split"]}
    plain = build_shards(raw, tmp_path / "p", shard_size=8, workers=1, progress=False)
    assert not [g for g in plain.duplicate_groups if g["kind"] == "near"]


# ----------------------------------------------------------------------------- interoperability


def test_tar_tf_lists_plain_members(built_raw):
    shard = built_raw / "train-000000.tar"
    names = subprocess.run(["tar", "tf", str(shard)], capture_output=True, text=True, check=True).stdout.split()
    assert len(names) == 8 * 3
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+\.(image\.npy|cls|json)", n) for n in names), names
    verbose = subprocess.run(["tar", "tvf", str(shard)], capture_output=True, text=True, check=True).stdout
    assert "1970-01-01" in verbose and "radstream" in verbose


def test_tarfile_and_numpy_alone(built_raw):
    with tarfile.open(built_raw / "val-000000.tar") as tar:
        members = tar.getmembers()
        npy = next(m for m in members if m.name.endswith(".image.npy"))
        arr = np.load(io.BytesIO(tar.extractfile(npy).read()), allow_pickle=False)
        cls = next(m for m in members if m.name.endswith(".cls"))
        label = int(tar.extractfile(cls).read())
    assert arr.dtype == np.uint8 and arr.shape == (1, 299, 299)
    assert 0 <= label < 4


def test_webdataset_standard_decoders(built_raw, built_png_masks):
    import webdataset as wds

    url = str(built_raw / "train-000000.tar")
    samples = list(wds.WebDataset(url, shardshuffle=False).decode())
    assert len(samples) == 8
    s = samples[0]
    assert s["image.npy"].shape == (1, 299, 299) and s["image.npy"].dtype == np.uint8
    assert isinstance(s["cls"], int) and s["json"]["split"] == "train"
    url = str(built_png_masks / "train-000000.tar")
    s = next(iter(wds.WebDataset(url, shardshuffle=False).decode("l8")))
    assert s["image.png"].shape == (299, 299) and s["image.png"].dtype == np.uint8
    assert set(np.unique(s["mask.png"])) <= {0, 1}


def test_png_matches_raw_pixels_and_is_smaller(built_raw, built_png_masks):
    raw = {s["__key__"]: s for _, _, s in _samples(built_raw)}
    png = {s["__key__"]: s for _, _, s in _samples(built_png_masks)}
    assert raw.keys() == png.keys()
    key = sorted(raw)[0]
    a = np.load(io.BytesIO(raw[key]["image.npy"]))[0]
    b = np.asarray(Image.open(io.BytesIO(png[key]["image.png"])))
    assert np.array_equal(a, b)
    raw_bytes = sum(s.bytes for sp in SPLITS for s in load_manifest(built_raw).split(sp).shards)
    png_m = load_manifest(built_png_masks)
    png_images = sum(len(s["image.png"]) for s in png.values())
    assert png_images < raw_bytes * 0.8
    assert png_m.masks and png_m.encoding == "png"


@pytest.mark.slow
def test_cli_build_summary_then_noop(phantom_raw, tmp_path, python_exe, subprocess_env, repo_root):
    cmd = [
        python_exe,
        "-m",
        "sharding",
        "build",
        "--raw",
        str(phantom_raw),
        "--out",
        str(tmp_path / "s"),
        "--shard-size",
        "16",
        "--workers",
        "1",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env, cwd=repo_root)
    assert run.returncode == 0, run.stderr
    assert "scanned 48 = written 48 + skipped 0" in run.stdout
    assert "duplicate groups" in run.stdout and "elapsed" in run.stdout
    for word in ("train", "val", "test") + CLASSES:
        assert word in run.stdout
    assert "img/s" in run.stderr  # the progress bar
    again = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env, cwd=repo_root)
    assert again.returncode == 0 and "nothing to do" in again.stdout
