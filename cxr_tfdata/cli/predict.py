"""cxr-predict: image files or folders to a CSV of pneumonia probabilities, with optional Grad-CAM overlays.

Usage: cxr-predict --model=model.keras [--output_csv=out.csv] [--gradcam_dir=DIR] PATH ...
A model written by cxr-train says how its images are prepared and where its operating threshold
lies (its contract): no other flag is needed, and one that contradicts it is refused.
CSV columns: path, probability, calibrated_probability (with the model's temperature), label (class
name at the model's operating threshold), error (why a file was not read).
Exit status: 0 when at least one image was predicted (bad files are reported on their rows), 1 when
every file failed or the model cannot be used, 2 on a usage error.
"""

from __future__ import annotations

import sys

from absl import flags

from cxr_tfdata.cli.record_flags import define_record_flags
from cxr_tfdata.core import imaging
from cxr_tfdata.core.contract_values import PREVALENCE_HELP
from cxr_tfdata.core.runner import run_main

_MODEL = flags.DEFINE_string("model", None, "Trained model: .keras (loaded in Keras safe mode), or an export by cxr-export (SavedModel folder, .onnx, OpenVINO .xml, .tflite, or its export folder), recognised by content.")
_OUTPUT_CSV = flags.DEFINE_string("output_csv", None, "Write the CSV here instead of stdout.")
_GRADCAM_DIR = flags.DEFINE_string(
    "gradcam_dir", None,
    "Write a Grad-CAM PNG per image here: the source image at its own resolution (at least 512 px on the long side) "
    "beside the same with the heatmap on top, with the probability, label and threshold written on it.")
_RECORDS = define_record_flags(__name__)
_PREVALENCE = flags.DEFINE_float("prevalence", None, PREVALENCE_HELP)
_THRESHOLD = flags.DEFINE_float(
    "threshold", None,
    "Probability at or above which the label is PNEUMONIA. Default: the operating threshold the model stores "
    "(chosen by cxr-train on val), or 0.5 for a model without one; a value contradicting the stored one is refused.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per inference batch.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing --output_csv (a regular file that is not an input); without it an "
    "existing file is never replaced.")
_MAX_FILE_MB = flags.DEFINE_float("max_file_mb", imaging.DEFAULT_MAX_FILE_MB,
                                  "Files larger than this are reported on their row and not read.")
_REDACT_PATHS = flags.DEFINE_bool(
    "redact_paths", False,
    "Write each file's path (CSV, messages) as its keyed hash, keeping the extension: for folders or files "
    "named after patients. Not with --gradcam_dir.")
_PATIENT_KEY_FILE = flags.DEFINE_string(
    "patient_key_file", None,
    "With --redact_paths: the site's secret key (default $XDG_CONFIG_HOME/cxr-tfdata/patient_key, "
    "~/.config/cxr-tfdata/patient_key; created on first use, owner-only).")


def main(argv):
    from cxr_tfdata.serving import predict

    config = predict.PredictConfig(
        model_path=_MODEL.value or "",
        paths=tuple(argv[1:]),
        output_csv=_OUTPUT_CSV.value or "",
        gradcam_dir=_GRADCAM_DIR.value or "",
        threshold=_THRESHOLD.value,
        prevalence=_PREVALENCE.value,
        batch_size=_BATCH_SIZE.value,
        data_dir=_RECORDS.data_dir.value or "",
        **_RECORDS.given(),
        max_file_mb=_MAX_FILE_MB.value,
        overwrite=_OVERWRITE.value,
        redact_paths=_REDACT_PATHS.value,
        patient_key_file=_PATIENT_KEY_FILE.value or "",
    )
    rows = predict.predict(config, sys.stdout)
    failed = [row for row in rows if row.error]
    for row in failed:
        path = row.path if row.path.isprintable() else repr(row.path)  # one line per file, whatever its name
        print(f"cxr-predict: {path}: {row.error}", file=sys.stderr)
    if len(failed) == len(rows):
        print(f"cxr-predict: error: none of the {len(rows)} files could be read", file=sys.stderr)
        return 1
    return 0


def run():
    run_main(main, __name__, "cxr-predict")


if __name__ == "__main__":
    run()
