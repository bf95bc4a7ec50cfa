"""Bootstrap intervals: ~95 % coverage of the truth, replay with a seed, match sklearn, skip absent classes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from evaluation.statistics.bootstrap import auc_resamples, bootstrap_ci, fmt, resample_indices
from evaluation.statistics.metrics import classification_report
from train.validation import quick_metrics


def _predictions(rng, n: int, accuracy: float, n_classes: int = 3):
    labels = rng.integers(0, n_classes, n)
    right = rng.random(n) < accuracy
    preds = np.where(right, labels, (labels + rng.integers(1, n_classes, n)) % n_classes)
    probs = np.full((n, n_classes), 0.1)
    probs[np.arange(n), preds] = 0.8
    return labels, probs / probs.sum(1, keepdims=True)


def test_accuracy_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    """Repeated test sets drawn from a model of known accuracy 0.85: the interval must contain 0.85 in
    roughly 95 % of them (binomial sd of the hit rate over 200 draws is 1.5 points)."""
    rng = np.random.default_rng(123)
    hits = 0
    for i in range(200):
        labels, probs = _predictions(rng, 150, 0.85)
        lo, hi = bootstrap_ci(labels, probs, [0, 1, 2], n_resamples=400, seed=i)["accuracy"]
        hits += lo <= 0.85 <= hi
    assert 0.90 <= hits / 200 <= 0.99, hits


def test_seeded_intervals_replay_and_another_seed_differs():
    labels, probs = _predictions(np.random.default_rng(0), 120, 0.8)
    a = bootstrap_ci(labels, probs, [0, 1, 2], 300, seed=7)
    assert a == bootstrap_ci(labels, probs, [0, 1, 2], 300, seed=7)
    assert a != bootstrap_ci(labels, probs, [0, 1, 2], 300, seed=8)


def test_resamples_keep_each_class_count():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 7)
    idx = resample_indices(labels, 50, np.random.default_rng(0))
    assert all(np.bincount(labels[row], minlength=3).tolist() == [5, 3, 7] for row in idx)


def test_vectorised_auc_equals_sklearn_with_ties_on_resamples():
    rng = np.random.default_rng(1)
    labels, probs = _predictions(rng, 90, 0.7)
    scores = np.round(probs[:, 0] + rng.random(90) * 0.05, 2)  # ties
    idx = resample_indices(labels, 5, rng)
    got = auc_resamples(scores, labels == 0, idx)
    want = [roc_auc_score((labels == 0)[row], scores[row]) for row in idx]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_absent_classes_are_reported_as_such_and_left_out_of_the_macro_averages():
    """A COVID/Normal-only test set of a 4-class model: macro-F1 over the 2 classes present, not 4."""
    classes = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    labels = np.array([0] * 30 + [2] * 30)
    probs = np.full((60, 4), 0.05)
    probs[np.arange(60), labels] = 0.85
    probs[:6, 1] = 0.9  # 6 COVID films predicted Lung_Opacity
    r = classification_report(labels, probs / probs.sum(1, keepdims=True), classes, bootstrap=200)
    assert r["classes_evaluated"] == ["COVID", "Normal"]
    assert r["per_class"]["Lung_Opacity"]["note"] == "no test samples"
    assert r["per_class"]["Lung_Opacity"]["f1"] is None
    f1_covid = 2 * 24 / (2 * 24 + 6)  # tp 24, fn 6, fp 0
    assert r["macro_f1"] == pytest.approx((f1_covid + 1.0) / 2)
    assert r["balanced_accuracy"] == pytest.approx((24 / 30 + 1.0) / 2)
    lo, hi = r["ci95"]["accuracy"]
    assert lo <= r["accuracy"] <= hi and set(r["per_class"]["COVID"]) >= {"sensitivity_ci95", "roc_auc_ci95"}
    assert quick_metrics(labels, probs, 4)["macro_f1"] == pytest.approx((f1_covid + 1.0) / 2)


def test_format():
    assert fmt(0.9, [0.8012, 0.9634]) == "0.90 (0.80–0.96)" and fmt(None, None) == "n/a"


def test_wilson_interval_by_hand_and_where_it_replaces_a_zero_width_bootstrap():
    from evaluation.statistics.bootstrap import widen, wilson

    lo, hi = wilson(30, 30)
    assert lo == pytest.approx(30 / (30 + 1.959964**2)) and hi == 1.0  # p = 1: lower bound n / (n + z^2)
    assert wilson(0, 30)[0] == 0.0 and wilson(0, 30)[1] == pytest.approx(1 - lo)
    assert wilson(5, 0) is None
    assert widen(1.0, [1.0, 1.0], 30) == wilson(30, 30)
    assert widen(0.9, [0.8, 0.97], 30) == [0.8, 0.97], "a bootstrap interval with width stays"
    # in a report: a class that is always right gets a Wilson interval, a class never predicted has no PPV
    labels = np.array([0] * 30 + [1] * 30 + [2] * 10)
    probs = np.zeros((70, 4))
    probs[np.arange(70), np.where(labels == 2, 1, labels)] = 1.0  # class 2 always called class 1
    report = classification_report(labels, probs, ["a", "b", "c", "d"], bootstrap=200, seed=0)
    assert report["per_class"]["a"]["sensitivity_ci95"] == pytest.approx(wilson(30, 30))
    assert report["per_class"]["c"]["ppv"] is None and report["per_class"]["c"]["sensitivity"] == 0.0
    assert report["per_class"]["c"]["sensitivity_ci95"] == pytest.approx(wilson(0, 10))


def test_a_model_calling_every_film_one_class_gets_intervals_with_width():
    """Each class's sensitivity is 0 or 1 in every stratified resample: the bootstrap alone says 0.43 (0.43-0.43)."""
    from evaluation.statistics.bootstrap import wilson

    labels = np.array([0] * 6 + [2] * 8)
    probs = np.zeros((14, 4))
    probs[:, 2] = 1.0
    report = classification_report(labels, probs, ["a", "b", "c", "d"], bootstrap=200, seed=0)
    assert report["accuracy"] == pytest.approx(8 / 14)
    assert report["ci95"]["accuracy"] == pytest.approx(wilson(8, 14))
    # balanced accuracy 0.5 = (0/6 + 8/8) / 2 has the variance of a proportion over 1 / (1/(4*6) + 1/(4*8)) films
    n_eff = 1 / (1 / 24 + 1 / 32)
    assert report["ci95"]["balanced_accuracy"] == pytest.approx(wilson(0.5 * n_eff, n_eff))
    lo, hi = report["ci95"]["balanced_accuracy"]
    assert lo < report["balanced_accuracy"] == 0.5 < hi
    # one rule for both: with equal classes, all right, balanced accuracy and accuracy get the same interval
    labels = np.repeat(np.arange(4), 5)
    report = classification_report(labels, np.eye(4)[labels], ["a", "b", "c", "d"], bootstrap=200, seed=0)
    assert report["ci95"]["balanced_accuracy"] == pytest.approx(report["ci95"]["accuracy"])
    assert report["ci95"]["accuracy"] == pytest.approx(wilson(20, 20))


