"""The model card cxr-evaluate writes beside report.md: model_card.json and MODEL_CARD.md.

A model card (Mitchell et al., 2019) says what a model is, what it was trained and evaluated on,
what it is for and not for, how well it did and how uncertain that is, and what limits it. `build`
gathers those facts from the evaluation (metrics.json) and the model's contract (contract.py) into
one JSON-ready dict; card_markdown.markdown renders that dict alone, so MODEL_CARD.md can never disagree with
model_card.json and can be rebuilt from it.

Inputs may be incomplete (a model saved without a contract, a stage that could not fit a
threshold, an evaluation without bootstrap intervals or with one class): a missing fact is written
as None in the JSON and as "unknown", "not stored" or "n/a" in the Markdown, never as an error.

Library versions come from installed package metadata (importlib.metadata), not from importing them.
"""

from __future__ import annotations

import datetime
import importlib.metadata
from collections.abc import Mapping, Sequence
from typing import Any

from cxr_tfdata.core import contract_values, record_schema
from cxr_tfdata.evaluation import card_limitations
from cxr_tfdata.evaluation.formatting import (
    as_dict,
    interval,
    jsonable,
    number,
)
from cxr_tfdata.metrics.threshold_metrics import HEADLINE_METRICS

CARD_FORMAT = 1
DATE_KEY = "written_on"  # the UTC date the card was written: the one entry that changes between runs
LIBRARIES = ("tensorflow", "keras", "tensorflow-datasets", "numpy", "scikit-learn", "absl-py",
             "pillow", "cxr-tfdata")
NOT_INSTALLED = "not installed"
THRESHOLD_BLOCKS = ("threshold_0.5", "operating_point")
CALIBRATION_MEASURES = ("ece", "brier", "nll")
DECISION_RULE = "PNEUMONIA when P(PNEUMONIA) >= threshold"
NO_CONTRACT = "not stored: the model carries no contract (it was not saved by cxr-train)"

INTENDED_USE = (
    "Decision support and research on pediatric (ages about 1-5) frontal (AP) chest radiographs "
    "similar to the training center's (Guangzhou Women and Children's Medical Center): flagging "
    "radiographs that may show pneumonia for a clinician, who reviews every image and decides.",
    "The output is a probability and a suggested label, not a diagnosis: a clinician stays in the "
    "loop for every case.",
)
OUT_OF_SCOPE = (
    "Adults (and adolescents or infants outside the ~1-5 year age range): the model has only seen "
    "young children's chests.",
    "Lateral views, or any view other than a frontal (AP) chest radiograph.",
    "Other centers, scanners, acquisition protocols or populations without local validation; "
    "`cxr-evaluate --images_dir` (a folder of NORMAL/ and PNEUMONIA/ images) is how to validate it "
    "on local images first.",
    "Other diseases or findings (tuberculosis, COVID-19, effusion, ...), and telling bacterial from "
    "viral pneumonia: the model only separates NORMAL from PNEUMONIA.",
    "Use without human review: autonomous diagnosis, triage that removes images from a "
    "clinician's worklist, or treatment decisions from the output alone.",
)


