"""Tests of cxr_tfdata.metrics.calibration: temperature scaling, the prior logit shift and the calibration
measures, on sets whose miscalibration is known. The rule applied on val when a stage ends is tested in
tests/training/test_val_calibration.py."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_tfdata.metrics import calibration


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


def test_the_logit_shift_undoes_class_reweighting():
    """A loss weighting the classes w0, w1 is minimised by q = w1 p / (w1 p + w0 (1 - p)); the shift
    takes q back to p exactly, for class weights and for balanced sampling alike."""
    from cxr_tfdata.training import train

    counts = {"NORMAL": 1341, "PNEUMONIA": 3875}
    weights = train.class_weights_from_counts(counts)
    p = np.linspace(0.01, 0.99, 99)
    q = weights[1] * p / (weights[1] * p + weights[0] * (1 - p))
    shift = calibration.prior_logit_shift(weights, counts, balanced_sampling=False)
    np.testing.assert_allclose(calibration.apply_temperature(q, 1.0, shift), p, atol=1e-12)
    assert calibration.prior_logit_shift(None, counts, balanced_sampling=True) == pytest.approx(shift)
    assert calibration.prior_logit_shift(None, counts, balanced_sampling=False) == 0.0


def test_shift_and_temperature_calibrate_a_reweighted_overconfident_model():
    """Labels at 75% prevalence; a model trained with balancing class weights, and overconfident:
    temperature alone cannot remove the bias, the shift and the temperature together do."""
    rng = np.random.default_rng(3)
    z = rng.normal(1.1, 2.0, 6000)
    labels = (rng.random(z.size) < calibration.sigmoid(z)).astype(np.int64)
    counts = {"NORMAL": int((labels == 0).sum()), "PNEUMONIA": int((labels == 1).sum())}
    shift = calibration.prior_logit_shift(None, counts, balanced_sampling=True)
    reported = calibration.sigmoid(2.0 * (z - shift))  # reweighted (logit - shift), overconfident (x2)
    alone = calibration.apply_temperature(reported, calibration.fit_temperature(labels, reported).temperature)
    fit = calibration.fit_temperature(labels, reported, shift)
    both = calibration.apply_temperature(reported, fit.temperature, shift)
    assert fit.temperature == pytest.approx(2.0, rel=0.1)
    assert calibration.ece(labels, both) < 0.03 < calibration.ece(labels, alone) < calibration.ece(labels, reported)
