"""Metrics and reports on a split or an image folder: threshold metrics, AUCs, bootstrap intervals,
the operating threshold, calibration, and the model card.

Conventions, used everywhere in this package:
  * a prediction is positive (PNEUMONIA) when probability >= threshold (scikit-learn's convention);
  * the operating threshold is the one stored in the model's contract (chosen by cxr-train on val),
    unless --threshold fixes one or --choose_threshold_on_val asks for a fresh choice: the highest
    threshold whose recall (sensitivity) on the val split is at least `target_recall`, a val
    probability itself, so nothing is interpolated;
  * calibrated probabilities apply the contract's temperature (calibration.py); the threshold applies
    to the raw probability, which ranks images the same way;
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

from cxr_tfdata import (
    atomic,
    calibration,
    dataset_info,
    features,
    locking,
    model_card,
    model_io,
    outputs,
    tables,
)
from cxr_tfdata import config as config_lib
from cxr_tfdata import contract as contract_lib
from cxr_tfdata.progress import Progress

HEADLINE_METRICS = model_card.HEADLINE_METRICS
DEFAULT_THRESHOLD = features.DEFAULT_THRESHOLD
DEFAULT_TARGET_RECALL = 0.95
CONFIDENCE = 0.95
PROGRAM = "cxr-evaluate"
# Everything cxr-evaluate writes into --output_dir; no other file there is touched.
EVALUATION_FILES = ("metrics.json", "report.md", "predictions.csv", "roc.png", "pr.png",
                    "confusion_matrix.png", "calibration.png", "MODEL_CARD.md", "model_card.json")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """What cxr-evaluate runs: a model over one split, with the val split for the operating point."""

    model_path: str
    data_dir: str = ""  # records written by cxr-build-tfrecords (or images_dir)
    output_dir: str = ""
    split: str = "test"
    val_split: str = "val"
    # The recall an operating threshold chosen on val must reach; None: the one the model's stored
    # threshold was chosen for, else DEFAULT_TARGET_RECALL.
    target_recall: float | None = None
    threshold: float | None = None  # a fixed operating threshold (neither the model's nor chosen on val)
    bootstrap_samples: int = 1000
    seed: int = 0
    batch_size: int = 32
    overwrite: bool = False  # write into a non-empty --output_dir that cxr-evaluate did not write
    images_dir: str = ""  # evaluate on a folder of NORMAL/ and PNEUMONIA/ images instead of records
    choose_threshold_on_val: bool = False  # choose afresh on --val_split even when the model stores one
    max_file_mb: float = 256.0  # with --images_dir: bytes read per file at most

    def __post_init__(self):
        _require(bool(self.model_path), "model", "is required")
        _require(bool(self.data_dir) != bool(self.images_dir), "data_dir",
                 "give exactly one of --data_dir (records) and --images_dir (an image folder)")
        _require(bool(self.output_dir), "output_dir", "is required")
        _require(not (self.images_dir and self.choose_threshold_on_val), "choose_threshold_on_val",
                 "needs --data_dir: an image folder has no val split")
        _require(not (self.threshold is not None and self.choose_threshold_on_val), "choose_threshold_on_val",
                 f"contradicts --threshold={self.threshold}: give one of them")
        _require(bool(self.images_dir) or self.threshold is not None or self.val_split != self.split, "val_split",
                 f"is --split={self.split!r}: the operating threshold would be chosen on the very data it "
                 f"is evaluated on, which flatters every metric at it; choose it on another split "
                 f"(e.g. val) or pass a fixed --threshold")
        _require(self.target_recall is None or 0.0 < self.target_recall <= 1.0, "target_recall",
                 f"must be in (0, 1], got {self.target_recall}")
        _require(self.threshold is None or 0.0 <= self.threshold <= 1.0, "threshold", f"must be in [0, 1], got {self.threshold}")
        _require(self.bootstrap_samples >= 0, "bootstrap_samples", f"must be >= 0, got {self.bootstrap_samples}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(0 < self.max_file_mb < 1 << 30, "max_file_mb", f"must be a number of MB in (0, 2^30), got {self.max_file_mb}")


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


@dataclasses.dataclass(frozen=True)
class Excluded:
    """A file of an --images_dir that was not evaluated, and why."""

    path: str
    reason: str


def predict_folder(model, records, image_size: int, images_dir: str, batch_size: int,
                   max_file_bytes: int) -> tuple[SplitPredictions, list[Excluded]]:
    """Runs `model` over a folder of NORMAL/ and PNEUMONIA/ images, prepared as `records`
    (predict.RecordSettings) say, through cxr-predict's decode path; the folder is listed exactly as
    the converter lists one split (same files, names and patient ids). Files that cannot be read are
    returned as excluded."""
    from cxr_tfdata import predict  # TensorFlow-heavy
    from tfrecords_builder import scan

    try:
        files, strays, unusable = scan.scan_labelled_folder(images_dir)
    except scan.LayoutError as e:
        raise ValueError(f"--images_dir: {e}") from e
    excluded = [Excluded(path, "not inside NORMAL/ or PNEUMONIA/; not evaluated") for path in strays]
    excluded += [Excluded(entry.path, entry.reason) for entry in unusable]
    rows = predict.predict_rows(
        model, [f.path for f in files], image_size, records.resize == "pad", DEFAULT_THRESHOLD, batch_size,
        records.record_encoding, records.jpeg_quality, max_file_bytes)
    kept = []
    for source, row in zip(files, rows, strict=True):
        if row.error:
            excluded.append(Excluded(source.path, row.error))
        else:
            kept.append((source, row.probability))
    if not kept:
        raise ValueError(f"--images_dir: no image of {images_dir} could be read ({len(excluded)} excluded)")
    predictions = SplitPredictions(
        filenames=[source.filename for source, _ in kept],
        patient_ids=[source.patient_id for source, _ in kept],
        labels=np.asarray([source.label for source, _ in kept], np.int64),
        probabilities=np.asarray([p for _, p in kept], np.float32),
    )
    return predictions, sorted(excluded, key=lambda e: e.path)


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, Any]:
    """Headline metrics at `threshold`, each computed by scikit-learn so anyone can recompute them."""
    labels = np.asarray(labels).astype(np.int64)
    predicted = _at(probabilities, threshold)
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


def _at(probabilities, threshold: float) -> np.ndarray:
    """1 (PNEUMONIA) where probability >= threshold, compared in float64 as cxr-predict and the export
    compare (NumPy would compare a float32 array in float32, rounding a typed threshold)."""
    return (np.asarray(probabilities, np.float64) >= threshold).astype(np.int64)


def classification_report(labels: np.ndarray, probabilities: np.ndarray, threshold: float, as_dict: bool):
    predicted = _at(probabilities, threshold)
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
        predicted = _at(probabilities, threshold)
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


def build_metrics(config: EvaluateConfig, predictions: SplitPredictions, operating: dict[str, Any],
                  calibration_block: dict[str, Any], source: dict[str, Any],
                  model_contract: dict[str, Any] | None) -> dict[str, Any]:
    """The whole metrics.json: the 0.5 block at top level and under "threshold_0.5", the operating
    point, calibration, what was evaluated and what the model's contract says."""
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
        "calibration": calibration_block,
        "bootstrap": {
            "resampled_by": "patient" if groups is not None else "image",
            "num_clusters": len(set(groups)) if groups is not None else int(predictions.labels.size),
            "samples": config.bootstrap_samples,
            "confidence": CONFIDENCE,
            "method": "percentile",
            "seed": config.seed,
        },
        "source": source,
        "split": source["split"],
        "model": os.path.abspath(config.model_path),
        "data_dir": os.path.abspath(config.data_dir) if config.data_dir else None,
        "images_dir": os.path.abspath(config.images_dir) if config.images_dir else None,
        "model_contract": _contract_facts(model_contract),
        "positive_class": features.POSITIVE_CLASS,
        "decision_rule": "PNEUMONIA when probability >= threshold",
        "class_counts": {
            name: int((predictions.labels == i).sum()) for i, name in enumerate(features.CLASS_NAMES)
        },
    }


