"""Percentile bootstrap intervals of the headline metrics, resampling patients when ids are known.

When the records carry patient ids the bootstrap samples patients with replacement and takes all
their images (a cluster bootstrap: images of one patient are not independent), otherwise images.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from cxr_tfdata.metrics.threshold_metrics import HEADLINE_METRICS, predicted_at

CONFIDENCE = 0.95


def cluster_weights(groups: list[str] | None, n: int, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """[num_samples, n] bootstrap multiplicities: patients (or images) drawn with replacement."""
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=num_samples).astype(np.float64)
    unique, cluster_of_image = np.unique(np.asarray(groups), return_inverse=True)
    draws = rng.multinomial(unique.size, np.full(unique.size, 1.0 / unique.size), size=num_samples)
    return draws[:, cluster_of_image].astype(np.float64)


def _weighted_threshold_metrics(weights: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    positive, negative = labels == 1, labels == 0
    tp = weights @ (positive & (predicted == 1))
    fn = weights @ (positive & (predicted == 0))
    fp = weights @ (negative & (predicted == 1))
    tn = weights @ (negative & (predicted == 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        return {
            "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "precision": precision,
            "recall": recall,
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
        }


def _weighted_ranking_metrics(weights: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> dict[str, np.ndarray]:
    roc, ap = np.full(len(weights), np.nan), np.full(len(weights), np.nan)
    for i, w in enumerate(weights):
        if (w * labels).sum() > 0 and (w * (1 - labels)).sum() > 0:
            roc[i] = skm.roc_auc_score(labels, probabilities, sample_weight=w)
            ap[i] = skm.average_precision_score(labels, probabilities, sample_weight=w)
    return {"roc_auc": roc, "pr_auc": ap}


def bootstrap_intervals(
    labels: np.ndarray,
    probabilities: np.ndarray,
    thresholds: dict[str, float],
    groups: list[str] | None,
    num_samples: int,
    seed: int,
) -> dict[str, dict[str, list[float] | None]]:
    """Percentile intervals of the headline metrics at each named threshold (same resamples for all)."""
    if num_samples == 0:
        return {name: dict.fromkeys(HEADLINE_METRICS) for name in thresholds}
    labels = np.asarray(labels).astype(np.int64)
    rng = np.random.default_rng(seed)
    weights = cluster_weights(groups, labels.size, num_samples, rng)
    ranking = _weighted_ranking_metrics(weights, labels, np.asarray(probabilities, np.float64))
    intervals = {}
    for name, threshold in thresholds.items():
        predicted = predicted_at(probabilities, threshold)
        values = {**_weighted_threshold_metrics(weights, labels, predicted), **ranking}
        intervals[name] = {key: _percentile_interval(values[key]) for key in HEADLINE_METRICS}
    return intervals


def _percentile_interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = 100.0 * (1.0 - CONFIDENCE) / 2.0
    # Every headline metric is a fraction; clipping removes float round-off such as 1.0000000000000002.
    low, high = np.clip(np.percentile(values, [tail, 100.0 - tail]), 0.0, 1.0)
    return [float(low), float(high)]
