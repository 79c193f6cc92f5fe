"""Image files and folders to pneumonia probabilities, and Grad-CAM overlays of what the model looked at.

Every image goes through the converter's own decode and resize (`tfrecords_builder.imaging`), so a
file predicted here meets the model exactly as its record did in training; the model holds the rest
of the preprocessing. A file that cannot be read gets its reason in the `error` column; the others
go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from cxr_tfdata import (
    atomic,
    calibration,
    contract,
    dataset_info,
    features,
    gradcam,
    locking,
    outputs,
    tables,
)
from cxr_tfdata.progress import Progress
from tfrecords_builder import imaging

CSV_COLUMNS = ("path", "probability", "calibrated_probability", "label", "error")
# Headers of CSVs earlier versions wrote: still recognised as cxr-predict's own, so replaceable.
_EARLIER_CSV_HEADERS = ("path,probability,label,error",)
PROGRAM = "cxr-predict"
DEFAULT_THRESHOLD = features.DEFAULT_THRESHOLD


@dataclasses.dataclass(frozen=True)
class RecordSettings:
    """How the training records were built, as far as a reader of source images must repeat it."""

    resize: str = imaging.DEFAULT_RESIZE
    record_encoding: str = imaging.DEFAULT_ENCODING
    jpeg_quality: int = imaging.DEFAULT_JPEG_QUALITY

    def __post_init__(self):
        check_record_flags(self.resize, self.record_encoding, self.jpeg_quality)

    @property
    def round_trip_quality(self) -> int | None:
        """The JPEG quality of the records' round trip; None for lossless (png) records."""
        return self.jpeg_quality if self.record_encoding == "jpeg" else None


def check_record_flags(resize: str | None, record_encoding: str | None, jpeg_quality: int | None) -> None:
    """Validates the values given (None: not given)."""
    if resize is not None and resize not in imaging.RESIZE_MODES:
        raise ValueError(f"--resize: must be one of {imaging.RESIZE_MODES}, got {resize!r}")
    if record_encoding is not None and record_encoding not in imaging.ENCODINGS:
        raise ValueError(f"--record_encoding: must be one of {imaging.ENCODINGS}, got {record_encoding!r}")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg_quality: must be in [1, 100], got {jpeg_quality}")


@dataclasses.dataclass(frozen=True)
class Reading:
    """How to prepare a model's images and read its output: from its contract, a --data_dir and flags."""

    records: RecordSettings
    threshold: float  # PNEUMONIA when probability >= threshold
    threshold_source: str
    temperature: float | None  # calibrated = sigmoid(logit(p) / temperature + logit_shift); None: not calibrated
    logit_shift: float
    contract: dict | None


def resolve_records(model_contract: dict | None, image_size: int, model_path: str,
                    info: dataset_info.DatasetInfo | None = None, *, resize: str | None = None,
                    record_encoding: str | None = None, jpeg_quality: int | None = None) -> RecordSettings:
    """How a model's images are prepared: its contract, then the build of the dataset `info` (when
    given; its image size must be the model's), then the flags given (None: not given).

    A value given two ways must agree, else ValueError naming both. A model without a contract (not
    written by cxr-train) falls back to the flags or the converter's defaults, with a warning when
    no dataset is given: nothing then checks that they match how its records were built.
    """
    from cxr_tfdata import model_io

    check_record_flags(resize, record_encoding, jpeg_quality)
    dataset = None
    if info is not None:
        model_io.check_image_size(image_size, info.image_size, model_path, info.data_dir)
        dataset = contract.preparation(info.manifest)
    values = contract.resolve(model_contract, dataset, {"resize": resize, "record_encoding": record_encoding,
                                                        "jpeg_quality": jpeg_quality},
                              model_path, info.manifest_path if info is not None else "")
    records = RecordSettings(values["resize"] or imaging.DEFAULT_RESIZE,
                             values["record_encoding"] or imaging.DEFAULT_ENCODING,
                             values["jpeg_quality"] or imaging.DEFAULT_JPEG_QUALITY)
    if model_contract is None and dataset is None:
        logging.warning("%s carries no contract (it was not written by cxr-train): its images are prepared with "
                        "--resize=%s --record_encoding=%s, which must match how its records were built", model_path,
                        records.resize, records.record_encoding)
    return records