def _contract_facts(model_contract: dict[str, Any] | None) -> dict[str, Any] | None:
    """The contract without its bulky training record (the model card shows that)."""
    if model_contract is None:
        return None
    return {key: value for key, value in model_contract.items() if key not in ("training", "data")}


def operating_point(config: EvaluateConfig, model_contract: dict[str, Any] | None,
                    val_predictions: SplitPredictions | None) -> dict[str, Any]:
    """The operating threshold and where it came from, in this order: --threshold; the threshold the
    model stores (unless --choose_threshold_on_val); chosen on the val split for the target recall."""
    if config.threshold is not None:
        return {"threshold": float(config.threshold), "chosen_by": "--threshold"}
    stored = stored_threshold(model_contract)
    if stored is not None and not config.choose_threshold_on_val:
        check_target_recall(config, stored)
        return stored
    if val_predictions is None:
        raise ValueError(f"{config.model_path} stores no operating threshold and there is no val split to choose "
                         f"one on; pass --threshold")
    target = config.target_recall or (model_contract or {}).get("target_recall") or DEFAULT_TARGET_RECALL
    threshold = choose_operating_threshold(val_predictions.labels, val_predictions.probabilities, target)
    val = binary_metrics(val_predictions.labels, val_predictions.probabilities, threshold)
    return {
        "threshold": threshold,
        "chosen_by": f"highest threshold with recall >= {target} on split {config.val_split!r} (chosen by cxr-evaluate)",
        "target_recall": target,
        "val_split": config.val_split,
        "val_recall": val["recall"],
        "val_specificity": val["specificity"],
        "val_n": val["n"],
    }


