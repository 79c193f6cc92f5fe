"""A serving SavedModel: encoded JPEG/PNG bytes in, pneumonia probability out, preprocessing in-graph.

Signature `serving_default`: input `image_bytes` tf.string [None] (JPEG or PNG, any size, gray or
colour); outputs `probability` float32 [None], `calibrated_probability` float32 [None] (the model's
temperature applied), `label` tf.string [None] ("PNEUMONIA" when probability >= the model's operating
threshold, else "NORMAL") and `error` tf.string [None]. One bad image never fails the batch: its row
has probability NaN, label "" and the reason in `error` ("" for a scored image). The model's
contract is saved beside the graph as assets/cxr_export.json, readable without TensorFlow.
Before anything is decoded, each image's format and size are read from its header bytes: other
formats, corrupt headers and images announcing more than imaging.MAX_IMAGE_PIXELS pixels are
refused there (a decompression bomb is never decoded). The rest are decoded in a tf.data pipeline
that drops undecodable images (`ignore_errors`), and the survivors are scattered back to their
rows; a decoded image that is near-constant (damaged scan data behind an intact header decodes to
flat grey) is refused too. In the graph each image is decoded to one channel as the converter
decodes it (a JPEG at the converter's reduced DCT scale), resized to the model's size with PIL's
bilinear arithmetic -- squashed to a square, or with resize="pad" letterboxed on black with the
converter's geometry -- so its pixels match the converter's (on 318 of the 321 originals exactly,
on the other 3 within one grey level; benchmarks/serving_parity.py). Transparent and 16-bit PNGs can
differ slightly: the converter composites alpha on black and maps 16 bits to 8 by 1/257. With
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

from cxr_tfdata import calibration, features, folder_swap, locking, model_io, outputs, predict
from tfrecords_builder import imaging

SIGNATURE_KEY = "serving_default"
INPUT_KEY = "image_bytes"
OUTPUT_KEY = "probability"
CALIBRATED_KEY = "calibrated_probability"
LABEL_KEY = "label"
ERROR_KEY = "error"
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_HEADER_BYTES = 24  # enough for a PNG's IHDR width and height
PROGRAM = "cxr-export"
# The export's description, readable without TensorFlow; its presence marks cxr-export's folders.
DESCRIPTION_ASSET = os.path.basename(outputs.EXPORT_MARKER)


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

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--model: is required")
        if not self.output_dir:
            raise ValueError("--output_dir: is required")
        predict.check_record_flags(self.resize, self.record_encoding, self.jpeg_quality)
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold: must be in [0, 1], got {self.threshold}")


_PRECISION_BITS = 22  # PIL's fixed-point precision for 8-bit resampling (Resample.c)


def _pil_bilinear_pass(image: tf.Tensor, out_size) -> tf.Tensor:
    """One pass of PIL's 8-bit bilinear resample along the last axis of a float64 [rows, in] image.

    PIL's arithmetic exactly: the triangle filter widened by the scale when shrinking, taps from
    round(center - support) to round(center + support), weights normalised, turned into 22-bit
    fixed point, summed from half a unit and truncated to 8 bits. So the serving graph resizes as
    the converter does.
    """
    in_size = tf.shape(image)[-1]
    in_float = tf.cast(in_size, tf.float64)
    scale = in_float / tf.cast(out_size, tf.float64)
    filter_scale = tf.maximum(scale, 1.0)
    taps = 2 * tf.cast(tf.math.ceil(filter_scale), tf.int32) + 1
    center = (tf.range(tf.cast(out_size, tf.float64)) + 0.5) * scale
    first = tf.maximum(tf.floor(center - filter_scale + 0.5), 0.0)
    last = tf.minimum(tf.floor(center + filter_scale + 0.5), in_float)
    index = first[:, None] + tf.range(tf.cast(taps, tf.float64))[None, :]
    weights = tf.where(index < last[:, None],
                       tf.nn.relu(1.0 - tf.abs((index - center[:, None] + 0.5) / filter_scale)), 0.0)
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.where(total > 0, weights / tf.where(total > 0, total, 1.0), 0.0)
    fixed = tf.floor(0.5 + weights * 2.0 ** _PRECISION_BITS)
    gathered = tf.gather(image, tf.minimum(tf.cast(index, tf.int32), in_size - 1), axis=-1)
    summed = tf.reduce_sum(gathered * fixed, axis=-1) + 2.0 ** (_PRECISION_BITS - 1)
    return tf.clip_by_value(tf.floor(summed / 2.0 ** _PRECISION_BITS), 0.0, 255.0)


def _resize_rounded(image: tf.Tensor, height, width) -> tf.Tensor:
    """PIL's Image.resize(BILINEAR) of an 8-bit gray image in-graph: the horizontal pass, stored in
    8 bits, then the vertical pass. [H, W, 1] -> float32 [height, width, 1] integer values."""
    pixels = tf.cast(image[..., 0], tf.float64)
    across = _pil_bilinear_pass(pixels, width)  # [H, width]
    down = _pil_bilinear_pass(tf.transpose(across), height)  # [width, height]
    return tf.cast(tf.transpose(down), tf.float32)[..., None]


_DRAFT_SCALES = (1, 2, 4, 8)


def _draft_scale_index(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Index in _DRAFT_SCALES of the scale a JPEG is decoded at by the converter (PIL's draft mode,
    libjpeg's DCT scaling): the largest that keeps both sides >= image_size."""
    height_width = tf.image.extract_jpeg_shape(encoded, output_type=tf.int32)
    scale = tf.minimum(height_width[0] // image_size, height_width[1] // image_size)
    return tf.reduce_sum(tf.cast(scale >= tf.constant(_DRAFT_SCALES[1:]), tf.int32))


def _decode_source(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 [H, W, 1] as the converter decodes: a JPEG's luma at its draft scale with libjpeg's
    accurate integer DCT (PIL's default), other formats through decode_image."""

    def jpeg_at(scale: int):
        return lambda: tf.io.decode_jpeg(encoded, channels=1, ratio=scale, dct_method="INTEGER_ACCURATE")

    def jpeg():
        return tf.switch_case(_draft_scale_index(encoded, image_size), [jpeg_at(s) for s in _DRAFT_SCALES])

    def other():
        return tf.io.decode_image(encoded, channels=1, dtype=tf.uint8, expand_animations=False)

    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)
    image = tf.cond(is_jpeg, jpeg, other)
    image.set_shape([None, None, 1])
    return image


def _letterbox(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """tfrecords_builder.imaging.resize(pad=True) in-graph: the same size, rounding and offsets.

    float64 and round-half-to-even, as Python's round() of the same product, so the scaled sides
    (and so the black borders) are the converter's to the pixel.
    """
    shape = tf.shape(image, out_type=tf.int64)
    height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    scale = image_size / tf.maximum(height, width)
    new_height = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), 1)
    new_width = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), 1)
    resized = _resize_rounded(image, new_height, new_width)
    return tf.image.pad_to_bounding_box(
        resized, (image_size - new_height) // 2, (image_size - new_width) // 2, image_size, image_size)


def decode_image_bytes(encoded: tf.Tensor, image_size: int, pad: bool = False,
                       jpeg_quality: int | None = None) -> tf.Tensor:
    """One encoded image -> float32 [S, S, 1] integer pixel values in [0, 255] (pad: letterboxed).

    jpeg_quality: encode and decode the resized pixels as JPEG records at that quality are.
    """
    image = _decode_source(encoded, image_size)
    pixels = _letterbox(image, image_size) if pad else _resize_rounded(image, image_size, image_size)
    if jpeg_quality is None:
        return pixels
    record = tf.io.encode_jpeg(tf.cast(pixels, tf.uint8), quality=jpeg_quality)
    return tf.cast(tf.io.decode_jpeg(record, channels=1), tf.float32)


def _big_endian_uint32(raw: tf.Tensor, offset: int) -> tf.Tensor:
    """Bytes offset..offset+3 of each row of a [N, K] uint8 tensor as a big-endian int64."""
    b = tf.cast(raw[:, offset:offset + 4], tf.int64)
    return b[:, 0] * 16777216 + b[:, 1] * 65536 + b[:, 2] * 256 + b[:, 3]


def _all_as_one_batch(dataset: tf.data.Dataset, count: tf.Tensor, sentinel) -> tuple:
    """Every element of a finite dataset as one batch, plus `sentinel` (index -1) at the end, so
    that there is always exactly one batch, even when every image was dropped."""
    ended = dataset.concatenate(tf.data.Dataset.from_tensors(sentinel))
    return ended.batch(tf.cast(count + 1, tf.int64)).get_single_element()


def _header_sizes(image_bytes: tf.Tensor, count: tf.Tensor, index: tf.Tensor):
    """(is_jpeg, is_png, header_ok, [N, 2] height and width) read from the header bytes only."""
    head = tf.strings.join([tf.strings.substr(image_bytes, 0, _HEADER_BYTES),
                            tf.fill([count], b"\0" * _HEADER_BYTES)])  # substr clips short inputs
    is_jpeg = tf.equal(tf.strings.substr(head, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)
    is_png = (tf.equal(tf.strings.substr(head, 0, len(_PNG_MAGIC)), _PNG_MAGIC)
              & tf.equal(tf.strings.substr(head, 12, 4), b"IHDR"))
    raw = tf.reshape(tf.io.decode_raw(tf.strings.substr(head, 0, _HEADER_BYTES), tf.uint8), [count, _HEADER_BYTES])
    png_hw = tf.stack([_big_endian_uint32(raw, 20), _big_endian_uint32(raw, 16)], axis=1)
    # extract_jpeg_shape reads only the header, but raises on a bad one: run it where errors drop.
    jpegs = tf.data.Dataset.from_tensor_slices((tf.boolean_mask(index, is_jpeg), tf.boolean_mask(image_bytes, is_jpeg)))
    jpegs = jpegs.map(lambda i, b: (i, tf.image.extract_jpeg_shape(b, output_type=tf.int64)[:2])).ignore_errors()
    jpeg_index, jpeg_hw = _all_as_one_batch(jpegs, count, (tf.constant(-1, tf.int32), tf.zeros([2], tf.int64)))
    kept = jpeg_index >= 0
    jpeg_index, jpeg_hw = tf.boolean_mask(jpeg_index, kept), tf.boolean_mask(jpeg_hw, kept)
    jpeg_ok = tf.scatter_nd(jpeg_index[:, None], tf.ones_like(jpeg_index, tf.bool), [count])
    hw = tf.where(is_jpeg[:, None], tf.scatter_nd(jpeg_index[:, None], jpeg_hw, [count, 2]), png_hw)
    return is_jpeg, is_png, (is_jpeg & jpeg_ok) | is_png, hw


def _calibrated(probability: tf.Tensor, temperature: float | None, logit_shift: float = 0.0) -> tf.Tensor:
    """calibration.apply_temperature in-graph, in float64 as there (NaN stays NaN)."""
    if temperature is None:
        return probability
    p = tf.clip_by_value(tf.cast(probability, tf.float64), calibration.PROBABILITY_EPSILON,
                         1.0 - calibration.PROBABILITY_EPSILON)
    logit = tf.math.log(p) - tf.math.log1p(-p)
    return tf.cast(tf.sigmoid(logit / temperature + logit_shift), tf.float32)


def serving_function(model: keras.Model, image_size: int, pad: bool = False, jpeg_quality: int | None = None,
                     max_pixels: int = imaging.MAX_IMAGE_PIXELS, threshold: float = predict.DEFAULT_THRESHOLD,
                     temperature: float | None = None, logit_shift: float = 0.0):
    """The serving computation: a batch of encoded images -> {"probability": float32 [N] (NaN where
    the image was refused), "calibrated_probability": float32 [N], "label": string [N] (class name at
    `threshold`, "" where refused), "error": string [N] ("" where it was scored)}."""

    def serve(image_bytes):
        count = tf.shape(image_bytes)[0]
        index = tf.range(count, dtype=tf.int32)
        is_jpeg, is_png, header_ok, hw = _header_sizes(image_bytes, count, index)
        size_ok = (hw[:, 0] > 0) & (hw[:, 1] > 0) & (hw[:, 0] * hw[:, 1] <= max_pixels)
        admitted = header_ok & size_ok
        decoded = tf.data.Dataset.from_tensor_slices(
            (tf.boolean_mask(index, admitted), tf.boolean_mask(image_bytes, admitted)))
        decoded = decoded.map(lambda i, b: (i, decode_image_bytes(b, image_size, pad, jpeg_quality)),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
        # The sentinel's blank image also keeps the batch from being empty (oneDNN convolutions
        # fail on a zero-sized batch); its row is dropped below.
        image_index, images = _all_as_one_batch(
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
        error = tf.where(is_jpeg & ~header_ok, "corrupt JPEG header", error)
        error = tf.where(~is_jpeg & ~is_png, "not a JPEG or PNG image", error)
        error = tf.where(tf.equal(tf.strings.length(image_bytes), 0), "empty input", error)
        # Compared in float64, as cxr-predict compares: a float32 threshold could round either way.
        positive = tf.cast(probability, tf.float64) >= tf.constant(threshold, tf.float64)
        label = tf.where(is_scored, tf.where(positive, features.CLASS_NAMES[1], features.CLASS_NAMES[0]), "")
        return {OUTPUT_KEY: probability, CALIBRATED_KEY: _calibrated(probability, temperature, logit_shift),
                LABEL_KEY: label, ERROR_KEY: error}

    return serve


class ServingModule(tf.Module):
    """What the SavedModel holds: the serving function, exactly the variables it reads, and the
    description asset.

    The variables are tracked as the tf.Variables the traced graph captures (not through the Keras
    model object), so each is saved once and TF1-style loaders such as `saved_model_cli run` restore
    them by the names the graph uses.
    """

    def __init__(self, model: keras.Model, pad: bool = False, jpeg_quality: int | None = None,
                 description_path: str | None = None, threshold: float = predict.DEFAULT_THRESHOLD,
                 temperature: float | None = None, logit_shift: float = 0.0):
        super().__init__(name="cxr_serving")
        self.image_size = model_io.model_image_size(model)
        self.serve = tf.function(
            serving_function(model, self.image_size, pad, jpeg_quality, threshold=threshold,
                             temperature=temperature, logit_shift=logit_shift),
            input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_KEY)],
        )
        self.captured_variables = list(self.serve.get_concrete_function().variables)
        if description_path:
            self.description = tf.saved_model.Asset(description_path)


def description(image_size: int, reading: predict.Reading, model_path: str = "") -> dict:
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
                                    "sigmoid(logit(p) / temperature + logit_shift); equal to probability "
                                    "without a temperature",
                    LABEL_KEY: "string [None]: PNEUMONIA when probability >= operating_threshold, else NORMAL; "
                               "empty where the image was refused",
                    ERROR_KEY: "string [None]: why the image was refused; empty where it was scored"},
        "image_size": image_size,
        "resize": records.resize,
        "record_encoding": records.record_encoding,
        "jpeg_quality": records.round_trip_quality,
        "operating_threshold": reading.threshold,
        "threshold_source": reading.threshold_source,
        "temperature": reading.temperature,
        "logit_shift": reading.logit_shift,
        "class_names": list(features.CLASS_NAMES),
        "max_image_pixels": imaging.MAX_IMAGE_PIXELS,
        "contract": reading.contract,
    }


