"""Cross-fitted site recalibration and operating threshold: fit on k-1 patient folds, score the held-out one."""

# A calibration fitted and scored on the same images flatters itself (in-sample NLL is the minimum by
# construction); scoring each image with a fit that never saw its patient gives figures an unseen image
# of the site would get. Folds group images by patient (StratifiedGroupKFold: no patient on both sides,
# classes spread as evenly as the patients allow), shuffled with a seed so a run is reproducible.
#
# Intervals are 95% patient-bootstrap percentile intervals over the out-of-fold probabilities held fixed:
# they cover the sampling of the site's images, not the refitting (refitting k models per replicate
# costs k x samples fits and would widen them a little). "before", "cross_fitted" and "in_sample" share
# one set of resamples, so `change` (cross_fitted - before, negative = better) is a paired interval.
# ECE's percentile interval can miss its own point estimate: resampling duplicates patients, which adds
# binning noise that |observed - mean| folds upwards, so for a well-calibrated set (ECE ~0.03) every
# replicate can exceed it. NLL and Brier, plain means, have no such bias; quote them (and `change`)
# first, and read an ECE interval as "the size of ECE such a sample shows", not as cover for the truth.

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from cxr_tfdata.metrics import (
    bootstrap,
    calibration,
    calibration_bootstrap,
    recalibration,
    sample_checks,
)
from cxr_tfdata.metrics.calibration_bootstrap import Estimate
from cxr_tfdata.metrics.threshold_metrics import choose_operating_threshold

MEASURES = ("ece", "nll", "brier")


def patient_folds(labels, groups, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of every image: grouped by patient and stratified by class; by image when
    groups is None."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    groups = calibration_bootstrap.checked_groups(groups, labels.size)
    if groups is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(labels.size), labels)
    else:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(labels.size), labels, groups)
    fold_of_image = np.full(labels.size, -1, np.int64)
    for fold, (_, held_out) in enumerate(splits):
        fold_of_image[held_out] = fold
    return fold_of_image


@dataclasses.dataclass(frozen=True, eq=False)
class CrossFit:
    """Out-of-fold calibrated probabilities, the fold of each image and each fold's fit."""

    probabilities: np.ndarray
    fold_of_image: np.ndarray
    fold_fits: tuple[recalibration.Recalibration, ...]


def cross_fit(labels, probabilities, fold_of_image: np.ndarray, method: str, temperature: float,
              logit_shift: float) -> CrossFit:
    """Each image calibrated by the fit on the other folds (which never saw its patient)."""
    labels, probabilities = calibration.checked(labels, probabilities)
    out_of_fold = np.full(labels.size, np.nan)
    fits = []
    for fold in np.unique(fold_of_image):
        held_out = fold_of_image == fold
        fitted = recalibration.fit(labels[~held_out], probabilities[~held_out], method, temperature, logit_shift)
        out_of_fold[held_out] = fitted.apply(probabilities[held_out])
        fits.append(fitted)
    return CrossFit(out_of_fold, fold_of_image, tuple(fits))


@dataclasses.dataclass(frozen=True)
class CalibrationFigures:
    """ECE (15 equal-width bins), NLL and Brier of one set of probabilities, each with its interval."""

    ece: Estimate
    nll: Estimate
    brier: Estimate


def _figures(labels, probabilities, replicates: dict[str, np.ndarray] | None) -> CalibrationFigures:
    point = calibration.summary(labels, probabilities)
    return CalibrationFigures(**{m: calibration_bootstrap.estimate(point[m], None if replicates is None else replicates[m])
                                 for m in MEASURES})


def _change(after: CalibrationFigures, before: CalibrationFigures, replicates_after, replicates_before):
    return CalibrationFigures(**{
        m: calibration_bootstrap.estimate(getattr(after, m).value - getattr(before, m).value,
                               None if replicates_after is None else replicates_after[m] - replicates_before[m])
        for m in MEASURES})


