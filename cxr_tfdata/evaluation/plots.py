"""Evaluation plots as PNG files: ROC, precision-recall, confusion matrix and calibration.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global state),
and each file is written beside its target and renamed into place.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as skm

from cxr_tfdata.core import record_schema
from cxr_tfdata.files import atomic
from cxr_tfdata.metrics import calibration


def _save(figure: Figure, path: str) -> None:
    FigureCanvasAgg(figure)
    atomic.write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"),
                      suffix=".png")


def _mark_thresholds(ax, points: list[tuple[float, float, str]]) -> None:
    for (x, y, label), marker in zip(points, ("o", "s"), strict=False):
        ax.plot([x], [y], marker=marker, linestyle="none", markersize=7, label=label)


def roc_plot(labels: np.ndarray, probabilities: np.ndarray, metrics: dict[str, Any], path: str) -> None:
    fpr, tpr, _ = skm.roc_curve(labels, probabilities)
    figure = Figure(figsize=(5, 5))
    ax = figure.add_subplot()
    ax.plot(fpr, tpr, label=f"ROC (AUC {metrics['roc_auc']:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    _mark_thresholds(ax, [
        (1 - b["specificity"], b["recall"], f"threshold {b['threshold']:.3g}")
        for b in (metrics["threshold_0.5"], metrics["operating_point"])
    ])
    ax.set(xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)",
           title="ROC curve", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    _save(figure, path)


def pr_plot(labels: np.ndarray, probabilities: np.ndarray, metrics: dict[str, Any], path: str) -> None:
    precision, recall, _ = skm.precision_recall_curve(labels, probabilities)
    figure = Figure(figsize=(5, 5))
    ax = figure.add_subplot()
    ax.step(recall, precision, where="post", label=f"PR (AP {metrics['pr_auc']:.3f})")
    ax.axhline(float(np.mean(labels)), linestyle="--", color="grey", linewidth=1, label="prevalence")
    _mark_thresholds(ax, [
        (b["recall"], b["precision"], f"threshold {b['threshold']:.3g}")
        for b in (metrics["threshold_0.5"], metrics["operating_point"])
    ])
    ax.set(xlabel="Recall (sensitivity)", ylabel="Precision (PPV)", title="Precision-recall curve",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left")
    _save(figure, path)


def confusion_plot(metrics: dict[str, Any], path: str) -> None:
    blocks = (metrics["threshold_0.5"], metrics["operating_point"])
    figure = Figure(figsize=(9, 4))
    for i, block in enumerate(blocks):
        ax = figure.add_subplot(1, 2, i + 1)
        matrix = np.asarray(block["confusion_matrix"])
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for (row, col), count in np.ndenumerate(matrix):
            color = "white" if count > matrix.max() / 2 else "black"
            ax.text(col, row, str(count), ha="center", va="center", color=color, fontsize=13)
        ax.set_xticks([0, 1], record_schema.CLASS_NAMES)
        ax.set_yticks([0, 1], record_schema.CLASS_NAMES)
        ax.set(xlabel="Predicted", ylabel="True", title=f"Threshold {block['threshold']:.3g}")
    _save(figure, path)


def calibration_plot(labels: np.ndarray, probabilities: np.ndarray, path: str,
                     calibrated: np.ndarray | None = None, temperature: float | None = None,
                     logit_shift: float = 0.0) -> None:
    """Reliability diagram of the raw (and the calibrated) probabilities, with the bins ECE uses
    (calibration.ECE_BINS equal-width bins; a marker per non-empty bin), and their histograms."""
    figure = Figure(figsize=(5.5, 6.5))
    ax, hist = figure.add_subplot(2, 1, 1), figure.add_subplot(2, 1, 2)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    curves = [("raw", probabilities, "o")]
    if calibrated is not None:
        curves.append((f"calibrated (T = {temperature:.3g}, shift {logit_shift:.3g})" if temperature else "calibrated",
                       calibrated, "s"))
    for name, values, marker in curves:
        bins = calibration.reliability(labels, values)
        ece = calibration.ece(labels, values)
        ax.plot(bins["mean_probability"], bins["observed_frequency"], marker=marker, label=f"{name}: ECE {ece:.3f}")
    ax.set(ylabel="Fraction PNEUMONIA", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability diagram ({calibration.ECE_BINS} equal-width bins)")
    ax.legend(loc="upper left", fontsize=8)
    hist.hist([values for _, values, _ in curves], bins=calibration.ECE_BINS, range=(0, 1),
              label=[name for name, _, _ in curves])
    hist.set(xlabel="Predicted probability of PNEUMONIA", ylabel="Images", xlim=(0, 1))
    if len(curves) > 1:
        hist.legend(fontsize=8)
    _save(figure, path)


def write_all(labels: np.ndarray, probabilities: np.ndarray, metrics: dict[str, Any], output_dir: str,
              calibrated: np.ndarray | None = None) -> list[str]:
    """Writes roc.png, pr.png, confusion_matrix.png and calibration.png; returns their paths."""
    paths = [os.path.join(output_dir, name) for name in
             ("roc.png", "pr.png", "confusion_matrix.png", "calibration.png")]
    both_classes = len(np.unique(labels)) == 2
    if both_classes:
        roc_plot(labels, probabilities, metrics, paths[0])
        pr_plot(labels, probabilities, metrics, paths[1])
    confusion_plot(metrics, paths[2])
    block = metrics.get("calibration") or {}
    temperature = block.get("temperature")
    calibration_plot(labels, probabilities, paths[3], calibrated if temperature is not None else None, temperature,
                     (block.get("logit_shift") or 0.0) + (block.get("prevalence_shift") or 0.0))
    return [p for p in paths if os.path.exists(p)]
