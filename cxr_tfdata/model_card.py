"""The model card cxr-evaluate writes beside report.md: model_card.json and MODEL_CARD.md.

A model card (Mitchell et al., 2019) says what a model is, what it was trained and evaluated on,
what it is for and not for, how well it did and how uncertain that is, and what limits it. `build`
gathers those facts from the evaluation (metrics.json) and the model's contract (contract.py) into
one JSON-ready dict; `markdown` renders that dict alone, so MODEL_CARD.md can never disagree with
model_card.json and can be rebuilt from it.

Inputs may be incomplete (a model saved without a contract, a stage that could not fit a
threshold, an evaluation without bootstrap intervals or with one class): a missing fact is written
as None in the JSON and as "unknown", "not stored" or "n/a" in the Markdown, never as an error.

The module imports neither NumPy nor TensorFlow: it only formats numbers it is given, and library
versions come from installed package metadata (importlib.metadata), not from importing them.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from cxr_tfdata import features

CARD_FORMAT = 1
DATE_KEY = "written_on"  # the UTC date the card was written: the one entry that changes between runs
LIBRARIES = ("tensorflow", "keras", "tensorflow-datasets", "numpy", "scikit-learn", "absl-py",
             "pillow", "cxr-tfdata")
NOT_INSTALLED = "not installed"
# Below this many val images, a threshold and a temperature fitted on val move a lot between samples.
SMALL_VAL_IMAGES = 100
HEADLINE_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")
METRIC_LABELS = {
    "accuracy": "Accuracy",
    "precision": "Precision (PPV)",
    "recall": "Recall (sensitivity)",
    "specificity": "Specificity",
    "f1": "F1",
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC (average precision)",
}
THRESHOLD_BLOCKS = ("threshold_0.5", "operating_point")
CALIBRATION_MEASURES = ("ece", "brier", "nll")
CALIBRATION_LABELS = {"ece": "ECE", "brier": "Brier score", "nll": "NLL (log loss)"}
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
STANDING_LIMITATIONS = (
    "Single center, single population: every training image comes from one hospital's pediatric "
    "patients; performance elsewhere is unknown until measured there.",
    "Label noise: the public dataset's labels come from graders' reading of the radiographs, and "
    "some are known to be wrong; metrics are measured against these labels, not against a "
    "confirmed diagnosis.",
    "The test set is small and several of its images can belong to one patient, so images are not "
    "independent: intervals are computed by a bootstrap that resamples patients (when patient ids "
    "are known) and are wide.",
    "Calibration (the temperature) is fitted on the val split of the same center and may not "
    "transfer to other centers, scanners or prevalences.",
    "Grad-CAM heatmaps (cxr-predict) are a coarse visual aid showing which regions drove the score, "
    "not a localisation or segmentation of disease.",
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
    training = _as_dict((contract or {}).get("training"))
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
    card["limitations"] = _limitations(card, metrics, contract)
    card["library_versions"] = dict(versions) if versions is not None else library_versions()
    return _jsonable(card)


# ---------------------------------------------------------------------------------------------
# build(): the sections


def _model_section(metrics: dict, contract: dict | None, training: dict) -> dict[str, Any]:
    """What the model is, how to feed it and how to read its output."""
    c = contract or {}
    weights = _as_dict(training.get("model")).get("weights")
    return {
        "path": metrics.get("model"),
        "contract_stored": contract is not None,
        "contract_format": c.get("format"),
        "architecture": _architecture(weights),
        "weights": weights,
        "output": f"one sigmoid unit: P({c.get('positive_class') or features.POSITIVE_CLASS})",
        "decision_rule": metrics.get("decision_rule") or DECISION_RULE,
        "class_names": list(c.get("class_names") or features.CLASS_NAMES),
        "positive_class": c.get("positive_class") or features.POSITIVE_CLASS,
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
    value = _number(contract.get("operating_threshold"))
    note = None if value is not None else (
        "not stored: the model's training stage could not fit one (it labels at 0.5)")
    return {
        "value": value,
        "target_recall": contract.get("target_recall"),
        "chosen_on": contract.get("threshold_chosen_on"),
        "val_metrics": _as_dict(contract.get("threshold_val_metrics")) or None,
        "note": note,
    }


def _training_data_section(contract: dict | None) -> dict[str, Any]:
    """The training dataset, from the contract's data summary (contract.data_summary)."""
    data = _as_dict((contract or {}).get("data"))
    if not data:
        note = NO_CONTRACT if contract is None else "not stored: the model's contract has no data summary"
        return {"stored": False, "note": note, "splits": {}}
    splits = {name: _split_summary(_as_dict(split))
              for name, split in _as_dict(data.get("splits")).items()}
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
    counts = _as_dict(split.get("class_counts"))
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
    positive = counts.get(features.POSITIVE_CLASS)
    if not total or not isinstance(positive, (int, float)):
        return None
    return positive / total


