"""MODEL_CARD.md, rendered from model_card.json's dict alone, so the two never disagree."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from cxr_tfdata.core import record_schema
from cxr_tfdata.evaluation.card_facts import CALIBRATION_MEASURES, DATE_KEY, NO_CONTRACT
from cxr_tfdata.evaluation.formatting import (
    CALIBRATION_LABELS,
    METRIC_LABELS,
    cell,
    code,
    fmt,
    fmt_ci,
    number,
    plain,
)
from cxr_tfdata.metrics.threshold_metrics import HEADLINE_METRICS


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
        f"- Model file: {code(model['path'])}",
        f"- Format evaluated: {plain(model.get('format'))} (file run: {code(model.get('file_run'))})",
        f"- Quantization: {quantization_text(model.get('quantization'))}",
        f"- Contract: {_md_contract(model)}",
        f"- Architecture: {model['architecture']}",
        f"- Weights at the start of training: {plain(model['weights'])}",
        f"- Output: {model['output']}; decision rule: {model['decision_rule']}",
        f"- Class names: {', '.join(model['class_names'])} (positive class {model['positive_class']})",
        f"- Input image size: {plain(model['image_size'])}; resize mode: {plain(model['resize'])}",
        f"- Record encoding: {plain(model['record_encoding'])}; JPEG quality: "
        f"{'not used (lossless png records)' if model['record_encoding'] == 'png' else plain(model['jpeg_quality'])}",
        f"- Training stage the model is from: {plain(model['stage'])} (run setting: "
        f"{plain(model['training_stage_setting'])})",
        f"- Dataset fingerprint: {code(model['dataset_fingerprint'])}",
        f"- Stored operating threshold: {_md_stored_threshold(threshold)}",
        "",
        "### Training configuration",
        "",
        _md_training_table(training),
    ]
    return "\n".join(lines)


def quantization_text(block: dict | None) -> str:
    """The contract's quantization block in one line: its method, then every guard figure."""
    if not isinstance(block, dict) or not block:
        return "none (float32 weights as trained)"
    method = block.get("method") or block.get("quantize") or "unknown method"
    figures = "; ".join(f"{key}: {plain(value)}" for key, value in block.items() if key not in ("method", "quantize"))
    return f"{method}" + (f" ({figures})" if figures else "")


def _md_contract(model: dict) -> str:
    if not model["contract_stored"]:
        return NO_CONTRACT
    return f"stored (format {plain(model['contract_format'])})"


def _md_stored_threshold(threshold: dict) -> str:
    if threshold["value"] is None:
        return threshold["note"]
    val = threshold.get("val_metrics") or {}
    figures = ", ".join(f"{key} {fmt(val.get(key))}" for key in ("recall", "specificity", "precision"))
    return (f"{fmt(threshold['value'])}, chosen on {plain(threshold.get('chosen_on'))} for recall >= "
            f"{fmt(threshold.get('target_recall'))} (there: {figures}, n {plain(val.get('n'))})")


def _md_training_table(training: dict | None) -> str:
    if not training:
        return "Not stored: the model carries no training config."
    rows = ["| Setting | Value |", "|---|---|"]
    rows += [f"| {cell(key)} | {cell(_config_value(value))} |"
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
            f"- Source: {code(training['source'])}",
            f"- Val split: {plain(training['val_source'])}",
            f"- Leaked patients dropped: {plain(training['leaks_dropped'])} (drop_leaks: "
            f"{plain(training['drop_leaks'])}); patients in several given splits: "
            f"{plain(training['patients_in_several_given_splits'])}",
            f"- Duplicate images across splits: {plain(training['duplicates_across_splits'])}",
            f"- Skipped files: {plain(training['skipped_files'])}",
            "",
            _md_split_table(training["splits"]),
        ]
    lines += ["", "### Evaluation data", ""] + _md_evaluation(evaluation)
    return "\n".join(lines)


def _class_columns(count_maps: list[Mapping[str, Any]]) -> list[str]:
    """The class names to tabulate: the package's classes first, then any others found."""
    names = list(record_schema.CLASS_NAMES)
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
        counts = " | ".join(plain(split["class_counts"].get(c)) for c in classes)
        rows.append(f"| {cell(name)} | {plain(split['images'])} | {plain(split['patients'])} | "
                    f"{counts} | {fmt(split['positive_fraction'])} | {plain(split['skipped_files'])} |")
    return "\n".join(rows)


