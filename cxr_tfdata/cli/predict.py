"""cxr-predict: image files or folders to a CSV of pneumonia probabilities, with optional Grad-CAM overlays.

Usage: cxr-predict --model=model.keras [--data_dir=RECORDS] [--output_csv=out.csv] [--gradcam_dir=DIR] PATH ...
CSV columns: path, probability, label (class name at --threshold), error (why a file was not read).
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
_GRADCAM_DIR = flags.DEFINE_string("gradcam_dir", None, "Write a Grad-CAM overlay PNG per image here.")
_RECORDS = define_record_flags(__name__)
_THRESHOLD = flags.DEFINE_float("threshold", 0.5, "Probability at or above which the label is PNEUMONIA.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per inference batch.")
_MAX_FILE_MB = flags.DEFINE_float("max_file_mb", imaging.DEFAULT_MAX_FILE_MB,
                                  "Files larger than this are reported on their row and not read.")


def main(argv):
    from cxr_tfdata import predict

    settings = _RECORDS.settings()
    config = predict.PredictConfig(
        model_path=_MODEL.value or "",
        paths=tuple(argv[1:]),
        output_csv=_OUTPUT_CSV.value or "",
        gradcam_dir=_GRADCAM_DIR.value or "",
        resize=settings.resize,
        threshold=_THRESHOLD.value,
        batch_size=_BATCH_SIZE.value,
        record_encoding=settings.record_encoding,
        jpeg_quality=settings.jpeg_quality,
        data_dir=_RECORDS.data_dir.value or "",
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
