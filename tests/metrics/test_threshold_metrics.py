"""Tests of cxr_tfdata.metrics.threshold_metrics: the metrics at a threshold by hand, the operating threshold
that reaches a target recall, and float32 probabilities compared as cxr-predict compares them."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_tfdata.metrics import bootstrap, threshold_metrics


def test_binary_metrics_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    probabilities = np.array([0.1, 0.6, 0.4, 0.7, 0.5, 0.2, 0.9])
    m = threshold_metrics.binary_metrics(labels, probabilities, 0.5)
    # predicted: 0 1 0 1 1 0 1 -> tn=2 fp=1 fn=1 tp=3 (0.5 counts as positive)
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.75)
    # AUC: of 12 (pos, neg) pairs the positive scores higher in 9.
    assert m["roc_auc"] == pytest.approx(9 / 12)
    assert m["n"] == 7 and m["threshold"] == 0.5


def test_operating_threshold_is_highest_reaching_target():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probabilities = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1).round(2)  # with ties
    for target in (0.5, 0.8, 0.95, 1.0):
        t = threshold_metrics.choose_operating_threshold(labels, probabilities, target)
        assert threshold_metrics.binary_metrics(labels, probabilities, t)["recall"] >= target
        higher = probabilities[probabilities > t]
        if higher.size:
            next_up = higher.min()
            assert threshold_metrics.binary_metrics(labels, probabilities, next_up)["recall"] < target


def test_operating_threshold_needs_positives():
    with pytest.raises(ValueError, match="no PNEUMONIA"):
        threshold_metrics.choose_operating_threshold(np.zeros(4), np.linspace(0, 1, 4), 0.9)


def test_a_typed_threshold_labels_as_predict_and_the_export_do():
    """float32(0.7) is just below 0.7: every rule here compares in float64, as cxr-predict does."""
    probabilities = np.array([0.7, 0.9], np.float32)
    labels = np.array([1, 1])
    block = threshold_metrics.binary_metrics(labels, probabilities, 0.7)
    assert block["confusion_matrix"] == [[0, 0], [1, 1]]
    assert (float(probabilities[0]) >= 0.7) is False  # cxr-predict's comparison
    at_threshold = np.full(6, 0.7, np.float32)  # every resample holds only these: recall 0 in all of them
    intervals = bootstrap.bootstrap_intervals(np.ones(6), at_threshold, {"t": 0.7}, None, 20, 0)
    assert intervals["t"]["recall"] == [0.0, 0.0]
    report = threshold_metrics.classification_report(labels, probabilities, 0.7, as_dict=True)
    assert report["PNEUMONIA"]["recall"] == 0.5
