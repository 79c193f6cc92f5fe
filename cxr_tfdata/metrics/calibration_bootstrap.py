"""Patient-bootstrap intervals of ECE, NLL and Brier, and whether a stored calibration holds at a site."""

# The bootstrap is the cluster bootstrap of cxr-evaluate (bootstrap.cluster_weights): each replicate draws
# patients with replacement and takes all their images, expressed as a [num_samples, n] matrix of
# multiplicities so one matrix serves every measure (and paired differences use the same resamples).

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from cxr_tfdata.metrics import calibration
from cxr_tfdata.metrics.bootstrap import CONFIDENCE, cluster_weights

DEFAULT_BOOTSTRAP_SAMPLES = 1000


def checked_groups(groups, n: int) -> np.ndarray | None:
    """The patient ids as a 1-D array aligned with the images, or None (each image its own patient)."""
    if groups is None:
        return None
    groups = np.asarray(groups).reshape(-1)
    if groups.size != n:
        raise ValueError(f"groups must give one patient id per image ({groups.size} ids for {n} images)")
    return groups


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A figure with its 95% percentile bootstrap interval (low, high None without resamples)."""

    value: float
    low: float | None
    high: float | None


def percentile_interval(values: np.ndarray) -> tuple[float | None, float | None]:
    """The central CONFIDENCE percentile interval of the finite values (no clipping: differences and NLL
    are not fractions)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None
    tail = 100.0 * (1.0 - CONFIDENCE) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def estimate(value: float, replicates: np.ndarray | None) -> Estimate:
    low, high = (None, None) if replicates is None else percentile_interval(replicates)
    return Estimate(float(value), low, high)


def weighted_ece(weights: np.ndarray, labels, probabilities, num_bins: int = calibration.ECE_BINS) -> np.ndarray:
    """calibration.ece under each row of bootstrap multiplicities (same bins, images counted w times)."""
    labels, probabilities = calibration.checked(labels, probabilities)
    bins = np.minimum((probabilities * num_bins).astype(np.int64), num_bins - 1)
    onehot = np.zeros((labels.size, num_bins))
    onehot[np.arange(labels.size), bins] = 1.0
    gap = np.abs(weights @ (onehot * labels[:, None]) - weights @ (onehot * probabilities[:, None]))
    # An empty bin contributes |0 - 0| = 0, so summing every bin equals summing the non-empty ones.
    return gap.sum(axis=1) / weights.sum(axis=1)


def per_image_losses(labels, probabilities) -> dict[str, np.ndarray]:
    """Each image's NLL and squared error, as calibration.nll and calibration.brier average them."""
    labels, probabilities = calibration.checked(labels, probabilities)
    z = calibration.logit(probabilities)
    return {"nll": np.logaddexp(0.0, z) - labels * z, "brier": (probabilities - labels) ** 2}


def measure_replicates(weights: np.ndarray, labels, probabilities) -> dict[str, np.ndarray]:
    """ECE, NLL and Brier of the probabilities under every bootstrap replicate."""
    losses = per_image_losses(labels, probabilities)
    totals = weights.sum(axis=1)
    return {"ece": weighted_ece(weights, labels, probabilities),
            "nll": weights @ losses["nll"] / totals, "brier": weights @ losses["brier"] / totals}


# A calibration that made things worse on the site's labelled images (its ECE above the raw
# probabilities' with the whole 95% interval of the difference above 0) does not hold there: the
# site's probabilities should not be read as risks until it is recalibrated. Both ECEs are measured on
# the same resamples (patients drawn with replacement, all their images), so the interval is of the
# paired difference and much narrower than two separate intervals would suggest. An interval that
# includes 0 is not evidence that calibration holds, only no evidence that it fails.
class CalibrationDoesNotHoldWarning(UserWarning):
    """Calibrated probabilities are measurably worse calibrated than raw ones on a site's images."""


@dataclasses.dataclass(frozen=True)
class CalibrationHolds:
    """Both ECEs, their difference with its 95% paired-bootstrap interval, and the verdict."""

    ece_raw: float
    ece_calibrated: float
    difference: Estimate  # ECE(calibrated) - ECE(raw)
    bootstrap_samples: int
    resampled_by: str
    does_not_hold: bool  # the interval of the difference lies wholly above 0
    message: str


def check_calibration_holds(labels, raw_probabilities, calibrated_probabilities, groups=None,
                            bootstrap_samples: int = DEFAULT_BOOTSTRAP_SAMPLES, seed: int = 0,
                            warn: bool = True) -> CalibrationHolds:
    """Bootstraps ECE(calibrated) - ECE(raw) by patient; warns (CalibrationDoesNotHoldWarning) when its
    95% interval lies wholly above 0."""
    labels, raw = calibration.checked(labels, raw_probabilities)
    _, calibrated = calibration.checked(labels, calibrated_probabilities)
    groups = checked_groups(groups, labels.size)
    if bootstrap_samples < 1:
        raise ValueError(f"bootstrap_samples must be >= 1 to test anything, got {bootstrap_samples}")
    ece_raw, ece_calibrated = calibration.ece(labels, raw), calibration.ece(labels, calibrated)
    weights = cluster_weights(groups, labels.size, bootstrap_samples, np.random.default_rng(seed))
    replicates = weighted_ece(weights, labels, calibrated) - weighted_ece(weights, labels, raw)
    difference = estimate(ece_calibrated - ece_raw, replicates)
    does_not_hold = difference.low is not None and difference.low > 0.0
    message = (f"ECE calibrated {ece_calibrated:.4f} vs raw {ece_raw:.4f}: difference {difference.value:+.4f}, "
               f"95% interval [{difference.low:+.4f}, {difference.high:+.4f}] by "
               f"{'patient' if groups is not None else 'image'} ({bootstrap_samples} resamples)")
    if does_not_hold:
        message = f"calibration does not hold on this sample: {message}; recalibrate before reading risks"
        if warn:
            warnings.warn(message, CalibrationDoesNotHoldWarning, stacklevel=2)
    return CalibrationHolds(ece_raw, ece_calibrated, difference, bootstrap_samples,
                            "image" if groups is None else "patient", does_not_hold, message)
