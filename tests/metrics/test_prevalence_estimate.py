"""EM estimate of a site's prevalence from unlabelled images (Saerens et al. 2002)."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_tfdata.metrics import calibration, prevalence, prevalence_estimate
from tests.metrics import site_synthetic as synthetic


def _calibrated(site) -> np.ndarray:
    """The contract's calibration: posteriors at the training prevalence."""
    return calibration.apply_temperature(site.raw, synthetic.TEMPERATURE, synthetic.LOGIT_SHIFT)


@pytest.mark.parametrize("site_prevalence, seed", [(0.30, 0), (0.55, 1), (0.85, 2)])
def test_em_recovers_a_known_prevalence_on_well_specified_data(site_prevalence, seed):
    site = synthetic.site(1500, site_prevalence, seed=seed)
    found = prevalence_estimate.estimate_prevalence(_calibrated(site), synthetic.TRAIN_PREVALENCE, site.groups,
                                               bootstrap_samples=200, seed=seed)
    assert found.converged and found.resampled_by == "patient"
    assert found.prevalence.value == pytest.approx(site_prevalence, abs=0.03)
    # The MLE estimates this sample's share, which the interval (sampling only) must cover.
    assert found.prevalence.low <= site.labels.mean() <= found.prevalence.high
    assert found.prevalence.high - found.prevalence.low < 0.1


def test_em_at_the_training_prevalence_stays_there():
    site = synthetic.site(1500, synthetic.TRAIN_PREVALENCE, seed=3)
    found = prevalence_estimate.estimate_prevalence(_calibrated(site), synthetic.TRAIN_PREVALENCE, bootstrap_samples=0)
    assert found.prevalence.value == pytest.approx(synthetic.TRAIN_PREVALENCE, abs=0.03)
    assert found.prevalence.low is None and found.resampled_by == "image"


def test_the_estimate_is_a_fixed_point_of_the_em_step():
    site = synthetic.site(800, 0.4, seed=4)
    calibrated = _calibrated(site)
    found = prevalence_estimate.estimate_prevalence(calibrated, synthetic.TRAIN_PREVALENCE, bootstrap_samples=0)
    restated = prevalence.restate(calibrated, synthetic.TRAIN_PREVALENCE, found.prevalence.value)
    assert restated.mean() == pytest.approx(found.prevalence.value, abs=1e-5)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="training prevalence must be"):
        prevalence_estimate.estimate_prevalence(np.full(200, 0.5), 1.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        prevalence_estimate.estimate_prevalence(np.full(200, 1.5), 0.5)


def test_the_resamples_fixed_points_equal_em_run_to_convergence():
    """The bootstrap solves EM's fixed-point equation by Newton steps: the same answer EM reaches."""
    site = synthetic.site(300, 0.4, seed=8)
    z = calibration.logit(_calibrated(site))
    weights = np.random.default_rng(0).integers(0, 3, (4, z.size)).astype(np.float64)
    found, converged = prevalence_estimate._fixed_points(z, weights, synthetic.TRAIN_PREVALENCE, 0.5, 1e-12)
    assert converged
    for row, value in zip(weights, found, strict=True):
        expanded = np.repeat(z, row.astype(np.int64))  # a resample is the images repeated w times
        em, _, em_converged = prevalence_estimate._em(expanded, synthetic.TRAIN_PREVALENCE, 1e-12, 100_000)
        assert em_converged and value == pytest.approx(em, abs=1e-8)
