"""Cross-fitting by patient: the folds, and that out-of-fold figures are no better than in-sample ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_tfdata.metrics import calibration, recalibration, site_recalibration
from tests.metrics import site_synthetic as synthetic

CONTRACT = {"temperature": synthetic.TEMPERATURE, "logit_shift": synthetic.LOGIT_SHIFT}


def test_folds_keep_each_patient_whole_and_both_classes_in_every_fold():
    site = synthetic.site(60, 0.5, seed=0)
    folds = site_recalibration.patient_folds(site.labels, site.groups, 5, seed=0)
    assert set(folds.tolist()) == set(range(5))
    for patient in np.unique(site.groups):
        assert np.unique(folds[site.groups == patient]).size == 1
    for fold in range(5):
        assert set(site.labels[folds == fold].tolist()) == {0, 1}
    np.testing.assert_array_equal(folds, site_recalibration.patient_folds(site.labels, site.groups, 5, seed=0))
    assert not np.array_equal(folds, site_recalibration.patient_folds(site.labels, site.groups, 5, seed=1))


def test_every_image_is_scored_by_a_fit_that_never_saw_its_patient():
    site = synthetic.site(60, 0.5, seed=0)
    report = site_recalibration.recalibrate_site(site.labels, site.raw, site.groups, **CONTRACT, bootstrap_samples=0)
    crossed = report.cross_fit
    assert np.all(np.isfinite(crossed.probabilities)) and len(crossed.fold_fits) == 5
    for fold, fitted in enumerate(crossed.fold_fits):
        held_out = crossed.fold_of_image == fold
        refit = recalibration.fit(site.labels[~held_out], site.raw[~held_out], temperature=synthetic.TEMPERATURE,
                                  logit_shift=synthetic.LOGIT_SHIFT)
        assert refit == fitted
        np.testing.assert_allclose(crossed.probabilities[held_out], fitted.apply(site.raw[held_out]))
    assert report.final == recalibration.fit(site.labels, site.raw, temperature=synthetic.TEMPERATURE,
                                             logit_shift=synthetic.LOGIT_SHIFT)


# Small site: 40 patients (about 40 images per class), 5 folds. Over seeds 0..99 (86 large enough to
# pass the refusal checks) cross-fitted NLL and Brier were above in-sample in every one (smallest gaps
# 0.006 and 0.0017): the in-sample fit minimises (smoothed) NLL on exactly these images, so this is the
# meaningful direction. ECE is not asserted: with 15 bins over ~80 images its binning noise swamps the
# optimism (cross-fitted ECE was >= in-sample in 41 of 86 seeds, mean gap 0.003 +- 0.003), so any seed
# chosen to make it pass would test the seed, not the code.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_fitted_figures_are_no_better_than_in_sample_ones_on_a_small_sample(seed):
    site = synthetic.site(40, 0.5, seed=seed)
    report = site_recalibration.recalibrate_site(site.labels, site.raw, site.groups, **CONTRACT, seed=seed,
                                       bootstrap_samples=0)
    assert report.cross_fitted.nll.value > report.in_sample.nll.value
    assert report.cross_fitted.brier.value > report.in_sample.brier.value
    assert report.in_sample.nll.value == pytest.approx(report.final.nll_after)


def test_recalibration_at_a_shifted_site_beats_the_contract_with_paired_intervals():
    """A site at prevalence 0.3 whose model is also overconfident there: both parameters need refitting."""
    site = synthetic.site(300, 0.3, seed=5)
    raw = calibration.sigmoid(1.6 * calibration.logit(site.raw))  # sharper at this site than in training
    report = site_recalibration.recalibrate_site(site.labels, raw, site.groups, **CONTRACT, bootstrap_samples=300)
    assert report.resampled_by == "patient"
    for figures in (report.before, report.cross_fitted, report.in_sample, report.change):
        for measure in ("nll", "brier"):
            estimate = getattr(figures, measure)
            assert estimate.low <= estimate.value <= estimate.high
        assert figures.ece.low < figures.ece.high
    # ECE is biased upwards by resampling (duplicated patients add binning noise, and |gap| folds it
    # upwards), so a well-calibrated set's percentile interval can lie wholly above its ECE: here
    # 0.028 with interval [0.032, 0.072]. Documented in site_recalibration.py; the paired change is not affected.
    assert report.cross_fitted.ece.value < report.cross_fitted.ece.low
    assert report.change.nll.high < 0 and report.change.ece.high < 0  # better, beyond sampling noise
    assert report.change.ece.value == pytest.approx(report.cross_fitted.ece.value - report.before.ece.value)
    as_json = json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert as_json["change"]["nll"]["high"] == report.change.nll.high and len(as_json["fold_fits"]) == 5


def test_the_intercept_only_variant_and_images_without_patient_ids():
    site = synthetic.site(150, 0.3, seed=6)
    report = site_recalibration.recalibrate_site(site.labels, site.raw, None, **CONTRACT,
                                       method=recalibration.INTERCEPT_ONLY, bootstrap_samples=50)
    assert report.resampled_by == "image" and report.method == recalibration.INTERCEPT_ONLY
    assert all(f.temperature == synthetic.TEMPERATURE for f in report.cross_fit.fold_fits)
    assert report.cross_fitted.nll.value < report.before.nll.value
