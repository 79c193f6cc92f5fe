"""cxr-export: a trained .keras model to a serving SavedModel taking encoded JPEG/PNG bytes."""

from __future__ import annotations

import sys

from absl import app, flags

from cxr_tfdata.cli import run_main
from tfrecords_builder import imaging

_MODEL = flags.DEFINE_string("model", None, "Trained model (.keras); loaded in Keras safe mode.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "SavedModel directory to write (renamed into place when complete).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output_dir.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None,
    "The dataset the model was trained on (cxr-build-tfrecords --output_dir): --resize, "
    "--record_encoding and --jpeg_quality are read from its manifest.json, and a conflicting value "
    "given here is refused. Without it those flags (or their defaults) must match the build.")
_RESIZE = flags.DEFINE_enum(
    "resize", imaging.DEFAULT_RESIZE, imaging.RESIZE_MODES,
    "How the serving graph resizes images: squash (stretch to a square) or pad (keep the aspect "
    "ratio on black). Use what the training records were built with (cxr-build-tfrecords --resize).")
_RECORD_ENCODING = flags.DEFINE_enum(
    "record_encoding", imaging.DEFAULT_ENCODING, imaging.ENCODINGS,
    "How the training records stored images (cxr-build-tfrecords --encoding): with jpeg the serving "
    "graph applies the same JPEG round trip to each resized image.")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", imaging.DEFAULT_JPEG_QUALITY,
                                     "cxr-build-tfrecords --jpeg_quality of the records.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cxr_tfdata import export, predict

    try:
        settings = predict.record_settings(
            _DATA_DIR.value or "",
            resize=_RESIZE.value if _RESIZE.present else None,
            record_encoding=_RECORD_ENCODING.value if _RECORD_ENCODING.present else None,
            jpeg_quality=_JPEG_QUALITY.value if _JPEG_QUALITY.present else None,
        )
        config = export.ExportConfig(
            model_path=_MODEL.value or "", output_dir=_OUTPUT_DIR.value or "", overwrite=_OVERWRITE.value,
            resize=settings.resize, record_encoding=settings.record_encoding,
            jpeg_quality=settings.jpeg_quality, data_dir=_DATA_DIR.value or "",
        )
        path = export.export(config)
    except (ValueError, OSError) as e:
        print(f"cxr-export: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote SavedModel to {path}: signature {export.SIGNATURE_KEY!r} takes "
          f"{export.INPUT_KEY!r} (tf.string [None], JPEG or PNG bytes) and returns "
          f"{export.OUTPUT_KEY!r} (float32 [None]).")
    return 0


def run():
    run_main(main, __name__)


if __name__ == "__main__":
    run()