def check_target_recall(config: EvaluateConfig, stored: dict[str, Any]) -> None:
    """A --target_recall must be the one the stored threshold was chosen for, unless the run chooses
    a new threshold (--choose_threshold_on_val)."""
    if (config.target_recall is not None and stored["target_recall"] is not None
            and abs(config.target_recall - stored["target_recall"]) > 1e-12):
        raise ValueError(
            f"--target_recall={config.target_recall} but {config.model_path} stores an operating threshold "
            f"chosen for recall {stored['target_recall']}; drop --target_recall, or pass "
            f"--choose_threshold_on_val to choose a new threshold on {config.val_split!r}")


def stored_threshold(model_contract: dict[str, Any] | None) -> dict[str, Any] | None:
    """The operating point block of a model that stores a threshold, else None."""
    if not model_contract or model_contract.get("operating_threshold") is None:
        return None
    val = model_contract.get("threshold_val_metrics") or {}
    return {
        "threshold": float(model_contract["operating_threshold"]),
        "chosen_by": contract_lib.describe_threshold(model_contract),
        "target_recall": model_contract.get("target_recall"),
        "val_split": model_contract.get("threshold_chosen_on"),
        "val_recall": val.get("recall"),
        "val_specificity": val.get("specificity"),
        "val_n": val.get("n"),
    }


def calibration_block(predictions: SplitPredictions, model_contract: dict[str, Any] | None,
                      val_predictions: SplitPredictions | None, val_split: str) -> dict[str, Any]:
    """Raw and calibrated ECE, Brier and NLL on the evaluated images, with the reliability diagram
    bins of both. The temperature (and logit shift) are the model's; a model without them gets a
    temperature fitted on val here (said so), or none (then "calibrated" is None)."""
    temperature, source = None, "none: the model stores no temperature and no val split was available"
    logit_shift = 0.0
    if model_contract and model_contract.get("temperature") is not None:
        temperature = float(model_contract["temperature"])
        logit_shift = float(model_contract.get("logit_shift") or 0.0)
        source = f"stored in the model (fitted by cxr-train on {(model_contract.get('calibration') or {}).get('fitted_on', 'val')})"
    elif val_predictions is not None:
        try:
            temperature = calibration.fit_temperature(val_predictions.labels, val_predictions.probabilities).temperature
            source = f"fitted by cxr-evaluate on split {val_split!r} (the model stores none)"
        except ValueError as e:
            source = f"none: split {val_split!r} cannot determine one ({e})"
    labels, raw = predictions.labels, predictions.probabilities
    calibrated = None if temperature is None else calibration.apply_temperature(raw, temperature, logit_shift)
    return {
        "ece_bins": calibration.ECE_BINS,
        "ece_definition": calibration.ECE_DEFINITION,
        "temperature": temperature,
        "logit_shift": logit_shift,
        "temperature_source": source,
        "raw": calibration.summary(labels, raw),
        "calibrated": None if calibrated is None else calibration.summary(labels, calibrated),
        "reliability": {"raw": calibration.reliability(labels, raw),
                        "calibrated": None if calibrated is None else calibration.reliability(labels, calibrated)},
    }


