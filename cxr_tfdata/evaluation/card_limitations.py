"""The model card's known limitations: the standing ones, and the warnings these figures call for
(a small val split, a threshold that does not transfer, data unlike the training data)."""

from __future__ import annotations

from typing import Any

from cxr_tfdata.core import contract_values
from cxr_tfdata.evaluation.formatting import (
    as_dict,
    fmt,
    fmt_ci,
    number,
)

# Below this many val images, a threshold and a temperature fitted on val move a lot between samples.
SMALL_VAL_IMAGES = 100
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

# ---------------------------------------------------------------------------------------------
# build(): limitations, the standing ones and the ones these inputs show


def limitations(card: dict, metrics: dict, contract: dict | None) -> list[str]:
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
        return (f"The operating threshold {fmt(op['threshold'])} was fixed by the user (--threshold), not chosen "
                f"for a target recall: at it the measured recall on {card['evaluation_data']['description']} is "
                f"{fmt(recall['value'])} (95% CI {fmt_ci(recall['ci'])}).")
    target = op.get("target_recall")
    if target is None:
        target = card["model"]["stored_threshold"].get("target_recall")
    chosen_on = "a site sample" if (op.get("val_measured_on") or "").startswith("the site sample") else "val"
    text = (f"A threshold chosen on {chosen_on} need not reach its target recall elsewhere: at the operating "
            f"threshold {fmt(op['threshold'])} (target recall {fmt(target)}) the measured recall on "
            f"{card['evaluation_data']['description']} is {fmt(recall['value'])} (95% CI "
            f"{fmt_ci(recall['ci'])}).")
    if number(target) is not None and recall["value"] is not None and recall["value"] < target:
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
    if number(contract.get("temperature")) is None:
        warnings.append("No temperature is stored in the model: its training stage could not fit one, "
                        "so its probabilities are uncalibrated.")
    if card["calibration"]["temperature_at_search_bound"]:
        warnings.append("The fitted temperature lies at the bound of its search interval: the val "
                        "split could not pin it down, so calibrated probabilities are unreliable.")
    return warnings


def _val_images(metrics: dict, contract: dict | None) -> int | None:
    """How many val images the threshold and the temperature were fitted on, when recorded."""
    c = contract or {}
    # A threshold cxr-recalibrate re-chose carries the site sample's n, not val's.
    on_val = c.get("threshold_chosen_by") != contract_values.RECALIBRATE
    candidates = (
        as_dict(c.get("threshold_val_metrics")).get("n") if on_val else None,
        as_dict(as_dict(as_dict(c.get("data")).get("splits")).get("val")).get("images"),
        as_dict(metrics.get("operating_point")).get("val_n"),
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


