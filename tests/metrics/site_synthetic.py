"""Synthetic chest-X-ray-like scores whose calibration and prevalence are known exactly."""

# Images of a class have a score x ~ N(+-SEPARATION, 1) (a patient part N(0, 1/2) shared by a patient's
# images plus an image part N(0, 1/2)), so at prevalence P the true posterior logit of an image is
# logit(P) + 2 * SEPARATION * x, whatever the patient structure. A model trained with class weights and
# overconfident is simulated by raw logit = TEMPERATURE * (true logit at P_train - LOGIT_SHIFT): the
# contract's calibration sigmoid(raw / TEMPERATURE + LOGIT_SHIFT) then gives the true posterior at P_train.

from __future__ import annotations

import dataclasses
import math

import numpy as np

SEPARATION = 1.0
TEMPERATURE = 1.8
LOGIT_SHIFT = math.log(0.26 / 0.74)  # log(w0 / w1) for balanced class weights at P_train = 0.74
TRAIN_PREVALENCE = 0.74


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    labels: np.ndarray
    scores: np.ndarray  # x
    groups: np.ndarray  # patient ids
    raw: np.ndarray  # the model's raw probabilities (float32, as Keras gives them)

    def true_posterior(self, prevalence: float) -> np.ndarray:
        return sigmoid(logit(prevalence) + 2.0 * SEPARATION * self.scores)


def site(num_patients: int, prevalence: float, seed: int, max_images_per_patient: int = 3) -> Site:
    """Patients of class PNEUMONIA with probability `prevalence`, 1..max images each."""
    rng = np.random.default_rng(seed)
    patient_labels = (rng.random(num_patients) < prevalence).astype(np.int64)
    images = rng.integers(1, max_images_per_patient + 1, num_patients)
    patient_effect = rng.normal(0.0, math.sqrt(0.5), num_patients)
    labels = np.repeat(patient_labels, images)
    groups = np.repeat(np.array([f"P{i:05d}" for i in range(num_patients)]), images)
    scores = (np.where(labels == 1, SEPARATION, -SEPARATION) + np.repeat(patient_effect, images)
              + rng.normal(0.0, math.sqrt(0.5), labels.size))
    calibrated_logit = logit(TRAIN_PREVALENCE) + 2.0 * SEPARATION * scores
    raw = sigmoid(TEMPERATURE * (calibrated_logit - LOGIT_SHIFT)).astype(np.float32)
    return Site(labels, scores, groups, raw)
