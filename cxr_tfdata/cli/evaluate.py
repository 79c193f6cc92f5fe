"""cxr-evaluate: metrics, intervals, calibration, report, plots and model card of a trained model, on
one split of a dataset (--data_dir) or on a folder of NORMAL/ and PNEUMONIA/ images (--images_dir)."""

from __future__ import annotations

from absl import app, flags

from cxr_tfdata.core import imaging
from cxr_tfdata.core.contract_values import PREVALENCE_HELP
from cxr_tfdata.core.runner import run_main

_MODEL = flags.DEFINE_string("model", None, "Trained model to evaluate: .keras (loaded in Keras safe mode), or an export by cxr-export (SavedModel folder, .onnx, OpenVINO .xml, .tflite, or its export folder), recognised by content.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset directory written by cxr-build-tfrecords.")
_IMAGES_DIR = flags.DEFINE_string(
    "images_dir", None,
    "Instead of --data_dir: a folder with NORMAL/ and PNEUMONIA/ subfolders of images (e.g. another hospital's), "
    "read as cxr-predict reads images and prepared as the model's contract says. Unreadable files are listed in "
    "report.md and excluded. Needs a model written by cxr-train (its contract says how to prepare the images; "
    "one that stores no operating threshold also needs --threshold).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None,
    "Where metrics.json, report.md, MODEL_CARD.md, model_card.json, predictions.csv and the plots (roc, pr, "
    "confusion_matrix, calibration .png) go.")
_VAL_SPLIT = flags.DEFINE_string(
    "val_split", "val",
    "Split on which an operating threshold is chosen (when the model stores none, or with "
    "--choose_threshold_on_val) and a temperature fitted (when the model stores none).")
_TARGET_RECALL = flags.DEFINE_float(
    "target_recall", None,
    "Recall (sensitivity) an operating threshold chosen on --val_split must reach: the highest such threshold "
    "is chosen. Default: the one the model's stored threshold was chosen for, else 0.95. A value "
    "contradicting the stored threshold's is refused unless --choose_threshold_on_val.")
_PREVALENCE = flags.DEFINE_float("prevalence", None, PREVALENCE_HELP)
_THRESHOLD = flags.DEFINE_float(
    "threshold", None, "Fixed operating threshold, instead of the model's stored one or one chosen on --val_split.")
_CHOOSE = flags.DEFINE_bool(
    "choose_threshold_on_val", False,
    "Choose the operating threshold afresh on --val_split for --target_recall, even when the model stores one.")
_PATIENT_KEY_FILE = flags.DEFINE_string("patient_key_file", None, "With --images_dir: the site's secret key that hashes patient ids (HMAC-SHA256) before anything is "
    "written; created on first use, owner-only. Default: $XDG_CONFIG_HOME/cxr-tfdata/patient_key "
    "(~/.config/cxr-tfdata/patient_key). Give the one cxr-build-tfrecords used so patient ids agree.")
_REDACT_PATHS = flags.DEFINE_bool(
    "redact_paths", False,
    "With --images_dir: write every image's path (predictions.csv, report.md, metrics.json, logs) as its keyed "
    "hash, keeping the extension: for folders or files named after patients.")
_MAX_FILE_MB = flags.DEFINE_float("max_file_mb", imaging.DEFAULT_MAX_FILE_MB,
                                  "With --images_dir: files larger than this are listed as excluded, not read.")
_BOOTSTRAP_SAMPLES = flags.DEFINE_integer(
    "bootstrap_samples", 1000, "Bootstrap resamples for the 95% intervals (by patient when ids exist); 0 disables.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per inference batch.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Write into a non-empty --output_dir that cxr-evaluate did not write, beside what is there. A file of "
    "the same name as one of cxr-evaluate's (e.g. cxr-train's metrics.json) is never replaced. A folder "
    "cxr-evaluate wrote before is updated without this flag.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cxr_tfdata.evaluation import evaluate, evaluate_config, report

    config = evaluate_config.EvaluateConfig(
        model_path=_MODEL.value or "",
        data_dir=_DATA_DIR.value or "",
        images_dir=_IMAGES_DIR.value or "",
        choose_threshold_on_val=_CHOOSE.value,
        max_file_mb=_MAX_FILE_MB.value,
        output_dir=_OUTPUT_DIR.value or "",
        split=_SPLIT.value,
        val_split=_VAL_SPLIT.value,
        target_recall=_TARGET_RECALL.value,
        threshold=_THRESHOLD.value,
        prevalence=_PREVALENCE.value,
        bootstrap_samples=_BOOTSTRAP_SAMPLES.value,
        seed=_SEED.value,
        batch_size=_BATCH_SIZE.value,
        overwrite=_OVERWRITE.value,
        patient_key_file=_PATIENT_KEY_FILE.value or "",
        redact_paths=_REDACT_PATHS.value,
    )
    metrics = evaluate.evaluate(config)
    if "prevalence_estimate" in metrics:
        return _print_estimate(metrics, config.output_dir)
    boot, source, cal = metrics["bootstrap"], metrics["source"], metrics["calibration"]
    where = f"Image folder {source['path']}" if source["kind"] == "images_dir" else f"Split {config.split!r}"
    excluded = f" ({source['num_unreadable']} unreadable file(s) excluded)" if source["kind"] == "images_dir" else ""
    print(f"{where}: {metrics['n']} images{excluded}. 95% bootstrap intervals by {boot['resampled_by']} "
          f"({boot['samples']} resamples).")
    print(report.summary_table(metrics))
    print(f"Operating threshold {metrics['operating_point']['threshold']:.4g}: "
          f"{metrics['operating_point']['chosen_by']}.")
    calibrated = cal["calibrated"]
    print(f"Calibration (ECE, {cal['ece_bins']} bins): raw {cal['raw']['ece']:.4f}"
          + (f", calibrated {calibrated['ece']:.4f} (temperature {cal['temperature']:.4g})" if calibrated else
             " (no temperature)"))
    if calibrated and cal.get("prevalence") is not None:
        print(f"Calibrated probabilities assume a PNEUMONIA prevalence of {cal['prevalence']:.4g}; the operating "
              f"threshold applies to the raw probability and is unaffected.")
    if cal.get("warning"):
        print(f"Warning: {cal['warning']}")
    print(f"Wrote report.md, MODEL_CARD.md, metrics.json, model_card.json, predictions.csv and plots to "
          f"{config.output_dir}")
    return 0


def _print_estimate(metrics: dict, output_dir: str) -> int:
    """What an --images_dir of unlabelled images gives: the prevalence estimate, not applied."""
    block = metrics["prevalence_estimate"]
    interval = block["interval"]
    shown = "" if interval is None else f" (95% interval {interval[0]:.3f}-{interval[1]:.3f})"
    print(f"Unlabelled images: {block['n']} scored. Estimated PNEUMONIA prevalence {block['value']:.3f}{shown}, "
          f"{block['reliability']}. Not applied.")
    print(f"Wrote report.md, metrics.json and predictions.csv to {output_dir}")
    return 0


def run():
    run_main(main, __name__, "cxr-evaluate")


if __name__ == "__main__":
    run()

