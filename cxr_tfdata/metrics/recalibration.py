"""Site recalibration on labelled images: temperature and intercept (Platt), or intercept only."""

# calibrated = sigmoid(logit(p) / T + b) on the raw probability p; equivalently a one-feature logistic
# regression sigmoid(a z + b) on the raw logit z with slope a = 1/T. The intercept b replaces the
# contract's logit shift (and any prevalence shift): it absorbs both the training reweighting and the
# site's own class mix. The intercept-only variant keeps the contract's temperature and refits b, for a
# sample too small to trust a slope, or when only the class mix is believed to differ.
# The intercept learns the class mix of the fitting sample itself: a labelled sample collected
# enriched (say 50/50 while the site sees 20% PNEUMONIA) gives probabilities at 50%; restate them
# with prevalence.restate(p, sample_prevalence, site_prevalence).
#
# Fitting, chosen to be robust, bounded and deterministic:
#   * Platt's (1999) smoothed targets: label 1 counts as (N1 + 1) / (N1 + 2) and label 0 as 1 / (N0 + 2).
#     With perfectly separated data plain NLL has no minimum (a -> infinity); with these targets every
#     image is a soft label, the objective is strictly convex and coercive, and the optimum is finite. The
#     pull is mild (a balanced sample's mean target is exactly its prevalence; 900/100 moves it by 2e-5)
#     and vanishes as the sample grows. nll_after is the plain NLL of the result, not the smoothed one.
#   * box bounds: T in [MIN_TEMPERATURE, MAX_TEMPERATURE] of calibration.py (so slope a > 0: recalibration
#     never inverts the ranking) and |b| <= MAX_INTERCEPT; a fit that stops on a bound says so (at_bound).
#   * L-BFGS-B with the analytic gradient from a fixed start (the contract's T and shift): no randomness.

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize

from cxr_tfdata.metrics import calibration

# A generous bound: an intercept of 25 is a prior odds ratio of 7e10, so a fit that wants more is
# broken rather than informative, and stopping there is reported (at_bound).
MAX_INTERCEPT = 25.0
SLOPE_BOUNDS = (1.0 / calibration.MAX_TEMPERATURE, 1.0 / calibration.MIN_TEMPERATURE)
TEMPERATURE_AND_INTERCEPT = "temperature_and_intercept"
INTERCEPT_ONLY = "intercept_only"
METHODS = (TEMPERATURE_AND_INTERCEPT, INTERCEPT_ONLY)


@dataclasses.dataclass(frozen=True)
class Recalibration:
    """A fitted sigmoid(logit(p) / temperature + intercept) and how it was obtained."""

    method: str
    temperature: float
    intercept: float
    at_bound: bool  # the optimum lies on a bound: separable, uninformative or inverted scores
    converged: bool
    n: int
    nll_before: float  # plain NLL of the starting calibration (the contract's) on the fitting images
    nll_after: float  # plain NLL of this recalibration on the fitting images

    def apply(self, probabilities) -> np.ndarray:
        return calibration.apply_temperature(probabilities, self.temperature, self.intercept)


def smoothed_targets(labels: np.ndarray) -> np.ndarray:
    """Platt's targets: (N1 + 1) / (N1 + 2) for PNEUMONIA, 1 / (N0 + 2) for NORMAL."""
    positives = float(labels.sum())
    negatives = float(labels.size - positives)
    return np.where(labels == 1, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))


def _objective(z: np.ndarray, targets: np.ndarray, fixed_slope: float | None):
    """Mean cross-entropy of sigmoid(a z + b) against the targets, and its gradient, over the free
    parameters ((a, b), or (b,) with a fixed)."""
    def value_and_gradient(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = (params[0], params[1]) if fixed_slope is None else (fixed_slope, params[0])
        u = a * z + b
        residual = calibration.sigmoid(u) - targets
        value = float(np.mean(np.logaddexp(0.0, u) - targets * u))
        d_b = float(np.mean(residual))
        if fixed_slope is not None:
            return value, np.array([d_b])
        return value, np.array([float(np.mean(residual * z)), d_b])
    return value_and_gradient


def _checked_start(temperature: float, intercept: float) -> tuple[float, float]:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not math.isfinite(intercept):
        raise ValueError(f"intercept (logit shift) must be finite, got {intercept!r}")
    return temperature, intercept


def fit(labels, probabilities, method: str = TEMPERATURE_AND_INTERCEPT, temperature: float = 1.0,
        logit_shift: float = 0.0) -> Recalibration:
    """Fits the site's calibration on raw probabilities; temperature and logit_shift are the contract's
    (the starting point, the fixed temperature of INTERCEPT_ONLY, and the "before" NLL).

    Raises ValueError for a set that cannot determine it: one class only, or (with a free temperature)
    every raw probability equal.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    labels, probabilities = calibration.checked(labels, probabilities)
    temperature, logit_shift = _checked_start(temperature, logit_shift)
    if labels.min() == labels.max():
        raise ValueError("recalibration needs both classes among the labels")
    z = calibration.logit(probabilities)
    if method == TEMPERATURE_AND_INTERCEPT and np.ptp(z) == 0:
        raise ValueError("every raw probability is the same: no temperature can be fitted")
    fixed_slope = 1.0 / temperature if method == INTERCEPT_ONLY else None
    b_bounds = (-MAX_INTERCEPT, MAX_INTERCEPT)
    start_b = float(np.clip(logit_shift, *b_bounds))
    if fixed_slope is None:
        start, bounds = [float(np.clip(1.0 / temperature, *SLOPE_BOUNDS)), start_b], [SLOPE_BOUNDS, b_bounds]
    else:
        start, bounds = [start_b], [b_bounds]
    result = optimize.minimize(_objective(z, smoothed_targets(labels), fixed_slope), np.array(start), jac=True,
                               method="L-BFGS-B", bounds=bounds,
                               options={"maxiter": 500, "ftol": 1e-15, "gtol": 1e-10})
    slope = fixed_slope if fixed_slope is not None else float(result.x[0])
    intercept = float(result.x[-1])
    at_bound = any(math.isclose(value, edge, rel_tol=1e-6, abs_tol=1e-9)
                   for value, (low, high) in zip(result.x, bounds, strict=True) for edge in (low, high))
    # The kept temperature is returned as given (1 / (1 / T) need not round-trip exactly).
    fitted_temperature = temperature if fixed_slope is not None else 1.0 / slope
    fitted = calibration.apply_temperature(probabilities, fitted_temperature, intercept)
    before = calibration.apply_temperature(probabilities, temperature, logit_shift)
    return Recalibration(method, fitted_temperature, intercept, at_bound, bool(result.success), int(labels.size),
                         calibration.nll(labels, before), calibration.nll(labels, fitted))
