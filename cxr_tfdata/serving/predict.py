"""Image files and folders to pneumonia probabilities, and Grad-CAM overlays of what the model looked at.

Every image goes through the converter's own decode and resize (`cxr_tfdata.core.imaging`), so a
file predicted here meets the model exactly as its record did in training; the model holds the rest
of the preprocessing. A file that cannot be read gets its reason in the `error` column; the others
go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os

from absl import logging

from cxr_tfdata.core import imaging, patient_keys
from cxr_tfdata.files import atomic, locking, output_safety, table_cells
from cxr_tfdata.modeling import feeding, image_scoring, runtimes
from cxr_tfdata.modeling.image_scoring import PredictionRow
from cxr_tfdata.serving import gradcam

CSV_COLUMNS = ("path", "probability", "calibrated_probability", "label", "error")
# Headers of CSVs earlier versions wrote: still recognised as cxr-predict's own, so replaceable.
_EARLIER_CSV_HEADERS = ("path,probability,label,error",)
PROGRAM = "cxr-predict"


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
    # An existing --output_csv is replaced only with overwrite (never when it is an input).
    overwrite: bool = False
    prevalence: float | None = None  # the site's PNEUMONIA prevalence the calibrated probabilities assume
    # Write each file's path (CSV, messages) as its keyed hash (README "Patient identity"), under this key.
    redact_paths: bool = False
    patient_key_file: str = ""

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--model: is required")
        if not self.paths:
            raise ValueError("no image files or folders given (pass them as arguments)")
        if not 0 < self.max_file_mb < 1 << 30:
            raise ValueError(f"--max_file_mb: must be a number of MB in (0, 2^30), got {self.max_file_mb}")
        feeding.check_reading_flags(self.resize, self.record_encoding, self.jpeg_quality, self.threshold,
                                    self.prevalence)
        if self.batch_size < 1:
            raise ValueError(f"--batch_size: must be >= 1, got {self.batch_size}")
        if self.redact_paths and self.gradcam_dir:
            raise ValueError("--redact_paths: not with --gradcam_dir (Grad-CAM pictures are named and labelled "
                             "after their source files)")


def collect_image_paths(paths: list[str] | tuple[str, ...]) -> list[str]:
    """Paths as given, plus every non-hidden entry under each folder (recursive, sorted).

    Every entry is listed whatever its name or kind: one that is not an image, not a regular file
    or a symbolic link to a folder (which is not followed) gets its reason on its row, as the
    converter lists it as skipped, rather than vanishing from the output. So does a folder that
    cannot be listed (no permission, say): it is listed itself, and its row says why.
    """
    collected = []
    for path in paths:
        if not os.path.isdir(path):
            collected.append(path)
            continue
        for root, dirs, files in os.walk(path, onerror=lambda e: collected.append(e.filename)):
            visible = sorted(d for d in dirs if not d.startswith("."))
            linked = [d for d in visible if os.path.islink(os.path.join(root, d))]
            dirs[:] = [d for d in visible if d not in linked]
            names = sorted([n for n in files if not n.startswith(".")] + linked)
            collected.extend(os.path.join(root, name) for name in names)
    return collected


def rows_to_csv(rows: list[PredictionRow]) -> str:
    """The CSV document; text cells a spreadsheet would run as formulas start with a single quote."""
    return table_cells.csv_text(CSV_COLUMNS, (
        [row.path, _number(row.probability), _number(row.calibrated_probability), row.label, row.error]
        for row in rows))


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.9g}"


def is_prediction_csv(path: str) -> bool:
    """True for a CSV that cxr-predict wrote (recognised by its header line)."""
    return output_safety.first_line(path) in (",".join(CSV_COLUMNS), *_EARLIER_CSV_HEADERS)


def check_outputs(config: PredictConfig) -> None:
    """Refuses a CSV or Grad-CAM folder that is, holds or lies inside an input, and an existing CSV
    path without --overwrite: a header like ours is no proof that cxr-predict wrote the file (it may
    be a reviewed copy with notes), so only the user can say it may be replaced."""
    inputs = {"--model": config.model_path, "--data_dir": config.data_dir}
    inputs.update({f"--model's file {i + 1}": path for i, path in enumerate(runtimes.companion_files(config.model_path))})
    inputs.update({f"image path {i + 1}": path for i, path in enumerate(config.paths)})
    if config.output_csv:
        output_safety.check_apart("--output_csv", config.output_csv, inputs)
        if os.path.lexists(config.output_csv) and not config.overwrite:
            raise output_safety.UnsafeOutputError(
                f"--output_csv={config.output_csv} exists and is not replaced without --overwrite; pass "
                f"--overwrite to replace it, or choose another path")
        output_safety.check_file_replaceable("--output_csv", config.output_csv, lambda _: True)  # a regular file
    if config.gradcam_dir:
        output_safety.check_apart("--gradcam_dir", config.gradcam_dir, inputs)
        if os.path.lexists(config.gradcam_dir) and not os.path.isdir(config.gradcam_dir):
            raise output_safety.UnsafeOutputError(f"--gradcam_dir={config.gradcam_dir} is a file, not a folder")


def check_gradcam_model(config: PredictConfig) -> None:
    """Refuses --gradcam_dir with a model that is not a .keras file: Grad-CAM needs the Keras layers' gradients."""
    if config.gradcam_dir and os.path.exists(config.model_path):
        fmt, _ = runtimes.detect_format(config.model_path)
        if fmt != runtimes.KERAS:
            raise ValueError(f"--gradcam_dir: needs a .keras --model (Grad-CAM reads the Keras layers' gradients); "
                             f"--model={config.model_path} is {fmt}: drop --gradcam_dir or give the .keras model")


