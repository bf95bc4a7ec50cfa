"""Operating points: chosen on validation from known scores, frozen in the card, applied to test and by predict."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.statistics import operating
from train.card import ModelCard
from train.validation import choose

CLASSES = ["A", "B", "C"]


def _probs(scores_a: list[float]) -> np.ndarray:
    a = np.asarray(scores_a)
    rest = (1 - a) / 2
    return np.stack([a, rest, rest], axis=1)


def test_youden_and_target_sensitivity_thresholds_from_known_scores():
    # class A positives score 0.9 0.8 0.7 0.65, negatives 0.6 0.5 0.3 0.1: 0.65 separates them (J = 1)
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    probs = _probs([0.9, 0.8, 0.7, 0.65, 0.6, 0.5, 0.3, 0.1])
    points = choose(labels, probs, CLASSES, target=0.75)
    a = points["A"]
    assert a["youden"] == {"threshold": 0.65, "sensitivity": 1.0, "specificity": 1.0}
    # the most specific threshold that still finds 3 of the 4 positives
    assert a["target_sensitivity"]["threshold"] == 0.7 and a["target_sensitivity"]["sensitivity"] == 0.75
    assert a["target_sensitivity"]["specificity"] == 1.0 and a["target_sensitivity"]["target"] == 0.75


def test_frozen_points_applied_to_test_with_intervals():
    points = {"A": {"youden": {"threshold": 0.65}, "target_sensitivity": {"threshold": 0.85}}}
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 1, 2])
    probs = _probs([0.9, 0.8, 0.7, 0.6, 0.66, 0.5, 0.3, 0.1, 0.2, 0.2])
    out = operating.apply(labels, probs, CLASSES, points, n_resamples=300, seed=0)["A"]
    assert (out["youden"]["sensitivity"], out["youden"]["specificity"]) == pytest.approx((3 / 4, 5 / 6))
    assert (out["target_sensitivity"]["sensitivity"], out["target_sensitivity"]["specificity"]) == (0.25, 1.0)
    lo, hi = out["youden"]["sensitivity_ci95"]
    assert 0 <= lo <= 0.75 <= hi <= 1


def test_the_report_shows_validation_beside_test_and_a_missed_target():
    from evaluation.report.document import operating_section

    val_labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    points = choose(val_labels, _probs([0.9, 0.8, 0.7, 0.65, 0.6, 0.5, 0.3, 0.1]), CLASSES, target=0.75)
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 1, 2])
    out = operating.apply(labels, _probs([0.9, 0.8, 0.6, 0.6, 0.66, 0.5, 0.3, 0.1, 0.2, 0.2]), CLASSES, points, 0)
    target = out["A"]["target_sensitivity"]
    assert target["validation"] == {"sensitivity": 0.75, "specificity": 1.0, "target": 0.75}
    assert target["sensitivity"] == 0.5 and out["A"]["youden"]["validation"] == {"sensitivity": 1.0, "specificity": 1.0}
    text = "\n".join(operating_section({"operating_points": out}, "test"))
    assert "| A | sensitivity ≥ 0.75 | 0.700 | 0.75 | 1.00 | 0.50 | 1.00 |" in text
    assert "Below the sensitivity target on test, though met on validation: A 0.500; B 0.667." in text
    # with intervals: 2 of 4 positives reach up to 0.75, so the target is not called clearly missed
    with_ci = operating.apply(labels, _probs([0.9, 0.8, 0.6, 0.6, 0.66, 0.5, 0.3, 0.1, 0.2, 0.2]), CLASSES, points, 200)
    text = "\n".join(operating_section({"operating_points": with_ci}, "test"))
    assert "A 0.500 (" in text and "within its interval" in text


def test_points_survive_the_card_and_change_predictions(tmp_path):
    points = {
        "A": {"youden": {"threshold": 0.3}, "target_sensitivity": {"threshold": 0.05}},
        "B": {"youden": {"threshold": 0.9}, "target_sensitivity": {"threshold": 0.2}},
    }
    card = ModelCard(model="resnet18", classes=tuple(CLASSES), image_size=64, stored_size=299, operating_points=points)
    assert ModelCard.from_dict(card.to_dict()).operating_points == points
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.25, 0.65]])
    assert operating.flags(probs, CLASSES, points, "youden") == [["A"], []]
    assert operating.flags(probs, CLASSES, points, "target_sensitivity") == [["A", "B"], ["A", "B"]]
    assert probs.argmax(1).tolist() == [0, 2]  # argmax alone says something else again