def test_a_single_class_set_has_no_specificity():
    labels = np.zeros(20, np.int64)
    probs = np.tile([0.7, 0.1, 0.1, 0.1], (20, 1))
    report = classification_report(labels, probs, ["a", "b", "c", "d"], bootstrap=100, seed=0)
    assert report["per_class"]["a"]["specificity"] is None and report["per_class"]["a"]["sensitivity"] == 1.0


def _reference_intervals(labels, probs, present, n_resamples, seed):
    """bootstrap_ci computed resample by resample with scikit-learn (the same resamples: the BOOTSTRAP stream,
    drawn in blocks of CHUNK), then the 2.5 and 97.5 percentiles of the finite values: an independent
    computation of what bootstrap_ci vectorises, before any Wilson widening."""
    from sklearn.metrics import confusion_matrix

    from evaluation.statistics.bootstrap import CHUNK
    from sharding import seeds

    rng = seeds.rng(seed, seeds.BOOTSTRAP)
    rows = []
    for start in range(0, n_resamples, CHUNK):
        rows += list(resample_indices(labels, min(CHUNK, n_resamples - start), rng))
    k = probs.shape[1]
    out = {"accuracy": [], "balanced_accuracy": [], "macro_f1": [], "macro_roc_auc": []}
    per = {c: {"sensitivity": [], "specificity": [], "ppv": [], "roc_auc": []} for c in present}
    for row in rows:
        y, p = labels[row], probs[row].argmax(1)
        cm = confusion_matrix(y, p, labels=list(range(k)))
        out["accuracy"].append(np.trace(cm) / len(y))
        sens, f1s, aucs = [], [], []
        for c in present:
            tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c].sum() - cm[c, c]
            tn = len(y) - tp - fp - fn
            sens.append(tp / (tp + fn))
            f1s.append(2 * tp / (2 * tp + fp + fn))
            per[c]["sensitivity"].append(tp / (tp + fn))
            per[c]["specificity"].append(tn / (tn + fp) if tn + fp else np.nan)
            per[c]["ppv"].append(tp / (tp + fp) if tp + fp else np.nan)
            aucs.append(roc_auc_score(y == c, probs[row, c]))
            per[c]["roc_auc"].append(aucs[-1])
        out["balanced_accuracy"].append(np.mean(sens))
        out["macro_f1"].append(np.mean(f1s))
        out["macro_roc_auc"].append(np.mean(aucs))

    def pct(values):
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        return [float(v) for v in np.percentile(values, [2.5, 97.5])] if len(values) else None

    return {k: pct(v) for k, v in out.items()} | {
        "per_class": {c: {k: pct(v) for k, v in d.items()} for c, d in per.items()}
    }


