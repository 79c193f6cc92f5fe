"""Image files scored as their records would have been: the converter's decode and resize, the
records' JPEG round trip, then the model; a file that cannot be used gets its reason on its row."""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from cxr_tfdata.core import imaging, record_schema
from cxr_tfdata.core.progress import Progress
from cxr_tfdata.metrics import calibration


@dataclasses.dataclass
class PredictionRow:
    path: str
    probability: float | None = None
    calibrated_probability: float | None = None  # with the model's temperature (= probability without one)
    label: str = ""
    error: str = ""
    pixels: np.ndarray | None = dataclasses.field(default=None, repr=False)


def load_image(path: str, image_size: int, pad: bool, record_encoding: str = "png",
               jpeg_quality: int = imaging.DEFAULT_JPEG_QUALITY,
               max_file_bytes: int = int(imaging.DEFAULT_MAX_FILE_MB * (1 << 20))) -> np.ndarray:
    """The converter's decode and resize of one file, then its record encoding decoded as the input
    pipeline decodes it: uint8 [S, S, 1], the pixels training saw. ImageError on failure.

    "png" is lossless, so the converter's pixels are returned as they are.
    """
    if os.path.islink(path) and os.path.isdir(path):
        raise imaging.ImageError("symbolic link to a folder (not followed)")
    if os.path.isdir(path):  # a folder listed on its own row: one that could not be listed
        try:
            os.listdir(path)
        except OSError as e:
            raise imaging.ImageError(f"folder that cannot be listed: {e.strerror or e}; its files are not "
                                     f"predicted") from None
        raise imaging.ImageError("a folder, not an image file")
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
            row.label = record_schema.CLASS_NAMES[int(probability >= threshold)]
        progress.advance(len(batch))
    return rows
