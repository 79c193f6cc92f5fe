"""Weighted measures under bootstrap multiplicities agree with calibration.py's plain ones."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_tfdata.metrics import calibration, calibration_bootstrap
from tests.metrics import site_synthetic as synthetic


def test_unit_weights_give_the_plain_measures_and_integer_weights_repeat_images():
    site = synthetic.site(200, 0.4, seed=9)
    p = calibration.apply_temperature(site.raw, synthetic.TEMPERATURE, synthetic.LOGIT_SHIFT)
    plain = calibration_bootstrap.measure_replicates(np.ones((1, p.size)), site.labels, p)
    for measure, value in calibration.summary(site.labels, p).items():
        assert plain[measure][0] == pytest.approx(value)
    weights = calibration_bootstrap.cluster_weights(site.groups, p.size, 3, np.random.default_rng(0))
    repeated = calibration_bootstrap.measure_replicates(weights, site.labels, p)
    for row, w in enumerate(weights.astype(np.int64)):
        labels, probabilities = np.repeat(site.labels, w), np.repeat(p, w)
        for measure, value in calibration.summary(labels, probabilities).items():
            assert repeated[measure][row] == pytest.approx(value)


def test_cluster_weights_keep_a_patients_images_together():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    weights = calibration_bootstrap.cluster_weights(groups, 6, 50, np.random.default_rng(1))
    assert np.all(weights[:, 0] == weights[:, 1]) and np.all(weights[:, 3] == weights[:, 5])
    assert np.all(weights[:, [0, 2, 3]].sum(axis=1) == 3)  # three patients drawn each time


def test_a_percentile_interval_ignores_non_finite_replicates():
    assert calibration_bootstrap.percentile_interval(np.array([np.nan, np.inf])) == (None, None)
    low, high = calibration_bootstrap.percentile_interval(np.append(np.arange(1001.0), np.nan))
    assert (low, high) == (pytest.approx(25.0), pytest.approx(975.0))