def resolve_reading(model: keras.Model, model_path: str, data_dir: str = "", *, resize: str | None = None,
                    record_encoding: str | None = None, jpeg_quality: int | None = None,
                    threshold: float | None = None) -> Reading:
    """`resolve_records`, and the label rule and calibration: the contract's threshold (a --threshold
    must agree with it), else --threshold, else 0.5 with a warning; the contract's temperature and
    logit shift (none for a model without them)."""
    from cxr_tfdata import model_io

    model_contract = contract.read(model)
    info = dataset_info.load(data_dir) if data_dir else None
    records = resolve_records(model_contract, model_io.model_image_size(model, model_path), model_path, info,
                              resize=resize, record_encoding=record_encoding, jpeg_quality=jpeg_quality)
    stored = contract.resolve(model_contract, None, {"threshold": threshold}, model_path)["threshold"]
    if model_contract is not None and model_contract.get("operating_threshold") is not None:
        source = contract.describe_threshold(model_contract)
    elif threshold is not None:
        source = "--threshold"
    else:
        source = f"the default {DEFAULT_THRESHOLD}: {model_path} stores no operating threshold"
        logging.warning("%s stores no operating threshold: labels at %g (pass --threshold to choose one)",
                        model_path, DEFAULT_THRESHOLD)
    temperature = (model_contract or {}).get("temperature")
    return Reading(records, float(stored if stored is not None else DEFAULT_THRESHOLD),
                   source, None if temperature is None else float(temperature),
                   float((model_contract or {}).get("logit_shift") or 0.0), model_contract)


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """What cxr-predict runs."""

    model_path: str
    paths: tuple[str, ...]
    output_csv: str = ""  # empty: the CSV goes to stdout
    gradcam_dir: str = ""
    # None: not given. The model's contract says how its images are prepared and labelled; a value
    # given here must agree with it (and with --data_dir's manifest), else the run is refused.
    resize: str | None = None
    threshold: float | None = None
    batch_size: int = 32
    # How the training records stored images (the converter's --encoding, --jpeg_quality): the same
    # lossy round trip is applied here, so a source file meets the model as its record did.
    record_encoding: str | None = None
    jpeg_quality: int | None = None
    data_dir: str = ""  # the training dataset, when given: checked against the model's contract
    max_file_mb: float = imaging.DEFAULT_MAX_FILE_MB

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--model: is required")
        if not self.paths:
            raise ValueError("no image files or folders given (pass them as arguments)")
        if not 0 < self.max_file_mb < 1 << 30:
            raise ValueError(f"--max_file_mb: must be a number of MB in (0, 2^30), got {self.max_file_mb}")
        check_record_flags(self.resize, self.record_encoding, self.jpeg_quality)
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold: must be in [0, 1], got {self.threshold}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size: must be >= 1, got {self.batch_size}")


@dataclasses.dataclass
class PredictionRow:
    path: str
    probability: float | None = None
    calibrated_probability: float | None = None  # with the model's temperature (= probability without one)
    label: str = ""
    error: str = ""
    pixels: np.ndarray | None = dataclasses.field(default=None, repr=False)


def collect_image_paths(paths: list[str] | tuple[str, ...]) -> list[str]:
    """Paths as given, plus every non-hidden entry under each folder (recursive, sorted).

    Every entry is listed whatever its name or kind: one that is not an image, not a regular file
    or a symbolic link to a folder (which is not followed) gets its reason on its row, as the
    converter lists it as skipped, rather than vanishing from the output.
    """
    collected = []
    for path in paths:
        if not os.path.isdir(path):
            collected.append(path)
            continue
        for root, dirs, files in os.walk(path):
            visible = sorted(d for d in dirs if not d.startswith("."))
            linked = [d for d in visible if os.path.islink(os.path.join(root, d))]
            dirs[:] = [d for d in visible if d not in linked]
            names = sorted([n for n in files if not n.startswith(".")] + linked)
            collected.extend(os.path.join(root, name) for name in names)
    return collected


