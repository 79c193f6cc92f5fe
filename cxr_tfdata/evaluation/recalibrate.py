"""cxr-recalibrate as a plain function: refit a model's calibration on a site's labelled sample and write
a new .keras whose contract carries it, with its provenance and its cross-fitted figures.

The images (a records split, or a NORMAL/PNEUMONIA folder) are scored as cxr-evaluate scores them
(inference.py). The maths is cxr_tfdata.metrics: site_recalibration.recalibrate_site fits the
temperature and the intercept (which becomes the new logit shift) and measures ECE, NLL and Brier
before and after by patient cross-fitting, with patient-bootstrap intervals; a --target_recall
re-chooses the operating threshold the same way, and the contract's threshold_val_metrics are then
its cross-fitted recall and specificity (the in-sample ones, >= target by construction, stay inside
site_calibration only). Without --target_recall the stored threshold is kept, so every label (and the
recall at it) is unchanged: only the calibrated probability moves.
A sample from the training data is refused: the same dataset's train/val split, a folder inside the
training source's train/val, or any patient among those cxr-train recorded (contract
training_patients, compared by keyed hash when both were hashed under the same key). With
--redact_paths every path written to the contract or the log is its keyed hash.
The input model is never written to; the output must not exist yet.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable
from typing import Any

from absl import logging

from cxr_tfdata.core import config as config_lib
from cxr_tfdata.core import contract_values, dataset_info, imaging, patient_keys
from cxr_tfdata.evaluation import inference
from cxr_tfdata.files import atomic, locking, output_safety
from cxr_tfdata.metrics import calibration, recalibration, sample_checks, site_recalibration
from cxr_tfdata.modeling import contract as contract_lib
from cxr_tfdata.modeling import feeding, loading

PROGRAM = "cxr-recalibrate"
TRAINING_SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class RecalibrateConfig:
    """What cxr-recalibrate runs."""

    model_path: str
    output_model: str
    images_dir: str = ""  # a folder of NORMAL/ and PNEUMONIA/ images of the site
    data_dir: str = ""  # or records written by cxr-build-tfrecords, with --split
    split: str = ""
    target_recall: float | None = None  # re-choose the operating threshold on the sample for this recall
    method: str = recalibration.TEMPERATURE_AND_INTERCEPT
    folds: int = sample_checks.DEFAULT_FOLDS
    seed: int = 0
    bootstrap_samples: int = 1000
    batch_size: int = 32
    max_file_mb: float = imaging.DEFAULT_MAX_FILE_MB
    patient_key_file: str = ""  # with --images_dir: the site key hashing patient ids ("": the default one)
    redact_paths: bool = False  # paths in the contract and the log as their keyed hashes

    def __post_init__(self):
        require = config_lib.require
        require(bool(self.model_path), "model", "is required")
        require(bool(self.output_model), "output_model", "is required")
        require(self.output_model.endswith(".keras"), "output_model", f"must end in .keras, got {self.output_model!r}")
        require(bool(self.data_dir) != bool(self.images_dir), "data_dir",
                "give exactly one of --data_dir (records, with --split) and --images_dir (an image folder)")
        require(not self.data_dir or bool(self.split), "split", "is required with --data_dir")
        require(not self.images_dir or not self.split, "split", "applies to --data_dir only")
        require(self.target_recall is None or 0.0 < self.target_recall <= 1.0, "target_recall",
                f"must be in (0, 1], got {self.target_recall}")
        require(self.method in recalibration.METHODS, "refit", f"must be one of {recalibration.METHODS}, got {self.method!r}")
        require(self.folds >= 2, "folds", f"must be >= 2 (cross-fitting holds one fold out), got {self.folds}")
        require(self.bootstrap_samples >= 0, "bootstrap_samples", f"must be >= 0, got {self.bootstrap_samples}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(0 < self.max_file_mb < 1 << 30, "max_file_mb", f"must be a number of MB in (0, 2^30), got {self.max_file_mb}")

    @property
    def sample_flag(self) -> str:
        return f"--images_dir={self.images_dir}" if self.images_dir else f"--data_dir={self.data_dir} --split={self.split}"

    def shown_flag(self, show: Callable[[str], str]) -> str:
        """sample_flag with its path as `show` gives it (hashed with --redact_paths)."""
        return (f"--images_dir={show(self.images_dir)}" if self.images_dir
                else f"--data_dir={show(self.data_dir)} --split={self.split}")


def _as_given(path: str) -> str:
    return path


def path_shower(config: RecalibrateConfig, key: patient_keys.PatientKey | None) -> Callable[[str], str]:
    """How a path appears in the contract, the log and errors: itself, or (--redact_paths) the keyed hash of
    its absolute form, as cxr-predict --redact_paths writes it."""
    if not config.redact_paths or key is None:
        return _as_given
    return lambda path: key.path_name(os.path.abspath(path)) if path else path


def check_output(config: RecalibrateConfig) -> None:
    """Refuses an --output_model that is, links to, lies in or contains an input, or that exists."""
    inputs = {"--model": config.model_path, "--data_dir": config.data_dir, "--images_dir": config.images_dir}
    output_safety.check_apart("--output_model", config.output_model, inputs)
    if os.path.lexists(config.output_model):
        raise FileExistsError(f"--output_model: {config.output_model} already exists; cxr-recalibrate writes a new "
                              f"model and never replaces a file (choose another path, or move that file away)")


def check_not_training_data(config: RecalibrateConfig, model_contract: dict[str, Any],
                            info: dataset_info.DatasetInfo | None, show: Callable[[str], str] = _as_given) -> None:
    """Refuses a sample from the model's own training data: a split of the dataset it was trained on
    (same fingerprint) that it was trained or calibrated on, or a folder inside its source's train/val."""
    used = set(TRAINING_SPLITS) | {model_contract.get("threshold_chosen_on") or "val"}
    if info is not None and info.fingerprint == model_contract.get("dataset_fingerprint") and config.split in used:
        raise ValueError(f"--split={config.split}: {show(config.data_dir)} is the dataset {show(config.model_path)} was trained "
                         f"on (same fingerprint {info.fingerprint}) and split {config.split!r} is among those it was "
                         f"fitted on ({', '.join(sorted(used))}); recalibrate on images of the site, never on the "
                         f"training data")
    source = ((model_contract.get("data") or {}).get("source") or "") if config.images_dir else ""
    if source:
        folder = output_safety.resolved(config.images_dir)
        for split in sorted(used):
            if output_safety.is_within(folder, output_safety.resolved(os.path.join(source, split))):
                raise ValueError(f"--images_dir={show(config.images_dir)} lies in {show(os.path.join(source, split))}, "
                                 f"the {split} images {show(config.model_path)} was trained on; recalibrate on images "
                                 f"of the site")


