"""cxr-recalibrate: refit a model's calibration on a site's labelled sample and write a new .keras.

Usage: cxr-recalibrate --model=M (--images_dir=DIR | --data_dir=D --split=S) --output_model=NEW.keras
       [--target_recall=R] [--folds=5] [--seed=0] [--bootstrap_samples=1000] [--redact_paths]
The new model's contract carries the site's temperature and intercept (its new logit shift), where and
when they were fitted, and ECE, NLL and Brier before and after, cross-fitted by patient with 95%
patient-bootstrap intervals. The input model is never written to. A sample sharing a patient with the
model's train/val records is refused.
"""

from __future__ import annotations

import os

from absl import app, flags

from cxr_tfdata.core import imaging
from cxr_tfdata.core.runner import run_main

_MODEL = flags.DEFINE_string("model", None, "Trained model (.keras) to recalibrate; loaded in Keras safe mode, "
                                            "never written to.")
_OUTPUT_MODEL = flags.DEFINE_string("output_model", None, "The recalibrated model to write (.keras; must not exist).")
_IMAGES_DIR = flags.DEFINE_string(
    "images_dir", None, "The site's labelled sample: a folder with NORMAL/ and PNEUMONIA/ subfolders of images.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Instead of --images_dir: records written by cxr-build-tfrecords.")
_SPLIT = flags.DEFINE_string("split", None, "With --data_dir: the split holding the site's sample.")
_TARGET_RECALL = flags.DEFINE_float(
    "target_recall", None,
    "Re-choose the operating threshold on the sample: the highest with recall >= this (its recall cross-fitted "
    "by patient). Default: keep the stored threshold, so every label is unchanged.")
_REFIT = flags.DEFINE_enum("refit", "temperature_and_intercept", ["temperature_and_intercept", "intercept_only"],
                           "What to refit: both, or the intercept only (the stored temperature kept).")
_FOLDS = flags.DEFINE_integer("folds", 5, "Patient folds of the cross-fitted before/after figures.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the folds and the bootstrap.")
_BOOTSTRAP_SAMPLES = flags.DEFINE_integer(
    "bootstrap_samples", 1000, "Bootstrap resamples (by patient when ids exist) of the 95% intervals; 0 disables.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per inference batch.")
_PATIENT_KEY_FILE = flags.DEFINE_string("patient_key_file", None, "With --images_dir (or --redact_paths): the site's secret key that hashes patient ids and paths (HMAC-SHA256) before anything is "
    "written; created on first use, owner-only. Default: $XDG_CONFIG_HOME/cxr-tfdata/patient_key "
    "(~/.config/cxr-tfdata/patient_key). Give the one cxr-build-tfrecords used so patient ids agree: the sample's "
    "patients are then checked against the model's training patients.")
_REDACT_PATHS = flags.DEFINE_bool(
    "redact_paths", False,
    "Write every path (the sample's, the source model's) into the new model's contract and the log as its keyed "
    "hash (under --patient_key_file): for folders named after patients.")
_MAX_FILE_MB = flags.DEFINE_float("max_file_mb", imaging.DEFAULT_MAX_FILE_MB,
                                  "With --images_dir: files larger than this are excluded, not read.")


def _interval(estimate: dict) -> str:
    if estimate["low"] is None:
        return f"{estimate['value']:.4f}"
    return f"{estimate['value']:.4f} [{estimate['low']:.4f}, {estimate['high']:.4f}]"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cxr_tfdata.evaluation import recalibrate

    config = recalibrate.RecalibrateConfig(
        model_path=_MODEL.value or "", output_model=_OUTPUT_MODEL.value or "", images_dir=_IMAGES_DIR.value or "",
        data_dir=_DATA_DIR.value or "", split=_SPLIT.value or "", target_recall=_TARGET_RECALL.value,
        method=_REFIT.value, folds=_FOLDS.value, seed=_SEED.value, bootstrap_samples=_BOOTSTRAP_SAMPLES.value,
        batch_size=_BATCH_SIZE.value, max_file_mb=_MAX_FILE_MB.value,
        patient_key_file=_PATIENT_KEY_FILE.value or "", redact_paths=_REDACT_PATHS.value)
    site = recalibrate.recalibrate(config)
    final = site["final"]
    print(f"Refitted on {site['images']} images ({site['images_per_class']}; patients {site['patients_per_class']}): "
          f"temperature {final['temperature']:.4g}, logit shift {final['intercept']:.4g}; calibrated probabilities "
          f"now assume the sample's PNEUMONIA prevalence {site['sample_prevalence']:.4g} (restate with --prevalence).")
    print(f"Cross-fitted by {site['resampled_by']} ({site['folds']} folds), 95% bootstrap intervals:")
    print("| measure | before (stored calibration) | after (cross-fitted) | change |")
    for m in ("ece", "nll", "brier"):
        print(f"| {m} | {_interval(site['before'][m])} | {_interval(site['cross_fitted'][m])} | "
              f"{_interval(site['change'][m])} |")
    if site["threshold"] is not None:
        t = site["threshold"]
        print(f"Operating threshold re-chosen for recall >= {t['target_recall']}: {t['threshold']:.4g} (cross-fitted "
              f"recall {_interval(t['cross_fitted_recall'])}, specificity {_interval(t['cross_fitted_specificity'])}).")
    else:
        print("Operating threshold kept: every label is unchanged.")
    print(f"Wrote {os.path.abspath(config.output_model)}")
    return 0


def run():
    run_main(main, __name__, "cxr-recalibrate")


if __name__ == "__main__":
    run()
