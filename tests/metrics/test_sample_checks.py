"""Every refusal: a sample too small to recalibrate on, re-choose a threshold on, or estimate prevalence from."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_tfdata.metrics import prevalence_estimate, sample_checks, site_recalibration
from tests.metrics import site_synthetic as synthetic


def _sample(normal_patients: int, pneumonia_patients: int, images_per_patient: int):
    labels = np.repeat([0] * normal_patients + [1] * pneumonia_patients, images_per_patient)
    groups = np.repeat(np.arange(normal_patients + pneumonia_patients), images_per_patient).astype(str)
    probabilities = np.linspace(0.05, 0.95, labels.size)
    return labels, probabilities, groups


def test_a_large_enough_sample_passes():
    check = sample_checks.check_labelled_sample(*_sample(10, 10, 3))
    assert check.ok and check.images_per_class == (30, 30) and check.patients_per_class == (10, 10)


@pytest.mark.parametrize("normal, pneumonia, per_patient, expected", [
    (10, 29, 1, "29 PNEUMONIA images, fewer than the minimum 30"),
    (29, 40, 1, "29 NORMAL images, fewer than the minimum 30"),
    (9, 12, 4, "9 NORMAL patients, fewer than the minimum 10"),
    (12, 9, 4, "9 PNEUMONIA patients, fewer than the minimum 10"),
])
def test_too_few_images_or_patients_of_a_class_is_refused_with_the_count(normal, pneumonia, per_patient, expected):
    check = sample_checks.check_labelled_sample(*_sample(normal, pneumonia, per_patient))
    assert not check.ok and expected in check.reasons


def test_without_patient_ids_images_count_as_patients_and_the_reason_says_so():
    labels, probabilities, _ = _sample(40, 20, 1)
    check = sample_checks.check_labelled_sample(labels, probabilities, None)
    assert check.reasons == ("20 PNEUMONIA images, fewer than the minimum 30",)
    labels, probabilities, _ = _sample(40, 5, 1)
    check = sample_checks.check_labelled_sample(labels, probabilities, None, min_images_per_class=1)
    assert any("each image counted as a patient" in r for r in check.reasons)


def test_fold_counts_the_patients_cannot_support_are_refused():
    sample = _sample(10, 12, 3)
    assert "cross-fitting needs at least 2 folds, got 1" in sample_checks.check_labelled_sample(*sample, folds=1).reasons
    assert ("11 folds need at least 11 patients of each class (have 10)"
            in sample_checks.check_labelled_sample(*sample, folds=11).reasons)


def test_constant_scores_are_refused():
    labels, _, groups = _sample(10, 10, 3)
    check = sample_checks.check_labelled_sample(labels, np.full(labels.size, 0.7), groups)
    assert check.reasons == ("every raw probability is the same: the scores carry nothing to calibrate",)


def test_every_refusal_is_reported_at_once_and_raised_by_each_entry_point():
    labels, probabilities, groups = _sample(5, 6, 2)
    with pytest.raises(sample_checks.SampleRefused, match="site recalibration refused") as refused:
        site_recalibration.recalibrate_site(labels, probabilities, groups, temperature=1.0, logit_shift=0.0)
    assert len(refused.value.check.reasons) == 4 and isinstance(refused.value, ValueError)
    with pytest.raises(sample_checks.SampleRefused, match="re-choosing the operating threshold refused"):
        site_recalibration.choose_site_threshold(labels, probabilities, groups, target_recall=0.95)


def test_too_few_unlabelled_images_or_patients_are_refused():
    site = synthetic.site(100, 0.5, seed=0)
    check = sample_checks.check_unlabelled_sample(site.raw[:99])
    assert check.reasons == ("99 unlabelled images, fewer than the minimum 100",)
    few_patients = np.repeat(np.arange(9), 12).astype(str)
    check = sample_checks.check_unlabelled_sample(np.full(108, 0.5), few_patients)
    assert check.reasons == ("9 patients, fewer than the minimum 10",)
    with pytest.raises(sample_checks.SampleRefused, match="prevalence estimate refused: 99 unlabelled images"):
        prevalence_estimate.estimate_prevalence(site.raw[:99], 0.74)
