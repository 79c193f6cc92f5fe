"""Tests of cxr_tfdata.metrics.bootstrap: whole patients resampled, weighted metrics equal to explicit
resampling, intervals that bracket the estimate."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_tfdata.metrics import bootstrap, threshold_metrics
from tests import eval_fixtures


def test_cluster_weights_take_whole_patients():
    groups = ["a", "a", "b", "c", "c", "c"]
    weights = bootstrap.cluster_weights(groups, 6, 50, np.random.default_rng(1))
    assert weights.shape == (50, 6)
    np.testing.assert_array_equal(weights[:, 0], weights[:, 1])
    np.testing.assert_array_equal(weights[:, 3], weights[:, 5])
    # Three patients drawn with replacement per resample.
    np.testing.assert_array_equal(weights[:, [0, 2, 3]].sum(axis=1), 3)
    by_image = bootstrap.cluster_weights(None, 6, 50, np.random.default_rng(1))
    np.testing.assert_array_equal(by_image.sum(axis=1), 6)


def test_bootstrap_interval_matches_resampled_sklearn():
    """The weighted (multiplicity) computation equals explicitly resampling the images."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 60)
    probabilities = rng.random(60)
    groups = [f"p{i // 3}" for i in range(60)]
    weights = bootstrap.cluster_weights(groups, 60, 1, np.random.default_rng(7))[0]
    index = np.repeat(np.arange(60), weights.astype(int))
    expected = eval_fixtures.sklearn_metrics(labels[index], probabilities[index], 0.5)
    predicted = (probabilities >= 0.5).astype(int)
    threshold_part = bootstrap._weighted_threshold_metrics(weights[None], labels, predicted)
    ranking_part = bootstrap._weighted_ranking_metrics(weights[None], labels, probabilities)
    for key in ("accuracy", "precision", "recall", "specificity", "f1"):
        assert threshold_part[key][0] == pytest.approx(expected[key])
    for key in ("roc_auc", "pr_auc"):
        assert ranking_part[key][0] == pytest.approx(expected[key])


def test_bootstrap_intervals_bracket_the_estimate():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 300)
    probabilities = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    intervals = bootstrap.bootstrap_intervals(labels, probabilities, {"a": 0.5}, None, 300, 0)["a"]
    point = threshold_metrics.binary_metrics(labels, probabilities, 0.5)
    for key in threshold_metrics.HEADLINE_METRICS:
        low, high = intervals[key]
        assert low < point[key] < high, key
        assert high - low < 0.25, key
