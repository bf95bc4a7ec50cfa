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
