"""What metrics.json and predictions.csv hold: metric blocks at 0.5 and at the operating point with
their intervals, where the operating threshold came from, and calibration raw and calibrated.

  * the operating threshold is the one stored in the model's contract (chosen by cxr-train on val),
    unless --threshold fixes one or --choose_threshold_on_val asks for a fresh choice: the highest
    threshold whose recall (sensitivity) on the val split is at least `target_recall`;
  * calibrated probabilities apply the contract's temperature and logit shift; the threshold applies
    to the raw probability, which ranks images the same way.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cxr_tfdata.core import config as config_lib
from cxr_tfdata.core import contract_values, record_schema
from cxr_tfdata.evaluation.evaluate_config import EvaluateConfig
from cxr_tfdata.evaluation.inference import SplitPredictions
from cxr_tfdata.files import table_cells
from cxr_tfdata.metrics import bootstrap, calibration, calibration_bootstrap, threshold_metrics
from cxr_tfdata.metrics.threshold_metrics import HEADLINE_METRICS


def metrics_at(predictions: SplitPredictions, threshold: float, intervals: dict[str, Any]) -> dict[str, Any]:
    """One threshold's block of metrics.json: the headline numbers, their intervals, the report."""
    block = threshold_metrics.binary_metrics(predictions.labels, predictions.probabilities, threshold)
    block["classification_report"] = threshold_metrics.classification_report(
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
    thresholds = {"threshold_0.5": record_schema.DEFAULT_THRESHOLD, "operating_point": operating["threshold"]}
    intervals = bootstrap.bootstrap_intervals(
        predictions.labels, predictions.probabilities, thresholds, groups,
        config.bootstrap_samples, config.seed,
    )
    at_half = metrics_at(predictions, record_schema.DEFAULT_THRESHOLD, intervals["threshold_0.5"])
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
            "confidence": bootstrap.CONFIDENCE,
            "method": "percentile",
            "seed": config.seed,
        },
        "source": source,
        "split": source["split"],
        "model": os.path.abspath(config.model_path),
        "data_dir": os.path.abspath(config.data_dir) if config.data_dir else None,
        "images_dir": os.path.abspath(config.images_dir) if config.images_dir else None,
        "model_contract": _contract_facts(model_contract),
        "positive_class": record_schema.POSITIVE_CLASS,
        "decision_rule": "PNEUMONIA when probability >= threshold",
        "class_counts": {
            name: int((predictions.labels == i).sum()) for i, name in enumerate(record_schema.CLASS_NAMES)
        },
    }


def _contract_facts(model_contract: dict[str, Any] | None) -> dict[str, Any] | None:
    """The contract without its bulky training record (the model card shows that) and its list of
    training patients (cxr-recalibrate's check)."""
    if model_contract is None:
        return None
    return {key: value for key, value in model_contract.items()
            if key not in ("training", "data", "training_patients")}


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
    target = config.target_recall or (model_contract or {}).get("target_recall") or config_lib.DEFAULT_TARGET_RECALL
    threshold = threshold_metrics.choose_operating_threshold(val_predictions.labels, val_predictions.probabilities, target)
    val = threshold_metrics.binary_metrics(val_predictions.labels, val_predictions.probabilities, threshold)
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
    stored = contract_values.stored_threshold(model_contract)
    if stored is None:
        return None
    return {
        "threshold": stored.value,
        "chosen_by": stored.chosen_by,
        "target_recall": stored.target_recall,
        "val_split": stored.chosen_on,
        "val_measured_on": stored.measured_on,  # cxr-recalibrate's: the site sample, cross-fitted
        "val_recall": stored.val_metrics.get("recall"),
        "val_specificity": stored.val_metrics.get("specificity"),
        "val_n": stored.val_metrics.get("n"),
    }


def calibration_block(predictions: SplitPredictions, model_contract: dict[str, Any] | None,
                      val_predictions: SplitPredictions | None, val_split: str, prevalence: Any = None,
                      bootstrap_samples: int = 0, seed: int = 0) -> dict[str, Any]:
    """Raw and calibrated ECE, Brier and NLL on the evaluated images, with the reliability diagram
    bins of both. The temperature (and logit shift) are the model's; a model without them gets a
    temperature fitted on val here (said so), or none (then "calibrated" is None). `prevalence`
    (feeding.PrevalenceSetting) restates the stored calibration; with bootstrap samples, "holds" says
    whether calibration holds on these images (calibration_bootstrap.check_calibration_holds)."""
    temperature, source = None, "none: the model stores no temperature and no val split was available"
    logit_shift, stored = 0.0, False
    if model_contract and model_contract.get("temperature") is not None:
        temperature, stored = float(model_contract["temperature"]), True
        logit_shift = float(model_contract.get("logit_shift") or 0.0)
        source = f"stored in the model (fitted by cxr-train on {(model_contract.get('calibration') or {}).get('fitted_on', 'val')})"
        if (model_contract.get("site_calibration") or {}).get("written_by"):
            source = "stored in the model (refitted on a site's sample by cxr-recalibrate)"
    elif val_predictions is not None:
        try:
            temperature = calibration.fit_temperature(val_predictions.labels, val_predictions.probabilities).temperature
            source = f"fitted by cxr-evaluate on split {val_split!r} (the model stores none)"
        except ValueError as e:
            source = f"none: split {val_split!r} cannot determine one ({e})"
    labels, raw = predictions.labels, predictions.probabilities
    prevalence_entries = _prevalence_entries(prevalence if stored else None, temperature, val_split)
    calibrated = None if temperature is None else calibration.apply_temperature(
        raw, temperature, logit_shift + prevalence_entries["prevalence_shift"])
    return {
        "ece_bins": calibration.ECE_BINS,
        "ece_definition": calibration.ECE_DEFINITION,
        "temperature": temperature,
        "logit_shift": logit_shift,
        "temperature_source": source,
        **prevalence_entries,
        "raw": calibration.summary(labels, raw),
        "calibrated": None if calibrated is None else calibration.summary(labels, calibrated),
        "reliability": {"raw": calibration.reliability(labels, raw),
                        "calibrated": None if calibrated is None else calibration.reliability(labels, calibrated)},
        **holds_entries(predictions, calibrated, bootstrap_samples, seed),
    }


