"""A serving SavedModel: encoded JPEG/PNG bytes in, pneumonia probability out, preprocessing in-graph.

Signature `serving_default`: input `image_bytes` tf.string [None] (JPEG or PNG, any size, gray or
colour); outputs `probability` float32 [None], `calibrated_probability` float32 [None] (the model's
temperature applied), `label` tf.string [None] ("PNEUMONIA" when probability >= the model's operating
threshold, else "NORMAL") and `error` tf.string [None]. One bad image never fails the batch: its row
has probability NaN, label "" and the reason in `error` ("" for a scored image). The model's
contract is saved beside the graph as assets/cxr_export.json, readable without TensorFlow.
A second signature, `serving_pixels` (portable_formats.SAVED_MODEL_PIXELS_SIGNATURE), takes the
preprocessed pixels every other format takes (`pixels_function`); serving/portable_export.py writes those.
Before anything is decoded, each image's format and size are read from its header bytes: other
formats, corrupt headers and images announcing more than imaging.MAX_IMAGE_PIXELS pixels are
refused there (a decompression bomb is never decoded). The rest are decoded in a tf.data pipeline
that drops undecodable images (`ignore_errors`), and the survivors are scattered back to their
rows; a decoded image that is near-constant (damaged scan data behind an intact header decodes to
flat grey) is refused too. In the graph each image is decoded to one channel as the converter
decodes it (a JPEG at the converter's reduced DCT scale), resized to the model's size with PIL's
bilinear arithmetic -- squashed to a square, or with resize="pad" letterboxed on black with the
converter's geometry -- so its pixels match the converter's (on all 321 originals exactly;
benchmarks/serving_parity.py). PNGs (alpha composited on black,
16-bit, palette) give the converter's pixels exactly; a CMYK JPEG, whose conversion TensorFlow cannot
repeat, is refused with imaging_in_graph.CMYK_REASON. The EXIF orientation is applied after the decode and
before the resize, as the converter applies it (imaging_in_graph.exif_orientation); an orientation the graph
cannot read as PIL does is refused with imaging_in_graph.UNREADABLE_ORIENTATION_REASON. With
record_encoding="jpeg" the pixels then go through the records' JPEG round trip (as cxr-predict does). The model itself then applies the ResNet scaling. All of these settings come from the
model's contract; a model without one is exported with the flags given (or the converter's defaults).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import keras
import tensorflow as tf
from absl import logging

from cxr_tfdata.core import imaging, record_schema
from cxr_tfdata.core.config import require
from cxr_tfdata.files import folder_swap, locking, output_safety
from cxr_tfdata.metrics import calibration
from cxr_tfdata.modeling import feeding, loading, portable_formats
from cxr_tfdata.serving import imaging_in_graph

SIGNATURE_KEY = "serving_default"
INPUT_KEY = "image_bytes"
OUTPUT_KEY = "probability"
CALIBRATED_KEY = "calibrated_probability"
LABEL_KEY = "label"
ERROR_KEY = "error"
PROGRAM = "cxr-export"
# The export's description, readable without TensorFlow; its presence marks cxr-export's folders.
DESCRIPTION_ASSET = os.path.basename(output_safety.EXPORT_MARKER)
# What a staging folder of any format holds (portable_export writes "export" and "work").
STAGING_ENTRIES = (DESCRIPTION_ASSET, "saved_model", "export", "work")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What cxr-export runs."""

    model_path: str
    output_dir: str
    overwrite: bool = False
    # None: not given. The model's contract says how its images are prepared and labelled; a value
    # given here must agree with it (and with --data_dir's manifest), else the export is refused.
    resize: str | None = None
    record_encoding: str | None = None
    jpeg_quality: int | None = None
    threshold: float | None = None
    data_dir: str = ""  # the training dataset, when given: checked against the model's contract
    prevalence: float | None = None  # the site's PNEUMONIA prevalence the calibrated probabilities assume
    format: str = "saved_model"  # portable_formats.FORMATS
    quantize: str = "none"  # portable_formats.QUANTIZATIONS, as SUPPORTED_QUANTIZATIONS allows for the format
    calibration_images: int = 200  # int8: images of --data_dir's train split to calibrate on
    max_auc_drop: float = 0.005  # the guard: val ROC-AUC of the float model minus the quantized one's
    max_label_flips: float = 0.01  # the guard: share of val images whose label at the threshold changes

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--model: is required")
        if not self.output_dir:
            raise ValueError("--output_dir: is required")
        feeding.check_reading_flags(self.resize, self.record_encoding, self.jpeg_quality, self.threshold,
                                    self.prevalence)
        formats, quantizations = portable_formats.FORMATS, portable_formats.QUANTIZATIONS
        require(self.format in formats, "format", f"must be one of {', '.join(formats)}, got {self.format!r}")
        require(self.quantize in quantizations, "quantize",
                f"must be one of {', '.join(quantizations)}, got {self.quantize!r}")
        supported = portable_formats.SUPPORTED_QUANTIZATIONS[self.format]
        require(self.quantize in supported, "quantize",
                f"{self.quantize} is not available with --format={self.format}, which supports --quantize="
                f"{' or '.join(supported)}")
        require(self.quantize == "none" or bool(self.data_dir), "quantize",
                f"{self.quantize} needs --data_dir (the training records: its train split calibrates, its val "
                f"split is scored by the guard)")
        require(1 <= self.calibration_images <= 100_000, "calibration_images",
                f"must be in [1, 100000], got {self.calibration_images}")
        require(-1.0 <= self.max_auc_drop <= 1.0, "max_auc_drop", f"must be in [-1, 1], got {self.max_auc_drop}")
        require(0.0 <= self.max_label_flips <= 1.0, "max_label_flips",
                f"must be in [0, 1] (a share of the val images), got {self.max_label_flips}")


