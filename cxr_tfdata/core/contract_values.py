"""Reading values a model's contract stores (a plain dict, no Keras needed): the stored operating
threshold and where it came from, and the prevalence its calibration reflects, read the same way by
every tool."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# The --prevalence flag's help, the same in cxr-predict, cxr-export and cxr-evaluate.
PREVALENCE_HELP = (
    "The PNEUMONIA prevalence (in (0, 1)) of the population the model is used on: calibrated probabilities are "
    "restated at it, their logit moved by logit(P) - logit(P_train), P_train being the prevalence the model's "
    "stored calibration reflects. The operating threshold applies to the raw probability and is unaffected. "
    "Default: the stored prevalence.")


@dataclasses.dataclass(frozen=True)
class StoredThreshold:
    """The operating threshold a contract stores, with the val figures it was chosen on."""

    value: float
    target_recall: float | None
    chosen_on: str | None
    val_metrics: dict[str, Any]
    chosen_by: str
    measured_on: str  # where val_metrics were measured, in words ("the val split", or a site sample cross-fitted)


def stored_threshold(values: dict[str, Any] | None) -> StoredThreshold | None:
    """The one reading of a contract's operating threshold; None when it stores none (or no contract)."""
    threshold = (values or {}).get("operating_threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        return None
    val_metrics = values.get("threshold_val_metrics")
    return StoredThreshold(float(threshold), values.get("target_recall"), values.get("threshold_chosen_on"),
                           dict(val_metrics) if isinstance(val_metrics, dict) else {}, describe_threshold(values),
                           threshold_measured_on(values))


# cxr-recalibrate --target_recall marks the threshold it re-chose (threshold_chosen_by); its recall and
# specificity (threshold_val_metrics) are then cross-fitted on the site sample, not in-sample figures.
RECALIBRATE = "cxr-recalibrate"


def describe_threshold(values: dict[str, Any]) -> str:
    """Where a contract's operating threshold came from, in words."""
    if values.get("threshold_chosen_by") == RECALIBRATE:
        return (f"stored in the model: re-chosen by cxr-recalibrate for recall >= {values.get('target_recall')} on "
                f"the {values.get('threshold_chosen_on')}")
    if values.get("threshold_chosen_on") is None or values.get("target_recall") is None:
        return "stored in the model (its contract does not say how it was chosen)"
    return (f"stored in the model: chosen by cxr-train on {values.get('threshold_chosen_on')} for recall >= "
            f"{values.get('target_recall')}")


def threshold_measured_on(values: dict[str, Any]) -> str:
    """Where the stored threshold's recall and specificity (threshold_val_metrics) were measured, in words."""
    if values.get("threshold_chosen_by") == RECALIBRATE:
        return f"the {values.get('threshold_chosen_on')}"
    return f"the {values.get('threshold_chosen_on')} split"


@dataclasses.dataclass(frozen=True)
class CalibrationPrevalence:
    """The PNEUMONIA prevalence a contract's calibrated probabilities assume, and where it was read."""

    value: float | None  # None: the contract does not say (then `source` says why)
    source: str


def _pneumonia_share(class_counts: Any) -> float | None:
    if not isinstance(class_counts, dict):
        return None
    normal, pneumonia = class_counts.get("NORMAL"), class_counts.get("PNEUMONIA")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (normal, pneumonia)):
        return None
    return pneumonia / (normal + pneumonia)


def _share(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        return None
    return float(value)


def calibration_prevalence(values: dict[str, Any] | None) -> CalibrationPrevalence:
    """The prevalence the stored calibration reflects: the one an export folded into it
    (calibrated_prevalence, written by cxr-export --prevalence), else a site recalibration's sample share,
    else the recorded train_prevalence, else the train split's share from the contract's data summary (a
    model sealed before train_prevalence was recorded)."""
    values = values or {}
    if _share(values.get("calibrated_prevalence")) is not None:
        source = values.get("calibrated_prevalence_source") or "cxr-export --prevalence"
        return CalibrationPrevalence(float(values["calibrated_prevalence"]),
                                     f"the prevalence the export's calibration was restated at ({source}; "
                                     f"calibrated_prevalence in the model's contract)")
    site = values.get("site_calibration")
    if isinstance(site, dict) and _share(site.get("sample_prevalence")) is not None:
        return CalibrationPrevalence(float(site["sample_prevalence"]),
                                     "the PNEUMONIA share of the site sample cxr-recalibrate fitted on")
    if _share(values.get("train_prevalence")) is not None:
        return CalibrationPrevalence(float(values["train_prevalence"]), "the train split's PNEUMONIA share "
                                     "(train_prevalence in the model's contract)")
    splits = (values.get("data") or {}).get("splits") if isinstance(values.get("data"), dict) else None
    share = _pneumonia_share(((splits or {}).get("train") or {}).get("class_counts"))
    if share is not None:
        return CalibrationPrevalence(share, "the train split's PNEUMONIA share, from the class counts in the "
                                            "model's contract")
    if not values:
        return CalibrationPrevalence(None, "the model carries no contract")
    return CalibrationPrevalence(None, "the model's contract records no train_prevalence and no class counts of "
                                       "its train split with both classes")
