"""How to feed a model the images it was trained on: the records' build settings, the label rule and
calibration, resolved from the model's contract, a dataset and the flags given, which must agree."""

from __future__ import annotations

import dataclasses

import keras
from absl import logging

from cxr_tfdata.core import contract_values, dataset_info, imaging, record_schema
from cxr_tfdata.metrics import prevalence as prevalence_lib
from cxr_tfdata.modeling import contract


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


def check_reading_flags(resize: str | None = None, record_encoding: str | None = None,
                        jpeg_quality: int | None = None, threshold: float | None = None,
                        prevalence: float | None = None) -> None:
    """Validates every flag that says how a model's images are read and its output labelled (None: not
    given): the one check cxr-predict, cxr-export and cxr-evaluate share."""
    check_record_flags(resize, record_encoding, jpeg_quality)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold: must be in [0, 1], got {threshold}")
    if prevalence is not None:
        _checked_prevalence(prevalence)


@dataclasses.dataclass(frozen=True)
class Reading:
    """How to prepare a model's images and read its output: from its contract, a --data_dir and flags."""

    records: RecordSettings
    threshold: float  # PNEUMONIA when probability >= threshold
    threshold_source: str
    temperature: float | None  # calibrated = sigmoid(logit(p) / temperature + logit_shift); None: not calibrated
    logit_shift: float
    contract: dict | None
    prevalence: PrevalenceSetting = dataclasses.field(default_factory=lambda: PrevalenceSetting(None, None, 0.0, ""))

    @property
    def calibration_shift(self) -> float:
        """What is added to logit(p) / temperature: the contract's logit shift and the prevalence shift."""
        return self.logit_shift + self.prevalence.shift


@dataclasses.dataclass(frozen=True)
class PrevalenceSetting:
    """The PNEUMONIA prevalence a model's calibrated probabilities assume."""

    assumed: float | None  # the prevalence the calibrated probabilities assume; None: not known
    stored: float | None  # the one the stored calibration reflects (the train split's, or a site sample's)
    shift: float  # logit(assumed) - logit(stored), added to the calibrated logit; 0 unless --prevalence
    source: str  # where `assumed` comes from, in words

    @property
    def description(self) -> str:
        if self.assumed is None:
            return f"calibrated probabilities assume an unknown prevalence ({self.source})"
        return (f"calibrated probabilities assume a PNEUMONIA prevalence of {self.assumed:.4g} ({self.source}); "
                f"the operating threshold applies to the raw probability and is unaffected")


def resolve_prevalence(model_contract: dict | None, model_path: str, prevalence: float | None = None
                       ) -> PrevalenceSetting:
    """The prevalence the calibrated probabilities assume: --prevalence (moving the calibrated logit by
    logit(P) - logit(P_stored)), else the one the stored calibration reflects. A --prevalence is refused,
    naming why, for a model without a stored calibration or without a known stored prevalence."""
    stored = contract_values.calibration_prevalence(model_contract)
    if prevalence is None:
        return PrevalenceSetting(stored.value, stored.value, 0.0, stored.source)
    prevalence = _checked_prevalence(prevalence)
    if (model_contract or {}).get("temperature") is None:
        raise ValueError(f"--prevalence: {model_path} stores no calibration (no temperature) to restate at "
                         f"prevalence {prevalence}")
    if stored.value is None:
        raise ValueError(f"--prevalence: cannot restate {model_path}'s calibration: {stored.source}, so the "
                         f"prevalence its calibration reflects is unknown")
    shift = prevalence_lib.prevalence_shift(stored.value, prevalence)
    return PrevalenceSetting(prevalence, stored.value, shift,
                             f"--prevalence={prevalence}, moved from {stored.value:.4g}, {stored.source}")


EXPORTED_PREVALENCE_SOURCE = "cxr-export --prevalence"


def exported_contract(reading: Reading, prevalence: float | None) -> dict | None:
    """The contract an export embeds: the reading's, with a --prevalence folded into its calibration as the
    export's graph applies it (logit_shift += the prevalence shift; calibrated_prevalence: P), so every reader
    of the export reports the calibrated probabilities at P and a further --prevalence moves from P. The
    reading's contract unchanged without a --prevalence (or without a contract)."""
    if prevalence is None or reading.contract is None or reading.prevalence.assumed is None:
        return reading.contract
    return {**reading.contract, "logit_shift": reading.calibration_shift,
            "calibrated_prevalence": reading.prevalence.assumed,
            "calibrated_prevalence_source": EXPORTED_PREVALENCE_SOURCE}


def _checked_prevalence(value: float) -> float:
    try:
        return prevalence_lib.check_prevalence(value, "the prevalence")
    except ValueError as e:
        raise ValueError(f"--prevalence: {e}") from e


def resolve_records(model_contract: dict | None, image_size: int, model_path: str,
                    info: dataset_info.DatasetInfo | None = None, *, resize: str | None = None,
                    record_encoding: str | None = None, jpeg_quality: int | None = None) -> RecordSettings:
    """How a model's images are prepared: its contract, then the build of the dataset `info` (when
    given; its image size must be the model's), then the flags given (None: not given).

    A value given two ways must agree, else ValueError naming both. A model without a contract (not
    written by cxr-train) falls back to the flags or the converter's defaults, with a warning when
    no dataset is given: nothing then checks that they match how its records were built.
    """
    from cxr_tfdata.modeling import loading

    check_record_flags(resize, record_encoding, jpeg_quality)
    dataset = None
    if info is not None:
        loading.check_image_size(image_size, info.image_size, model_path, info.data_dir)
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
                    threshold: float | None = None, prevalence: float | None = None) -> Reading:
    """`resolve_records`, and the label rule and calibration: the contract's threshold (a --threshold
    must agree with it), else --threshold, else 0.5 with a warning; the contract's temperature and
    logit shift (none for a model without them), and the prevalence (`resolve_prevalence`)."""
    from cxr_tfdata.modeling import loading

    model_contract = contract.read(model)
    setting = resolve_prevalence(model_contract, model_path, prevalence)
    info = dataset_info.load(data_dir) if data_dir else None
    records = resolve_records(model_contract, loading.model_image_size(model, model_path), model_path, info,
                              resize=resize, record_encoding=record_encoding, jpeg_quality=jpeg_quality)
    stored = contract.resolve(model_contract, None, {"threshold": threshold}, model_path)["threshold"]
    if model_contract is not None and model_contract.get("operating_threshold") is not None:
        source = contract_values.describe_threshold(model_contract)
    elif threshold is not None:
        source = "--threshold"
    else:
        source = f"the default {record_schema.DEFAULT_THRESHOLD}: {model_path} stores no operating threshold"
        logging.warning("%s stores no operating threshold: labels at %g (pass --threshold to choose one)",
                        model_path, record_schema.DEFAULT_THRESHOLD)
    temperature = (model_contract or {}).get("temperature")
    return Reading(records, float(stored if stored is not None else record_schema.DEFAULT_THRESHOLD),
                   source, None if temperature is None else float(temperature),
                   float((model_contract or {}).get("logit_shift") or 0.0), model_contract, setting)
