"""Temperature scaling and the calibration measures (calibration.py), and the rule sealing.py applies
at the end of a stage, on sets whose miscalibration is known."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_tfdata import calibration, sealing


def _miscalibrated(true_temperature: float, n: int = 4000, seed: int = 0):
    """Labels drawn from sigmoid(z) and a model reporting sigmoid(z * true_temperature): dividing its
    logit by true_temperature calibrates it exactly (>1 overconfident, <1 underconfident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < calibration.sigmoid(z)).astype(np.int64)
    return labels, calibration.sigmoid(z * true_temperature).astype(np.float32)


@pytest.mark.parametrize("true_temperature", [3.0, 0.4])
def test_temperature_scaling_lowers_nll_and_ece_on_a_miscalibrated_set(true_temperature):
    labels, probabilities = _miscalibrated(true_temperature)
    fit = calibration.fit_temperature(labels, probabilities)
    assert fit.temperature == pytest.approx(true_temperature, rel=0.1) and not fit.at_bound
    calibrated = calibration.apply_temperature(probabilities, fit.temperature)
    assert fit.nll_after < fit.nll_before - 0.01
    assert calibration.nll(labels, calibrated) == pytest.approx(fit.nll_after)
    assert calibration.ece(labels, calibrated) < calibration.ece(labels, probabilities) / 2
    assert calibration.brier(labels, calibrated) < calibration.brier(labels, probabilities)
    # The fitted T is the minimum: a step either way raises the NLL.
    for nearby in (fit.temperature * 0.98, fit.temperature * 1.02):
        assert calibration.nll(labels, calibration.apply_temperature(probabilities, nearby)) > fit.nll_after


def test_a_calibrated_model_keeps_a_temperature_near_one():
    labels, probabilities = _miscalibrated(1.0)
    assert calibration.fit_temperature(labels, probabilities).temperature == pytest.approx(1.0, abs=0.1)


def test_temperature_changes_no_ranking_and_no_label():
    labels, probabilities = _miscalibrated(3.0, n=500)
    calibrated = calibration.apply_temperature(probabilities, 3.0)
    order = np.argsort(probabilities, kind="stable")
    assert np.all(np.diff(calibrated[order]) >= 0)  # monotone: no pair changes order
    # A threshold on the raw probability labels as its calibrated image does on the calibrated one.
    threshold = 0.3
    assert np.array_equal(probabilities >= threshold,
                          calibrated >= calibration.apply_temperature(np.float32(threshold), 3.0))


def test_separable_or_undeterminable_sets():
    labels = np.array([0, 0, 1, 1])
    separable = calibration.fit_temperature(labels, np.array([0.2, 0.3, 0.7, 0.8]))
    assert separable.at_bound and separable.temperature == pytest.approx(calibration.MIN_TEMPERATURE)
    with pytest.raises(ValueError, match="both classes"):
        calibration.fit_temperature(np.array([1, 1]), np.array([0.2, 0.9]))
    with pytest.raises(ValueError, match="0.5"):
        calibration.fit_temperature(labels, np.full(4, 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration.nll(labels, np.array([0.1, 0.2, 1.5, 0.3]))


def test_ece_brier_and_nll_by_hand():
    labels = np.array([0, 1, 1, 0, 1])
    probabilities = np.array([0.1, 0.1, 0.95, 0.9, 1.0])
    # 15 bins: 0.1 -> bin 1 (two images, mean 0.1, frequency 0.5); 0.9 and 0.95 -> bins 13 and 14
    # (14 = [14/15, 1), with 1.0 in the last bin too).
    expected = (2 * abs(0.5 - 0.1) + abs(0 - 0.9) + 2 * abs(1.0 - 0.975)) / 5
    assert calibration.ece(labels, probabilities) == pytest.approx(expected)
    assert calibration.brier(labels, probabilities) == pytest.approx(np.mean((probabilities - labels) ** 2))
    eps = calibration.PROBABILITY_EPSILON
    clipped = np.clip(probabilities, eps, 1 - eps)
    assert calibration.nll(labels, probabilities) == pytest.approx(
        -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)), rel=1e-9)
    bins = calibration.reliability(labels, probabilities)
    assert bins["count"] == [2, 1, 2] and bins["observed_frequency"] == [0.5, 0.0, 1.0]


def test_sealing_rule_on_val_predictions():
    labels, probabilities = _miscalibrated(3.0, n=400, seed=1)
    values = sealing.fit_on_val(labels, probabilities, target_recall=0.9, split="val")
    positives = np.sort(probabilities[labels == 1])[::-1]
    needed = int(np.ceil(0.9 * positives.size))
    assert values["operating_threshold"] == pytest.approx(float(positives[needed - 1]))
    assert values["threshold_val_metrics"]["recall"] >= 0.9
    assert values["calibration"]["calibrated"]["ece"] < values["calibration"]["raw"]["ece"]
    assert values["temperature"] == pytest.approx(calibration.fit_temperature(labels, probabilities).temperature)
    with pytest.raises(ValueError):
        sealing.fit_on_val(np.zeros(4, np.int64), np.full(4, 0.3, np.float32), 0.95, "val")