def test_bootstrap_ci_equals_a_resample_by_resample_sklearn_reference():
    """Three of four classes present, scores with ties, more resamples than one block (CHUNK = 100)."""
    rng = np.random.default_rng(11)
    labels = rng.choice([0, 1, 3], size=60, p=[0.5, 0.3, 0.2])
    probs = rng.dirichlet([1, 1, 1, 1], size=60).round(1) + 1e-3
    probs /= probs.sum(1, keepdims=True)
    got = bootstrap_ci(labels, probs, [0, 1, 3], n_resamples=137, seed=4)
    want = _reference_intervals(labels, probs, [0, 1, 3], 137, 4)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert set(got["per_class"]) == {0, 1, 3}
    for c in (0, 1, 3):
        for key, value in want["per_class"][c].items():
            assert got["per_class"][c][key] == pytest.approx(value, abs=1e-12), (c, key)
    assert bootstrap_ci(labels, probs, [0, 1, 3], n_resamples=137) == bootstrap_ci(labels, probs, [0, 1, 3], 137, 0)


def test_wilson_bounds_stay_inside_0_1_where_rounding_would_leave_them():
    """20 of 20 computes an upper bound of 1.0000000000000002 and 0 of 7 a lower one of -3e-17: clipped."""
    from evaluation.statistics.bootstrap import wilson

    assert wilson(20, 20)[1] == 1.0 and wilson(0, 7)[0] == 0.0
    # 1 of 1 by hand: centre (1 + z²/2) / (1 + z²) = 0.603275, half z √(z²/4) / (1 + z²) = 0.396725
    assert wilson(1, 1) == pytest.approx([0.206549, 1.0], abs=1e-6), "one film still has an interval"
    assert wilson(0, 0) is None


def test_bootstrap_ci_defaults_two_classes_and_no_warnings():
    """Defaults 2000 resamples and seed 0; with exactly two classes present ROC-AUC intervals exist; a class
    never predicted (undefined PPV in every resample) raises no NumPy warning into the user's log."""
    import warnings

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 80)
    probs = np.column_stack([rng.random(80), rng.random(80), np.zeros(80)])
    probs /= probs.sum(1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = bootstrap_ci(labels, probs, [0, 1])
        never = bootstrap_ci(np.r_[labels, 2], np.r_[probs, [[0.5, 0.5, 0.0]]], [0, 1, 2], 100, 0)
    assert default == bootstrap_ci(labels, probs, [0, 1], 2000, 0) != bootstrap_ci(labels, probs, [0, 1], 2001, 0)
    assert default["macro_roc_auc"] is not None and default["per_class"][0]["roc_auc"] is not None
    assert never["per_class"][2]["ppv"] is None, "class 2 is never predicted: no PPV in any resample"


def test_zero_width_specificity_and_ppv_get_the_wilson_interval_of_their_own_count():
    """Class 0: 8 of 10 films called 0, 2 called 1; classes 1 and 2 always right. Class 0 is never given to a
    film of another class, so its PPV (8 of 8) and specificity (20 of 20) are 1 in every resample: their Wilson
    intervals count the 8 films called 0 and the 20 films of other classes, not class 0's 10."""
    from evaluation.statistics.bootstrap import wilson

    labels = np.repeat([0, 1, 2], 10)
    preds = labels.copy()
    preds[:2] = 1
    got = bootstrap_ci(labels, np.eye(3)[preds], [0, 1, 2], 200, 0)["per_class"]
    assert got[0]["ppv"] == pytest.approx(wilson(8, 8)) and got[0]["specificity"] == pytest.approx(wilson(20, 20))
    assert got[2]["sensitivity"] == pytest.approx(wilson(10, 10))
    lo, hi = got[1]["ppv"]  # 10 of 12 with the two of class 0 drawn 0 to 10 times: a bootstrap interval with width
    assert lo < 10 / 12 < hi and [lo, hi] != pytest.approx(wilson(10, 12))


def test_widen_leaves_what_it_cannot_or_need_not_widen():
    """No interval stays none; an interval with no value or no films is kept as it is; one film is enough for
    a Wilson interval, and an effective count may be a fraction."""
    from evaluation.statistics.bootstrap import widen, wilson

    assert widen(0.5, None, 10) is None
    assert widen(None, [0.5, 0.5], 10) == [0.5, 0.5]
    assert widen(0.5, [0.5, 0.5], 0) == [0.5, 0.5]
    assert widen(1.0, [1.0, 1.0], 1) == wilson(1, 1)
    assert widen(0.5, [0.5, 0.5], 2.5) == wilson(1.25, 2.5)


def test_auc_of_resamples_without_negatives_or_positives_is_nan_and_silent():
    import warnings

    scores = np.array([0.1, 0.4, 0.35, 0.8])
    idx = np.array([[0, 1, 2, 3], [3, 3, 0, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for positive in (np.ones(4, bool), np.zeros(4, bool)):
            assert np.isnan(auc_resamples(scores, positive, idx)).all()


@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered in divide")
def test_without_a_present_class_only_accuracy_has_an_interval():
    rng = np.random.default_rng(2)
    labels, probs = _predictions(rng, 40, 0.7)
    got = bootstrap_ci(labels, probs, [], 50, 0)
    assert got["accuracy"] is not None and got["per_class"] == {}
    assert got["balanced_accuracy"] is None and got["macro_f1"] is None and got["macro_roc_auc"] is None
