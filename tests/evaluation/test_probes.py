"""Shortcut probes: which pixels each probe keeps, the fill, chance levels and when a probe flags a shortcut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.audits.probes import PROBES, SHORTCUT_MARGIN, chance_levels, probe_augment, probe_result, verdict
from pipeline.augment import DeviceAugment


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 1, 8, 8), generator=g, dtype=torch.uint8)
    masks = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    masks[:, :, 2:6, 1:4] = 1  # "lungs": a 4x3 block
    return images, masks


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_probe_keeps_its_region_and_fills_the_rest_with_the_kept_mean(probe):
    augment = DeviceAugment(train=False, channels_last=False)
    images, masks = _batch()
    full, _ = augment(images, masks)
    x, _ = probe_augment(augment, probe)(images, masks)
    lungs = masks.bool()
    keep = lungs if probe == "lungs_only" else ~lungs
    assert torch.equal(x[keep], full[keep]), "kept pixels are untouched"
    for i in range(3):
        kept, blanked = full[i][keep[i]], x[i][~keep[i]]
        # the fill is one value per film: the mean of that film's kept pixels (nothing of the blanked region)
        torch.testing.assert_close(blanked, torch.full_like(blanked, float(kept.mean())))


def test_lungs_blanked_input_does_not_depend_on_the_lungs():
    augment = DeviceAugment(train=False)
    images, masks = _batch()
    other = images.clone()
    other[masks.bool()] = 255 - other[masks.bool()]  # different lungs, same surroundings
    probe = probe_augment(augment, "lungs_blanked")
    assert torch.equal(probe(images, masks)[0], probe(other, masks)[0])


def test_probe_needs_masks_and_a_known_name():
    augment = DeviceAugment(train=False)
    images, _ = _batch()
    with pytest.raises(ValueError, match="--include-masks"):
        probe_augment(augment, "lungs_only")(images, None)
    with pytest.raises(ValueError, match="unknown probe"):
        probe_augment(augment, "heart_only")


def test_chance_levels_by_hand():
    assert chance_levels(np.array([0, 0, 0, 1, 2, 2])) == {"accuracy": 0.5, "balanced_accuracy": pytest.approx(1 / 3)}
    # a class absent from the labels does not count
    assert chance_levels(np.array([0, 3, 3, 3]))["balanced_accuracy"] == 0.5


def _probs(labels, preds, n_classes=4):
    probs = np.full((len(labels), n_classes), 0.1 / (n_classes - 1), np.float32)
    probs[np.arange(len(labels)), preds] = 0.9
    return probs


def test_a_probe_far_above_chance_flags_and_one_at_chance_does_not():
    labels = np.repeat(np.arange(4), 50)
    rng = np.random.default_rng(0)
    reading = np.where(rng.random(200) < 0.8, labels, (labels + 1) % 4)  # 80 % right with the lungs gone
    blind = np.zeros(200, np.int64)  # one class for everything: exactly chance
    flagged = probe_result(labels, _probs(labels, reading), 500, seed=0)
    calm = probe_result(labels, _probs(labels, blind), 500, seed=0)
    assert flagged["shortcut"] and not calm["shortcut"]
    assert (flagged["outcome"], calm["outcome"]) == ("shortcut", "near chance")
    assert calm["balanced_accuracy"] == pytest.approx(0.25) and calm["accuracy"] == pytest.approx(0.25)
    assert calm["chance"] == {"accuracy": 0.25, "balanced_accuracy": 0.25}
    lo, hi = flagged["ci95"]["balanced_accuracy"]
    assert lo <= flagged["balanced_accuracy"] <= hi and lo > 0.25 + SHORTCUT_MARGIN
    assert "Shortcut" in verdict({"lungs_blanked": flagged}, ["a", "b", "c", "d"])
    assert "No shortcut" in verdict({"lungs_blanked": calm}, ["a", "b", "c", "d"])


def test_the_flag_is_judged_on_the_interval_not_the_point():
    # 8 films, one of two right in every class: 0.50 balanced accuracy, but the interval reaches chance
    labels = np.repeat(np.arange(4), 2)
    preds = np.array([0, 1, 1, 2, 2, 3, 3, 0])
    result = probe_result(labels, _probs(labels, preds), 1000, seed=0)
    assert result["balanced_accuracy"] > 0.25 + SHORTCUT_MARGIN and not result["shortcut"]
    assert result["outcome"] == "inconclusive"
    assert "inconclusive" in verdict({"lungs_blanked": result}, ["a", "b", "c", "d"])


def test_without_intervals_the_probe_is_not_judged():
    labels = np.repeat(np.arange(4), 50)
    result = probe_result(labels, _probs(labels, labels), 0, seed=0)  # perfect, but no bootstrap
    assert result["outcome"] == "not judged" and not result["shortcut"]
    assert verdict({"lungs_blanked": result}, ["a", "b", "c", "d"]).startswith("Shortcut probe not judged")


def _identity(images, masks):
    """A device transform that changes nothing (so the tests below choose the mask values exactly)."""
    return images.float(), masks.float()


def test_the_needs_masks_message_is_whole():
    images, _ = _batch()
    with pytest.raises(ValueError, match=r"^shortcut probes need lung masks: build the shards with --include-masks$"):
        probe_augment(DeviceAugment(train=False), "lungs_only")(images, None)


def test_a_pixel_at_exactly_half_a_mask_is_outside_the_lungs_and_one_kept_pixel_is_its_own_fill():
    images = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, 1, 1] = 1.0  # the only lung pixel: value 5
    masks[0, 0, 2, 2] = 0.5  # a resized edge exactly at half: not lung
    x, _ = probe_augment(_identity, "lungs_only")(images, masks)
    assert torch.equal(x, torch.full_like(x, 5.0))  # one kept pixel: the fill is its value, nothing halves it


def test_balanced_accuracy_and_the_boundary_of_near_chance_by_hand():
    # two classes of 10 films, 6 right in each: balanced accuracy 0.6 = chance 0.5 + the 0.10 margin exactly
    labels = np.repeat([0, 1], 10)
    preds = np.array([0] * 6 + [1] * 4 + [1] * 6 + [0] * 4)
    result = probe_result(labels, _probs(labels, preds, 2), 400, seed=0)
    assert result["balanced_accuracy"] == 0.6 and result["samples"] == 20
    assert result["outcome"] == "near chance"  # at the margin is near chance; above it would be inconclusive
    # uneven classes: 3 of 4 right in class 0, 1 of 2 in class 1 -> (0.75 + 0.5) / 2, accuracy 4/6
    labels = np.array([0, 0, 0, 0, 1, 1])
    result = probe_result(labels, _probs(labels, np.array([0, 0, 0, 1, 1, 0]), 2), 0, seed=0)
    assert result["balanced_accuracy"] == 0.625 and result["accuracy"] == pytest.approx(4 / 6)
    # three classes (two are symmetric): 1 of 2, 2 of 3 and 1 of 1 right -> (1/2 + 2/3 + 1) / 3
    labels = np.array([0, 0, 1, 1, 1, 2])
    result = probe_result(labels, _probs(labels, np.array([0, 1, 1, 1, 0, 2]), 3), 0, seed=0)
    assert result["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_the_intervals_follow_the_seed():
    labels = np.repeat(np.arange(4), 10)
    rng = np.random.default_rng(1)
    preds = np.where(rng.random(40) < 0.6, labels, (labels + 1) % 4)
    a, b = (probe_result(labels, _probs(labels, preds), 200, seed=s)["ci95"] for s in (0, 1))
    assert a == probe_result(labels, _probs(labels, preds), 200, seed=0)["ci95"] and a != b


def _blanked(bal, ci, **extra):
    return {
        "lungs_blanked": {
            "balanced_accuracy": bal,
            "ci95": {"balanced_accuracy": ci},
            "chance": {"balanced_accuracy": 0.25},
            **extra,
        }
    }


@pytest.mark.parametrize(
    "probe, sentence",
    [
        (
            {"outcome": "shortcut", "shortcut": True},
            "Shortcut: with the lungs blanked balanced accuracy is 0.62 (0.50–0.74) against a chance level of 0.25 "
            "over 4 classes: the model reads something outside the lungs.",
        ),
        (
            {"shortcut": True},  # a report written before `outcome` existed
            "Shortcut: with the lungs blanked balanced accuracy is 0.62 (0.50–0.74) against a chance level of 0.25 "
            "over 4 classes: the model reads something outside the lungs.",
        ),
        (
            {"shortcut": False},
            "No shortcut found by the probe: with the lungs blanked balanced accuracy is 0.62 (0.50–0.74) against a "
            "chance level of 0.25, within 0.10 of chance.",
        ),
        (
            {"outcome": "inconclusive", "shortcut": False},
            "Shortcut probe inconclusive: with the lungs blanked balanced accuracy is 0.62 (0.50–0.74) against a "
            "chance level of 0.25; the interval is too wide to tell (more films needed).",
        ),
    ],
)
def test_verdict_sentences_whole(probe, sentence):
    assert verdict(_blanked(0.62, [0.5, 0.74], **probe), ["a", "b", "c", "d"]) == sentence


def test_no_blanked_probe_no_verdict():
    assert verdict({}, ["a"]) == "" and verdict({"lungs_only": {}}, ["a"]) == ""


def test_a_lower_bound_exactly_at_the_margin_is_not_a_shortcut():
    # 5 films per class, 2 and 5 right: balanced accuracy 0.7; with 40 resamples (seed 10) the interval's
    # lower bound lands exactly on chance + margin = 0.6, which does not clear it
    labels = np.repeat([0, 1], 5)
    preds = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    result = probe_result(labels, _probs(labels, preds, 2), 40, seed=10)
    assert result["ci95"]["balanced_accuracy"][0] == 0.5 + SHORTCUT_MARGIN
    assert result["outcome"] == "inconclusive" and not result["shortcut"]
