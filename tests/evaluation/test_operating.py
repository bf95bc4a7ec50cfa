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


def _reference_rates(labels, probs, c, threshold, n_resamples, seed):
    """Test sensitivity and specificity intervals at `threshold`, computed resample by resample in a loop from the
    operating-point stream (seeds.OPERATING): an independent computation of what `apply` vectorises."""
    from evaluation.statistics.bootstrap import interval, resample_indices, widen
    from sharding import seeds

    idx = resample_indices(labels, n_resamples, seeds.rng(seed, seeds.OPERATING))
    sens, spec = [], []
    for row in idx:
        y, hit = labels[row], probs[row, c] >= threshold
        sens.append(sum(h and t == c for h, t in zip(hit, y)) / sum(t == c for t in y))
        spec.append(sum(not h and t != c for h, t in zip(hit, y)) / sum(t != c for t in y))
    positive = labels == c
    point_sens = float((probs[positive, c] >= threshold).mean())
    point_spec = float((probs[~positive, c] < threshold).mean())
    return (
        widen(point_sens, interval(np.array(sens)), int(positive.sum())),
        widen(point_spec, interval(np.array(spec)), int((~positive).sum())),
    )


def test_apply_against_a_resample_by_resample_reference():
    """Thresholds equal to some scores (a film at the threshold is flagged), a class without positives and
    a class that is all of a split skipped without stopping the others, intervals for both rates."""
    rng = np.random.default_rng(3)
    labels = np.array([1] * 9 + [2] * 11)
    probs = rng.dirichlet([1, 1, 1], size=20)
    probs[:, 1] = np.round(probs[:, 1], 2)
    at = float(probs[4, 1])  # a positive film's score exactly at the threshold
    points = {
        name: {"youden": {"threshold": t, "sensitivity": 0.9}, "target_sensitivity": {"threshold": t, "target": 0.95}}
        for name, t in (("A", 0.5), ("B", at), ("C", 0.3))
    }
    got = operating.apply(labels, probs, CLASSES, points, n_resamples=300, seed=7)
    assert list(got) == ["B", "C"], "A has no positives: skipped, and the classes after it still evaluated"
    b = got["B"]["youden"]
    assert b["sensitivity"] == float((probs[labels == 1, 1] >= at).mean()) and probs[4, 1] == at
    assert (b["sensitivity_ci95"], b["specificity_ci95"]) == _reference_rates(labels, probs, 1, at, 300, 7)
    c = got["C"]["target_sensitivity"]
    assert (c["sensitivity_ci95"], c["specificity_ci95"]) == _reference_rates(labels, probs, 2, 0.3, 300, 7)
    assert c["validation"] == {"target": 0.95} and b["validation"] == {"sensitivity": 0.9}
    # another seed, other resamples
    assert operating.apply(labels, probs, CLASSES, points, 300, 8)["B"] != got["B"]
    # a threshold of 0 flags every film: the bootstrap has no width, the Wilson interval of 9/9 and 0/11 replaces it
    everything = {"B": {"youden": {"threshold": 0.0}, "target_sensitivity": {"threshold": 0.0}}}
    zero = operating.apply(labels, probs, CLASSES, everything, n_resamples=300, seed=7)["B"]["youden"]
    assert (zero["sensitivity"], zero["specificity"]) == (1.0, 0.0)
    assert (zero["sensitivity_ci95"], zero["specificity_ci95"]) == _reference_rates(labels, probs, 1, 0.0, 300, 7)
    assert zero["sensitivity_ci95"] == pytest.approx([_wilson(9, 9)[0], 1.0])
    assert zero["specificity_ci95"] == pytest.approx([0.0, _wilson(0, 11)[1]])
    # no resamples: point estimates only; a split holding one class only: nothing to report
    plain = operating.apply(labels, probs, CLASSES, points, n_resamples=0)["B"]["youden"]
    assert not [k for k in plain if k.endswith("_ci95")]
    assert operating.apply(np.ones(5, int), probs[:5], CLASSES, points) == {}
    assert operating.apply(np.zeros(0, int), np.zeros((0, 3)), CLASSES, points) == {}


def _wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval by its formula."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_apply_defaults_to_2000_resamples_and_seed_0():
    """300 films, so the interval endpoints move with the number of resamples (on a handful they do not)."""
    rng = np.random.default_rng(4)
    labels, probs = rng.integers(1, 3, 300), rng.dirichlet([1, 1, 1], size=300)
    points = {n: {"youden": {"threshold": 0.3}, "target_sensitivity": {"threshold": 0.4}} for n in CLASSES}
    default = operating.apply(labels, probs, CLASSES, points)
    assert default == operating.apply(labels, probs, CLASSES, points, 2000, 0)
    assert default != operating.apply(labels, probs, CLASSES, points, 2001, 0)
    assert default != operating.apply(labels, probs, CLASSES, points, 2000, 1)


def test_flags_include_a_score_exactly_at_the_threshold():
    points = {"A": {"youden": {"threshold": 0.5}}, "B": {"youden": {"threshold": 0.25}}}
    probs = np.array([[0.5, 0.25, 0.25], [0.49, 0.26, 0.25]])
    assert operating.flags(probs, CLASSES, points, "youden") == [["A", "B"], ["B"]]