def check_patients(config: RecalibrateConfig, model_contract: dict[str, Any], patient_ids: list[str],
                   sample_key_fingerprint: str | None, show: Callable[[str], str] = _as_given) -> str:
    """Refuses a sample any of whose patients is among the train/val patients cxr-train recorded
    (contract training_patients: 64-bit prefixes of keyed hashes), naming how many. When they cannot be
    compared (no recorded patients, other key, ids not hashed) it warns why. Returns how the sample's
    patients were checked, for site_calibration."""
    recorded = model_contract.get("training_patients")
    recorded = recorded if isinstance(recorded, dict) and isinstance(recorded.get("prefixes"), list) else None
    flag, model = config.shown_flag(show), show(config.model_path)
    if recorded is None:
        reason = (f"{model}'s contract records no patients of its training data (sealed before cxr-train recorded "
                  f"them, or trained on records whose patient ids are not keyed hashes)")
    elif sample_key_fingerprint is None:
        reason = "the sample's patient ids are not keyed hashes (records built before patient keys)"
    elif sample_key_fingerprint != recorded.get("key_fingerprint"):
        reason = (f"the sample's patient ids are hashed under the key of fingerprint {sample_key_fingerprint}, the "
                  f"training patients under the key of fingerprint {recorded.get('key_fingerprint')}: equal "
                  f"patients give different hashes (give --patient_key_file=the key cxr-build-tfrecords used for "
                  f"the training data to compare them)")
    elif not all(patient_ids):
        reason = "some of the sample's images have no patient id"
    else:
        width = contract_lib.PATIENT_PREFIX_HEX_CHARS
        training = set(recorded["prefixes"])
        sample = {patient[:width] for patient in patient_ids}
        shared = len(sample & training)
        if shared:
            raise ValueError(f"{flag}: {shared} of the sample's {len(sample)} patients are among the {len(training)} "
                             f"train/val patients {model} was trained and calibrated on (same keyed patient hash, "
                             f"key fingerprint {sample_key_fingerprint}); recalibrate on patients the model never saw")
        return (f"by keyed patient hash (key fingerprint {sample_key_fingerprint}): none of the sample's "
                f"{len(sample)} patients is among the {len(training)} train/val patients the contract records")
    logging.warning("%s: the sample's patients cannot be compared with the model's training patients: %s; only "
                    "the dataset fingerprint and the training source's train/val folders were checked", flag, reason)
    return (f"not by patient ({reason}); by dataset fingerprint and the training source's train/val folders "
            f"only")


