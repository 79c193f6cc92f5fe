"""The site recalibration fit: recovery of a known temperature and intercept, bounds, separable data."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_tfdata.metrics import calibration, recalibration


def _known(temperature: float, intercept: float, n: int = 2000, seed: int = 0):
    """Raw logits z ~ N(0, 3^2) and labels drawn from sigmoid(z / temperature + intercept)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, n)
    labels = (rng.random(n) < calibration.sigmoid(z / temperature + intercept)).astype(np.int64)
    return labels, calibration.sigmoid(z).astype(np.float32)


# At n = 2000 the fit is unbiased (mean error <= 1.2% over 100 seeds) with a relative standard error
# of 4-5% for T and 4-5% for these intercepts, so 10% is about 2 standard errors: over seeds 0..99
# these cases missed 10% in 0-5 seeds each; seed 0 is fixed, not picked. (T = 0.6 with intercept
# -1.2 has a relative standard error of 7.6% on the intercept: too imprecise to test at 10% here.)
@pytest.mark.parametrize("temperature, intercept", [(2.0, 1.5), (1.3, 2.0), (0.7, 2.0)])
def test_a_known_temperature_and_intercept_are_recovered_within_ten_percent(temperature, intercept):
    labels, raw = _known(temperature, intercept, seed=0)
    fit = recalibration.fit(labels, raw)
    assert fit.temperature == pytest.approx(temperature, rel=0.1)
    assert fit.intercept == pytest.approx(intercept, rel=0.1)
    assert fit.converged and not fit.at_bound
    assert fit.nll_after < fit.nll_before
    np.testing.assert_allclose(fit.apply(raw), calibration.apply_temperature(raw, fit.temperature, fit.intercept))


def test_the_intercept_only_fit_keeps_the_temperature_and_recovers_the_intercept():
    labels, raw = _known(2.0, 1.5)
    fit = recalibration.fit(labels, raw, recalibration.INTERCEPT_ONLY, temperature=2.0, logit_shift=0.0)
    assert fit.temperature == 2.0
    assert fit.intercept == pytest.approx(1.5, rel=0.1)


def test_the_fit_minimises_nll_up_to_platts_smoothing():
    labels, raw = _known(2.0, 1.5)
    fit = recalibration.fit(labels, raw)
    for t, b in [(fit.temperature * 1.05, fit.intercept), (fit.temperature, fit.intercept + 0.1)]:
        assert calibration.nll(labels, calibration.apply_temperature(raw, t, b)) > fit.nll_after


def test_separable_data_gives_a_finite_fit():
    """Every PNEUMONIA image scores above every NORMAL one: plain NLL would send the slope to infinity."""
    z = np.concatenate([np.linspace(-6, -0.5, 40), np.linspace(0.5, 6, 40)])
    labels = np.repeat([0, 1], 40)
    fit = recalibration.fit(labels, calibration.sigmoid(z))
    assert np.isfinite(fit.temperature) and np.isfinite(fit.intercept)
    assert calibration.MIN_TEMPERATURE <= fit.temperature < 1.0  # sharper than the raw model, but bounded
    assert fit.nll_after < 0.1


def test_inverted_scores_stop_on_the_slope_bound_instead_of_inverting_the_ranking():
    labels, raw = _known(1.0, 0.0)
    fit = recalibration.fit(1 - labels, raw)
    assert fit.at_bound and fit.temperature == pytest.approx(calibration.MAX_TEMPERATURE)


def test_the_fit_refuses_what_cannot_determine_it():
    with pytest.raises(ValueError, match="both classes"):
        recalibration.fit([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="same"):
        recalibration.fit([0, 1, 1], [0.4, 0.4, 0.4])
    with pytest.raises(ValueError, match="method"):
        recalibration.fit([0, 1], [0.2, 0.8], method="isotonic")
    with pytest.raises(ValueError, match="temperature"):
        recalibration.fit([0, 1], [0.2, 0.8], temperature=0.0)
