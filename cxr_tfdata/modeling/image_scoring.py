"""Image files scored as their records would have been: the converter's decode and resize, the
records' JPEG round trip, then the model; a file that cannot be used gets its reason on its row."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
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


# Files read and decoded in threads while the model scores the batch before (PIL, TensorFlow's JPEG
# decode and NumPy release the GIL): at most two batches of pixels wait at any time.
DECODE_WORKERS = 2


def _read_row(path: str, image_size: int, pad: bool, record_encoding: str, jpeg_quality: int,
              max_file_bytes: int) -> PredictionRow:
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
    return row


def _rows_in_order(paths: list[str], read, workers: int, ahead: int):
    """`read(path)` of every path, in order. With workers, up to `ahead` files are being read in threads
    while the caller scores the rows already yielded; workers=0 reads each one when it is needed."""
    if workers < 1:
        yield from map(read, paths)
        return
    remaining = iter(paths)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cxr-decode") as pool:
        pending = collections.deque(pool.submit(read, path) for path in itertools.islice(remaining, ahead))
        try:
            while pending:
                row = pending.popleft().result()
                for path in itertools.islice(remaining, 1):
                    pending.append(pool.submit(read, path))
                yield row
        finally:
            for future in pending:
                future.cancel()


def predict_rows(model: keras.Model, paths: list[str], image_size: int, pad: bool,
                 threshold: float, batch_size: int, record_encoding: str = "png",
                 jpeg_quality: int = imaging.DEFAULT_JPEG_QUALITY,
                 max_file_bytes: int = int(imaging.DEFAULT_MAX_FILE_MB * (1 << 20)),
                 temperature: float | None = None, logit_shift: float = 0.0, *,
                 decode_workers: int = DECODE_WORKERS, keep_pixels: bool = True) -> list[PredictionRow]:
    """One row per path, in order: probability, calibrated probability (with `temperature` and
    `logit_shift`; the probability itself without a temperature) and class name at `threshold`, or the
    reason it failed. `model`: a keras.Model or a runtimes.PortableModel, fed float32 [N, S, S, 1].

    The files of the next batch are read and decoded by `decode_workers` threads while a batch is scored
    (0: one file at a time, in this thread); the batches are the same either way. Without keep_pixels
    (Grad-CAM needs them) a row's pixels are dropped once scored, so memory stays at about two batches.
    """
    read = functools.partial(_read_row, image_size=image_size, pad=pad, record_encoding=record_encoding,
                             jpeg_quality=jpeg_quality, max_file_bytes=max_file_bytes)
    rows: list[PredictionRow] = []
    batch: list[PredictionRow] = []
    progress = Progress(len(paths), "read and predicted")
    scored = 0

    def score() -> None:
        nonlocal scored
        pixels = np.stack([row.pixels for row in batch]).astype(np.float32)
        probabilities = np.asarray(model.predict_on_batch(pixels), np.float32).reshape(-1)
        calibrated = (probabilities if temperature is None else
                      calibration.apply_temperature(probabilities, temperature, logit_shift))
        for row, probability, calibrated_probability in zip(batch, probabilities.tolist(), calibrated.tolist(),
                                                             strict=True):
            row.probability = probability
            row.calibrated_probability = calibrated_probability
            row.label = record_schema.CLASS_NAMES[int(probability >= threshold)]
            if not keep_pixels:
                row.pixels = None
        batch.clear()
        progress.advance(len(rows) - scored)
        scored = len(rows)

    for row in _rows_in_order(paths, read, decode_workers, 2 * batch_size):
        rows.append(row)
        if row.pixels is not None:
            batch.append(row)
            if len(batch) == batch_size:
                score()
    if batch:
        score()
    progress.advance(len(rows) - scored)
    return rows
