"""Metrics and reports on a split: threshold metrics, AUCs, bootstrap intervals, operating threshold.

Conventions, used everywhere in this package:
  * a prediction is positive (PNEUMONIA) when probability >= threshold (scikit-learn's convention);
  * the operating threshold is the highest threshold whose recall (sensitivity) on the val split is
    at least `target_recall`: a val probability itself, so nothing is interpolated;
  * intervals are 95% percentile bootstrap intervals; when the records carry patient ids the
    bootstrap samples patients with replacement and takes all their images (a cluster bootstrap,
    since images of one patient are not independent), otherwise it samples images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import numpy as np
from absl import logging
from sklearn import metrics as skm

from cxr_tfdata import atomic, dataset_info, features, locking, model_io, outputs, tables
from cxr_tfdata import config as config_lib
from cxr_tfdata.progress import Progress

HEADLINE_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")
DEFAULT_THRESHOLD = 0.5
CONFIDENCE = 0.95
PROGRAM = "cxr-evaluate"
# Everything cxr-evaluate writes into --output_dir; no other file there is touched.
EVALUATION_FILES = ("metrics.json", "report.md", "predictions.csv", "roc.png", "pr.png",
                    "confusion_matrix.png", "calibration.png")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """What cxr-evaluate runs: a model over one split, with the val split for the operating point."""

    model_path: str
    data_dir: str
    output_dir: str
    split: str = "test"
    val_split: str = "val"
    target_recall: float = 0.95
    threshold: float | None = None  # overrides the val-chosen operating threshold
    bootstrap_samples: int = 1000
    seed: int = 0
    batch_size: int = 32
    overwrite: bool = False  # write into a non-empty --output_dir that cxr-evaluate did not write

    def __post_init__(self):
        _require(bool(self.model_path), "model", "is required")
        _require(bool(self.data_dir), "data_dir", "is required")
        _require(bool(self.output_dir), "output_dir", "is required")
        _require(self.threshold is not None or self.val_split != self.split, "val_split",
                 f"is --split={self.split!r}: the operating threshold would be chosen on the very data it "
                 f"is evaluated on, which flatters every metric at it; choose it on another split "
                 f"(e.g. val) or pass a fixed --threshold")
        _require(0.0 < self.target_recall <= 1.0, "target_recall", f"must be in (0, 1], got {self.target_recall}")
        _require(self.threshold is None or 0.0 <= self.threshold <= 1.0, "threshold", f"must be in [0, 1], got {self.threshold}")
        _require(self.bootstrap_samples >= 0, "bootstrap_samples", f"must be >= 0, got {self.bootstrap_samples}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


def _require(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise ValueError(f"--{flag}: {message}")


@dataclasses.dataclass(frozen=True)
class SplitPredictions:
    """Per-image model outputs of a split, aligned with the records' labels and metadata."""

    filenames: list[str]
    patient_ids: list[str]
    labels: np.ndarray  # int64 in {0, 1}
    probabilities: np.ndarray  # float32 in [0, 1]


def predict_split(model, data_dir: str, split: str, image_size: int, batch_size: int,
                  info: dataset_info.DatasetInfo | None = None) -> SplitPredictions:
    """Runs `model` over a split through the evaluation pipeline (fixed order, no augmentation)."""
    from cxr_tfdata import input_pipeline  # heavy import kept out of the metric helpers

    data_config = config_lib.DataConfig(
        data_dir=data_dir, image_size=image_size, cache="off", deterministic=True
    )
    dataset = input_pipeline.create_dataset(
        data_config, split, batch_size=batch_size, training=False, with_metadata=True, info=info
    )
    filenames, patient_ids, labels, probabilities = [], [], [], []
    info = info or dataset_info.load(data_dir)
    progress = Progress(info.num_examples(split), f"evaluated split {split}")
    for images, batch_labels, metadata in dataset:
        progress.advance(int(images.shape[0]))
        probabilities.append(np.asarray(model.predict_on_batch(images), np.float32).reshape(-1))
        labels.append(np.asarray(batch_labels).reshape(-1))
        filenames.extend(_decode_strings(metadata["filename"]))
        patient_ids.extend(_decode_strings(metadata["patient_id"]))
    if not labels:
        raise ValueError(f"split {split!r} of {data_dir} yielded no records")
    return SplitPredictions(
        filenames=filenames,
        patient_ids=patient_ids,
        labels=np.rint(np.concatenate(labels)).astype(np.int64),
        probabilities=np.concatenate(probabilities),
    )