@dataclasses.dataclass(frozen=True, eq=False)
class SiteRecalibration:
    """What recalibrating on a site's labelled sample gives, honestly measured."""

    method: str
    folds: int
    seed: int
    bootstrap_samples: int
    resampled_by: str  # "patient", or "image" without patient ids
    check: sample_checks.SampleCheck
    before: CalibrationFigures  # the contract's calibration on the site's images
    cross_fitted: CalibrationFigures  # the site recalibration, out of fold: what to quote
    in_sample: CalibrationFigures  # fitted and scored on all images: optimistic, for comparison only
    change: CalibrationFigures  # cross_fitted - before (paired; negative = better)
    final: recalibration.Recalibration  # fitted on all images: the one to store and use
    cross_fit: CrossFit

    def as_dict(self) -> dict:
        """Everything but the per-image probabilities, as JSON-ready values (for metrics.json)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cross_fit"}
        out = {key: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for key, v in out.items()}
        out["fold_fits"] = [dataclasses.asdict(fitted) for fitted in self.cross_fit.fold_fits]
        return out


def recalibrate_site(labels, probabilities, groups=None, *, temperature: float, logit_shift: float,
                     method: str = recalibration.TEMPERATURE_AND_INTERCEPT,
                     folds: int = sample_checks.DEFAULT_FOLDS, seed: int = 0,
                     bootstrap_samples: int = calibration_bootstrap.DEFAULT_BOOTSTRAP_SAMPLES) -> SiteRecalibration:
    """Recalibrates the raw probabilities of a site's labelled images (temperature and logit_shift: the
    contract's), cross-fitted by patient. Raises sample_checks.SampleRefused for too small a sample."""
    labels, probabilities = calibration.checked(labels, probabilities)
    groups = calibration_bootstrap.checked_groups(groups, labels.size)
    check = sample_checks.require(sample_checks.check_labelled_sample(labels, probabilities, groups, folds),
                                  "site recalibration")
    fold_of_image = patient_folds(labels, groups, folds, seed)
    crossed = cross_fit(labels, probabilities, fold_of_image, method, temperature, logit_shift)
    final = recalibration.fit(labels, probabilities, method, temperature, logit_shift)
    sets = {"before": calibration.apply_temperature(probabilities, temperature, logit_shift),
            "cross_fitted": crossed.probabilities, "in_sample": final.apply(probabilities)}
    replicates = dict.fromkeys(sets)
    if bootstrap_samples > 0:
        weights = bootstrap.cluster_weights(groups, labels.size, bootstrap_samples, np.random.default_rng(seed))
        replicates = {name: calibration_bootstrap.measure_replicates(weights, labels, p) for name, p in sets.items()}
    figures = {name: _figures(labels, p, replicates[name]) for name, p in sets.items()}
    change = _change(figures["cross_fitted"], figures["before"], replicates["cross_fitted"], replicates["before"])
    return SiteRecalibration(method, folds, seed, bootstrap_samples, "image" if groups is None else "patient",
                             check, figures["before"], figures["cross_fitted"], figures["in_sample"], change,
                             final, crossed)


# The rule is cxr-evaluate's (`choose_operating_threshold`: the highest threshold whose recall on the
# fitting images is >= target, a probability of the sample itself, compared as probability >= threshold
# on the raw probability). Chosen and measured on the same images its recall is >= target by
# construction; chosen on k-1 patient folds and applied to the held-out one, the pooled out-of-fold
# recall and specificity are what the rule delivers on unseen patients of the site. The threshold to use
# is the one chosen on all images (`threshold`); the per-fold ones show how much it moves.


@dataclasses.dataclass(frozen=True)
class SiteThreshold:
    """An operating threshold re-chosen on a site's sample, with honest and in-sample figures."""

    target_recall: float
    threshold: float  # chosen on all the site's images: the one to use
    fold_thresholds: tuple[float, ...]
    cross_fitted_recall: Estimate  # each fold labelled at the threshold chosen on the others
    cross_fitted_specificity: Estimate
    in_sample_recall: Estimate  # at `threshold` on the images it was chosen on: >= target by construction
    in_sample_specificity: Estimate
    resampled_by: str


def _rates(weights: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and specificity under each row of bootstrap multiplicities (NaN where a class is absent)."""
    positive, negative = labels == 1, labels == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = (weights @ (positive & (predicted == 1))) / (weights @ positive)
        specificity = (weights @ (negative & (predicted == 0))) / (weights @ negative)
    return recall, specificity


def _estimates(labels, predicted, weights) -> tuple[Estimate, Estimate]:
    point_recall, point_specificity = _rates(np.ones((1, labels.size)), labels, predicted)
    recall, specificity = (None, None) if weights is None else _rates(weights, labels, predicted)
    return (calibration_bootstrap.estimate(point_recall[0], recall), calibration_bootstrap.estimate(point_specificity[0], specificity))


def choose_site_threshold(labels, probabilities, groups=None, *, target_recall: float,
                          folds: int = sample_checks.DEFAULT_FOLDS, seed: int = 0,
                          bootstrap_samples: int = calibration_bootstrap.DEFAULT_BOOTSTRAP_SAMPLES) -> SiteThreshold:
    """Chooses the threshold on the site's raw probabilities, cross-fitted by patient (same folds as
    recalibrate_site for the same seed). Raises SampleRefused for too small a sample."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    labels, probabilities = calibration.checked(labels, probabilities)
    labels = labels.astype(np.int64)
    groups = calibration_bootstrap.checked_groups(groups, labels.size)
    sample_checks.require(sample_checks.check_labelled_sample(labels, probabilities, groups, folds),
                          "re-choosing the operating threshold")
    fold_of_image = patient_folds(labels, groups, folds, seed)
    crossed = np.zeros(labels.size, np.int64)
    fold_thresholds = []
    for fold in range(folds):
        held_out = fold_of_image == fold
        chosen = choose_operating_threshold(labels[~held_out], probabilities[~held_out], target_recall)
        crossed[held_out] = probabilities[held_out] >= chosen
        fold_thresholds.append(chosen)
    threshold = choose_operating_threshold(labels, probabilities, target_recall)
    in_sample = (probabilities >= threshold).astype(np.int64)
    weights = None
    if bootstrap_samples > 0:
        weights = bootstrap.cluster_weights(groups, labels.size, bootstrap_samples, np.random.default_rng(seed))
    return SiteThreshold(target_recall, threshold, tuple(fold_thresholds), *_estimates(labels, crossed, weights),
                         *_estimates(labels, in_sample, weights), "image" if groups is None else "patient")
