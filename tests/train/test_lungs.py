"""`python -m train.lungs`: a segmenter fitted on the phantom's drawn masks, its figures, its determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.loader import build_loader
from sharding.segmenter import dice_iou, load_segmenter, segmenter_card
from train.lungs import CARD, WEIGHTS, main

pytestmark = pytest.mark.slow

TINY = ["--size", "32", "--width", "8", "--epochs", "20", "--batch-size", "8", "--num-workers", "0"]


@pytest.fixture(scope="module")
def fitted(phantom_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("lungs")
    assert main(["fit", "--shards", str(phantom_shards), "--out", str(out), *TINY]) == 0
    return out


def test_fit_writes_the_weights_and_a_card_with_intervals(fitted, phantom_shards, capsys):
    card = json.loads((fitted / CARD).read_text())
    seg = load_segmenter(fitted / WEIGHTS)
    assert card["sha256"] == seg.sha256 and card["shards"] == str(phantom_shards)
    assert seg.spec.size == 32 and seg.spec.width == 8
    for split, films in (("val", 4), ("test", 4)):  # the phantom's 12 films a class split 10/1/1
        s = card["splits"][split]
        assert s["films"] == films and s["no_mask"] == 0
        lo, hi = s["dice"]["ci95"]
        assert lo <= s["dice"]["mean"] <= hi and 0.6 < s["dice"]["mean"] <= 1.0
        assert s["iou"]["mean"] < s["dice"]["mean"], "IoU is below Dice whenever they are not 1"
        assert len(s["worst"]) == films
    inner = segmenter_card(fitted / WEIGHTS)
    assert inner["options"]["size"] == 32 and 0 <= inner["epoch"] < 20 and inner["val_dice"] > 0.6


def test_its_dice_falls_against_shifted_masks(fitted, phantom_shards):
    """The score reads the masks: the same predictions against masks moved by 20 px score far lower."""
    seg = load_segmenter(fitted / WEIGHTS)
    loader = build_loader(str(phantom_shards), "test", batch_size=16, num_workers=0, masks=True, train=False)
    batch = next(iter(loader))
    pred = seg.masks(batch.images).numpy()
    right = dice_iou(pred, batch.masks.numpy())[0].mean()
    moved = dice_iou(pred, np.roll(batch.masks.numpy(), 20, axis=-1))[0].mean()
    assert right > 0.6 and moved < right - 0.1


def test_the_same_seed_gives_the_same_weights_file(fitted, phantom_shards, tmp_path):
    assert main(["fit", "--shards", str(phantom_shards), "--out", str(tmp_path), *TINY]) == 0
    assert (tmp_path / WEIGHTS).read_bytes() == (fitted / WEIGHTS).read_bytes()


def test_shards_without_drawn_masks_are_refused(tmp_path, capsys):
    from helpers.indexed_shards import write_shards

    write_shards(tmp_path / "s", masks=False)
    assert main(["fit", "--shards", str(tmp_path / "s"), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "carries no lung masks" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_shards_whose_train_masks_are_all_missing_and_bad_options_are_refused(tmp_path, phantom_raw, capsys):
    import shutil

    from sharding.build import build_shards

    raw = tmp_path / "raw"
    shutil.copytree(phantom_raw, raw)
    for masks in raw.glob("*/masks"):
        shutil.rmtree(masks)
    build_shards(raw, tmp_path / "s", include_masks=True, workers=1, progress=False)  # every mask all-zero
    assert main(["fit", "--shards", str(tmp_path / "s"), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "train split has a drawn lung mask: nothing to learn from" in capsys.readouterr().err
    assert main(["fit", "--shards", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--epochs", "0"]) == 2
    assert "need epochs, patience, batch size and width >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o" / WEIGHTS).exists()