def calibrated_probabilities(predictions: SplitPredictions, metrics: dict[str, Any]) -> np.ndarray:
    """The evaluated images' probabilities calibrated as the report says (raw ones without a temperature)."""
    block = metrics["calibration"]
    if block["temperature"] is None:
        return np.asarray(predictions.probabilities, np.float64)
    return calibration.apply_temperature(predictions.probabilities, block["temperature"], block.get("logit_shift") or 0.0)


PREDICTIONS_COLUMNS = ("filename", "patient_id", "label", "probability", "calibrated_probability",
                       "predicted_label")


def predictions_csv(predictions: SplitPredictions, metrics: dict[str, Any] | None = None) -> str:
    """One row per image: filename, patient_id, label (0 NORMAL / 1 PNEUMONIA), probability, and with
    `metrics` the calibrated probability and the class predicted at the operating threshold: enough
    to recompute every metric.

    Text cells that a spreadsheet would run as a formula start with a single quote (tables.safe_cell).
    """
    n = predictions.labels.size
    calibrated, predicted = [""] * n, [""] * n
    if metrics is not None:
        calibrated = [f"{p:.9g}" for p in calibrated_probabilities(predictions, metrics).tolist()]
        threshold = metrics["operating_point"]["threshold"]
        predicted = [features.CLASS_NAMES[int(p >= threshold)] for p in predictions.probabilities.tolist()]
    rows = zip(predictions.filenames, predictions.patient_ids, predictions.labels.tolist(),
               (f"{p:.9g}" for p in predictions.probabilities.tolist()), calibrated, predicted, strict=True)
    return tables.csv_text(PREDICTIONS_COLUMNS, rows)


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What an evaluation reads, loaded and checked before any output is touched."""

    model: Any
    image_size: int
    contract: dict[str, Any] | None
    info: dataset_info.DatasetInfo | None  # the records' dataset (None with --images_dir)
    records: Any  # predict.RecordSettings: how the model's images are prepared
    needs_val: bool  # the val split's predictions are needed (threshold or temperature on val)


def _check_inputs(config: EvaluateConfig) -> _Inputs:
    """Loads the model and checks it against the data and the output folder, before any work: the
    records (or the image folder) must be prepared as the model's contract says."""
    inputs = {"--model": config.model_path, "--data_dir": config.data_dir, "--images_dir": config.images_dir}
    # The folder only receives files of fixed names, so it may hold the model it evaluates; none of
    # those files may be an input.
    outputs.check_apart("--output_dir", config.output_dir, inputs, may_contain_inputs=True)
    for name in EVALUATION_FILES:
        outputs.check_apart("--output_dir", os.path.join(config.output_dir, name), inputs)
    model = model_io.load_model(config.model_path)
    image_size = model_io.model_image_size(model, config.model_path)
    model_contract = contract_lib.read(model)
    stored = stored_threshold(model_contract)
    if stored is not None and config.threshold is None and not config.choose_threshold_on_val:
        check_target_recall(config, stored)  # before any image is read
    from cxr_tfdata import predict  # TensorFlow-heavy

    if config.images_dir:
        if model_contract is None:
            raise ValueError(f"--images_dir: {config.model_path} carries no contract saying how its images were "
                             f"prepared; build records from the folder with cxr-build-tfrecords and evaluate "
                             f"them with --data_dir")
        if config.threshold is None and stored is None:
            raise ValueError(f"--images_dir: {config.model_path} stores no operating threshold and an image "
                             f"folder has no val split to choose one on; pass --threshold")
        if not os.path.isdir(config.images_dir):
            raise FileNotFoundError(f"--images_dir: {config.images_dir} does not exist or is not a folder")
        records = predict.resolve_records(model_contract, image_size, config.model_path)
        return _Inputs(model, image_size, model_contract, None, records, needs_val=False)
    info = dataset_info.load(config.data_dir)
    info.split(config.split)
    records = predict.resolve_records(model_contract, image_size, config.model_path, info)
    choose = config.threshold is None and (config.choose_threshold_on_val or stored is None)
    if choose:
        info.split(config.val_split)  # names the missing split
    lacks_temperature = not model_contract or model_contract.get("temperature") is None
    needs_val = choose or (lacks_temperature and config.val_split in info.splits and config.val_split != config.split)
    return _Inputs(model, image_size, model_contract, info, records, needs_val)


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
    """Runs the model over the split (or the image folder) and writes metrics.json, report.md, the
    plots, predictions.csv, MODEL_CARD.md and model_card.json."""
    from cxr_tfdata import plots

    config = dataclasses.replace(config, output_dir=outputs.canonical(config.output_dir))
    checked = _check_inputs(config)
    where = (f"image folder {config.images_dir}" if config.images_dir else
             f"split {config.split} of {config.data_dir} ({checked.info.num_examples(config.split)} images)")
    logging.info("evaluating %s on %s", config.model_path, where)
    with claimed_output_dir(config) as folder:
        excluded: list[Excluded] = []
        if config.images_dir:
            predictions, excluded = predict_folder(checked.model, checked.records, checked.image_size,
                                                   config.images_dir, config.batch_size,
                                                   int(config.max_file_mb * (1 << 20)))
        else:
            predictions = predict_split(checked.model, config.data_dir, config.split, checked.image_size,
                                        config.batch_size, checked.info)
        val_predictions = None
        if checked.needs_val:
            val_predictions = predict_split(checked.model, config.data_dir, config.val_split, checked.image_size,
                                            config.batch_size, checked.info)
        operating = operating_point(config, checked.contract, val_predictions)
        logging.info("operating threshold %.4g: %s", operating["threshold"], operating["chosen_by"])
        metrics = build_metrics(config, predictions, operating,
                                calibration_block(predictions, checked.contract, val_predictions, config.val_split),
                                _source(config, checked, excluded), checked.contract)
        atomic.write_text(os.path.join(folder, "predictions.csv"), predictions_csv(predictions, metrics))
        plots.write_all(predictions.labels, predictions.probabilities, metrics, folder,
                        calibrated_probabilities(predictions, metrics))
        atomic.write_text(os.path.join(folder, "report.md"), markdown_report(metrics, predictions))
        card = model_card.build(metrics, checked.contract)
        atomic.write_json(os.path.join(folder, "model_card.json"), card)
        atomic.write_text(os.path.join(folder, "MODEL_CARD.md"), model_card.markdown(card))
        atomic.write_json(os.path.join(folder, "metrics.json"), metrics)
    if excluded:
        logging.warning("%d file(s) of %s could not be evaluated and were excluded (listed in report.md and "
                        "metrics.json), e.g. %s: %s", len(excluded), config.images_dir, excluded[0].path,
                        excluded[0].reason)
    return metrics