def _score(config: RecalibrateConfig, model, model_contract: dict[str, Any], key: patient_keys.PatientKey | None):
    """The sample's predictions (inference.SplitPredictions) and the files it could not read."""
    image_size = loading.model_image_size(model, config.model_path)
    if config.images_dir:
        if not os.path.isdir(config.images_dir):
            raise FileNotFoundError(f"--images_dir: {config.images_dir} does not exist or is not a folder")
        records = feeding.resolve_records(model_contract, image_size, config.model_path)
        return inference.predict_folder(model, records, image_size, config.images_dir, config.batch_size,
                                        int(config.max_file_mb * (1 << 20)), key, config.redact_paths)
    info = dataset_info.load(config.data_dir)
    info.split(config.split)
    feeding.resolve_records(model_contract, image_size, config.model_path, info)
    return inference.predict_split(model, config.data_dir, config.split, image_size, config.batch_size, info), []


def _load(config: RecalibrateConfig):
    """The model and its contract, refused when it has none (nothing says how its images are prepared), or
    when it is not a .keras file: the refitted calibration is written into a new .keras model's contract."""
    from cxr_tfdata.modeling import runtimes

    fmt, _ = runtimes.detect_format(config.model_path)
    if fmt != runtimes.KERAS:
        raise ValueError(f"--model: {config.model_path} is {fmt}, not a .keras file: cxr-recalibrate writes the refitted "
                         f"calibration into a new .keras model; recalibrate the .keras model, then export it again "
                         f"with cxr-export")
    model = loading.load_model(config.model_path)
    model_contract = contract_lib.read(model)
    if model_contract is None:
        raise ValueError(f"--model: {config.model_path} carries no contract (it was not written by cxr-train): "
                         f"nothing says how its images are prepared")
    return model, model_contract


def recalibrate(config: RecalibrateConfig) -> dict[str, Any]:
    """Runs cxr-recalibrate; returns the site_calibration entry written into --output_model's contract."""
    config = dataclasses.replace(config, output_model=output_safety.canonical(config.output_model))
    check_output(config)
    model, model_contract = _load(config)
    info = dataset_info.load(config.data_dir) if config.data_dir else None
    # The site key hashes an image folder's patient ids (as the converter did), and with --redact_paths paths.
    key = (patient_keys.load_key(config.patient_key_file, {"--images_dir": config.images_dir,
                                                           "--data_dir": config.data_dir})
           if config.images_dir or config.redact_paths else None)
    show = path_shower(config, key)
    check_not_training_data(config, model_contract, info, show)
    predictions, excluded = _score(config, model, model_contract, key)
    sample_key = (key.fingerprint if config.images_dir else
                  ((info.manifest.get("patient_ids") or {}).get("key_fingerprint") or None))
    checked = check_patients(config, model_contract, predictions.patient_ids, sample_key, show)
    values, site = fit_site(config, predictions, model_contract, info, excluded, show=show, patients_checked=checked)
    contract_lib.update(model, **values)
    os.makedirs(os.path.dirname(config.output_model), exist_ok=True)
    with locking.exclusive_lock(locking.lock_path_beside(config.output_model),
                                f"--output_model={config.output_model}", PROGRAM):
        check_output(config)  # again, now that no other run can write it
        atomic.write_with(config.output_model, model.save, suffix=".keras")
    logging.info("wrote %s: temperature %.4g, logit shift %.4g (refitted on %d images of %s)", config.output_model,
                 values["temperature"], values["logit_shift"], site["images"], config.shown_flag(show))
    return site


