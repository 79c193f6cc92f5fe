"""Prevalence as a setting: validation, and that stating a site's prevalence restores its calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from cxr_tfdata.metrics import calibration, prevalence
from tests.metrics import site_synthetic as synthetic


def test_prevalence_shift_is_the_prior_log_odds_ratio():
    assert prevalence.prevalence_shift(0.5, 0.5) == 0.0
    assert prevalence.prevalence_shift(0.74, 0.3) == pytest.approx(math.log(0.3 / 0.7) - math.log(0.74 / 0.26))
    assert prevalence.prevalence_shift(0.2, 0.6) == pytest.approx(-prevalence.prevalence_shift(0.6, 0.2))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf, None, "abc"])
def test_a_prevalence_outside_the_open_unit_interval_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="target prevalence must be"):
        prevalence.prevalence_shift(0.5, bad)
    with pytest.raises(ValueError, match="training prevalence must be"):
        prevalence.calibrated_at_prevalence([0.2, 0.9], 1.0, 0.0, bad, 0.5)


def test_prevalence_from_a_contracts_class_counts():
    assert prevalence.prevalence_from_counts({"NORMAL": 1000, "PNEUMONIA": 3000}) == 0.75
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        prevalence.prevalence_from_counts({"NORMAL": 0, "PNEUMONIA": 10})


def test_the_same_prevalence_leaves_the_contract_calibration_unchanged():
    raw = np.array([0.01, 0.3, 0.5, 0.97], np.float32)
    stored = calibration.apply_temperature(raw, 1.7, -0.4)
    np.testing.assert_allclose(prevalence.calibrated_at_prevalence(raw, 1.7, -0.4, 0.7, 0.7), stored)
    np.testing.assert_allclose(prevalence.restate(prevalence.restate(stored, 0.7, 0.2), 0.2, 0.7), stored)


def test_stating_the_site_prevalence_restores_ece_of_a_model_fitted_at_it():
    """Training prevalence 0.74, site 0.30 (label shift only). Read at 0.74 the probabilities overstate
    every risk; stated at 0.30 their ECE matches a logistic model fitted on another sample of the site."""
    site_prevalence = 0.30
    site = synthetic.site(2500, site_prevalence, seed=1)
    args = (synthetic.TEMPERATURE, synthetic.LOGIT_SHIFT)
    at_training = calibration.apply_temperature(site.raw, *args)
    stated = prevalence.calibrated_at_prevalence(site.raw, *args, synthetic.TRAIN_PREVALENCE, site_prevalence)
    other = synthetic.site(2500, site_prevalence, seed=2)
    fitted_at_site = LogisticRegression(C=1e6).fit(other.scores[:, None], other.labels)
    reference = fitted_at_site.predict_proba(site.scores[:, None])[:, 1]

    ece_reference = calibration.ece(site.labels, reference)
    assert calibration.ece(site.labels, at_training) > 0.15  # the shift is visible
    assert abs(calibration.ece(site.labels, stated) - ece_reference) < 0.015
    assert calibration.ece(site.labels, stated) < 0.03
    # Exact up to the float32 rounding of the raw probabilities (largest near 0 and 1).
    np.testing.assert_allclose(stated, site.true_posterior(site_prevalence), atol=5e-3)