def _source(config: EvaluateConfig, checked: _Inputs, excluded: list[Excluded]) -> dict[str, Any]:
    """What was evaluated: the records' split, or an image folder with the files it could not use."""
    if config.images_dir:
        return {"kind": "images_dir", "path": os.path.abspath(config.images_dir), "split": None,
                "num_unreadable": len(excluded),
                "unreadable": [{"path": e.path, "error": e.reason} for e in excluded]}
    trained_on = (checked.contract or {}).get("dataset_fingerprint")
    return {"kind": "records", "path": os.path.abspath(config.data_dir), "split": config.split,
            "num_unreadable": 0, "unreadable": [],
            "dataset_fingerprint": checked.info.fingerprint,
            "same_dataset_as_training": None if trained_on is None else trained_on == checked.info.fingerprint}


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
            f"| {model_card.METRIC_LABELS[key]} | {_fmt(half[key])} | {_fmt_ci(half['ci'].get(key))} "
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
    if op.get("val_recall") is not None:
        val_part = (f" On the {op['val_split']} split it gave sensitivity {op['val_recall']:.4f} "
                    f"(target {op['target_recall']}).")
    return (
        "A missed pneumonia (false negative) is the costly error here: a sick child may go untreated, "
        "while a false alarm costs a second look. The operating threshold "
        f"{op['threshold']:.4g} comes from: {how}.{val_part} On the {_evaluated(metrics)} it "
        f"gives sensitivity {_fmt(op['recall'])} (95% CI {_fmt_ci(op['ci'].get('recall'))}): "
        f"{fn} of {fn + tp} pneumonia images missed, against {fn_half} at threshold 0.5. "
        f"The price is specificity {_fmt(op['specificity'])} (95% CI "
        f"{_fmt_ci(op['ci'].get('specificity'))}): {fp} of {tn + fp} normal images flagged. "
        "A threshold chosen on val need not reach its target on another split; the interval shows how "
        "far the sensitivity may move."
    )


