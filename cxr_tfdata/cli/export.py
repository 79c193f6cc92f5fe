"""cxr-export: a trained .keras model to a serving SavedModel taking encoded JPEG/PNG bytes, or (--format) to
ONNX, OpenVINO IR or LiteRT taking preprocessed pixels, optionally quantized behind a guard."""

from __future__ import annotations

import os

from absl import app, flags

from cxr_tfdata.cli.record_flags import define_record_flags
from cxr_tfdata.core.contract_values import PREVALENCE_HELP
from cxr_tfdata.core.runner import run_main

_MODEL = flags.DEFINE_string("model", None, "Trained model (.keras); loaded in Keras safe mode.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to write the export into (renamed into place when complete).")
_FORMAT = flags.DEFINE_string(
    "format", "saved_model",
    "saved_model (TF Serving; image bytes in, decoding in the graph), onnx (ONNX Runtime, TensorRT and other "
    "runtimes), openvino (a CPU server) or tflite (LiteRT, an edge device). The last three take preprocessed "
    "pixels (cxr_tfdata.modeling.image_scoring.load_image) and carry the contract in their metadata.")
_QUANTIZE = flags.DEFINE_string(
    "quantize", "none",
    "none, float16 or int8. openvino: none (float32 weights; bfloat16 compute where the CPU supports it), "
    "float16 (compressed weights), int8 (NNCF); onnx: none, int8 (static QDQ); tflite: none, float16, int8 "
    "(full-integer); saved_model: none. Anything but none needs --data_dir and passes the guard below or is "
    "not written.")
_CALIBRATION_IMAGES = flags.DEFINE_integer(
    "calibration_images", 200, "int8: how many images of --data_dir's train split to calibrate on.")
_MAX_AUC_DROP = flags.DEFINE_float(
    "max_auc_drop", 0.005,
    "The guard: refuse a quantized export whose val ROC-AUC is lower than the float model's by more than this.")
_MAX_LABEL_FLIPS = flags.DEFINE_float(
    "max_label_flips", 0.01,
    "The guard: refuse a quantized export whose label at the operating threshold differs from the float "
    "model's on more than this share of the val images.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False,
    "Replace an existing --output_dir; only an export written by cxr-export that holds nothing else is "
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
        format=_FORMAT.value, quantize=_QUANTIZE.value, calibration_images=_CALIBRATION_IMAGES.value,
        max_auc_drop=_MAX_AUC_DROP.value, max_label_flips=_MAX_LABEL_FLIPS.value,
    )
    path = export.export(config)
    if config.format != "saved_model":
        from cxr_tfdata.modeling import portable_formats

        print(f"Wrote {config.format} export (--quantize={config.quantize}) to {path}: input "
              f"{portable_formats.PIXELS_INPUT!r} (float32 [N, S, S, 1], grey values 0..255 as "
              f"cxr_tfdata.modeling.image_scoring.load_image gives them), output "
              f"{portable_formats.PROBABILITY_OUTPUT!r} (float32 [N, 1]). Its contract and description: "
              f"{os.path.join(path, portable_formats.DESCRIPTION_FILE)}")
        return 0
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
