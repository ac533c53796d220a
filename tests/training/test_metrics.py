"""Metrics: names and values against scikit-learn, the vectorised bootstrap, fold summaries, selection."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    roc_auc_score,
)

from wsi_mil.training.metrics import (
    SCALAR_METRICS,
    bootstrap_intervals,
    classification_metrics,
    is_improvement,
    resampled_metrics,
    selection_key,
    summarize_folds,
)


def _predictions(num: int, num_classes: int, seed: int, *, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num)
    logits = rng.normal(size=(num, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    if ties:
        logits = np.round(logits)  # many exactly tied scores
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


@pytest.mark.parametrize("num_classes", [2, 3])
def test_point_metrics_equal_scikit_learn(num_classes):
    labels, probs = _predictions(60, num_classes, seed=num_classes)
    predicted = probs.argmax(axis=1)
    result = classification_metrics(labels, probs)
    if num_classes == 2:
        expected_auc = roc_auc_score(labels, probs[:, 1])
    else:
        expected_auc = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert result["roc_auc_macro"] == pytest.approx(expected_auc)
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert result["f1_macro"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert result["accuracy_micro"] == pytest.approx(accuracy_score(labels, predicted))
    assert result["loss"] == pytest.approx(log_loss(labels, probs, labels=list(range(num_classes))))
    assert result["confusion_matrix"] == confusion_matrix(labels, predicted).tolist()
    assert result["n"] == 60
    assert "ci95" not in result


def test_macro_f1_is_not_micro():
    labels = np.array([0] * 9 + [1])
    probs = np.tile([0.9, 0.1], (10, 1))  # always predicts the majority class
    result = classification_metrics(labels, probs)
    assert result["accuracy_micro"] == pytest.approx(0.9)
    assert result["f1_macro"] == pytest.approx((18 / 19 + 0.0) / 2)
    assert result["balanced_accuracy"] == pytest.approx(0.5)


def test_auc_undefined_with_one_class():
    result = classification_metrics(np.zeros(5, dtype=int), np.tile([0.6, 0.4], (5, 1)))
    assert result["roc_auc_macro"] is None
    assert result["accuracy_micro"] == 1.0


@pytest.mark.parametrize(("num_classes", "ties"), [(2, False), (2, True), (3, False), (4, True)])
def test_vectorised_resamples_equal_scikit_learn(num_classes, ties):
    labels, probs = _predictions(25, num_classes, seed=7, ties=ties)
    index = np.random.default_rng(0).integers(0, 25, (40, 25))
    fast = resampled_metrics(labels, probs, index)
    for r in range(40):
        expected = classification_metrics(labels[index[r]], probs[index[r]])
        for name in SCALAR_METRICS:
            if expected[name] is None:
                assert np.isnan(fast[name][r])
            else:
                assert fast[name][r] == pytest.approx(expected[name], abs=1e-9), (name, r)


def test_bootstrap_intervals_bracket_the_estimate_and_are_seeded():
    labels, probs = _predictions(80, 2, seed=1)
    result = classification_metrics(labels, probs, bootstrap_samples=500, seed=3)
    for name in SCALAR_METRICS:
        low, high = result["ci95"][name]
        assert low <= result[name] <= high
        assert high - low > 0
    again = classification_metrics(labels, probs, bootstrap_samples=500, seed=3)
    assert again["ci95"] == result["ci95"]
    assert bootstrap_intervals(labels, probs, samples=500, seed=4) != result["ci95"]


def test_summarize_folds_mean_and_sample_sd():
    folds = [{"roc_auc_macro": 0.8, "loss": 0.5}, {"roc_auc_macro": 0.9, "loss": 0.3}, {"roc_auc_macro": None, "loss": 0.4}]
    summary = summarize_folds(folds)
    assert summary["roc_auc_macro"] == {"mean": pytest.approx(0.85), "sd": pytest.approx(np.std([0.8, 0.9], ddof=1)), "n_folds": 2}
    assert summary["loss"]["mean"] == pytest.approx(0.4) and summary["loss"]["n_folds"] == 3
    assert summary["f1_macro"] == {"mean": None, "sd": None, "n_folds": 0}


def test_selection_prefers_the_metric_then_the_lower_loss():
    auc_high = selection_key({"roc_auc_macro": 0.9, "loss": 0.6}, "roc_auc_macro")
    auc_tie_lower_loss = selection_key({"roc_auc_macro": 0.9, "loss": 0.4}, "roc_auc_macro")
    auc_low = selection_key({"roc_auc_macro": 0.8, "loss": 0.1}, "roc_auc_macro")
    assert is_improvement(auc_high, None)
    assert is_improvement(auc_tie_lower_loss, auc_high)
    assert not is_improvement(auc_low, auc_high)
    assert not is_improvement(selection_key({"roc_auc_macro": None, "loss": 0.1}, "roc_auc_macro"), None)
    assert is_improvement(selection_key({"loss": 0.2}, "loss"), selection_key({"loss": 0.3}, "loss"))