THRESHOLD_NOTE = ("the operating threshold applies to the raw probability: neither the calibration nor "
                  "--prevalence moves it or any label")


def _prevalence_entries(prevalence: Any, temperature: float | None, val_split: str) -> dict[str, Any]:
    """The prevalence the calibrated probabilities assume (feeding.PrevalenceSetting, None when the
    temperature was not the model's) and what --prevalence added to their logit."""
    if prevalence is not None:
        return {"prevalence": prevalence.assumed, "stored_prevalence": prevalence.stored,
                "prevalence_shift": prevalence.shift, "prevalence_source": prevalence.source,
                "threshold_note": THRESHOLD_NOTE}
    source = ("no calibration" if temperature is None else
              f"not known: a temperature fitted here without a logit shift reflects the class mix of split {val_split!r}")
    return {"prevalence": None, "stored_prevalence": None, "prevalence_shift": 0.0, "prevalence_source": source,
            "threshold_note": THRESHOLD_NOTE}


def holds_entries(predictions: SplitPredictions, calibrated: np.ndarray | None, bootstrap_samples: int,
                  seed: int) -> dict[str, Any]:
    """"holds": both ECEs and the patient-bootstrap interval of their difference; "does_not_hold": True
    when calibrated ECE exceeds raw ECE beyond that interval (None when not tested); "warning": the
    sentence report.md and the model card print then."""
    if calibrated is None or bootstrap_samples < 1:
        return {"holds": None, "does_not_hold": None, "warning": None}
    groups = predictions.patient_ids if all(predictions.patient_ids) else None
    check = calibration_bootstrap.check_calibration_holds(predictions.labels, predictions.probabilities, calibrated,
                                                          groups, bootstrap_samples, seed, warn=False)
    holds = {"ece_raw": check.ece_raw, "ece_calibrated": check.ece_calibrated,
             "difference": check.difference.value, "difference_ci": [check.difference.low, check.difference.high],
             "resampled_by": check.resampled_by, "bootstrap_samples": check.bootstrap_samples}
    warning = None
    if check.does_not_hold:
        warning = (f"Calibration does not hold on these images: calibrated ECE {check.ece_calibrated:.4f} is above "
                   f"raw ECE {check.ece_raw:.4f} (difference {check.difference.value:+.4f}, 95% interval by "
                   f"{check.resampled_by} [{check.difference.low:+.4f}, {check.difference.high:+.4f}]). Do not read "
                   f"the calibrated probabilities as risks here: refit the calibration on a labelled sample of this "
                   f"site with cxr-recalibrate (or state the site's prevalence with --prevalence).")
    return {"holds": holds, "does_not_hold": check.does_not_hold, "warning": warning}


def calibrated_probabilities(predictions: SplitPredictions, metrics: dict[str, Any]) -> np.ndarray:
    """The evaluated images' probabilities calibrated as the report says (raw ones without a temperature)."""
    block = metrics["calibration"]
    if block["temperature"] is None:
        return np.asarray(predictions.probabilities, np.float64)
    shift = (block.get("logit_shift") or 0.0) + (block.get("prevalence_shift") or 0.0)
    return calibration.apply_temperature(predictions.probabilities, block["temperature"], shift)


PREDICTIONS_COLUMNS = ("filename", "patient_id", "label", "probability", "calibrated_probability",
                       "predicted_label")


def predictions_csv(predictions: SplitPredictions, metrics: dict[str, Any] | None = None) -> str:
    """One row per image: filename, patient_id, label (0 NORMAL / 1 PNEUMONIA), probability, and with
    `metrics` the calibrated probability and the class predicted at the operating threshold: enough
    to recompute every metric.

    Text cells that a spreadsheet would run as a formula start with a single quote (table_cells.safe_cell).
    """
    n = predictions.labels.size
    calibrated, predicted = [""] * n, [""] * n
    if metrics is not None:
        calibrated = [f"{p:.9g}" for p in calibrated_probabilities(predictions, metrics).tolist()]
        threshold = metrics["operating_point"]["threshold"]
        predicted = [record_schema.CLASS_NAMES[int(p >= threshold)] for p in predictions.probabilities.tolist()]
    rows = zip(predictions.filenames, predictions.patient_ids, predictions.labels.tolist(),
               (f"{p:.9g}" for p in predictions.probabilities.tolist()), calibrated, predicted, strict=True)
    return table_cells.csv_text(PREDICTIONS_COLUMNS, rows)
