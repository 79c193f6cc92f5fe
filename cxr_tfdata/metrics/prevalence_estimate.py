"""A site's PNEUMONIA prevalence from unlabelled images by EM (Saerens et al. 2002)."""

# Given posteriors p_i calibrated at the training prevalence P_train, EM alternates: restate each
# posterior at the current estimate P (p_i' = sigmoid(logit(p_i) + logit(P) - logit(P_train)), Bayes'
# rule under label shift), then set P to the mean of the p_i'. It converges to the maximum-likelihood
# class mix of the site's images, and the restated posteriors are the site's calibrated probabilities.
# The point estimate is EM's, finished with a few Newton steps on the same fixed-point equation; each
# bootstrap resample is solved by those Newton steps directly (see _fixed_points for why).
#
# Unreliable beyond its assumption. EM assumes label shift only: each class's images look at the site
# as they did in training (p(image | class) unchanged) and the posteriors are calibrated at P_train.
# Under image shift (another scanner, exposure, post-processing, age range, view) the scores of both
# classes move and EM reads that as a change of class mix: the estimate can be badly biased while its
# interval, which only covers sampling, stays narrow. A weakly discriminating model also leaves the mix
# weakly identified (EM then converges slowly and its interval is wide). Check an estimate against a
# labelled sample of the site before acting on it.

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cxr_tfdata.metrics import (
    bootstrap,
    calibration,
    calibration_bootstrap,
    prevalence,
    sample_checks,
)

# EM cannot reach 0 or 1 (logit undefined); an estimate pinned here means "as far as the data pushes".
PREVALENCE_FLOOR = 1e-6
EM_TOLERANCE = 1e-7
EM_MAX_ITERATIONS = 10_000


@dataclasses.dataclass(frozen=True)
class PrevalenceEstimate:
    """The site prevalence EM estimates, with its bootstrap interval and how EM ended."""

    prevalence: calibration_bootstrap.Estimate
    train_prevalence: float
    iterations: int  # of the point estimate
    converged: bool  # EM (point) and Newton (resamples) each moved less than the tolerance in its last step
    n: int
    bootstrap_samples: int
    resampled_by: str


def _restated(z: np.ndarray, estimate: np.ndarray, train_prevalence: float) -> np.ndarray:
    """[rows, n] posteriors restated from the training prevalence at each row's estimate (the E-step)."""
    shift = np.log(estimate) - np.log1p(-estimate) - math.log(train_prevalence / (1.0 - train_prevalence))
    return calibration.sigmoid(z[None, :] + shift[:, None])


def _em(z: np.ndarray, train_prevalence: float, tolerance: float, max_iterations: int) -> tuple[float, int, bool]:
    """Saerens' EM on the unweighted sample: the prevalence, the iterations and whether it converged."""
    estimate = np.array([train_prevalence])
    for iteration in range(1, max_iterations + 1):
        # M-step: the new prevalence is the mean of the posteriors restated at the current one.
        updated = np.clip(_restated(z, estimate, train_prevalence).mean(axis=1), PREVALENCE_FLOOR,
                          1.0 - PREVALENCE_FLOOR)
        moved = float(abs(updated[0] - estimate[0]))
        estimate = updated
        if moved < tolerance:
            return float(estimate[0]), iteration, True
    return float(estimate[0]), max_iterations, False


def _fixed_points(z: np.ndarray, weights: np.ndarray, train_prevalence: float, start: float,
                  tolerance: float, max_iterations: int = 100) -> tuple[np.ndarray, bool]:
    """EM's fixed point for every row of bootstrap weights, found by Newton's method.

    EM's fixed point (mean restated posterior = P) is where the mixture log-likelihood
    L(P) = sum w_i log(P rho_i + 1 - P) (rho_i the image's likelihood ratio) is flat; L is concave, so
    Newton steps kept inside a bisection bracket reach it in a handful of passes, where EM itself needs
    hundreds for a weakly discriminating model (and 1000 resamples x hundreds of passes take minutes).
    With q_i the posterior restated at P: L' = sum w (q - P) / (P (1 - P)),
    L'' = -sum w (q - P)^2 / (P (1 - P))^2.
    """
    totals = weights.sum(axis=1)
    low = np.full(weights.shape[0], PREVALENCE_FLOOR)
    high = np.full(weights.shape[0], 1.0 - PREVALENCE_FLOOR)
    estimate = np.full(weights.shape[0], start)
    for _ in range(max_iterations):
        gap = _restated(z, estimate, train_prevalence) - estimate[:, None]
        mean_gap = (weights * gap).sum(axis=1) / totals  # the sign of L'
        curvature = (weights * gap * gap).sum(axis=1) / totals
        low, high = np.where(mean_gap > 0, estimate, low), np.where(mean_gap < 0, estimate, high)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = estimate + estimate * (1.0 - estimate) * mean_gap / curvature
        # A step onto the bracket's edge is kept: at the root the edge is the estimate itself.
        updated = np.where((step >= low) & (step <= high), step, 0.5 * (low + high))
        updated = np.where(mean_gap == 0, estimate, updated)
        done = np.abs(updated - estimate) < tolerance
        estimate = updated
        if done.all():
            return estimate, True
    return estimate, False


def estimate_prevalence(calibrated_probabilities, train_prevalence: float, groups=None,
                        bootstrap_samples: int = calibration_bootstrap.DEFAULT_BOOTSTRAP_SAMPLES, seed: int = 0,
                        tolerance: float = EM_TOLERANCE,
                        max_iterations: int = EM_MAX_ITERATIONS) -> PrevalenceEstimate:
    """The site's prevalence from probabilities calibrated at train_prevalence (the contract's
    calibration), with a 95% bootstrap interval resampling patients when groups are given.

    Raises sample_checks.SampleRefused for too few images (or patients).
    """
    train_prevalence = prevalence.check_prevalence(train_prevalence, "training prevalence")
    probabilities = np.asarray(calibrated_probabilities, np.float64).reshape(-1)
    if not np.all(np.isfinite(probabilities)) or np.any((probabilities < 0) | (probabilities > 1)):
        raise ValueError("calibrated probabilities must be finite and in [0, 1]")
    groups = calibration_bootstrap.checked_groups(groups, probabilities.size)
    sample_checks.require(sample_checks.check_unlabelled_sample(probabilities, groups), "prevalence estimate")
    z = calibration.logit(probabilities)
    point, iterations, converged = _em(z, train_prevalence, tolerance, max_iterations)
    # EM's step shrinks slowly for a weak model, so a small step is not yet a small error: polish.
    polished, _ = _fixed_points(z, np.ones((1, z.size)), train_prevalence, point, tolerance * 1e-3)
    point = float(polished[0])
    replicates = None
    if bootstrap_samples > 0:
        weights = bootstrap.cluster_weights(groups, z.size, bootstrap_samples, np.random.default_rng(seed))
        replicates, all_converged = _fixed_points(z, weights, train_prevalence, point, tolerance)
        converged = converged and all_converged
    return PrevalenceEstimate(calibration_bootstrap.estimate(point, replicates), train_prevalence, iterations, converged,
                              int(z.size), bootstrap_samples, "image" if groups is None else "patient")
