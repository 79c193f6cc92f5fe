"""Prevalence as a setting: calibrated probabilities restated at a stated PNEUMONIA prevalence."""

# The stored calibration, sigmoid(logit(p) / T + s), gives P(PNEUMONIA | image) at the training
# prevalence P_train. Under label shift (the images of each class look the same at the site, only the
# class mix differs) Bayes' rule moves the posterior to a prevalence P_target by adding one constant to
# its logit: logit(P_target) - logit(P_train) (the prior odds ratio). Ranking, AUCs and every label at a
# threshold on the raw probability are unchanged; only the probabilities are read at the stated mix.

from __future__ import annotations

import math

import numpy as np

from cxr_tfdata.metrics import calibration


def check_prevalence(value, name: str = "prevalence") -> float:
    """value as a float strictly inside (0, 1), else ValueError naming it: 0 and 1 have no logit
    (a site with no PNEUMONIA at all needs no classifier)."""
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}") from e
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be strictly between 0 and 1 (a share of PNEUMONIA images), got {value!r}")
    return value


def prevalence_from_counts(class_counts: dict[str, int]) -> float:
    """The PNEUMONIA share of {"NORMAL": n0, "PNEUMONIA": n1}, as a contract's data.splits.<split>.class_counts
    stores them."""
    normal, pneumonia = int(class_counts.get("NORMAL", 0)), int(class_counts.get("PNEUMONIA", 0))
    if normal < 0 or pneumonia < 0 or normal + pneumonia == 0:
        raise ValueError(f"class counts must be non-negative with at least one image, got {class_counts!r}")
    return check_prevalence(pneumonia / (normal + pneumonia), "prevalence from class counts")


def prevalence_shift(p_train: float, p_target: float) -> float:
    """logit(p_target) - logit(p_train): what moving from the training to the target prevalence adds to
    the calibrated logit."""
    p_train = check_prevalence(p_train, "training prevalence")
    p_target = check_prevalence(p_target, "target prevalence")
    return math.log(p_target / (1.0 - p_target)) - math.log(p_train / (1.0 - p_train))


def calibrated_at_prevalence(probabilities, temperature: float, logit_shift: float, train_prevalence: float,
                             target_prevalence: float) -> np.ndarray:
    """sigmoid(logit(p) / T + logit_shift + prevalence_shift(P_train, P_target)) for raw probabilities p.

    temperature and logit_shift are the contract's; train_prevalence is the prevalence the stored
    calibration reflects (the train split's PNEUMONIA share: logit_shift brings the logit back to it).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not math.isfinite(logit_shift):
        raise ValueError(f"logit_shift must be finite, got {logit_shift!r}")
    shift = prevalence_shift(train_prevalence, target_prevalence)
    return calibration.apply_temperature(probabilities, temperature, logit_shift + shift)


def restate(calibrated_probabilities, from_prevalence: float, to_prevalence: float) -> np.ndarray:
    """Already calibrated probabilities (at from_prevalence) restated at to_prevalence."""
    shift = prevalence_shift(from_prevalence, to_prevalence)
    return calibration.sigmoid(calibration.logit(calibrated_probabilities) + shift)