def predict(config: PredictConfig, stream: io.TextIOBase) -> list[PredictionRow]:
    """Runs cxr-predict: the CSV to `config.output_csv` (atomically) or to `stream`."""

    config = dataclasses.replace(
        config, output_csv=output_safety.canonical(config.output_csv) if config.output_csv else "",
        gradcam_dir=output_safety.canonical(config.gradcam_dir) if config.gradcam_dir else "")
    check_gradcam_model(config)
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
    from cxr_tfdata.modeling import loading

    model = runtimes.open_model(config.model_path)
    image_size = loading.model_image_size(model, config.model_path)
    reading = feeding.resolve_reading(model, config.model_path, config.data_dir, resize=config.resize,
                              record_encoding=config.record_encoding, jpeg_quality=config.jpeg_quality,
                              threshold=config.threshold, prevalence=config.prevalence)
    key = (patient_keys.load_key(config.patient_key_file, {f"image path {i + 1}": p for i, p in enumerate(config.paths)})
           if config.redact_paths else None)
    paths = collect_image_paths(config.paths)
    if not paths:
        raise ValueError(f"no image files found in {list(config.paths)}")
    records = reading.records
    logging.info("predicting %d file(s) with %s (%s) at %d px (resize %s, records %s); labels at threshold %.4g (%s)",
                 len(paths), config.model_path, runtimes.describe(model, config.model_path)["format"], image_size, records.resize, records.record_encoding,
                 reading.threshold, reading.threshold_source)
    if reading.temperature is not None:
        logging.info("calibrated_probability: %s", reading.prevalence.description)
    rows = image_scoring.predict_rows(model, paths, image_size, records.resize == "pad", reading.threshold,
                        config.batch_size, records.record_encoding, records.jpeg_quality,
                        int(config.max_file_mb * (1 << 20)), reading.temperature, reading.calibration_shift,
                        keep_pixels=bool(config.gradcam_dir))
    if config.gradcam_dir:
        written = gradcam.write_gradcams(model, rows, config.gradcam_dir, config.batch_size, reading.threshold,
                                         reading.threshold_source, records.resize == "pad",
                                         int(config.max_file_mb * (1 << 20)))
        logging.info("wrote %d Grad-CAM image(s) to %s", len(written), config.gradcam_dir)
    if key is not None:  # --redact_paths: each path as its keyed hash, wherever it is written or printed
        rows = [dataclasses.replace(row, path=key.path_name(os.path.abspath(row.path)), pixels=None) for row in rows]
    if config.output_csv:
        atomic.write_text(config.output_csv, rows_to_csv(rows))
        failed = sum(1 for row in rows if row.error)
        logging.info("wrote %s: %d row(s), %d of them not predicted (their reasons are in the error column)",
                     config.output_csv, len(rows), failed)
    else:
        stream.write(rows_to_csv(rows))
    return rows