def _calibrated(probability: tf.Tensor, temperature: float | None, logit_shift: float = 0.0) -> tf.Tensor:
    """calibration.apply_temperature in-graph, in float64 as there (NaN stays NaN)."""
    if temperature is None:
        return probability
    p = tf.clip_by_value(tf.cast(probability, tf.float64), calibration.PROBABILITY_EPSILON,
                         1.0 - calibration.PROBABILITY_EPSILON)
    logit = tf.math.log(p) - tf.math.log1p(-p)
    return tf.cast(tf.sigmoid(logit / temperature + logit_shift), tf.float32)


def serving_function(model: keras.Model, image_size: int, pad: bool = False, jpeg_quality: int | None = None,
                     max_pixels: int = imaging.MAX_IMAGE_PIXELS, threshold: float = record_schema.DEFAULT_THRESHOLD,
                     temperature: float | None = None, logit_shift: float = 0.0):
    """The serving computation: a batch of encoded images -> {"probability": float32 [N] (NaN where
    the image was refused), "calibrated_probability": float32 [N], "label": string [N] (class name at
    `threshold`, "" where refused), "error": string [N] ("" where it was scored)}."""

    def serve(image_bytes):
        count = tf.shape(image_bytes)[0]
        index = tf.range(count, dtype=tf.int32)
        is_jpeg, is_png, header_ok, hw, is_cmyk = imaging_in_graph.header_sizes(image_bytes, count, index)
        size_ok = (hw[:, 0] > 0) & (hw[:, 1] > 0) & (hw[:, 0] * hw[:, 1] <= max_pixels)
        # An EXIF orientation the graph cannot read as PIL does would be applied otherwise than the converter does.
        # Read once per image: decides admission here and is applied by the decode below.
        orientation, orientation_readable = tf.map_fn(imaging_in_graph.exif_orientation, image_bytes,
                                                      fn_output_signature=(tf.int32, tf.bool))
        admitted = header_ok & size_ok & ~is_cmyk & orientation_readable
        decoded = tf.data.Dataset.from_tensor_slices((tf.boolean_mask(index, admitted),
                                                      tf.boolean_mask(image_bytes, admitted),
                                                      tf.boolean_mask(orientation, admitted)))
        decoded = decoded.map(lambda i, b, o: (i, imaging_in_graph.decode_image_bytes(b, image_size, pad, jpeg_quality, o)),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
        # The sentinel's blank image also keeps the batch from being empty (oneDNN convolutions
        # fail on a zero-sized batch); its row is dropped below.
        image_index, images = imaging_in_graph.all_as_one_batch(
            decoded, count, (tf.constant(-1, tf.int32), tf.zeros([image_size, image_size, 1], tf.float32)))
        probabilities = tf.reshape(tf.cast(model(images, training=False), tf.float32), [-1])
        real = image_index >= 0
        flat = tf.math.reduce_std(images, axis=[1, 2, 3]) < imaging.NEAR_CONSTANT_STD
        scored = real & ~flat
        near_constant = tf.scatter_nd(tf.boolean_mask(image_index, real & flat)[:, None],
                                      tf.ones_like(tf.boolean_mask(image_index, real & flat), tf.bool), [count])
        scored_index = tf.boolean_mask(image_index, scored)
        is_scored = tf.scatter_nd(scored_index[:, None], tf.ones_like(scored_index, tf.bool), [count])
        probability = tf.tensor_scatter_nd_update(
            tf.fill([count], float("nan")), scored_index[:, None], tf.boolean_mask(probabilities, scored))
        size_text = tf.strings.join([tf.strings.as_string(hw[:, 1]), "x", tf.strings.as_string(hw[:, 0])])
        error = tf.where(is_scored, "", "cannot decode the image: corrupt or truncated data")
        error = tf.where(near_constant, "near-constant image: blank, or damaged data behind an intact header", error)
        error = tf.where(header_ok & ~size_ok, tf.strings.join(
            ["image too large: ", size_text, f" pixels, more than the {max_pixels} pixel limit; not decoded"]), error)
        error = tf.where(header_ok & ((hw[:, 0] <= 0) | (hw[:, 1] <= 0)), "image has no pixels", error)
        error = tf.where(header_ok & size_ok & ~is_cmyk & ~orientation_readable,
                         imaging_in_graph.UNREADABLE_ORIENTATION_REASON, error)
        error = tf.where(header_ok & size_ok & is_cmyk, imaging_in_graph.CMYK_REASON, error)
        error = tf.where(is_jpeg & ~header_ok, "corrupt JPEG header", error)
        error = tf.where(~is_jpeg & ~is_png, "not a JPEG or PNG image", error)
        error = tf.where(tf.equal(tf.strings.length(image_bytes), 0), "empty input", error)
        # Compared in float64, as cxr-predict compares: a float32 threshold could round either way.
        positive = tf.cast(probability, tf.float64) >= tf.constant(threshold, tf.float64)
        label = tf.where(is_scored, tf.where(positive, record_schema.CLASS_NAMES[1], record_schema.CLASS_NAMES[0]), "")
        return {OUTPUT_KEY: probability, CALIBRATED_KEY: _calibrated(probability, temperature, logit_shift),
                LABEL_KEY: label, ERROR_KEY: error}

    return serve


def pixels_function(model: keras.Model, image_size: int):
    """The model alone on preprocessed pixels, as every non-SavedModel format and the SavedModel's
    `serving_pixels` signature take them: float32 [N, S, S, 1] grey values 0..255 -> float32 [N, 1]."""

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 1], tf.float32,
                                                name=portable_formats.PIXELS_INPUT)])
    def score(pixels):
        probability = tf.reshape(tf.cast(model(pixels, training=False), tf.float32), [-1, 1])
        return {portable_formats.PROBABILITY_OUTPUT: probability}

    return score