def _evaluation_data_section(metrics: dict) -> dict[str, Any]:
    """The data this evaluation ran on: a records split or an image folder."""
    source = _as_dict(metrics.get("source"))
    kind = source.get("kind") or ("records" if metrics.get("data_dir") else None)
    split = source.get("split") if source else metrics.get("split")
    if kind == "images_dir":
        split = None
    counts = _as_dict(metrics.get("class_counts"))
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
    boot = _as_dict(metrics.get("bootstrap"))
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
        "threshold_0.5": _threshold_block(_as_dict(metrics.get("threshold_0.5")) or metrics),
        "operating_point": _operating_block(_as_dict(metrics.get("operating_point"))),
    }


def _bootstrap_description(boot: dict) -> str:
    """How the intervals were made, in one sentence."""
    if not boot:
        return "unknown: the evaluation recorded no bootstrap settings"
    if not boot.get("samples"):
        return "no intervals: the evaluation ran without bootstrap resamples (bootstrap_samples=0)"
    unit = {"patient": "patients", "image": "images"}.get(boot.get("resampled_by"), "units")
    confidence = _number(boot.get("confidence"))
    level = f"{100 * confidence:g}%" if confidence is not None else "unknown-level"
    whole = " (each drawn patient brings all its images)" if unit == "patients" else ""
    return (f"{level} {boot.get('method') or 'percentile'} bootstrap: {boot.get('samples')} resamples "
            f"of {boot.get('num_clusters')} {unit} drawn with replacement{whole}, seed {boot.get('seed')}")


def _threshold_block(block: dict) -> dict[str, Any]:
    ci = _as_dict(block.get("ci"))
    return {
        "threshold": _number(block.get("threshold")),
        "n": block.get("n"),
        "confusion_matrix": block.get("confusion_matrix"),
        "values": {key: {"value": _number(block.get(key)), "ci": _interval(ci.get(key))}
                   for key in HEADLINE_METRICS},
    }


def _operating_block(block: dict) -> dict[str, Any]:
    out = _threshold_block(block)
    out["chosen_by"] = block.get("chosen_by") or "unknown"
    out["target_recall"] = block.get("target_recall")
    return out


def _calibration_section(metrics: dict, contract: dict | None) -> dict[str, Any]:
    """The temperature, where it came from, and raw vs calibrated ECE, Brier and NLL."""
    measured = _as_dict(metrics.get("calibration"))
    fit = _as_dict((contract or {}).get("calibration"))
    temperature = _number(measured.get("temperature"))
    source = measured.get("temperature_source")
    if temperature is None:
        temperature = _number((contract or {}).get("temperature"))
        source = "stored in the model's contract" if temperature is not None else None
    if temperature is None:
        source = (NO_CONTRACT if contract is None else
                  "not stored: the model's training stage fitted no temperature") + (
                      "; probabilities are the model's raw sigmoid outputs")
    bins = measured.get("ece_bins") or fit.get("ece_bins")
    logit_shift = _number(measured.get("logit_shift"))
    if logit_shift is None:
        logit_shift = _number((contract or {}).get("logit_shift"))
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
    }


def _ece_definition(bins: Any) -> str:
    if not bins:
        return "unknown binning"
    return (f"{bins} equal-width bins of P(PNEUMONIA) over [0, 1], each contributing |observed "
            f"frequency - mean probability| weighted by its share of the images")


def _calibration_measures(values: Any) -> dict[str, float | None] | None:
    values = _as_dict(values)
    return {key: _number(values.get(key)) for key in CALIBRATION_MEASURES} if values else None


