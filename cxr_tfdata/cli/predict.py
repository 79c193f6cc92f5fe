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

from cxr_tfdata.cli import define_record_flags, run_main
from tfrecords_builder import imaging

_MODEL = flags.DEFINE_string("model", None, "Trained model (.keras); loaded in Keras safe mode.")
_OUTPUT_CSV = flags.DEFINE_string("output_csv", None, "Write the CSV here instead of stdout.")
_GRADCAM_DIR = flags.DEFINE_string(
    "gradcam_dir", None,
    "Write a Grad-CAM PNG per image here: the source image at its own resolution (at least 512 px on the long side) "
    "beside the same with the heatmap on top, with the probability, label and threshold written on it.")
_RECORDS = define_record_flags(__name__)
_THRESHOLD = flags.DEFINE_float(
    "threshold", None,
    "Probability at or above which the label is PNEUMONIA. Default: the operating threshold the model stores "
    "(chosen by cxr-train on val), or 0.5 for a model without one; a value contradicting the stored one is refused.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per inference batch.")
_MAX_FILE_MB = flags.DEFINE_float("max_file_mb", imaging.DEFAULT_MAX_FILE_MB,
                                  "Files larger than this are reported on their row and not read.")


def main(argv):
    from cxr_tfdata import predict

    config = predict.PredictConfig(
        model_path=_MODEL.value or "",
        paths=tuple(argv[1:]),
        output_csv=_OUTPUT_CSV.value or "",
        gradcam_dir=_GRADCAM_DIR.value or "",
        threshold=_THRESHOLD.value,
        batch_size=_BATCH_SIZE.value,
        data_dir=_RECORDS.data_dir.value or "",
        **_RECORDS.given(),
        max_file_mb=_MAX_FILE_MB.value,
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
