"""cxr-export: a trained .keras model to a serving SavedModel taking encoded JPEG/PNG bytes."""

from __future__ import annotations

import sys

from absl import app, flags

from cxr_tfdata.cli import run_main
from tfrecords_builder import imaging

_MODEL = flags.DEFINE_string("model", None, "Trained model (.keras); loaded in Keras safe mode.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "SavedModel directory to write (renamed into place when complete).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output_dir.")
_RESIZE = flags.DEFINE_enum(
    "resize", imaging.DEFAULT_RESIZE, imaging.RESIZE_MODES,
    "How the serving graph resizes images: squash (stretch to a square) or pad (keep the aspect "
    "ratio on black). Use what the training records were built with (cxr-build-tfrecords --resize).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cxr_tfdata import export

    try:
        config = export.ExportConfig(
            model_path=_MODEL.value or "", output_dir=_OUTPUT_DIR.value or "", overwrite=_OVERWRITE.value,
            resize=_RESIZE.value,
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