def check_output(output_dir: str, overwrite: bool, inputs: dict[str, str]) -> None:
    """Refuses an output that overlaps an input, or exists and is not an export to replace."""
    outputs.check_apart("--output_dir", output_dir, inputs)
    if not os.path.lexists(output_dir):
        return
    if not overwrite:
        raise FileExistsError(f"--output_dir: {output_dir} already exists (pass --overwrite to replace "
                              f"it; only a SavedModel written by cxr-export is replaced)")
    outputs.check_replaceable("--output_dir", output_dir, "a SavedModel written by cxr-export",
                              outputs.saved_model_problems(output_dir))


def export_saved_model(model: keras.Model, output_dir: str, reading: predict.Reading | None = None,
                       overwrite: bool = False, model_path: str = "", data_dir: str = "") -> str:
    """Writes the SavedModel beside `output_dir` and renames it into place only when complete.

    An existing output_dir is replaced only with `overwrite`, and only when it is an export of this
    binary holding nothing else; an output overlapping the model file or the dataset is refused.
    A plain tf.Module rather than keras.export.ExportArchive: the archive (Keras 3.15) writes every
    variable twice (once per Keras variable, once per captured tf.Variable), doubling the size of a
    ResNet50V2 export.
    """
    output_dir = outputs.canonical(output_dir)
    reading = reading or predict.resolve_reading(model, model_path or model.name)
    inputs = {"--model": model_path, "--data_dir": data_dir}
    check_output(output_dir, overwrite, inputs)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    with locking.exclusive_lock(locking.lock_path_beside(output_dir), f"--output_dir={output_dir}", PROGRAM):
        folder_swap.recover(output_dir, outputs.saved_model_problems, (DESCRIPTION_ASSET, "saved_model"), inputs)
        check_output(output_dir, overwrite, inputs)  # again, now that no other export can change it
        staging = folder_swap.staging_path(output_dir)
        os.makedirs(staging)
        try:
            asset = os.path.join(staging, DESCRIPTION_ASSET)
            with open(asset, "w", encoding="utf-8") as f:
                json.dump(description(model_io.model_image_size(model), reading, model_path), f,
                          indent=2, sort_keys=True)
            module = ServingModule(model, reading.records.resize == "pad", reading.records.round_trip_quality,
                                   asset, reading.threshold, reading.temperature, reading.logit_shift)
            saved = os.path.join(staging, "saved_model")
            tf.saved_model.save(module, saved, signatures={SIGNATURE_KEY: module.serve})
            folder_swap.swap_into_place(saved, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def export(config: ExportConfig) -> str:
    """Runs cxr-export: loads the model in safe mode and writes the serving SavedModel, prepared and
    labelled as the model's contract says."""
    outputs.check_apart("--output_dir", config.output_dir, {"--model": config.model_path,
                                                            "--data_dir": config.data_dir})
    model = model_io.load_model(config.model_path)
    image_size = model_io.model_image_size(model, config.model_path)
    reading = predict.resolve_reading(model, config.model_path, config.data_dir, resize=config.resize,
                                      record_encoding=config.record_encoding, jpeg_quality=config.jpeg_quality,
                                      threshold=config.threshold)
    calibrated = ("no calibration stored" if reading.temperature is None else
                  f"calibration: temperature {reading.temperature:.4g}, logit shift {reading.logit_shift:.4g}")
    logging.info("exporting %s to %s (%d px, resize %s, records %s; labels at %.4g: %s; %s)",
                 config.model_path, config.output_dir, image_size, reading.records.resize,
                 reading.records.record_encoding, reading.threshold, reading.threshold_source, calibrated)
    return export_saved_model(model, config.output_dir, reading, config.overwrite, model_path=config.model_path,
                              data_dir=config.data_dir)