# ---------------------------------------------------------------------------------------------
# build(): limitations, the standing ones and the ones these inputs show


def _limitations(card: dict, metrics: dict, contract: dict | None) -> list[str]:
    """Known limitations: the standing list, the operating threshold's reach, then input warnings."""
    items = list(STANDING_LIMITATIONS)
    items.append(_threshold_transfer(card))
    items.append(_downsampling(card["model"]["image_size"]))
    items.extend(_input_warnings(card, metrics, contract))
    return items


def _downsampling(image_size: Any) -> str:
    size = f"{image_size}x{image_size} pixels" if image_size else "the model's input size (unknown)"
    return (f"Images are downsampled to {size} from radiographs often over 1000 pixels a side, so "
            f"fine detail is lost: the model reads the downsampled image.")


def _threshold_transfer(card: dict) -> str:
    """The sentence on whether the val-chosen threshold reached its target recall here."""
    op = card["metrics"]["operating_point"]
    recall = op["values"]["recall"]
    if op.get("chosen_by") == "--threshold":
        return (f"The operating threshold {_fmt(op['threshold'])} was fixed by the user (--threshold), not chosen "
                f"for a target recall: at it the measured recall on {card['evaluation_data']['description']} is "
                f"{_fmt(recall['value'])} (95% CI {_fmt_ci(recall['ci'])}).")
    target = op.get("target_recall")
    if target is None:
        target = card["model"]["stored_threshold"].get("target_recall")
    text = (f"A threshold chosen on val need not reach its target recall elsewhere: at the operating "
            f"threshold {_fmt(op['threshold'])} (target recall {_fmt(target)}) the measured recall on "
            f"{card['evaluation_data']['description']} is {_fmt(recall['value'])} (95% CI "
            f"{_fmt_ci(recall['ci'])}).")
    if _number(target) is not None and recall["value"] is not None and recall["value"] < target:
        text += " It falls short of the target here."
    return text


def _input_warnings(card: dict, metrics: dict, contract: dict | None) -> list[str]:
    """Warnings that follow from these particular inputs."""
    warnings = _contract_warnings(card, contract)
    warnings += _val_warnings(card, metrics, contract)
    warnings += _evaluation_warnings(card, metrics)
    warnings += _data_warnings(card["training_data"])
    return warnings


def _contract_warnings(card: dict, contract: dict | None) -> list[str]:
    if contract is None:
        return ["The model carries no contract: no operating threshold or temperature is stored, "
                "and its input preparation, training data and training config are unknown; the card "
                "states only what the evaluation measured."]
    warnings = []
    if card["model"]["stored_threshold"]["value"] is None:
        warnings.append("No operating threshold is stored in the model: its training stage could not "
                        "fit one, so on its own it labels at 0.5.")
    if _number(contract.get("temperature")) is None:
        warnings.append("No temperature is stored in the model: its training stage could not fit one, "
                        "so its probabilities are uncalibrated.")
    if card["calibration"]["temperature_at_search_bound"]:
        warnings.append("The fitted temperature lies at the bound of its search interval: the val "
                        "split could not pin it down, so calibrated probabilities are unreliable.")
    return warnings


def _val_images(metrics: dict, contract: dict | None) -> int | None:
    """How many val images the threshold and the temperature were fitted on, when recorded."""
    c = contract or {}
    candidates = (
        _as_dict(c.get("threshold_val_metrics")).get("n"),
        _as_dict(_as_dict(_as_dict(c.get("data")).get("splits")).get("val")).get("images"),
        _as_dict(metrics.get("operating_point")).get("val_n"),
    )
    return next((int(n) for n in candidates if isinstance(n, (int, float)) and not isinstance(n, bool)), None)


def _val_warnings(card: dict, metrics: dict, contract: dict | None) -> list[str]:
    n = _val_images(metrics, contract)
    if n is None or n >= SMALL_VAL_IMAGES:
        return []
    return [f"The val split is small ({n} images, fewer than {SMALL_VAL_IMAGES}): the operating threshold "
            f"and the temperature fitted on it are noisy and may move a lot with other val images."]


