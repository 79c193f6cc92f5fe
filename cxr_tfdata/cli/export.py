"""cxr-export: a trained .keras model to a serving SavedModel taking encoded JPEG/PNG bytes."""

from __future__ import annotations

from absl import app, flags

from cxr_tfdata.cli import define_record_flags, run_main

_MODEL = flags.DEFINE_string("model", None, "Trained model (.keras); loaded in Keras safe mode.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "SavedModel directory to write (renamed into place when complete).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Replace an existing --output_dir; only a SavedModel written by cxr-export that holds nothing else is "
    "replaced, any other folder is refused.")
_RECORDS = define_record_flags(__name__)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cxr_tfdata import export

    settings = _RECORDS.settings()
    config = export.ExportConfig(
        model_path=_MODEL.value or "", output_dir=_OUTPUT_DIR.value or "", overwrite=_OVERWRITE.value,
        resize=settings.resize, record_encoding=settings.record_encoding,
        jpeg_quality=settings.jpeg_quality, data_dir=_RECORDS.data_dir.value or "",
    )
    path = export.export(config)
    print(f"Wrote SavedModel to {path}: signature {export.SIGNATURE_KEY!r} takes {export.INPUT_KEY!r} "
          f"(tf.string [None], JPEG or PNG bytes) and returns {export.OUTPUT_KEY!r} (float32 [None], NaN for "
          f"a refused image) and {export.ERROR_KEY!r} (tf.string [None], why it was refused).")
    return 0


def run():
    run_main(main, __name__, "cxr-export")


if __name__ == "__main__":
    run()
