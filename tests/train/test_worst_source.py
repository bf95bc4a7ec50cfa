"""Worst-site model selection (issue 23, part 5): balanced accuracy per validation source, and the worst one."""

from __future__ import annotations

import numpy as np
import pytest

from train.validation import MIN_SOURCE_FILMS, per_source, quick_metrics, worst_source


def _probs(preds: list[int], n: int = 3) -> np.ndarray:
    return np.eye(n, dtype=np.float32)[preds]


def test_balanced_accuracy_is_the_mean_recall_of_the_classes_present():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    preds = [0, 0, 0, 1, 1, 0, 2]  # recalls 3/4, 1/2, 1
    assert quick_metrics(labels, _probs(preds), 3)["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert quick_metrics(labels[:4], _probs(preds[:4]), 3)["balanced_accuracy"] == 0.75  # only class 0 present
    assert quick_metrics(np.array([], np.int64), np.zeros((0, 3)), 3)["balanced_accuracy"] == 0.0


def test_the_worst_source_by_hand():
    labels = np.array([0] * 12 + [1] * 12 + [0] * 5 + [1] * 12)
    preds = [0] * 12 + [1] * 6 + [0] * 6 + [1] * 5 + [1] * 12
    sources = ["a"] * 24 + ["tiny"] * 5 + ["b"] * 12
    table = per_source(labels, _probs(preds, 2), sources, 2)
    assert table["a"] == pytest.approx(
        {"films": 24, "accuracy": 0.75, "macro_f1": table["a"]["macro_f1"], "balanced_accuracy": 0.75}
    )
    assert table["tiny"]["films"] == 5 and table["tiny"]["balanced_accuracy"] == 0.0
    assert table["b"]["balanced_accuracy"] == 1.0
    assert MIN_SOURCE_FILMS == 10
    assert worst_source(table, 0.9) == ("a", 0.75)  # "tiny" has too few films to select by


@pytest.mark.parametrize(
    "table",
    [
        {},
        {"a": {"films": 40, "balanced_accuracy": 0.6}},
        {"a": {"films": 40, "balanced_accuracy": 0.6}, "b": {"films": 3, "balanced_accuracy": 0.1}},
    ],
)
def test_with_fewer_than_two_countable_sources_it_is_the_overall_figure(table):
    assert worst_source(table, 0.83) == ("all", 0.83)


def test_ties_go_to_the_first_source_by_name():
    table = {"z": {"films": 20, "balanced_accuracy": 0.5}, "m": {"films": 20, "balanced_accuracy": 0.5}}
    assert worst_source(table, 0.9) == ("m", 0.5)


def test_films_of_no_known_source_never_count_as_a_site():
    table = {
        "unknown": {"films": 50, "balanced_accuracy": 0.1},
        "a": {"films": 20, "balanced_accuracy": 0.7},
        "b": {"films": 20, "balanced_accuracy": 0.9},
    }
    assert worst_source(table, 0.8) == ("a", 0.7)
    assert worst_source({"unknown": table["unknown"], "a": table["a"]}, 0.8) == ("all", 0.8)