def load_image(path: str, image_size: int, pad: bool, record_encoding: str = "png",
               jpeg_quality: int = imaging.DEFAULT_JPEG_QUALITY,
               max_file_bytes: int = int(imaging.DEFAULT_MAX_FILE_MB * (1 << 20))) -> np.ndarray:
    """The converter's decode and resize of one file, then its record encoding decoded as the input
    pipeline decodes it: uint8 [S, S, 1], the pixels training saw. ImageError on failure.

    "png" is lossless, so the converter's pixels are returned as they are.
    """
    if os.path.islink(path) and os.path.isdir(path):
        raise imaging.ImageError("symbolic link to a folder (not followed)")
    data = imaging.read_source(path, max_file_bytes)
    pixels, _ = imaging.decode_and_resize(data, image_size, pad=pad)
    if record_encoding == "jpeg":
        # TensorFlow's JPEG decoder, as in the input pipeline (PIL's differs by a few levels).
        encoded = imaging.encode(pixels, "jpeg", jpeg_quality)
        pixels = tf.io.decode_image(encoded, channels=1, expand_animations=False, dtype=tf.uint8).numpy()
    return pixels


def _read_rows(paths: list[str], image_size: int, pad: bool, record_encoding: str,
               jpeg_quality: int, max_file_bytes: int) -> list[PredictionRow]:
    rows = []
    for path in paths:
        row = PredictionRow(path=path)
        try:
            pixels = load_image(path, image_size, pad, record_encoding, jpeg_quality, max_file_bytes)
        except imaging.ImageError as e:
            row.error = f"cannot read image: {e}"
        else:
            if float(np.std(pixels)) < imaging.NEAR_CONSTANT_STD:
                row.error = (f"near-constant image (pixel standard deviation {float(np.std(pixels)):.2f}): "
                             f"blank, or damaged data behind an intact header; not predicted")
            else:
                row.pixels = pixels
        rows.append(row)
    return rows


def predict_rows(model: keras.Model, paths: list[str], image_size: int, pad: bool,
                 threshold: float, batch_size: int, record_encoding: str = "png",
                 jpeg_quality: int = imaging.DEFAULT_JPEG_QUALITY,
                 max_file_bytes: int = int(imaging.DEFAULT_MAX_FILE_MB * (1 << 20)),
                 temperature: float | None = None, logit_shift: float = 0.0) -> list[PredictionRow]:
    """One row per path: probability, calibrated probability (with `temperature` and `logit_shift`;
    the probability itself without a temperature) and class name at `threshold`, or the reason it
    failed."""
    rows = _read_rows(paths, image_size, pad, record_encoding, jpeg_quality, max_file_bytes)
    readable = [row for row in rows if row.pixels is not None]
    progress = Progress(len(readable), "predicted")
    for start in range(0, len(readable), batch_size):
        batch = readable[start:start + batch_size]
        probabilities = np.asarray(
            model.predict_on_batch(np.stack([row.pixels for row in batch])), np.float32
        ).reshape(-1)
        calibrated = (probabilities if temperature is None else
                      calibration.apply_temperature(probabilities, temperature, logit_shift))
        for row, probability, calibrated_probability in zip(batch, probabilities.tolist(), calibrated.tolist(),
                                                             strict=True):
            row.probability = probability
            row.calibrated_probability = calibrated_probability
            row.label = features.CLASS_NAMES[int(probability >= threshold)]
        progress.advance(len(batch))
    return rows


def rows_to_csv(rows: list[PredictionRow]) -> str:
    """The CSV document; text cells a spreadsheet would run as formulas start with a single quote."""
    return tables.csv_text(CSV_COLUMNS, (
        [row.path, _number(row.probability), _number(row.calibrated_probability), row.label, row.error]
        for row in rows))


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.9g}"