class ServingModule(tf.Module):
    """What the SavedModel holds: the serving function, exactly the variables it reads, and the
    description asset.

    The variables are tracked as the tf.Variables the traced graph captures (not through the Keras
    model object), so each is saved once and TF1-style loaders such as `saved_model_cli run` restore
    them by the names the graph uses.
    """

    def __init__(self, model: keras.Model, pad: bool = False, jpeg_quality: int | None = None,
                 description_path: str | None = None, threshold: float = record_schema.DEFAULT_THRESHOLD,
                 temperature: float | None = None, logit_shift: float = 0.0):
        super().__init__(name="cxr_serving")
        self.image_size = loading.model_image_size(model)
        self.serve = tf.function(
            serving_function(model, self.image_size, pad, jpeg_quality, threshold=threshold,
                             temperature=temperature, logit_shift=logit_shift),
            input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_KEY)],
        )
        self.serve_pixels = pixels_function(model, self.image_size)
        variables = {id(v): v for v in self.serve.get_concrete_function().variables}
        for v in self.serve_pixels.get_concrete_function().variables:
            variables.setdefault(id(v), v)
        self.captured_variables = list(variables.values())
        if description_path:
            self.description = tf.saved_model.Asset(description_path)


def description(image_size: int, reading: feeding.Reading, model_path: str = "") -> dict:
    """assets/cxr_export.json: what the export expects and returns, and the model's contract, readable
    without TensorFlow."""
    records = reading.records
    return {
        "written_by": PROGRAM,
        "source_model": os.path.abspath(model_path) if model_path else "",
        "signature": SIGNATURE_KEY,
        "input": {INPUT_KEY: "tf.string [None]: encoded JPEG or PNG bytes, any size, gray or colour"},
        "outputs": {OUTPUT_KEY: "float32 [None]: probability of PNEUMONIA; NaN where the image was refused",
                    CALIBRATED_KEY: "float32 [None]: the probability calibrated with the values below, "
                                    "sigmoid(logit(p) / temperature + logit_shift + prevalence_shift); equal "
                                    "to probability without a temperature",
                    LABEL_KEY: "string [None]: PNEUMONIA when probability >= operating_threshold, else NORMAL; "
                               "empty where the image was refused",
                    ERROR_KEY: "string [None]: why the image was refused; empty where it was scored"},
        "pixels_signature": {
            "name": portable_formats.SAVED_MODEL_PIXELS_SIGNATURE,
            "input": {portable_formats.PIXELS_INPUT: "float32 [None, image_size, image_size, 1]: grey values "
                                                     "0..255 as cxr_tfdata.modeling.image_scoring.load_image "
                                                     "returns them (no decoding, no refusals in the graph)"},
            "outputs": {portable_formats.PROBABILITY_OUTPUT: "float32 [None, 1]: probability of PNEUMONIA"}},
        "image_size": image_size,
        "resize": records.resize,
        "record_encoding": records.record_encoding,
        "jpeg_quality": records.round_trip_quality,
        "operating_threshold": reading.threshold,
        "threshold_source": reading.threshold_source,
        "temperature": reading.temperature,
        "logit_shift": reading.logit_shift,
        "prevalence": reading.prevalence.assumed,
        "stored_prevalence": reading.prevalence.stored,
        "prevalence_shift": reading.prevalence.shift,
        "prevalence_note": reading.prevalence.description,
        "class_names": list(record_schema.CLASS_NAMES),
        "max_image_pixels": imaging.MAX_IMAGE_PIXELS,
        "contract": reading.contract,
    }


