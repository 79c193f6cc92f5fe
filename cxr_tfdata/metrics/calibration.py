"""Calibration of a sigmoid classifier: temperature scaling, and how calibrated probabilities are.

calibrated = sigmoid(logit(p) / T + s). The shift s is not fitted: it undoes the known prior shift of
training with class weights or balanced sampling (`prior_logit_shift`), which temperature alone
cannot (it has no intercept) and which otherwise leaves every probability biased towards the class
the loss favoured; it applies after the temperature, since an over- or underconfident model scales
the logit it learned, the reweighted one. Temperature scaling (Guo et al. 2017) divides the model's logit by one scalar T > 0 fitted on val by
minimising the negative log-likelihood: it changes no ranking (ROC-AUC, and a threshold's labels,
are the same) and brings predicted probabilities closer to observed frequencies. Fitted on a = 1/T,
where NLL(a) = mean(softplus(a z) - y a z) is convex (a one-feature logistic regression without a
bias), with Newton steps kept inside a bisection bracket T in [0.01, 100]: pure Newton from T = 1
diverges on an overconfident model.

ECE here is the expected calibration error of P(PNEUMONIA): 15 equal-width bins over [0, 1]
([k/15, (k+1)/15), 1.0 in the last), each contributing |observed frequency - mean probability|
weighted by its share of the images. (The "confidence" variant folds both classes into [0.5, 1]
and can hide a miscalibration that differs by class.) Brier is the mean squared error of the
probability; NLL the mean binary cross-entropy. NumPy only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# A float32 sigmoid saturates at 1 - 2^-24: probabilities are clipped symmetrically to that before
# taking logits, so an exact 0 or 1 gets a finite logit.
PROBABILITY_EPSILON = 2.0 ** -24
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2
ECE_BINS = 15
ECE_DEFINITION = (f"expected calibration error of P(PNEUMONIA): {ECE_BINS} equal-width bins over [0, 1], each "
                  f"|observed PNEUMONIA frequency - mean probability| weighted by its share of the images")


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, np.float64)))


def apply_temperature(probabilities, temperature: float, logit_shift: float = 0.0) -> np.ndarray:
    """sigmoid(logit(p) / T + logit_shift): the calibrated probabilities."""
    return sigmoid(logit(probabilities) / temperature + logit_shift)


def prior_logit_shift(class_weights: dict[int, float] | None, class_counts: dict[str, int] | None,
                      balanced_sampling: bool) -> float:
    """What training with reweighted classes added to the model's logit, to be taken off again.

    A loss weighting class c by w_c is minimised by q = w1 p / (w1 p + w0 (1 - p)), i.e.
    logit(q) = logit(p) + log(w1 / w0): the model learns the posterior under other class priors.
    Balanced sampling does the same with w_c = 1 / (share of c). The shift returned, log(w0 / w1),
    brings the logit back to the train split's own prevalence; 0 when training did not reweight.
    """
    if class_weights:
        return float(math.log(class_weights[0] / class_weights[1]))
    if balanced_sampling and class_counts:
        normal, pneumonia = int(class_counts.get("NORMAL", 0)), int(class_counts.get("PNEUMONIA", 0))
        if normal > 0 and pneumonia > 0:
            return float(math.log(pneumonia / normal))
    return 0.0


def checked(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    """labels (0 or 1) and probabilities (finite, in [0, 1]) as aligned 1-D float64 arrays, else ValueError."""
    labels = np.asarray(labels, np.float64).reshape(-1)
    probabilities = np.asarray(probabilities, np.float64).reshape(-1)
    if labels.size == 0 or labels.shape != probabilities.shape:
        raise ValueError(f"labels and probabilities must be non-empty and as many ({labels.size} vs "
                         f"{probabilities.size})")
    if not np.all(np.isfinite(probabilities)) or np.any((probabilities < 0) | (probabilities > 1)):
        raise ValueError("probabilities must be finite and in [0, 1]")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 or 1")
    return labels, probabilities


def nll(labels, probabilities) -> float:
    labels, probabilities = checked(labels, probabilities)
    z = logit(probabilities)
    return float(np.mean(np.logaddexp(0.0, z) - labels * z))


def brier(labels, probabilities) -> float:
    labels, probabilities = checked(labels, probabilities)
    return float(np.mean((probabilities - labels) ** 2))


def ece(labels, probabilities, num_bins: int = ECE_BINS) -> float:
    labels, probabilities = checked(labels, probabilities)
    bins = np.minimum((probabilities * num_bins).astype(np.int64), num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    gap = np.abs(np.bincount(bins, labels, num_bins) - np.bincount(bins, probabilities, num_bins))
    return float(gap[count > 0].sum() / labels.size)


def reliability(labels, probabilities, num_bins: int = ECE_BINS) -> dict[str, list]:
    """Per non-empty bin: mean probability, observed frequency and count (the reliability diagram)."""
    labels, probabilities = checked(labels, probabilities)
    bins = np.minimum((probabilities * num_bins).astype(np.int64), num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    keep = count > 0
    return {"mean_probability": (np.bincount(bins, probabilities, num_bins)[keep] / count[keep]).tolist(),
            "observed_frequency": (np.bincount(bins, labels, num_bins)[keep] / count[keep]).tolist(),
            "count": count[keep].tolist()}


def summary(labels, probabilities) -> dict[str, float]:
    """ECE, Brier and NLL of one set of probabilities."""
    return {"ece": ece(labels, probabilities), "brier": brier(labels, probabilities),
            "nll": nll(labels, probabilities)}


@dataclasses.dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    at_bound: bool  # the optimum lies beyond [MIN_TEMPERATURE, MAX_TEMPERATURE]: separable or uninformative
    nll_before: float
    nll_after: float


def fit_temperature(labels, probabilities, logit_shift: float = 0.0, tolerance: float = 1e-12,
                    max_iterations: int = 100) -> TemperatureFit:
    """The T minimising the mean NLL of sigmoid(logit(p) / T + logit_shift) on (labels, probabilities).

    Raises ValueError for a set that cannot determine T: one class only, or every p = 0.5.
    """
    labels, probabilities = checked(labels, probabilities)
    if labels.min() == labels.max():
        raise ValueError("fitting a temperature needs both classes among the labels")
    z = logit(probabilities)
    if not np.any(z):
        raise ValueError("every probability is 0.5: no temperature changes anything")

    def derivatives(a: float) -> tuple[float, float]:
        s = sigmoid(a * z + logit_shift)
        return float(np.mean((s - labels) * z)), float(np.mean(s * (1.0 - s) * z * z))

    low, high = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE
    if derivatives(low)[0] >= 0:
        a, at_bound = low, True
    elif derivatives(high)[0] <= 0:
        a, at_bound = high, True
    else:
        a, at_bound = 1.0, False
        for _ in range(max_iterations):
            gradient, curvature = derivatives(a)
            if curvature > 0 and abs(gradient / curvature) <= tolerance * a:
                break
            if gradient > 0:
                high = a
            else:
                low = a
            step = a - gradient / curvature if curvature > 0 else math.nan
            a = step if low < step < high else math.sqrt(low * high)
    temperature = 1.0 / a
    return TemperatureFit(temperature, at_bound, nll(labels, probabilities),
                          nll(labels, apply_temperature(probabilities, temperature, logit_shift)))
