"""Tests of cxr_tfdata.training.val_calibration: the operating threshold and the temperature fitted on val
when a stage ends, on a set whose miscalibration is known."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_tfdata.metrics import calibration
from cxr_tfdata.training import val_calibration


def _miscalibrated(true_temperature: float, n: int, seed: int):
    """Labels drawn from sigmoid(z) and a model reporting sigmoid(z * true_temperature) (as in
    tests/metrics/test_calibration.py)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < calibration.sigmoid(z)).astype(np.int64)
    return labels, calibration.sigmoid(z * true_temperature).astype(np.float32)


def test_sealing_rule_on_val_predictions():
    labels, probabilities = _miscalibrated(3.0, n=400, seed=1)
    values = val_calibration.fit_on_val(labels, probabilities, target_recall=0.9, split="val")
    positives = np.sort(probabilities[labels == 1])[::-1]
    needed = int(np.ceil(0.9 * positives.size))
    assert values["operating_threshold"] == pytest.approx(float(positives[needed - 1]))
    assert values["threshold_val_metrics"]["recall"] >= 0.9
    assert values["calibration"]["calibrated"]["ece"] < values["calibration"]["raw"]["ece"]
    assert values["temperature"] == pytest.approx(calibration.fit_temperature(labels, probabilities).temperature)
    with pytest.raises(ValueError):
        val_calibration.fit_on_val(np.zeros(4, np.int64), np.full(4, 0.3, np.float32), 0.95, "val")