def _decode_strings(tensor) -> list[str]:
    return [v.decode("utf-8") for v in np.asarray(tensor).reshape(-1).tolist()]


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, Any]:
    """Headline metrics at `threshold`, each computed by scikit-learn so anyone can recompute them."""
    labels = np.asarray(labels).astype(np.int64)
    predicted = (np.asarray(probabilities) >= threshold).astype(np.int64)
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


def classification_report(labels: np.ndarray, probabilities: np.ndarray, threshold: float, as_dict: bool):
    predicted = (np.asarray(probabilities) >= threshold).astype(np.int64)
    return skm.classification_report(
        labels, predicted, labels=[0, 1], target_names=list(features.CLASS_NAMES),
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
        predicted = (np.asarray(probabilities) >= threshold).astype(np.int64)
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


def metrics_at(predictions: SplitPredictions, threshold: float, intervals: dict[str, Any]) -> dict[str, Any]:
    """One threshold's block of metrics.json: the headline numbers, their intervals, the report."""
    block = binary_metrics(predictions.labels, predictions.probabilities, threshold)
    block["classification_report"] = classification_report(
        predictions.labels, predictions.probabilities, threshold, as_dict=True
    )
    block["ci"] = intervals
    for key in HEADLINE_METRICS:
        block[f"{key}_ci"] = intervals.get(key)
    return block


def build_metrics(
    config: EvaluateConfig,
    predictions: SplitPredictions,
    operating: dict[str, Any],
) -> dict[str, Any]:
    """The whole metrics.json: the 0.5 block at top level and under "threshold_0.5", and the operating point."""
    groups = predictions.patient_ids if all(predictions.patient_ids) else None
    thresholds = {"threshold_0.5": DEFAULT_THRESHOLD, "operating_point": operating["threshold"]}
    intervals = bootstrap_intervals(
        predictions.labels, predictions.probabilities, thresholds, groups,
        config.bootstrap_samples, config.seed,
    )
    at_half = metrics_at(predictions, DEFAULT_THRESHOLD, intervals["threshold_0.5"])
    at_operating = metrics_at(predictions, operating["threshold"], intervals["operating_point"])
    at_operating.update({k: v for k, v in operating.items() if k != "threshold"})
    return {
        **at_half,
        "threshold_0.5": at_half,
        "operating_point": at_operating,
        "bootstrap": {
            "resampled_by": "patient" if groups is not None else "image",
            "num_clusters": len(set(groups)) if groups is not None else int(predictions.labels.size),
            "samples": config.bootstrap_samples,
            "confidence": CONFIDENCE,
            "method": "percentile",
            "seed": config.seed,
        },
        "split": config.split,
        "model": os.path.abspath(config.model_path),
        "data_dir": os.path.abspath(config.data_dir),
        "positive_class": features.POSITIVE_CLASS,
        "decision_rule": "PNEUMONIA when probability >= threshold",
        "class_counts": {
            name: int((predictions.labels == i).sum()) for i, name in enumerate(features.CLASS_NAMES)
        },
    }


def operating_point(config: EvaluateConfig, val_predictions: SplitPredictions | None) -> dict[str, Any]:
    """The operating threshold: --threshold when given, else chosen on the val split for --target_recall."""
    if config.threshold is not None:
        return {"threshold": float(config.threshold), "chosen_by": "--threshold"}
    if val_predictions is None:
        raise ValueError(f"choosing the operating threshold needs the {config.val_split!r} split's predictions "
                         f"(or pass --threshold)")
    threshold = choose_operating_threshold(
        val_predictions.labels, val_predictions.probabilities, config.target_recall
    )
    val = binary_metrics(val_predictions.labels, val_predictions.probabilities, threshold)
    return {
        "threshold": threshold,
        "chosen_by": f"highest threshold with recall >= {config.target_recall} on split {config.val_split!r}",
        "target_recall": config.target_recall,
        "val_split": config.val_split,
        "val_recall": val["recall"],
        "val_specificity": val["specificity"],
        "val_n": val["n"],
    }


def predictions_csv(predictions: SplitPredictions) -> str:
    """filename, patient_id, label (0 NORMAL / 1 PNEUMONIA), probability: enough to recompute every metric.

    Text cells that a spreadsheet would run as a formula start with a single quote (tables.safe_cell).
    """
    rows = zip(predictions.filenames, predictions.patient_ids, predictions.labels.tolist(),
               (f"{p:.9g}" for p in predictions.probabilities.tolist()), strict=True)
    return tables.csv_text(["filename", "patient_id", "label", "probability"], rows)


def _check_inputs(config: EvaluateConfig) -> tuple[Any, int, dataset_info.DatasetInfo]:
    """Loads the model and checks it against the dataset and the output folder, before any work."""
    inputs = {"--model": config.model_path, "--data_dir": config.data_dir}
    # The folder only receives files of fixed names, so it may hold the model it evaluates; none of
    # those files may be an input.
    outputs.check_apart("--output_dir", config.output_dir, inputs, may_contain_inputs=True)
    for name in EVALUATION_FILES:
        outputs.check_apart("--output_dir", os.path.join(config.output_dir, name), inputs)
    model = model_io.load_model(config.model_path)
    image_size = model_io.model_image_size(model, config.model_path)
    info = dataset_info.load(config.data_dir)
    info.split(config.split)
    if config.threshold is None:
        info.split(config.val_split)
    model_io.check_image_size(image_size, info.image_size, config.model_path, config.data_dir)
    return model, image_size, info


@contextlib.contextmanager
def claimed_output_dir(config: EvaluateConfig):
    """The output folder, locked and claimed for cxr-evaluate (see outputs.claim_folder) for the
    with-block. When the run fails, a folder it created is removed with what it wrote; a folder
    that existed keeps the marker, so its files stay recognisably cxr-evaluate's."""
    folder = config.output_dir
    created = not os.path.lexists(folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with locking.exclusive_lock(locking.lock_path_beside(folder), f"--output_dir={folder}", PROGRAM):
        try:
            outputs.claim_folder("--output_dir", folder, PROGRAM, EVALUATION_FILES, config.overwrite)
            yield folder
        except BaseException:
            if created:
                for name in (*EVALUATION_FILES, outputs.FOLDER_MARKER):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(folder, name))
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            raise


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Runs the model over the split (and val), writes metrics.json, report.md, plots, predictions.csv."""
    from cxr_tfdata import plots

    config = dataclasses.replace(config, output_dir=outputs.canonical(config.output_dir))
    model, image_size, info = _check_inputs(config)
    how = (f"threshold {config.threshold} given" if config.threshold is not None else
           f"operating threshold chosen on split {config.val_split} for recall {config.target_recall}")
    logging.info("evaluating %s on split %s of %s (%d images; %s)", config.model_path, config.split,
                 config.data_dir, info.num_examples(config.split), how)
    with claimed_output_dir(config) as folder:
        predictions = predict_split(model, config.data_dir, config.split, image_size, config.batch_size, info)
        val_predictions = None
        if config.threshold is None:
            val_predictions = predict_split(
                model, config.data_dir, config.val_split, image_size, config.batch_size, info
            )
        metrics = build_metrics(config, predictions, operating_point(config, val_predictions))
        atomic.write_text(os.path.join(folder, "predictions.csv"), predictions_csv(predictions))
        plots.write_all(predictions.labels, predictions.probabilities, metrics, folder)
        atomic.write_text(os.path.join(folder, "report.md"), markdown_report(metrics, predictions))
        atomic.write_json(os.path.join(folder, "metrics.json"), metrics)
    return metrics


_METRIC_LABELS = {
    "accuracy": "Accuracy",
    "precision": "Precision (PPV)",
    "recall": "Recall (sensitivity)",
    "specificity": "Specificity",
    "f1": "F1",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC (average precision)",
}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _fmt_ci(interval: list[float] | None) -> str:
    return "n/a" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def summary_table(metrics: dict[str, Any]) -> str:
    """A Markdown table of the headline metrics at 0.5 and at the operating point, with intervals."""
    half, op = metrics["threshold_0.5"], metrics["operating_point"]
    confidence = int(round(100 * metrics["bootstrap"]["confidence"]))
    lines = [
        f"| Metric | @ {half['threshold']:.4g} | {confidence}% CI | @ {op['threshold']:.4g} (operating) | {confidence}% CI |",
        "|---|---|---|---|---|",
    ]
    for key in HEADLINE_METRICS:
        lines.append(
            f"| {_METRIC_LABELS[key]} | {_fmt(half[key])} | {_fmt_ci(half['ci'].get(key))} "
            f"| {_fmt(op[key])} | {_fmt_ci(op['ci'].get(key))} |"
        )
    lines.append(f"| n | {half['n']} | | {op['n']} | |")
    return "\n".join(lines)


def _confusion_table(block: dict[str, Any]) -> str:
    (tn, fp), (fn, tp) = block["confusion_matrix"]
    return "\n".join([
        "| true \\ predicted | NORMAL | PNEUMONIA |",
        "|---|---|---|",
        f"| NORMAL | {tn} (true negatives) | {fp} (false positives) |",
        f"| PNEUMONIA | {fn} (false negatives) | {tp} (true positives) |",
    ])


def _false_negative_text(metrics: dict[str, Any]) -> str:
    op = metrics["operating_point"]
    (tn, fp), (fn, tp) = op["confusion_matrix"]
    (_, _), (fn_half, _) = metrics["threshold_0.5"]["confusion_matrix"]
    how = op["chosen_by"]
    val_part = ""
    if "val_recall" in op:
        val_part = (f" On the {op['val_split']} split it gave sensitivity {op['val_recall']:.4f} "
                    f"(target {op['target_recall']}).")
    return (
        "A missed pneumonia (false negative) is the costly error here: a sick child may go untreated, "
        "while a false alarm costs a second look. The operating threshold "
        f"{op['threshold']:.4g} was chosen as the {how}.{val_part} On the {metrics['split']} split it "
        f"gives sensitivity {_fmt(op['recall'])} (95% CI {_fmt_ci(op['ci'].get('recall'))}): "
        f"{fn} of {fn + tp} pneumonia images missed, against {fn_half} at threshold 0.5. "
        f"The price is specificity {_fmt(op['specificity'])} (95% CI "
        f"{_fmt_ci(op['ci'].get('specificity'))}): {fp} of {tn + fp} normal images flagged. "
        "A threshold chosen on val need not reach its target on another split; the interval shows how "
        "far the sensitivity may move."
    )


def markdown_report(metrics: dict[str, Any], predictions: SplitPredictions) -> str:
    """report.md: summary, intervals, confusion matrices, false negatives, classification reports, plots."""
    boot = metrics["bootstrap"]
    counts = ", ".join(f"{k}: {v}" for k, v in metrics["class_counts"].items())
    half, op = metrics["threshold_0.5"], metrics["operating_point"]
    return "\n".join([
        f"# Evaluation on split `{metrics['split']}`",
        "",
        f"Model: `{metrics['model']}`  ",
        f"Data: `{metrics['data_dir']}` ({metrics['n']} images; {counts})  ",
        f"Decision rule: {metrics['decision_rule']}.",
        "",
        "## Summary",
        "",
        summary_table(metrics),
        "",
        f"Intervals: {int(round(100 * boot['confidence']))}% percentile bootstrap, {boot['samples']} "
        f"resamples, resampled by **{boot['resampled_by']}** ({boot['num_clusters']} "
        f"{'patients' if boot['resampled_by'] == 'patient' else 'images'}; seed {boot['seed']}).",
        "",
        "## False negatives and the operating point",
        "",
        _false_negative_text(metrics),
        "",
        f"## Confusion matrix at threshold {half['threshold']:.4g}",
        "",
        _confusion_table(half),
        "",
        f"## Confusion matrix at the operating threshold {op['threshold']:.4g}",
        "",
        _confusion_table(op),
        "",
        f"## Classification report at threshold {half['threshold']:.4g}",
        "",
        "```",
        classification_report(predictions.labels, predictions.probabilities, half['threshold'], as_dict=False),
        "```",
        "",
        f"## Classification report at the operating threshold {op['threshold']:.4g}",
        "",
        "```",
        classification_report(predictions.labels, predictions.probabilities, op['threshold'], as_dict=False),
        "```",
        "",
        "## Plots",
        "",
        "![ROC](roc.png) ![Precision-recall](pr.png)",
        "![Confusion matrix](confusion_matrix.png) ![Calibration](calibration.png)",
        "",
        "Per-image probabilities: `predictions.csv`.",
        "",
    ])