def fit_site(config: RecalibrateConfig, predictions, model_contract: dict[str, Any],
             info: dataset_info.DatasetInfo | None, excluded: list, *, show: Callable[[str], str] = _as_given,
             patients_checked: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """The contract entries of the site calibration, and its site_calibration block. A re-chosen
    threshold is stored with its cross-fitted recall and specificity (what an unseen patient of the site
    gets), never the in-sample ones."""
    groups = predictions.patient_ids if all(predictions.patient_ids) else None
    temperature = float(model_contract.get("temperature") or 1.0)
    logit_shift = float(model_contract.get("logit_shift") or 0.0)
    labels, raw = predictions.labels, predictions.probabilities
    try:
        result = site_recalibration.recalibrate_site(
            labels, raw, groups, temperature=temperature, logit_shift=logit_shift, method=config.method,
            folds=config.folds, seed=config.seed, bootstrap_samples=config.bootstrap_samples)
        threshold = None if config.target_recall is None else site_recalibration.choose_site_threshold(
            labels, raw, groups, target_recall=config.target_recall, folds=config.folds, seed=config.seed,
            bootstrap_samples=config.bootstrap_samples)
    except sample_checks.SampleRefused as e:
        raise ValueError(f"{config.shown_flag(show)}: {e} (minimums: {sample_checks.MIN_IMAGES_PER_CLASS} images and "
                         f"{sample_checks.MIN_PATIENTS_PER_CLASS} patients of each class)") from e
    site = _site_block(config, result, threshold, model_contract, info, excluded, labels, show, patients_checked)
    values = {"temperature": result.final.temperature, "logit_shift": result.final.intercept,
              "calibration": _calibration_entry(config, result, labels, raw, model_contract, show),
              "site_calibration": site,
              # The site calibration is now the reference: a prevalence an export folded in no longer holds.
              "calibrated_prevalence": None, "calibrated_prevalence_source": None}
    if threshold is not None:
        values.update(operating_threshold=threshold.threshold, target_recall=threshold.target_recall,
                      threshold_chosen_on=f"site sample (cross-fitted by {threshold.resampled_by})",
                      threshold_chosen_by=contract_values.RECALIBRATE,
                      threshold_val_metrics={
                          "recall": threshold.cross_fitted_recall.value,
                          "specificity": threshold.cross_fitted_specificity.value,
                          "n": int(labels.size),
                          "measured": (f"cross-fitted by {threshold.resampled_by} on the site sample: each fold "
                                       f"labelled at the threshold chosen on the other folds"),
                      })
    return values, site


def _calibration_entry(config: RecalibrateConfig, result: site_recalibration.SiteRecalibration, labels, raw,
                       model_contract: dict[str, Any], show: Callable[[str], str] = _as_given) -> dict[str, Any]:
    refitted = ("temperature and intercept" if config.method == recalibration.TEMPERATURE_AND_INTERCEPT
                else "intercept only (the stored temperature kept)")
    return {
        "method": (f"sigmoid(logit(p) / temperature + logit_shift), refitted on a site's labelled sample by "
                   f"cxr-recalibrate ({refitted}; Platt's smoothed targets): the logit shift is the fitted intercept"),
        "logit_shift": result.final.intercept,
        "fitted_on": f"site sample ({config.shown_flag(show)})",
        "temperature_at_search_bound": result.final.at_bound,
        "ece_bins": calibration.ECE_BINS,
        "raw": calibration.summary(labels, raw),
        "calibrated": {m: getattr(result.cross_fitted, m).value for m in site_recalibration.MEASURES},
        "calibrated_is": "cross-fitted by patient (each image scored by a fit that never saw its patient)",
        "previous": model_contract.get("calibration"),
    }


def _site_block(config: RecalibrateConfig, result: site_recalibration.SiteRecalibration, threshold,
                model_contract: dict[str, Any], info: dataset_info.DatasetInfo | None, excluded: list,
                labels, show: Callable[[str], str] = _as_given, patients_checked: str = "") -> dict[str, Any]:
    """The provenance and the honest figures of a site recalibration, as the contract stores them (paths
    as `show` gives them: with --redact_paths, keyed hashes)."""
    redacted = show is not _as_given
    data = ({"kind": "images_dir", "path": show(os.path.abspath(config.images_dir)), "unreadable_files": len(excluded)}
            if config.images_dir else
            {"kind": "records", "path": show(os.path.abspath(config.data_dir)), "split": config.split,
             "dataset_fingerprint": info.fingerprint})
    data["path_redacted"] = redacted
    figures = result.as_dict()
    return {
        "written_by": PROGRAM,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_model": show(os.path.abspath(config.model_path)),
        "data": data,
        "images": int(labels.size),
        "images_per_class": dict(zip(sample_checks.CLASS_NAMES, result.check.images_per_class, strict=True)),
        "patients_per_class": dict(zip(sample_checks.CLASS_NAMES, result.check.patients_per_class, strict=True)),
        "resampled_by": result.resampled_by,
        "sample_prevalence": float(labels.mean()),
        "refitted": (["temperature", "logit_shift"] if config.method == recalibration.TEMPERATURE_AND_INTERCEPT
                     else ["logit_shift"]) + (["operating_threshold"] if threshold is not None else []),
        "method": config.method,
        "previous": {"temperature": model_contract.get("temperature"), "logit_shift": model_contract.get("logit_shift"),
                     "operating_threshold": model_contract.get("operating_threshold")},
        "folds": config.folds,
        "seed": config.seed,
        "bootstrap_samples": config.bootstrap_samples,
        **{key: figures[key] for key in ("before", "cross_fitted", "in_sample", "change", "final", "fold_fits")},
        "threshold": None if threshold is None else dataclasses.asdict(threshold),
        "patients_checked_against_training": patients_checked or "not recorded",
    }
