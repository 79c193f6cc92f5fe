"""cxr-export: a trained .keras model to a serving SavedModel taking encoded JPEG/PNG bytes."""

from __future__ import annotations

import os

from absl import app, flags

from cxr_tfdata.cli.record_flags import define_record_flags
from cxr_tfdata.core.contract_values import PREVALENCE_HELP
from cxr_tfdata.core.runner import run_main

_MODEL = flags.DEFINE_string("model", None, "Trained model (.keras); loaded in Keras safe mode.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "SavedModel directory to write (renamed into place when complete).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Replace an existing --output_dir; only a SavedModel written by cxr-export that holds nothing else is "
    "replaced, any other folder is refused.")
_RECORDS = define_record_flags(__name__)
_PREVALENCE = flags.DEFINE_float("prevalence", None, PREVALENCE_HELP)
_THRESHOLD = flags.DEFINE_float(
    "threshold", None,
    "The serving label's threshold. Default: the operating threshold the model stores (chosen by cxr-train on "
    "val), or 0.5 for a model without one; a value contradicting the stored one is refused.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from cxr_tfdata.serving import export

    config = export.ExportConfig(
        model_path=_MODEL.value or "", output_dir=_OUTPUT_DIR.value or "", overwrite=_OVERWRITE.value,
        threshold=_THRESHOLD.value,
        prevalence=_PREVALENCE.value, data_dir=_RECORDS.data_dir.value or "", **_RECORDS.given(),
    )
    path = export.export(config)
    print(f"Wrote SavedModel to {path}: signature {export.SIGNATURE_KEY!r} takes {export.INPUT_KEY!r} "
          f"(tf.string [None], JPEG or PNG bytes) and returns {export.OUTPUT_KEY!r} and "
          f"{export.CALIBRATED_KEY!r} (float32 [None], NaN for a refused image), {export.LABEL_KEY!r} (tf.string "
          f"[None], the class at the model's operating threshold) and {export.ERROR_KEY!r} (tf.string [None], "
          f"why an image was refused). Its contract: {os.path.join(path, 'assets', export.DESCRIPTION_ASSET)}")
    return 0


def run():
    run_main(main, __name__, "cxr-export")


if __name__ == "__main__":
    run()