def _evaluation_warnings(card: dict, metrics: dict) -> list[str]:
    data = card["evaluation_data"]
    warnings = []
    tuned_on = {"train", "val", card["model"]["stored_threshold"].get("chosen_on")}
    if data["split"] and data["split"] in tuned_on:
        warnings.append(f"Evaluated on the {data['split']!r} split, which the model was trained or "
                        f"tuned on (threshold and temperature are fitted on val): these metrics are "
                        f"optimistic; the test split or local images give an honest estimate.")
    if data["num_unreadable"]:
        warnings.append(f"{data['num_unreadable']} unreadable file(s) were excluded from the evaluation "
                        f"(listed in metrics.json); the metrics cover the {data['n']} readable images.")
    counts = [v for v in data["class_counts"].values() if isinstance(v, (int, float))]
    if counts and sum(1 for v in counts if v > 0) < 2:
        warnings.append("The evaluation data holds a single class: ROC-AUC and PR-AUC are undefined, "
                        "and only one of recall and specificity means anything.")
    boot = card["metrics"]["bootstrap"]
    if boot["resampled_by"] == "image":
        warnings.append("The evaluation data carries no patient ids, so the bootstrap resampled images: "
                        "images of one patient are not independent, and the intervals may be too narrow.")
    if boot["samples"] == 0:
        warnings.append("No bootstrap intervals were computed (bootstrap_samples=0): the metrics come "
                        "without any measure of their uncertainty.")
    return warnings


def _data_warnings(data: dict) -> list[str]:
    warnings = []
    shared = data.get("patients_in_several_given_splits")
    if shared and not data.get("drop_leaks"):
        warnings.append(f"{shared} patient(s) appear in several of the dataset's given splits and were "
                        f"not dropped: test metrics may be optimistic.")
    if data.get("duplicates_across_splits"):
        warnings.append(f"{data['duplicates_across_splits']} image(s) are duplicated across splits: "
                        f"test metrics may be optimistic.")
    return warnings


# ---------------------------------------------------------------------------------------------
# markdown(): MODEL_CARD.md from the card dict alone


def markdown(card: dict) -> str:
    """MODEL_CARD.md, from build()'s dict only (so the two never disagree)."""
    sections = [
        _md_header(card),
        _md_model(card["model"], card.get("training_config")),
        _md_data(card["training_data"], card["evaluation_data"]),
        _md_bullets("## Intended use", card["intended_use"]),
        _md_bullets("## Out-of-scope uses", card["out_of_scope"]),
        _md_metrics(card["metrics"]),
        _md_calibration(card["calibration"]),
        _md_bullets("## Known limitations", card["limitations"]),
        _md_versions(card["library_versions"]),
    ]
    return "\n\n".join(sections) + "\n"


def _md_header(card: dict) -> str:
    return "\n".join([
        "# Model card: pediatric chest X-ray pneumonia classifier (NORMAL vs PNEUMONIA)",
        "",
        f"Written {card.get(DATE_KEY) or 'unknown'} (UTC) by cxr-evaluate, beside report.md; the same "
        f"facts are in model_card.json (card format {card.get('card_format')}).",
    ])


def _md_model(model: dict, training: dict | None) -> str:
    threshold = model["stored_threshold"]
    lines = [
        "## Model",
        "",
        f"- Model file: {_code(model['path'])}",
        f"- Contract: {_md_contract(model)}",
        f"- Architecture: {model['architecture']}",
        f"- Weights at the start of training: {_plain(model['weights'])}",
        f"- Output: {model['output']}; decision rule: {model['decision_rule']}",
        f"- Class names: {', '.join(model['class_names'])} (positive class {model['positive_class']})",
        f"- Input image size: {_plain(model['image_size'])}; resize mode: {_plain(model['resize'])}",
        f"- Record encoding: {_plain(model['record_encoding'])}; JPEG quality: "
        f"{'not used (lossless png records)' if model['record_encoding'] == 'png' else _plain(model['jpeg_quality'])}",
        f"- Training stage the model is from: {_plain(model['stage'])} (run setting: "
        f"{_plain(model['training_stage_setting'])})",
        f"- Dataset fingerprint: {_code(model['dataset_fingerprint'])}",
        f"- Stored operating threshold: {_md_stored_threshold(threshold)}",
        "",
        "### Training configuration",
        "",
        _md_training_table(training),
    ]
    return "\n".join(lines)