def _evaluated(metrics: dict[str, Any]) -> str:
    source = metrics["source"]
    return f"image folder `{source['path']}`" if source["kind"] == "images_dir" else f"split `{metrics['split']}`"


def calibration_text(metrics: dict[str, Any]) -> str:
    """The calibration section: the temperature, where it came from, and raw vs calibrated figures."""
    block = metrics["calibration"]
    raw, calibrated = block["raw"], block["calibrated"]
    lines = [
        f"Temperature: {_fmt(block['temperature'])} ({block['temperature_source']}); logit shift "
        f"{_fmt(block.get('logit_shift'))} (undoes the prior shift of class-reweighted training). Calibrated "
        "probability = sigmoid(logit(p) / temperature + logit shift): the ranking, the AUCs and every label "
        "are unchanged.",
        "",
        "| Probabilities | ECE | Brier | NLL |",
        "|---|---|---|---|",
        f"| raw | {_fmt(raw['ece'])} | {_fmt(raw['brier'])} | {_fmt(raw['nll'])} |",
    ]
    if calibrated is not None:
        lines.append(f"| calibrated | {_fmt(calibrated['ece'])} | {_fmt(calibrated['brier'])} | "
                     f"{_fmt(calibrated['nll'])} |")
    lines += ["", f"ECE: {block['ece_definition']}. Brier: mean squared error of the probability. NLL: mean "
              "binary cross-entropy. Lower is better for all three."]
    return "\n".join(lines)


def _table_cell(text: str) -> str:
    """A file name or reason as a Markdown table cell: no formula start, no column break, one line."""
    cell = str(tables.safe_cell(text))
    return cell.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _excluded_text(metrics: dict[str, Any]) -> list[str]:
    source = metrics["source"]
    if source["kind"] != "images_dir":
        return []
    lines = ["## Files not evaluated", ""]
    if not source["unreadable"]:
        return [*lines, "None: every file of the folder was read and evaluated.", ""]
    lines += [f"{source['num_unreadable']} file(s) could not be read and are excluded from every figure above:", "",
              "| File | Reason |", "|---|---|"]
    lines += [f"| {_table_cell(e['path'])} | {_table_cell(e['error'])} |" for e in source["unreadable"]]
    return [*lines, ""]


def markdown_report(metrics: dict[str, Any], predictions: SplitPredictions) -> str:
    """report.md: summary, intervals, confusion matrices, false negatives, calibration, classification
    reports, plots, and (for an image folder) the files it could not read."""
    boot = metrics["bootstrap"]
    counts = ", ".join(f"{k}: {v}" for k, v in metrics["class_counts"].items())
    half, op = metrics["threshold_0.5"], metrics["operating_point"]
    source = metrics["source"]
    excluded = f"; {source['num_unreadable']} unreadable file(s) excluded" if source["kind"] == "images_dir" else ""
    return "\n".join([
        f"# Evaluation on {_evaluated(metrics)}",
        "",
        f"Model: `{metrics['model']}`  ",
        f"Data: `{source['path']}` ({metrics['n']} images; {counts}{excluded})  ",
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
        "## Calibration",
        "",
        calibration_text(metrics),
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
        *_excluded_text(metrics),
        "## Plots",
        "",
        "![ROC](roc.png) ![Precision-recall](pr.png)",
        "![Confusion matrix](confusion_matrix.png) ![Calibration](calibration.png)",
        "",
        "Per-image probabilities (raw and calibrated) and labels at the operating threshold: `predictions.csv`. "
        "What the model is for and not for: `MODEL_CARD.md`.",
        "",
    ])