def _md_evaluation(evaluation: dict) -> list[str]:
    counts = ", ".join(f"{cell(k)}: {plain(v)}" for k, v in evaluation["class_counts"].items())
    return [
        f"- Evaluated on: {cell(evaluation['description'])}",
        f"- Kind: {plain(evaluation['kind'])}; split: {plain(evaluation['split'])}",
        f"- Images: {plain(evaluation['n'])} ({counts or 'class counts unknown'}; PNEUMONIA share "
        f"{fmt(evaluation['positive_fraction'])})",
        f"- Unreadable files excluded: {plain(evaluation['num_unreadable'])}",
    ]


def _md_bullets(title: str, items: Sequence[str]) -> str:
    return "\n".join([title, ""] + [f"- {item}" for item in items])


def _md_metrics(section: dict) -> str:
    half, op = section["threshold_0.5"], section["operating_point"]
    boot = section["bootstrap"]
    confidence = number(boot["confidence"])
    level = f"{100 * confidence:g}% CI" if confidence is not None else "CI"
    rows = [
        f"| Metric | @ {fmt(half['threshold'])} | {level} | @ {fmt(op['threshold'])} (operating) | {level} |",
        "|---|---|---|---|---|",
    ]
    for key in HEADLINE_METRICS:
        a, b = half["values"][key], op["values"][key]
        rows.append(f"| {METRIC_LABELS[key]} | {fmt(a['value'])} | {fmt_ci(a['ci'])} "
                    f"| {fmt(b['value'])} | {fmt_ci(b['ci'])} |")
    rows.append(f"| n | {plain(half['n'])} | | {plain(op['n'])} | |")
    return "\n".join([
        "## Metrics",
        "",
        f"Decision rule: {section['decision_rule']}.",
        "",
        "\n".join(rows),
        "",
        f"- Intervals: {boot['description']}.",
        f"- Operating threshold {fmt(op['threshold'])}, chosen by: {cell(op['chosen_by'])} (target "
        f"recall {fmt(op['target_recall'])}).",
        f"- Confusion matrix [[TN, FP], [FN, TP]] at {fmt(half['threshold'])}: "
        f"{plain(half['confusion_matrix'])}; at {fmt(op['threshold'])}: {plain(op['confusion_matrix'])}",
    ])


def _md_calibration(section: dict) -> str:
    lines = [
        "## Calibration",
        "",
        f"- Temperature: {fmt(section['temperature'])} ({cell(section['temperature_source'])}); logit "
        f"shift: {fmt(section.get('logit_shift'))} (undoes the prior shift of class-reweighted training)",
        f"- Method: {plain(section['method'])}; fitted on: {plain(section['fitted_on'])}; at the "
        f"search bound: {plain(section['temperature_at_search_bound'])}",
        f"- ECE binning: {section['ece_definition']}",
        "",
        "| Measure | Raw (evaluation data) | Calibrated (evaluation data) | Raw (fit split) "
        "| Calibrated (fit split) |",
        "|---|---|---|---|---|",
    ]
    evaluation, fit = section["on_evaluation_data"], section["on_fit_split"] or {}
    columns = (evaluation["raw"], evaluation["calibrated"], fit.get("raw"), fit.get("calibrated"))
    for key in CALIBRATION_MEASURES:
        values = " | ".join(fmt((column or {}).get(key)) for column in columns)
        lines.append(f"| {CALIBRATION_LABELS[key]} | {values} |")
    if section.get("prevalence_source"):
        lines += ["", f"- Prevalence the calibrated probabilities assume: {fmt(section.get('prevalence'))} "
                      f"({cell(section['prevalence_source'])}); {plain(section.get('threshold_note'))}"]
    if section.get("warning"):
        lines += ["", f"**Warning:** {cell(section['warning'])}"]
    return "\n".join(lines)


def _md_versions(versions: Mapping[str, str]) -> str:
    rows = ["## Library versions", "", "| Package | Version |", "|---|---|"]
    rows += [f"| {cell(name)} | {cell(version)} |" for name, version in versions.items()]
    return "\n".join(rows)


