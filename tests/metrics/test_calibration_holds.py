"""The 'calibration does not hold' detector: a paired patient bootstrap of ECE(calibrated) - ECE(raw)."""

from __future__ import annotations

import warnings

import pytest

from cxr_tfdata.metrics import calibration, calibration_bootstrap
from tests.metrics import site_synthetic as synthetic


def _site():
    site = synthetic.site(400, 0.5, seed=7)
    return site, site.true_posterior(0.5)


def test_fires_when_calibration_made_things_worse():
    site, true = _site()
    miscalibrated = calibration.sigmoid(2.5 * calibration.logit(true) + 1.0)  # overconfident, shifted
    with pytest.warns(calibration_bootstrap.CalibrationDoesNotHoldWarning, match="does not hold"):
        verdict = calibration_bootstrap.check_calibration_holds(site.labels, true, miscalibrated, site.groups,
                                                             bootstrap_samples=300)
    assert verdict.does_not_hold and verdict.difference.low > 0
    assert verdict.ece_calibrated == pytest.approx(calibration.ece(site.labels, miscalibrated))
    assert verdict.difference.value == pytest.approx(verdict.ece_calibrated - verdict.ece_raw)
    assert verdict.resampled_by == "patient"


@pytest.mark.parametrize("raw_kind", ["miscalibrated", "well_calibrated"])
def test_quiet_when_the_calibrated_probabilities_are_well_calibrated(raw_kind):
    site, true = _site()
    raw = calibration.sigmoid(2.5 * calibration.logit(true) + 1.0) if raw_kind == "miscalibrated" else true
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verdict = calibration_bootstrap.check_calibration_holds(site.labels, raw, true, site.groups,
                                                             bootstrap_samples=300)
    assert not verdict.does_not_hold
    assert verdict.difference.low <= verdict.difference.value <= verdict.difference.high


def test_warn_false_only_reports():
    site, true = _site()
    miscalibrated = calibration.sigmoid(2.5 * calibration.logit(true) + 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verdict = calibration_bootstrap.check_calibration_holds(site.labels, true, miscalibrated, None,
                                                             bootstrap_samples=300, warn=False)
    assert verdict.does_not_hold and verdict.message.startswith("calibration does not hold")


def test_mismatched_groups_are_refused():
    site, true = _site()
    with pytest.raises(ValueError, match="one patient id per image"):
        calibration_bootstrap.check_calibration_holds(site.labels, true, true, site.groups[:-1])
    with pytest.raises(ValueError, match="bootstrap_samples"):
        calibration_bootstrap.check_calibration_holds(site.labels, true, true, bootstrap_samples=0)
