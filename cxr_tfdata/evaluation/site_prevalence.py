"""cxr-evaluate on a folder of unlabelled images: an estimate of the site's PNEUMONIA prevalence.

With no labels there is no metric to compute, but the calibrated probabilities still carry the
site's class mix: EM (Saerens et al., 2002; metrics/prevalence_estimate.py) finds the prevalence
that makes them consistent, with a bootstrap interval over patients. The estimate assumes the images
of each class look at the site as they did in training; under image shift (another scanner, other
post-processing, other ages or views) it can be badly biased while its interval stays narrow. So it
is reported, labelled as such, and never applied: a user who trusts it passes `--prevalence` to
cxr-predict, cxr-export or cxr-evaluate, and a labelled sample (cxr-recalibrate) is the sound way.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cxr_tfdata.core import contract_values, folder_scan, patient_keys, record_schema
from cxr_tfdata.files import table_cells
from cxr_tfdata.metrics import calibration, prevalence_estimate
from cxr_tfdata.modeling import image_scoring

RELIABILITY = ("unreliable under image shift: EM assumes each class's images look as they did in training, "
               "so another scanner, post-processing, age range or view moves the estimate while its interval, "
               "which covers sampling only, stays narrow; check it on a labelled sample (cxr-recalibrate) "
               "before acting on it")
METHOD = "EM on the calibrated probabilities (Saerens, Latinne and Decaestecker, 2002)"
PREDICTIONS_COLUMNS = ("filename", "patient_id", "probability", "calibrated_probability")


def check_model(model_contract: dict[str, Any] | None, model_path: str) -> float:
    """The prevalence the model's calibrated probabilities reflect; refuses a model without one."""
    if not model_contract or model_contract.get("temperature") is None:
        raise ValueError(f"--images_dir: the folder has no NORMAL/ or PNEUMONIA/ subfolder (unlabelled images), "
                         f"and {model_path} stores no calibration, which a prevalence estimate needs")
    reference = contract_values.calibration_prevalence(model_contract)
    if reference.value is None:
        raise ValueError(f"--images_dir: the folder holds unlabelled images, and a prevalence estimate needs the "
                         f"prevalence {model_path}'s calibration reflects: {reference.source}")
    return reference.value


def estimate(model, records, image_size: int, images_dir: str, batch_size: int, max_file_bytes: int,
             model_contract: dict[str, Any], reference: float, bootstrap_samples: int,
             seed: int, patient_key=None, redact_paths: bool = False) -> tuple[dict[str, Any], str]:
    """Scores every image of the folder and estimates the prevalence: (metrics.json, predictions.csv).
    `reference` is the prevalence the model's calibration reflects (check_model)."""
    files, unusable = folder_scan.scan_unlabelled_folder(images_dir)
    # Patient ids (and with redact_paths every path) as keyed hashes: README "Patient identity".
    patient_key = patient_key or patient_keys.load_key("", {"--images_dir": images_dir})
    files = patient_keys.pseudonymize(files, patient_key, redact_paths)
    shown = patient_keys.ShownPaths(os.path.abspath(images_dir), patient_key if redact_paths else None)
    rows = image_scoring.predict_rows(
        model, [f.path for f in files], image_size, records.resize == "pad", record_schema.DEFAULT_THRESHOLD,
        batch_size, records.record_encoding, records.jpeg_quality, max_file_bytes)
    kept = [(source, row.probability) for source, row in zip(files, rows, strict=True) if not row.error]
    excluded = ([{"path": shown.full(u.path), "error": u.reason} for u in unusable]
                + [{"path": shown.full(s.path), "error": r.error} for s, r in zip(files, rows, strict=True) if r.error])
    if not kept:
        raise ValueError(f"--images_dir: no image of {shown.full(images_dir)} could be read "
                         f"({len(excluded)} excluded)")
    raw = np.asarray([p for _, p in kept], np.float64)
    calibrated = calibration.apply_temperature(raw, float(model_contract["temperature"]),
                                               float(model_contract.get("logit_shift") or 0.0))
    groups = [source.patient_id for source, _ in kept]
    result = prevalence_estimate.estimate_prevalence(calibrated, reference, groups, bootstrap_samples, seed)
    metrics = _metrics(images_dir, result, reference, excluded)
    csv = table_cells.csv_text(PREDICTIONS_COLUMNS, (
        [source.filename, source.patient_id, f"{p:.9g}", f"{c:.9g}"]
        for (source, p), c in zip(kept, calibrated.tolist(), strict=True)))
    return metrics, csv


def _metrics(images_dir: str, result, reference: float, excluded: list[dict]) -> dict[str, Any]:
    value = result.prevalence
    return {
        "source": {"kind": "unlabelled_images_dir", "path": os.path.abspath(images_dir), "split": None,
                   "num_unreadable": len(excluded), "unreadable": sorted(excluded, key=lambda e: e["path"])},
        "prevalence_estimate": {
            "value": value.value,
            "interval": None if value.low is None else [value.low, value.high],
            "confidence": 0.95,
            "resampled_by": result.resampled_by,
            "bootstrap_samples": result.bootstrap_samples,
            "n": result.n,
            "calibration_reflects_prevalence": reference,
            "converged": result.converged,
            "method": METHOD,
            "reliability": RELIABILITY,
            "applied": False,
        },
    }


def markdown_report(metrics: dict[str, Any]) -> str:
    """report.md for an unlabelled folder: the estimate, what it assumes, and the files not read."""
    block, source = metrics["prevalence_estimate"], metrics["source"]
    interval = block["interval"]
    shown = "n/a" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"
    lines = [
        "# Prevalence estimate on unlabelled images", "",
        f"Folder: {table_cells.markdown_cell(source['path'])} ({block['n']} images scored).", "",
        f"**Estimated PNEUMONIA prevalence: {block['value']:.3f}** (95% interval {shown}, resampling "
        f"{block['resampled_by']}s, {block['bootstrap_samples']} resamples), by {block['method']}; the model's "
        f"calibration reflects a prevalence of {block['calibration_reflects_prevalence']:.3f}.", "",
        f"**This estimate is {block['reliability']}.** It was not applied to anything: pass "
        f"`--prevalence` to cxr-predict, cxr-export or cxr-evaluate to use a prevalence you trust.", "",
    ]
    if min(block["value"], 1.0 - block["value"]) < 1e-3:
        lines += ["The estimate sits at the edge of [0, 1]: the calibrated probabilities are nearly all on one "
                  "side, which a shifted image population or a model that does not separate these images "
                  "produces as readily as a one-class sample.", ""]
    if not block["converged"]:
        lines += ["EM did not converge within its iteration limit: the model separates the classes too weakly "
                  "here for the class mix to be identified.", ""]
    if source["unreadable"]:
        lines += [f"{source['num_unreadable']} file(s) could not be read and are not in the estimate:", "",
                  "| File | Reason |", "|---|---|"]
        lines += [f"| {table_cells.markdown_cell(e['path'])} | {table_cells.markdown_cell(e['error'])} |"
                  for e in source["unreadable"]]
    return "\n".join(lines) + "\n"
