"""Headline metrics at a threshold and the operating threshold chosen for a target recall.

Convention, used everywhere in this package: a prediction is positive (PNEUMONIA) when
probability >= threshold (scikit-learn's convention), compared in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm

from cxr_tfdata.core import record_schema

# The metrics every report, card and interval shows, in this order.
HEADLINE_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, Any]:
    """Headline metrics at `threshold`, each computed by scikit-learn so anyone can recompute them."""
    labels = np.asarray(labels).astype(np.int64)
    predicted = predicted_at(probabilities, threshold)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel().tolist()
    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "precision": float(skm.precision_score(labels, predicted, zero_division=0)),
        "recall": float(skm.recall_score(labels, predicted, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
        "f1": float(skm.f1_score(labels, predicted, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(labels, probabilities)) if both_classes else None,
        "pr_auc": float(skm.average_precision_score(labels, probabilities)) if both_classes else None,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "threshold": float(threshold),
        "n": int(labels.size),
    }


def predicted_at(probabilities, threshold: float) -> np.ndarray:
    """1 (PNEUMONIA) where probability >= threshold, compared in float64 as cxr-predict and the export
    compare (NumPy would compare a float32 array in float32, rounding a typed threshold)."""
    return (np.asarray(probabilities, np.float64) >= threshold).astype(np.int64)


def classification_report(labels: np.ndarray, probabilities: np.ndarray, threshold: float, as_dict: bool):
    predicted = predicted_at(probabilities, threshold)
    return skm.classification_report(
        labels, predicted, labels=[0, 1], target_names=list(record_schema.CLASS_NAMES),
        output_dict=as_dict, zero_division=0, digits=4,
    )


def choose_operating_threshold(labels: np.ndarray, probabilities: np.ndarray, target_recall: float) -> float:
    """The highest threshold whose recall on these (val) predictions is >= target_recall."""
    labels = np.asarray(labels).astype(np.int64)
    if not labels.any():
        raise ValueError("cannot choose an operating threshold: the val split has no PNEUMONIA images")
    positive_scores = np.sort(np.asarray(probabilities, np.float64)[labels == 1])[::-1]
    # Recall at threshold = k-th highest positive score is k / num_positive (ties count together).
    needed = int(np.ceil(target_recall * positive_scores.size - 1e-9))
    return float(positive_scores[max(needed, 1) - 1])