def _md_contract(model: dict) -> str:
    if not model["contract_stored"]:
        return NO_CONTRACT
    return f"stored (format {_plain(model['contract_format'])})"


def _md_stored_threshold(threshold: dict) -> str:
    if threshold["value"] is None:
        return threshold["note"]
    val = threshold.get("val_metrics") or {}
    figures = ", ".join(f"{key} {_fmt(val.get(key))}" for key in ("recall", "specificity", "precision"))
    return (f"{_fmt(threshold['value'])}, chosen on {_plain(threshold.get('chosen_on'))} for recall >= "
            f"{_fmt(threshold.get('target_recall'))} (there: {figures}, n {_plain(val.get('n'))})")


def _md_training_table(training: dict | None) -> str:
    if not training:
        return "Not stored: the model carries no training config."
    rows = ["| Setting | Value |", "|---|---|"]
    rows += [f"| {_cell(key)} | {_cell(_config_value(value))} |"
             for key, value in _flatten(training).items()]
    return "\n".join(rows)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _config_value(value: Any) -> str:
    """A setting as typed: floats keep their precision (a learning rate of 1e-05 is not 0.0000)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _md_data(training: dict, evaluation: dict) -> str:
    lines = ["## Data", "", "### Training data", ""]
    if not training["stored"]:
        lines.append(f"Training data: {training['note']}.")
    else:
        lines += [
            f"- Source: {_code(training['source'])}",
            f"- Val split: {_plain(training['val_source'])}",
            f"- Leaked patients dropped: {_plain(training['leaks_dropped'])} (drop_leaks: "
            f"{_plain(training['drop_leaks'])}); patients in several given splits: "
            f"{_plain(training['patients_in_several_given_splits'])}",
            f"- Duplicate images across splits: {_plain(training['duplicates_across_splits'])}",
            f"- Skipped files: {_plain(training['skipped_files'])}",
            "",
            _md_split_table(training["splits"]),
        ]
    lines += ["", "### Evaluation data", ""] + _md_evaluation(evaluation)
    return "\n".join(lines)


def _class_columns(count_maps: list[Mapping[str, Any]]) -> list[str]:
    """The class names to tabulate: the package's classes first, then any others found."""
    names = list(features.CLASS_NAMES)
    for counts in count_maps:
        names += [name for name in counts if name not in names]
    return names


def _md_split_table(splits: dict) -> str:
    if not splits:
        return "Split sizes: unknown."
    classes = _class_columns([s["class_counts"] for s in splits.values()])
    rows = ["| Split | Images | Patients | " + " | ".join(classes) + " | PNEUMONIA share | Skipped files |",
            "|---|---|---|" + "---|" * len(classes) + "---|---|"]
    for name, split in splits.items():
        counts = " | ".join(_plain(split["class_counts"].get(c)) for c in classes)
        rows.append(f"| {_cell(name)} | {_plain(split['images'])} | {_plain(split['patients'])} | "
                    f"{counts} | {_fmt(split['positive_fraction'])} | {_plain(split['skipped_files'])} |")
    return "\n".join(rows)


def _md_evaluation(evaluation: dict) -> list[str]:
    counts = ", ".join(f"{_cell(k)}: {_plain(v)}" for k, v in evaluation["class_counts"].items())
    return [
        f"- Evaluated on: {_cell(evaluation['description'])}",
        f"- Kind: {_plain(evaluation['kind'])}; split: {_plain(evaluation['split'])}",
        f"- Images: {_plain(evaluation['n'])} ({counts or 'class counts unknown'}; PNEUMONIA share "
        f"{_fmt(evaluation['positive_fraction'])})",
        f"- Unreadable files excluded: {_plain(evaluation['num_unreadable'])}",
    ]


def _md_bullets(title: str, items: Sequence[str]) -> str:
    return "\n".join([title, ""] + [f"- {item}" for item in items])


