"""report.md: the headline metrics with intervals, the confusion matrices, the missed pneumonias,
calibration, and the files that could not be evaluated."""

from __future__ import annotations

from typing import Any

from cxr_tfdata.evaluation.card_markdown import quantization_text
from cxr_tfdata.evaluation.formatting import METRIC_LABELS, code, fmt, fmt_ci
from cxr_tfdata.evaluation.inference import SplitPredictions
from cxr_tfdata.files import table_cells
from cxr_tfdata.metrics import threshold_metrics
from cxr_tfdata.metrics.threshold_metrics import HEADLINE_METRICS


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
            f"| {METRIC_LABELS[key]} | {fmt(half[key])} | {fmt_ci(half['ci'].get(key))} "
            f"| {fmt(op[key])} | {fmt_ci(op['ci'].get(key))} |"
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
        where = op.get("val_measured_on") or f"the {op['val_split']} split"
        val_part = f" On {where} it gave sensitivity {op['val_recall']:.4f} (target {op['target_recall']})."
    return (
        "A missed pneumonia (false negative) is the costly error here: a sick child may go untreated, "
        "while a false alarm costs a second look. The operating threshold "
        f"{op['threshold']:.4g} comes from: {how}.{val_part} On the {_evaluated(metrics)} it "
        f"gives sensitivity {fmt(op['recall'])} (95% CI {fmt_ci(op['ci'].get('recall'))}): "
        f"{fn} of {fn + tp} pneumonia images missed, against {fn_half} at threshold 0.5. "
        f"The price is specificity {fmt(op['specificity'])} (95% CI "
        f"{fmt_ci(op['ci'].get('specificity'))}): {fp} of {tn + fp} normal images flagged. "
        "A threshold chosen on val need not reach its target on another split; the interval shows how "
        "far the sensitivity may move."
    )


def _evaluated(metrics: dict[str, Any]) -> str:
    source = metrics["source"]
    return f"image folder {code(source['path'])}" if source["kind"] == "images_dir" else f"split `{metrics['split']}`"


def calibration_text(metrics: dict[str, Any]) -> str:
    """The calibration section: the temperature, where it came from, and raw vs calibrated figures."""
    block = metrics["calibration"]
    raw, calibrated = block["raw"], block["calibrated"]
    lines = [
        f"Temperature: {fmt(block['temperature'])} ({block['temperature_source']}); logit shift "
        f"{fmt(block.get('logit_shift'))} (undoes the prior shift of class-reweighted training). Calibrated "
        "probability = sigmoid(logit(p) / temperature + logit shift): the ranking, the AUCs and every label "
        "are unchanged.",
        "",
        "| Probabilities | ECE | Brier | NLL |",
        "|---|---|---|---|",
        f"| raw | {fmt(raw['ece'])} | {fmt(raw['brier'])} | {fmt(raw['nll'])} |",
    ]
    if calibrated is not None:
        lines.append(f"| calibrated | {fmt(calibrated['ece'])} | {fmt(calibrated['brier'])} | "
                     f"{fmt(calibrated['nll'])} |")
    lines += ["", f"ECE: {block['ece_definition']}. Brier: mean squared error of the probability. NLL: mean "
              "binary cross-entropy. Lower is better for all three."]
    return "\n".join(lines + prevalence_lines(block))


def prevalence_lines(block: dict[str, Any]) -> list[str]:
    """The prevalence the calibrated probabilities assume, and the warning when calibration does not hold."""
    if block.get("calibrated") is None:
        return []
    assumed = block.get("prevalence")
    lines = ["", f"Prevalence: the calibrated probabilities assume a PNEUMONIA prevalence of "
                 f"{fmt(assumed) if assumed is not None else 'unknown'} ({block.get('prevalence_source')}); "
                 f"{block.get('threshold_note')}."]
    holds = block.get("holds")
    if holds is not None and not block.get("warning"):
        low, high = holds["difference_ci"]
        lines += ["", f"Calibration check: calibrated ECE {fmt(holds['ece_calibrated'])} vs raw "
                      f"{fmt(holds['ece_raw'])}, difference {holds['difference']:+.4f} (95% interval by "
                      f"{holds['resampled_by']} [{fmt(low)}, {fmt(high)}]): no evidence that calibration fails here."]
    if block.get("warning"):
        lines += ["", f"**Warning:** {block['warning']}"]
    return lines


def _excluded_text(metrics: dict[str, Any]) -> list[str]:
    source = metrics["source"]
    if source["kind"] != "images_dir":
        return []
    lines = ["## Files not evaluated", ""]
    if not source["unreadable"]:
        return [*lines, "None: every file of the folder was read and evaluated.", ""]
    lines += [f"{source['num_unreadable']} file(s) could not be read and are excluded from every figure above:", "",
              "| File | Reason |", "|---|---|"]
    lines += [f"| {table_cells.markdown_cell(e['path'])} | {table_cells.markdown_cell(e['error'])} |" for e in source["unreadable"]]
    return [*lines, ""]


def _model_file_lines(metrics: dict[str, Any]) -> list[str]:
    """Which format and file was evaluated, and its quantization (cxr-export's guard figures), when known."""
    model_file = metrics.get("model_file") or {}
    if not model_file:
        return []
    return [f"Format evaluated: {model_file.get('format')} (file run: {code(model_file.get('file'))}); "
            f"quantization: {quantization_text(model_file.get('quantization'))}  "]


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
        f"Model: {code(metrics['model'])}  ",
        *_model_file_lines(metrics),
        f"Data: {code(source['path'])} ({metrics['n']} images; {counts}{excluded})  ",
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
        threshold_metrics.classification_report(predictions.labels, predictions.probabilities, half['threshold'], as_dict=False),
        "```",
        "",
        f"## Classification report at the operating threshold {op['threshold']:.4g}",
        "",
        "```",
        threshold_metrics.classification_report(predictions.labels, predictions.probabilities, op['threshold'], as_dict=False),
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
