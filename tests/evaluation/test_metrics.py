"""Metrics equal hand-computed values; early stopping counts exactly `patience` epochs."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.statistics.metrics import classification_report
from train.loop import EarlyStopping

CLASSES = ["A", "B", "C"]


def test_report_matches_hand_computation():
    # true:  A A A B B C C C C C ; pred: A A B B C C C C A C
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    preds = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0, 2])
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), preds] = 0.8
    r = classification_report(labels, probs, CLASSES)
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 4]]
    assert r["accuracy"] == pytest.approx(7 / 10)
    a, b, c = r["per_class"]["A"], r["per_class"]["B"], r["per_class"]["C"]
    # A: tp 2, fp 1, fn 1, tn 6
    assert (a["precision"], a["sensitivity"], a["specificity"]) == pytest.approx((2 / 3, 2 / 3, 6 / 7))
    # B: tp 1, fp 1, fn 1, tn 7
    assert (b["precision"], b["sensitivity"], b["specificity"]) == pytest.approx((1 / 2, 1 / 2, 7 / 8))
    # C: tp 4, fp 1, fn 1, tn 4
    assert (c["precision"], c["sensitivity"], c["specificity"]) == pytest.approx((4 / 5, 4 / 5, 4 / 5))
    assert c["f1"] == pytest.approx(0.8)
    assert [a["support"], b["support"], c["support"]] == [3, 2, 5]
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)
    # every prediction has confidence 0.8; 7/10 right -> ECE = |0.8 - 0.7|
    assert r["ece"] == pytest.approx(0.1, abs=1e-6)
    assert r["confusion_matrix_normalized"][2] == pytest.approx([0.2, 0.0, 0.8])


def test_perfect_ranking_gives_auc_one():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[labels] * 0.9 + 0.1 / 3
    r = classification_report(labels, probs, CLASSES)
    assert r["macro_roc_auc"] == pytest.approx(1.0)
    assert all(r["per_class"][c]["roc_auc"] == pytest.approx(1.0) for c in CLASSES)


def test_early_stopping_after_exactly_patience_bad_epochs():
    stop = EarlyStopping(patience=3, mode="min")
    values = [1.0, 0.8, 0.9, 0.85, 0.81]
    flags = []
    for epoch, v in enumerate(values):
        flags.append((stop.step(v, epoch), stop.should_stop))
    assert flags == [(True, False), (True, False), (False, False), (False, False), (False, True)]
    assert (stop.best, stop.best_epoch) == (0.8, 1)
    restored = EarlyStopping(patience=3)
    restored.load_state_dict(stop.state_dict())
    assert restored == stop


def test_early_stopping_max_mode_and_min_delta():
    stop = EarlyStopping(patience=2, mode="max", min_delta=0.01)
    assert stop.step(0.5, 0)
    assert not stop.step(0.505, 1)  # within min_delta: not an improvement
    assert stop.step(0.6, 2)
    assert stop.bad_epochs == 0


def test_the_registry_drives_the_reports_intervals_tables_and_docs():
    from pathlib import Path

    import numpy as np

    from evaluation.report.external_section import external_section
    from evaluation.statistics import registry
    from evaluation.statistics.metrics import classification_report

    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    probs = np.eye(4)[[0, 1, 1, 1, 2, 3, 3, 3]] * 0.7 + 0.075
    report = classification_report(labels, probs, ["a", "b", "c", "d"], bootstrap=50, seed=0)
    assert set(registry.NAMES) <= set(report) and list(report["ci95"]) == list(registry.NAMES)
    row = {"samples": 8, "classes_evaluated": ["a"], "ci95": report["ci95"], "copies": 0, "split": "all"}
    row.update({m: report[m] for m in registry.SUMMARY_NAMES})
    text = "\n".join(external_section({"external": {"x": row}}))
    header = next(line for line in text.splitlines() if line.startswith("| shard set"))
    assert [m.label for m in registry.SUMMARY] == header.split(" | ")[3 : 3 + len(registry.SUMMARY)]
    docs = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text()
    assert registry.markdown() in docs, "docs/evaluation.md is stale: python -m evaluation.statistics.registry"


def _ece_by_hand(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Expected calibration error: equal-width confidence bins, |accuracy - confidence| weighted by bin share."""
    conf, right = probs.max(1), probs.argmax(1) == labels
    total = 0.0
    edges = np.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.sum() / len(conf) * abs(right[inside].mean() - conf[inside].mean())
    return total


