"""`sharding verify` names each kind of defect, one at a time, with its whole message.

Each shard is rewritten consistently (its new sha256 and size in the manifest, everything else the manifest
says left as it was), so only the defect itself is wrong: what a writer bug would produce, which no digest
catches. The expected problems are the whole list, message by message.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from sharding.manifest import load_manifest, write_manifest
from sharding.verify import decode_member, iter_samples, verify

from helpers.indexed_shards import make_image, write_shards
from helpers.shard_edits import rewrite_samples

LAYOUT = {"train": [3, 2], "val": [2], "test": [1]}
T0, V0 = "train/train-000000.tar", "val/val-000000.tar"


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def second(change):
    """An edit of the shard's second sample (s00001 in the first train shard)."""

    def edit(samples):
        samples[1] = change(dict(samples[1]))
        return samples

    return edit


def counts_line(got, manifest):
    return f"{T0}: class counts {got}, manifest says {manifest}"


DEFECTS = {
    "members": (
        "train",
        second(lambda s: {k: v for k, v in s.items() if k != "mask.npy"}),
        [
            f"{T0}: sample s00001 has members ['cls', 'image.npy', 'json'], expected ['cls', 'image.npy', 'json', "
            "'mask.npy']",
            counts_line([1, 0, 1, 0], [1, 1, 1, 0]),
        ],
    ),
    "label-past-the-classes": (
        "train",
        second(lambda s: {**s, "cls": b"4"}),  # 4 classes: 0..3
        [f"{T0}: sample s00001 label 4 out of range", counts_line([1, 0, 1, 0], [1, 1, 1, 0])],
    ),
    "split": (
        "train",
        second(lambda s: {**s, "json": json.dumps({**json.loads(s["json"]), "split": "val"}).encode()}),
        [f"{T0}: sample s00001 json says split 'val'"],
    ),
    "image-shape": (
        "train",
        second(lambda s: {**s, "image.npy": npy(make_image(1, 8))}),
        [f"{T0}: sample s00001 image.npy is uint8[1, 8, 8], expected uint8[1, 16, 16]"],
    ),
    "image-dtype": (
        "train",
        second(lambda s: {**s, "image.npy": npy(make_image(1).astype(np.uint16))}),
        [f"{T0}: sample s00001 image.npy is uint16[1, 16, 16], expected uint8[1, 16, 16]"],
    ),
    "mask-above-1": (
        "train",
        second(lambda s: {**s, "mask.npy": npy(np.full((1, 16, 16), 2, np.uint8))}),
        [f"{T0}: sample s00001 mask has values above 1"],
    ),
    "a-sample-fewer": (
        "train",
        lambda samples: samples[:2],
        [f"{T0}: 2 samples, manifest says 3", counts_line([1, 1, 0, 0], [1, 1, 1, 0])],
    ),
    "class-counts": ("train", second(lambda s: {**s, "cls": b"0"}), [counts_line([2, 0, 1, 0], [1, 1, 1, 0])]),
    "duplicate-key": (
        "val",
        lambda samples: [{**samples[0], "__key__": "s00000"}, *samples[1:]],  # a train film's key
        [f"{V0}: duplicate key s00000"],
    ),
}


@pytest.mark.parametrize("name", list(DEFECTS))
def test_each_defect_is_named_whole(tmp_path, name):
    split, edit, expected = DEFECTS[name]
    write_shards(tmp_path, LAYOUT, true_hashes=True)
    assert verify(tmp_path).ok
    rewrite_samples(tmp_path, split, edit)
    result = verify(tmp_path)
    assert result.problems == expected
    assert (result.shards, result.samples) == (4, 8)  # every shard visited, the manifest's sample count


def test_an_unreadable_member_is_reported_with_its_reason(tmp_path):
    write_shards(tmp_path, LAYOUT, true_hashes=True)
    rewrite_samples(tmp_path, "train", second(lambda s: {**s, "image.npy": b"not an npy file"}))
    (problem,) = verify(tmp_path).problems
    assert problem.startswith(f"{T0}: cannot read: ValueError: ")


def test_split_totals_and_written_counts_are_checked_against_the_shards(tmp_path):
    m = write_shards(tmp_path, LAYOUT, true_hashes=True)
    train = dataclasses.replace(m.split("train"), class_counts=(9, 9, 9, 9))
    write_manifest(dataclasses.replace(m, splits={**m.splits, "train": train}, counts={"written": 999}), tmp_path)
    assert verify(tmp_path).problems == [
        "split train: class counts [9, 9, 9, 9] != sum of its shards",
        "manifest counts say 999 written, shards hold 8",
    ]
    write_manifest(dataclasses.replace(m, counts={"written": 8}), tmp_path)
    assert verify(tmp_path).ok


def test_decode_member_refuses_pickles_other_modes_and_other_types():
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_member("image.npy", npy_object())
    rgb = io.BytesIO()
    Image.new("RGB", (4, 4)).save(rgb, format="PNG")
    with pytest.raises(ValueError, match=r"^PNG mode RGB, expected L$"):
        decode_member("image.png", rgb.getvalue())
    with pytest.raises(ValueError, match=r"^unknown member type 'image.bmp'$"):
        decode_member("image.bmp", b"")


def npy_object() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_iter_samples_skips_folders_and_refuses_compressed_tars(tmp_path):
    write_shards(tmp_path, {"train": [2]})
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(tmp_path / "with_folder.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        folder = tarfile.TarInfo("a_folder")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    assert [s["__key__"] for s in iter_samples(tmp_path / "with_folder.tar")] == ["s00000", "s00001"]
    (tmp_path / "packed.tar.gz").write_bytes(gzip.compress(shard.read_bytes()))
    with pytest.raises(tarfile.ReadError):
        list(iter_samples(tmp_path / "packed.tar.gz"))  # shards are plain tars: no transparent decompression
    assert load_manifest(tmp_path).split("train").samples == 2