def library_versions(packages: Sequence[str] = LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries a result depends on, from package metadata.

    Reads importlib.metadata rather than `module.__version__`, so nothing heavy (TensorFlow) is
    imported just to name its version; a package that is absent reads "not installed".
    """
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = NOT_INSTALLED
    return versions


def build(metrics: dict, contract: dict | None, versions: dict[str, str] | None = None) -> dict:
    """model_card.json's content, from metrics.json's dict and the model's contract (or None).

    Every value is plain JSON (no NaN or infinity), and every fact MODEL_CARD.md shows is here.
    """
    metrics = metrics or {}
    training = as_dict((contract or {}).get("training"))
    card = {
        "card_format": CARD_FORMAT,
        DATE_KEY: datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "model": _model_section(metrics, contract, training),
        "training_config": training or None,
        "training_data": _training_data_section(contract),
        "evaluation_data": _evaluation_data_section(metrics),
        "intended_use": list(INTENDED_USE),
        "out_of_scope": list(OUT_OF_SCOPE),
        "metrics": _metrics_section(metrics),
        "calibration": _calibration_section(metrics, contract),
    }
    card["limitations"] = card_limitations.limitations(card, metrics, contract)
    card["library_versions"] = dict(versions) if versions is not None else library_versions()
    return jsonable(card)


# ---------------------------------------------------------------------------------------------
# build(): the sections


def _model_section(metrics: dict, contract: dict | None, training: dict) -> dict[str, Any]:
    """What the model is, how to feed it and how to read its output."""
    c = contract or {}
    weights = as_dict(training.get("model")).get("weights")
    return {
        "path": metrics.get("model"),
        # Which file was run, in which format (keras, saved_model, onnx, openvino, tflite), and how it was
        # quantized with the export's guard figures (the contract's "quantization" block), when it was.
        "format": as_dict(metrics.get("model_file")).get("format"),
        "file_run": as_dict(metrics.get("model_file")).get("file"),
        "quantization": as_dict(metrics.get("model_file")).get("quantization") or c.get("quantization"),
        "contract_stored": contract is not None,
        "contract_format": c.get("format"),
        "architecture": _architecture(weights),
        "weights": weights,
        "output": f"one sigmoid unit: P({c.get('positive_class') or record_schema.POSITIVE_CLASS})",
        "decision_rule": metrics.get("decision_rule") or DECISION_RULE,
        "class_names": list(c.get("class_names") or record_schema.CLASS_NAMES),
        "positive_class": c.get("positive_class") or record_schema.POSITIVE_CLASS,
        "image_size": c.get("image_size"),
        "resize": c.get("resize"),
        "record_encoding": c.get("record_encoding"),
        "jpeg_quality": c.get("jpeg_quality"),
        "stage": c.get("stage"),
        "training_stage_setting": training.get("stage"),
        "dataset_fingerprint": c.get("dataset_fingerprint") or training.get("dataset_fingerprint"),
        "stored_threshold": _stored_threshold(contract),
    }


def _architecture(weights: str | None) -> str:
    """The network in words; ImageNet transfer learning unless the training config says otherwise."""
    layers = ("ResNet50V2 convolutional base -> global average pooling -> dropout -> "
              "Dense(1, sigmoid) = P(PNEUMONIA); input: single-channel pixels 0-255, square")
    if weights is None or weights == "imagenet":
        start = "ImageNet transfer learning"
        if weights is None:
            start += " (cxr-train's default; no training config stored to confirm it)"
    elif weights == "none":
        start = "trained from random initialisation (not transfer learning)"
    else:
        start = f"transfer learning from the local weights file {weights}"
    return f"{layers}; {start}"


def _stored_threshold(contract: dict | None) -> dict[str, Any]:
    """The operating threshold the model's contract stores, with the val figures behind it."""
    if contract is None:
        return {"value": None, "note": NO_CONTRACT}
    stored = contract_values.stored_threshold(contract)
    return {
        "value": None if stored is None else stored.value,
        "target_recall": contract.get("target_recall"),
        "chosen_on": contract.get("threshold_chosen_on"),
        "val_metrics": (stored.val_metrics or None) if stored is not None else
        (as_dict(contract.get("threshold_val_metrics")) or None),
        "note": None if stored is not None else "not stored: the model's training stage could not fit one (it labels at 0.5)",
    }


def _training_data_section(contract: dict | None) -> dict[str, Any]:
    """The training dataset, from the contract's data summary (contract.data_summary)."""
    data = as_dict((contract or {}).get("data"))
    if not data:
        note = NO_CONTRACT if contract is None else "not stored: the model's contract has no data summary"
        return {"stored": False, "note": note, "splits": {}}
    splits = {name: _split_summary(as_dict(split))
              for name, split in as_dict(data.get("splits")).items()}
    return {
        "stored": True,
        "note": None,
        "source": data.get("source"),
        "val_source": data.get("val_source"),
        "splits": splits,
        "leaks_dropped": data.get("leaks_dropped"),
        "drop_leaks": data.get("drop_leaks"),
        "patients_in_several_given_splits": data.get("patients_in_several_given_splits"),
        "duplicates_across_splits": data.get("duplicates_across_splits"),
        "skipped_files": data.get("skipped_files"),
    }


def _split_summary(split: dict) -> dict[str, Any]:
    counts = as_dict(split.get("class_counts"))
    return {
        "images": split.get("images"),
        "patients": split.get("patients"),
        "class_counts": counts,
        "positive_fraction": _positive_fraction(counts),
        "skipped_files": split.get("skipped_files"),
    }


def _positive_fraction(counts: Mapping[str, Any]) -> float | None:
    """The PNEUMONIA share of a class count mapping, None when it has no images."""
    total = sum(v for v in counts.values() if isinstance(v, (int, float)))
    positive = counts.get(record_schema.POSITIVE_CLASS)
    if not total or not isinstance(positive, (int, float)):
        return None
    return positive / total


def _evaluation_data_section(metrics: dict) -> dict[str, Any]:
    """The data this evaluation ran on: a records split or an image folder."""
    source = as_dict(metrics.get("source"))
    kind = source.get("kind") or ("records" if metrics.get("data_dir") else None)
    split = source.get("split") if source else metrics.get("split")
    if kind == "images_dir":
        split = None
    counts = as_dict(metrics.get("class_counts"))
    return {
        "kind": kind,
        "path": source.get("path") or metrics.get("data_dir"),
        "split": split,
        "n": metrics.get("n"),
        "class_counts": counts,
        "positive_fraction": _positive_fraction(counts),
        "num_unreadable": source.get("num_unreadable"),
        "description": _evaluation_description(kind, split, source.get("path") or metrics.get("data_dir")),
    }


def _evaluation_description(kind: str | None, split: str | None, path: str | None) -> str:
    if kind == "images_dir":
        return f"image folder {path} (labels from its NORMAL/ and PNEUMONIA/ subfolders)"
    if kind == "records":
        return f"split {split!r} of the records in {path}"
    return f"split {split!r} of {path or 'unknown data'}" if split else "unknown"


def _metrics_section(metrics: dict) -> dict[str, Any]:
    """Headline metrics and bootstrap intervals at 0.5 and at the operating threshold."""
    boot = as_dict(metrics.get("bootstrap"))
    return {
        "decision_rule": metrics.get("decision_rule") or DECISION_RULE,
        "bootstrap": {
            "resampled_by": boot.get("resampled_by"),
            "num_clusters": boot.get("num_clusters"),
            "samples": boot.get("samples"),
            "confidence": boot.get("confidence"),
            "method": boot.get("method"),
            "seed": boot.get("seed"),
            "description": _bootstrap_description(boot),
        },
        # metrics.json repeats the 0.5 block at its top level; older files have only that copy.
        "threshold_0.5": _threshold_block(as_dict(metrics.get("threshold_0.5")) or metrics),
        "operating_point": _operating_block(as_dict(metrics.get("operating_point"))),
    }


def _bootstrap_description(boot: dict) -> str:
    """How the intervals were made, in one sentence."""
    if not boot:
        return "unknown: the evaluation recorded no bootstrap settings"
    if not boot.get("samples"):
        return "no intervals: the evaluation ran without bootstrap resamples (bootstrap_samples=0)"
    unit = {"patient": "patients", "image": "images"}.get(boot.get("resampled_by"), "units")
    confidence = number(boot.get("confidence"))
    level = f"{100 * confidence:g}%" if confidence is not None else "unknown-level"
    whole = " (each drawn patient brings all its images)" if unit == "patients" else ""
    return (f"{level} {boot.get('method') or 'percentile'} bootstrap: {boot.get('samples')} resamples "
            f"of {boot.get('num_clusters')} {unit} drawn with replacement{whole}, seed {boot.get('seed')}")


def _threshold_block(block: dict) -> dict[str, Any]:
    ci = as_dict(block.get("ci"))
    return {
        "threshold": number(block.get("threshold")),
        "n": block.get("n"),
        "confusion_matrix": block.get("confusion_matrix"),
        "values": {key: {"value": number(block.get(key)), "ci": interval(ci.get(key))}
                   for key in HEADLINE_METRICS},
    }


def _operating_block(block: dict) -> dict[str, Any]:
    out = _threshold_block(block)
    out["chosen_by"] = block.get("chosen_by") or "unknown"
    out["target_recall"] = block.get("target_recall")
    return out


def _calibration_section(metrics: dict, contract: dict | None) -> dict[str, Any]:
    """The temperature, where it came from, and raw vs calibrated ECE, Brier and NLL."""
    measured = as_dict(metrics.get("calibration"))
    fit = as_dict((contract or {}).get("calibration"))
    temperature = number(measured.get("temperature"))
    source = measured.get("temperature_source")
    if temperature is None:
        temperature = number((contract or {}).get("temperature"))
        source = "stored in the model's contract" if temperature is not None else None
    if temperature is None:
        source = (NO_CONTRACT if contract is None else
                  "not stored: the model's training stage fitted no temperature") + (
                      "; probabilities are the model's raw sigmoid outputs")
    bins = measured.get("ece_bins") or fit.get("ece_bins")
    logit_shift = number(measured.get("logit_shift"))
    if logit_shift is None:
        logit_shift = number((contract or {}).get("logit_shift"))
    return {
        "temperature": temperature,
        "temperature_source": source,
        "logit_shift": logit_shift,
        "method": fit.get("method"),
        "fitted_on": fit.get("fitted_on"),
        "temperature_at_search_bound": fit.get("temperature_at_search_bound"),
        "ece_bins": bins,
        "ece_definition": measured.get("ece_definition") or _ece_definition(bins),
        "on_evaluation_data": {"raw": _calibration_measures(measured.get("raw")),
                               "calibrated": _calibration_measures(measured.get("calibrated"))},
        "on_fit_split": {"raw": _calibration_measures(fit.get("raw")),
                         "calibrated": _calibration_measures(fit.get("calibrated"))} if fit else None,
        "prevalence": number(measured.get("prevalence")),
        "prevalence_source": measured.get("prevalence_source"),
        "threshold_note": measured.get("threshold_note"),
        "does_not_hold": measured.get("does_not_hold"),
        "warning": measured.get("warning"),
    }


def _ece_definition(bins: Any) -> str:
    if not bins:
        return "unknown binning"
    return (f"{bins} equal-width bins of P(PNEUMONIA) over [0, 1], each contributing |observed "
            f"frequency - mean probability| weighted by its share of the images")


def _calibration_measures(values: Any) -> dict[str, float | None] | None:
    values = as_dict(values)
    return {key: number(values.get(key)) for key in CALIBRATION_MEASURES} if values else None