def test_report_of_seven_films_worked_by_hand():
    """Class C has no films (between classes that have), D has one correct and one wrong; every rate by hand.

    confusion (rows true A B C D, columns predicted): A [2 1 0 0], B [1 1 0 0], C [0 0 0 0], D [1 0 0 1].
    """
    from evaluation.statistics.bootstrap import bootstrap_ci

    labels = np.array([0, 0, 0, 1, 1, 3, 3])
    probs = np.array(
        [
            [0.71, 0.09, 0.10, 0.10],
            [0.62, 0.18, 0.10, 0.10],
            [0.28, 0.52, 0.10, 0.10],
            [0.19, 0.61, 0.10, 0.10],
            [0.66, 0.24, 0.05, 0.05],
            [0.05, 0.08, 0.10, 0.77],
            [0.43, 0.17, 0.10, 0.30],
        ]
    )
    r = classification_report(labels, probs, ["A", "B", "C", "D"], bootstrap=300, seed=5)
    assert r["confusion_matrix"] == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]]
    assert r["confusion_matrix_normalized"] == [
        [0.6667, 0.3333, 0, 0],
        [0.5, 0.5, 0, 0],
        [0, 0, 0, 0],
        [0.5, 0, 0, 0.5],
    ]
    a, b, d = r["per_class"]["A"], r["per_class"]["B"], r["per_class"]["D"]
    # A: tp 2, fp 2, fn 1, tn 2 (so tn == fp); B: tp 1, fp 1, fn 1, tn 4; D: tp 1, fp 0, fn 1, tn 5
    want = {
        "A": (0.5, 2 / 3, 0.5, 4 / 7, 3, 9 / 12),
        "B": (0.5, 0.5, 0.8, 0.5, 2, 9 / 10),
        "D": (1.0, 0.5, 1.0, 2 / 3, 2, 1.0),
    }
    for entry, (ppv, sens, spec, f1, support, auc) in zip((a, b, d), want.values()):
        got = [entry[k] for k in ("precision", "sensitivity", "specificity", "f1", "support", "roc_auc")]
        assert got == pytest.approx([ppv, sens, spec, f1, support, auc]) and entry["ppv"] == entry["precision"]
    none = dict.fromkeys(("precision", "ppv", "sensitivity", "specificity", "f1", "roc_auc"))
    assert r["per_class"]["C"] == {"support": 0, "note": "no test samples", **none}
    assert r["classes_evaluated"] == ["A", "B", "D"] and r["samples"] == 7
    assert r["accuracy"] == pytest.approx(4 / 7) and r["balanced_accuracy"] == pytest.approx(5 / 9)
    assert r["macro_f1"] == pytest.approx(73 / 126) and r["macro_roc_auc"] == pytest.approx((0.75 + 0.9 + 1) / 3)
    # 15 bins: 0.61, 0.62 (right) and 0.66 (wrong) share a bin; 16 bins split them
    assert r["ece"] == pytest.approx(_ece_by_hand(probs, labels, 15), abs=1e-6)
    assert abs(_ece_by_hand(probs, labels, 15) - _ece_by_hand(probs, labels, 16)) > 0.05
    ci = bootstrap_ci(labels, probs, [0, 1, 3], 300, 5)
    assert r["ci95"] == {k: ci[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc")}
    assert {k: v for k, v in d.items() if k.endswith("_ci95")} == {
        f"{k}_ci95": v for k, v in ci["per_class"][3].items()
    }
    assert r["bootstrap"] == {"resamples": 300, "seed": 5, "stratified": True}
    assert classification_report(labels, probs, "ABCD", bootstrap=300, seed=6)["ci95"] != r["ci95"]


def defaults_probs() -> np.ndarray:
    return np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])


def test_report_edge_cases():
    with pytest.raises(ValueError, match=r"^classification_report needs at least one film \(an evaluation refuses"):
        classification_report(np.zeros(0, int), np.zeros((0, 2)), ["A", "B"])
    defaults = classification_report([0, 1, 1], defaults_probs(), "AB")
    assert defaults["bootstrap"] == {"resamples": 2000, "seed": 0, "stratified": True}
    assert defaults["ci95"] == classification_report([0, 1, 1], defaults_probs(), "AB", bootstrap=2000, seed=0)["ci95"]
    # one class only: no ROC curve anywhere; no resamples: no intervals
    one = classification_report(
        np.zeros(3, int), np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6]]), ["A", "B"], bootstrap=0
    )
    assert one["per_class"]["A"]["roc_auc"] is None and one["macro_roc_auc"] is None
    assert one["ci95"] == {} and not [k for k in one["per_class"]["A"] if k.endswith("_ci95")]
    # a class of one film: its row of the normalised matrix is that film's prediction
    single = classification_report(np.array([0, 1]), np.array([[0.9, 0.1], [0.3, 0.7]]), ["A", "B"], bootstrap=0)
    assert single["confusion_matrix_normalized"] == [[1.0, 0.0], [0.0, 1.0]]
    assert single["per_class"]["A"]["roc_auc"] == 1.0, "one positive is enough for a ROC curve"
