"""The end of a training stage: the operating threshold and the temperature, fitted on val and
written into the best model's contract (contract.py).

`fit_on_val` is the rule, on val labels and probabilities (NumPy only):
  * operating threshold: the highest threshold whose val recall is >= target_recall
    (threshold_metrics.choose_operating_threshold, the rule cxr-evaluate applies);
  * temperature: the scalar T minimising val NLL of sigmoid(logit(p) / T + s), where s undoes the
    prior shift of class-reweighted training (calibration.py; s is given, not fitted);
  * train_prevalence: the train split's PNEUMONIA share, the prevalence the calibrated probabilities
    assume (--prevalence of the readers moves them from it).
`seal` runs the model over val and stores both, with the val figures that justify them, and the
train and val patients (`training_patient_entry`: 64-bit prefixes of their keyed hashes) that
cxr-recalibrate checks a site sample against.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import logging

from cxr_tfdata.core import dataset_info, record_schema
from cxr_tfdata.evaluation import inference
from cxr_tfdata.metrics import calibration, prevalence, threshold_metrics
from cxr_tfdata.modeling import contract

EVAL_BATCH_SIZE = 32
TRAINING_SPLITS = ("train", "val")


def fit_on_val(labels: np.ndarray, probabilities: np.ndarray, target_recall: float, split: str,
               logit_shift: float = 0.0, train_prevalence: float | None = None) -> dict[str, Any]:
    """The contract entries fitted on one split's predictions (raises ValueError when that split
    cannot determine them: no PNEUMONIA image, or a single class); train_prevalence is recorded when given."""
    threshold = threshold_metrics.choose_operating_threshold(labels, probabilities, target_recall)
    at_threshold = threshold_metrics.binary_metrics(labels, probabilities, threshold)
    fit = calibration.fit_temperature(labels, probabilities, logit_shift)
    calibrated = calibration.apply_temperature(probabilities, fit.temperature, logit_shift)
    prevalence_entry = {} if train_prevalence is None else {"train_prevalence": train_prevalence}
    return {
        **prevalence_entry,
        "operating_threshold": threshold,
        "target_recall": target_recall,
        "threshold_chosen_on": split,
        "threshold_val_metrics": {key: at_threshold[key] for key in ("recall", "specificity", "precision", "n")},
        "temperature": fit.temperature,
        "logit_shift": logit_shift,
        "calibration": {
            "method": ("sigmoid(logit(p) / temperature + logit_shift): logit_shift undoes the prior shift of "
                       "class-reweighted training (computed from the class weights, not fitted); the "
                       "temperature is temperature scaling, one scalar fitted by minimising NLL"),
            "logit_shift": logit_shift,
            "fitted_on": split,
            "temperature_at_search_bound": fit.at_bound,
            "ece_bins": calibration.ECE_BINS,
            "raw": calibration.summary(labels, probabilities),
            "calibrated": calibration.summary(labels, calibrated),
        },
    }


def train_prevalence(info: dataset_info.DatasetInfo) -> float | None:
    """The train split's PNEUMONIA share; None without a train split holding both classes."""
    if "train" not in info.splits:
        return None
    counts = info.class_counts("train")
    try:
        return prevalence.prevalence_from_counts(counts) if min(counts.values(), default=0) > 0 else None
    except ValueError:
        return None


def read_patient_ids(info: dataset_info.DatasetInfo, splits=TRAINING_SPLITS) -> set[str]:
    """The distinct patient ids of the records of `splits` (those the dataset has): one pass over their
    shards parsing only the patient_id feature (no image is decoded)."""
    import tensorflow as tf

    spec = {record_schema.PATIENT_ID: tf.io.FixedLenFeature([], tf.string, default_value="")}
    patients: set[str] = set()
    for split in splits:
        if split not in info.splits:
            continue
        records = tf.data.TFRecordDataset(info.shard_paths(split)).batch(1024)
        for batch in records.map(lambda serialized: tf.io.parse_example(serialized, spec)[record_schema.PATIENT_ID]):
            patients.update(value.decode("utf-8") for value in batch.numpy().tolist())
    patients.discard("")
    return patients


def training_patient_entry(info: dataset_info.DatasetInfo) -> dict[str, Any] | None:
    """The contract's training_patients entry (contract.training_patients) of the train and val records;
    None (without reading any record) when their patient ids are not keyed hashes."""
    if not (info.manifest.get("patient_ids") or {}).get("key_fingerprint"):
        return None
    splits = [split for split in TRAINING_SPLITS if split in info.splits]
    return contract.training_patients(info.manifest, read_patient_ids(info, splits), splits)


def seal(model, data_dir: str, info: dataset_info.DatasetInfo, target_recall: float, split: str = "val",
         logit_shift: float = 0.0) -> dict[str, Any]:
    """Runs `model` (float32, with a contract) over `split` and stores the threshold and the
    temperature in its contract; returns the stored entries ({} when the split cannot determine
    them, which is logged: the model then labels at 0.5 and reports raw probabilities)."""
    image_size = int(model.inputs[0].shape[1])
    predictions = inference.predict_split(model, data_dir, split, image_size, EVAL_BATCH_SIZE, info)
    try:
        values = fit_on_val(predictions.labels, predictions.probabilities, target_recall, split, logit_shift,
                            train_prevalence(info))
    except ValueError as e:
        logging.warning("No operating threshold or temperature stored: split %s cannot determine them (%s)",
                        split, e)
        return {}
    patients = training_patient_entry(info)
    contract.update(model, **values, training_patients=patients)
    cal = values["calibration"]
    logging.info(
        "Operating threshold %.4g (val recall %.4f >= %g, specificity %.4f); calibration: logit shift %.4g, "
        "temperature %.4g (val NLL %.4f -> %.4f, ECE %.4f -> %.4f)", values["operating_threshold"],
        values["threshold_val_metrics"]["recall"], target_recall, values["threshold_val_metrics"]["specificity"],
        logit_shift, values["temperature"], cal["raw"]["nll"],
        cal["calibrated"]["nll"], cal["raw"]["ece"], cal["calibrated"]["ece"])
    return values