def is_prediction_csv(path: str) -> bool:
    """True for a CSV that cxr-predict wrote (recognised by its header line)."""
    return outputs.first_line(path) in (",".join(CSV_COLUMNS), *_EARLIER_CSV_HEADERS)


def check_outputs(config: PredictConfig) -> None:
    """Refuses a CSV or Grad-CAM folder that is, holds or lies inside an input, and a CSV path that
    holds a file cxr-predict did not write."""
    inputs = {"--model": config.model_path, "--data_dir": config.data_dir}
    inputs.update({f"image path {i + 1}": path for i, path in enumerate(config.paths)})
    if config.output_csv:
        outputs.check_apart("--output_csv", config.output_csv, inputs)
        outputs.check_file_replaceable("--output_csv", config.output_csv, is_prediction_csv)
    if config.gradcam_dir:
        outputs.check_apart("--gradcam_dir", config.gradcam_dir, inputs)
        if os.path.lexists(config.gradcam_dir) and not os.path.isdir(config.gradcam_dir):
            raise outputs.UnsafeOutputError(f"--gradcam_dir={config.gradcam_dir} is a file, not a folder")


def predict(config: PredictConfig, stream: io.TextIOBase) -> list[PredictionRow]:
    """Runs cxr-predict: the CSV to `config.output_csv` (atomically) or to `stream`."""

    config = dataclasses.replace(
        config, output_csv=outputs.canonical(config.output_csv) if config.output_csv else "",
        gradcam_dir=outputs.canonical(config.gradcam_dir) if config.gradcam_dir else "")
    check_outputs(config)
    with contextlib.ExitStack() as locks:
        for flag, path in (("--output_csv", config.output_csv), ("--gradcam_dir", config.gradcam_dir)):
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                locks.enter_context(locking.exclusive_lock(locking.lock_path_beside(path), f"{flag}={path}",
                                                           PROGRAM))
        check_outputs(config)  # again, now that no other run can change them
        return _predict_locked(config, stream)


def _predict_locked(config: PredictConfig, stream: io.TextIOBase) -> list[PredictionRow]:
    from cxr_tfdata import model_io

    model = model_io.load_model(config.model_path)
    image_size = model_io.model_image_size(model, config.model_path)
    reading = resolve_reading(model, config.model_path, config.data_dir, resize=config.resize,
                              record_encoding=config.record_encoding, jpeg_quality=config.jpeg_quality,
                              threshold=config.threshold)
    paths = collect_image_paths(config.paths)
    if not paths:
        raise ValueError(f"no image files found in {list(config.paths)}")
    records = reading.records
    logging.info("predicting %d file(s) with %s at %d px (resize %s, records %s); labels at threshold %.4g (%s)",
                 len(paths), config.model_path, image_size, records.resize, records.record_encoding,
                 reading.threshold, reading.threshold_source)
    rows = predict_rows(model, paths, image_size, records.resize == "pad", reading.threshold,
                        config.batch_size, records.record_encoding, records.jpeg_quality,
                        int(config.max_file_mb * (1 << 20)), reading.temperature, reading.logit_shift)
    if config.gradcam_dir:
        written = gradcam.write_gradcams(model, rows, config.gradcam_dir, config.batch_size, reading.threshold,
                                         reading.threshold_source, records.resize == "pad",
                                         int(config.max_file_mb * (1 << 20)))
        logging.info("wrote %d Grad-CAM image(s) to %s", len(written), config.gradcam_dir)
    if config.output_csv:
        atomic.write_text(config.output_csv, rows_to_csv(rows))
        failed = sum(1 for row in rows if row.error)
        logging.info("wrote %s: %d row(s), %d of them not predicted (their reasons are in the error column)",
                     config.output_csv, len(rows), failed)
    else:
        stream.write(rows_to_csv(rows))
    return rows