def _md_metrics(section: dict) -> str:
    half, op = section["threshold_0.5"], section["operating_point"]
    boot = section["bootstrap"]
    confidence = _number(boot["confidence"])
    level = f"{100 * confidence:g}% CI" if confidence is not None else "CI"
    rows = [
        f"| Metric | @ {_fmt(half['threshold'])} | {level} | @ {_fmt(op['threshold'])} (operating) | {level} |",
        "|---|---|---|---|---|",
    ]
    for key in HEADLINE_METRICS:
        a, b = half["values"][key], op["values"][key]
        rows.append(f"| {METRIC_LABELS[key]} | {_fmt(a['value'])} | {_fmt_ci(a['ci'])} "
                    f"| {_fmt(b['value'])} | {_fmt_ci(b['ci'])} |")
    rows.append(f"| n | {_plain(half['n'])} | | {_plain(op['n'])} | |")
    return "\n".join([
        "## Metrics",
        "",
        f"Decision rule: {section['decision_rule']}.",
        "",
        "\n".join(rows),
        "",
        f"- Intervals: {boot['description']}.",
        f"- Operating threshold {_fmt(op['threshold'])}, chosen by: {_cell(op['chosen_by'])} (target "
        f"recall {_fmt(op['target_recall'])}).",
        f"- Confusion matrix [[TN, FP], [FN, TP]] at {_fmt(half['threshold'])}: "
        f"{_plain(half['confusion_matrix'])}; at {_fmt(op['threshold'])}: {_plain(op['confusion_matrix'])}",
    ])


def _md_calibration(section: dict) -> str:
    lines = [
        "## Calibration",
        "",
        f"- Temperature: {_fmt(section['temperature'])} ({_cell(section['temperature_source'])}); logit "
        f"shift: {_fmt(section.get('logit_shift'))} (undoes the prior shift of class-reweighted training)",
        f"- Method: {_plain(section['method'])}; fitted on: {_plain(section['fitted_on'])}; at the "
        f"search bound: {_plain(section['temperature_at_search_bound'])}",
        f"- ECE binning: {section['ece_definition']}",
        "",
        "| Measure | Raw (evaluation data) | Calibrated (evaluation data) | Raw (fit split) "
        "| Calibrated (fit split) |",
        "|---|---|---|---|---|",
    ]
    evaluation, fit = section["on_evaluation_data"], section["on_fit_split"] or {}
    columns = (evaluation["raw"], evaluation["calibrated"], fit.get("raw"), fit.get("calibrated"))
    for key in CALIBRATION_MEASURES:
        values = " | ".join(_fmt((column or {}).get(key)) for column in columns)
        lines.append(f"| {CALIBRATION_LABELS[key]} | {values} |")
    return "\n".join(lines)


def _md_versions(versions: Mapping[str, str]) -> str:
    rows = ["## Library versions", "", "| Package | Version |", "|---|---|"]
    rows += [f"| {_cell(name)} | {_cell(version)} |" for name, version in versions.items()]
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Formatting and JSON hygiene


def _fmt(value: Any) -> str:
    """A measured number with 4 decimals; None (or anything not a number) as n/a."""
    number = _number(value)
    return "n/a" if number is None else f"{number:.4f}"


def _fmt_ci(interval: Any) -> str:
    interval = _interval(interval)
    return "n/a" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def _plain(value: Any) -> str:
    """A count, name or flag for a Markdown line: None as unknown, booleans as yes/no."""
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _cell(str(value))


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell or list item: one line, no column separators."""
    return str(text).replace("\r", " ").replace("\n", " ").replace("|", "\\|")


def _code(text: Any) -> str:
    """A path or identifier as inline code, with a fence longer than any backtick run inside."""
    if text is None:
        return "unknown"
    text = str(text).replace("\r", " ").replace("\n", " ")
    fence = "`" * (_longest_backtick_run(text) + 1)
    padded = f" {text} " if "`" in text else text
    return f"{fence}{padded}{fence}".replace("|", "\\|")


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return longest


def _number(value: Any) -> float | None:
    """A finite real number as float, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _interval(value: Any) -> list[float] | None:
    """[low, high] when both ends are finite numbers, else None."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    low, high = _number(value[0]), _number(value[1])
    return None if low is None or high is None else [low, high]


def _as_dict(value: Any) -> dict:
    return dict(value) if isinstance(value, Mapping) else {}


def _jsonable(value: Any) -> Any:
    """`value` as strict JSON: string keys, lists for tuples, None for NaN and infinities."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if hasattr(value, "item"):  # a NumPy scalar, without importing NumPy
        return _jsonable(value.item())
    return str(value)