def check_output(output_dir: str, overwrite: bool, inputs: dict[str, str]) -> None:
    """Refuses an output that overlaps an input, or exists and is not an export to replace."""
    output_safety.check_apart("--output_dir", output_dir, inputs)
    if not os.path.lexists(output_dir):
        return
    if not overwrite:
        raise FileExistsError(f"--output_dir: {output_dir} already exists (pass --overwrite to replace "
                              f"it; only a folder written by cxr-export is replaced)")
    output_safety.check_replaceable("--output_dir", output_dir, "a SavedModel written by cxr-export (or an ONNX, "
                                    "OpenVINO or LiteRT export of it)", output_safety.export_problems(output_dir))


def export_saved_model(model: keras.Model, output_dir: str, reading: feeding.Reading | None = None,
                       overwrite: bool = False, model_path: str = "", data_dir: str = "") -> str:
    """Writes the SavedModel beside `output_dir` and renames it into place only when complete.

    An existing output_dir is replaced only with `overwrite`, and only when it is an export of this
    binary holding nothing else; an output overlapping the model file or the dataset is refused.
    A plain tf.Module rather than keras.export.ExportArchive: the archive (Keras 3.15) writes every
    variable twice (once per Keras variable, once per captured tf.Variable), doubling the size of a
    ResNet50V2 export.
    """
    output_dir = output_safety.canonical(output_dir)
    reading = reading or feeding.resolve_reading(model, model_path or model.name)
    inputs = {"--model": model_path, "--data_dir": data_dir}
    check_output(output_dir, overwrite, inputs)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    with locking.exclusive_lock(locking.lock_path_beside(output_dir), f"--output_dir={output_dir}", PROGRAM):
        folder_swap.recover(output_dir, output_safety.export_problems, STAGING_ENTRIES, inputs)
        check_output(output_dir, overwrite, inputs)  # again, now that no other export can change it
        staging = folder_swap.staging_path(output_dir)
        os.makedirs(staging)
        try:
            asset = os.path.join(staging, DESCRIPTION_ASSET)
            with open(asset, "w", encoding="utf-8") as f:
                json.dump(description(loading.model_image_size(model), reading, model_path), f,
                          indent=2, sort_keys=True)
            module = ServingModule(model, reading.records.resize == "pad", reading.records.round_trip_quality,
                                   asset, reading.threshold, reading.temperature, reading.calibration_shift)
            saved = os.path.join(staging, "saved_model")
            tf.saved_model.save(module, saved, signatures={
                SIGNATURE_KEY: module.serve, portable_formats.SAVED_MODEL_PIXELS_SIGNATURE: module.serve_pixels})
            folder_swap.swap_into_place(saved, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def export(config: ExportConfig) -> str:
    """Runs cxr-export: loads the model in safe mode and writes the serving SavedModel, prepared and
    labelled as the model's contract says."""
    output_safety.check_apart("--output_dir", config.output_dir, {"--model": config.model_path,
                                                            "--data_dir": config.data_dir})
    model = loading.load_model(config.model_path)
    image_size = loading.model_image_size(model, config.model_path)
    reading = feeding.resolve_reading(model, config.model_path, config.data_dir, resize=config.resize,
                                      record_encoding=config.record_encoding, jpeg_quality=config.jpeg_quality,
                                      threshold=config.threshold, prevalence=config.prevalence)
    # The embedded contract records the calibration as exported (the graph applies reading.calibration_shift
    # once, as before), so readers of the export report what its calibrated_probability output does.
    reading = dataclasses.replace(reading, contract=feeding.exported_contract(reading, config.prevalence))
    calibrated = ("no calibration stored" if reading.temperature is None else
                  f"calibration: temperature {reading.temperature:.4g}, logit shift {reading.logit_shift:.4g}; "
                  f"{reading.prevalence.description}")
    logging.info("exporting %s to %s (%d px, resize %s, records %s; labels at %.4g: %s; %s)",
                 config.model_path, config.output_dir, image_size, reading.records.resize,
                 reading.records.record_encoding, reading.threshold, reading.threshold_source, calibrated)
    if config.format != "saved_model":
        from cxr_tfdata.serving import portable_export

        return portable_export.export_portable(model, config, reading)
    return export_saved_model(model, config.output_dir, reading, config.overwrite, model_path=config.model_path,
                              data_dir=config.data_dir)
