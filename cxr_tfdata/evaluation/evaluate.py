"""cxr-evaluate as a plain function: check the inputs against the model's contract, claim the output
folder, score a split (or an image folder) and write metrics.json, report.md, predictions.csv, the
plots and the model card.

Where each piece lives: inference.py (the model's probabilities), results.py (metric blocks, the
operating point, calibration: the conventions are stated there), report.py and card_*.py (what is
written), cxr_tfdata.metrics (the maths).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

from absl import logging

from cxr_tfdata.core import dataset_info, folder_scan, patient_keys
from cxr_tfdata.evaluation import (
    card_facts,
    card_markdown,
    inference,
    report,
    results,
    site_prevalence,
)
from cxr_tfdata.evaluation.evaluate_config import EvaluateConfig
from cxr_tfdata.files import atomic, locking, output_safety
from cxr_tfdata.modeling import contract as contract_lib
from cxr_tfdata.modeling import feeding, loading, runtimes

PROGRAM = "cxr-evaluate"
# Everything cxr-evaluate writes into --output_dir; no other file there is touched.
EVALUATION_FILES = ("metrics.json", "report.md", "predictions.csv", "roc.png", "pr.png",
                    "confusion_matrix.png", "calibration.png", "MODEL_CARD.md", "model_card.json")


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What an evaluation reads, loaded and checked before any output is touched."""

    model: Any
    image_size: int
    contract: dict[str, Any] | None
    info: dataset_info.DatasetInfo | None  # the records' dataset (None with --images_dir)
    records: Any  # feeding.RecordSettings: how the model's images are prepared
    needs_val: bool  # the val split's predictions are needed (threshold or temperature on val)
    prevalence: Any = None  # feeding.PrevalenceSetting: the prevalence calibrated probabilities assume
    # An --images_dir without class folders: only the site's prevalence can be estimated (site_prevalence.py),
    # from probabilities calibrated at this prevalence.
    unlabelled_reference: float | None = None


def _check_inputs(config: EvaluateConfig) -> _Inputs:
    """Loads the model and checks it against the data and the output folder, before any work: the
    records (or the image folder) must be prepared as the model's contract says."""
    inputs = {"--model": config.model_path, "--data_dir": config.data_dir, "--images_dir": config.images_dir}
    inputs.update({f"--model's file {i + 1}": path for i, path in enumerate(runtimes.companion_files(config.model_path))})
    # The folder only receives files of fixed names, so it may hold the model it evaluates; none of
    # those files may be an input.
    output_safety.check_apart("--output_dir", config.output_dir, inputs, may_contain_inputs=True)
    for name in EVALUATION_FILES:
        output_safety.check_apart("--output_dir", os.path.join(config.output_dir, name), inputs)
    model = runtimes.open_model(config.model_path)
    image_size = loading.model_image_size(model, config.model_path)
    model_contract = contract_lib.read(model)
    if model_contract is None:
        logging.warning("%s carries no contract (it was not written by cxr-train): nothing checks that the "
                        "images are prepared as for its training, and it stores no operating threshold or "
                        "calibration (the report and the model card say so)", config.model_path)
    prevalence = feeding.resolve_prevalence(model_contract, config.model_path, config.prevalence)
    stored = results.stored_threshold(model_contract)
    if stored is not None and config.threshold is None and not config.choose_threshold_on_val:
        results.check_target_recall(config, stored)  # before any image is read

    if config.images_dir:
        if model_contract is None:
            raise ValueError(f"--images_dir: {config.model_path} carries no contract saying how its images were "
                             f"prepared; build records from the folder with cxr-build-tfrecords and evaluate "
                             f"them with --data_dir")
        if os.path.isdir(config.images_dir) and not folder_scan.has_class_folders(config.images_dir):
            reference = site_prevalence.check_model(model_contract, config.model_path)
            records = feeding.resolve_records(model_contract, image_size, config.model_path)
            return _Inputs(model, image_size, model_contract, None, records, needs_val=False,
                           prevalence=prevalence, unlabelled_reference=reference)
        if config.threshold is None and stored is None:
            raise ValueError(f"--images_dir: {config.model_path} stores no operating threshold and an image "
                             f"folder has no val split to choose one on; pass --threshold")
        if not os.path.isdir(config.images_dir):
            raise FileNotFoundError(f"--images_dir: {config.images_dir} does not exist or is not a folder")
        records = feeding.resolve_records(model_contract, image_size, config.model_path)
        return _Inputs(model, image_size, model_contract, None, records, needs_val=False, prevalence=prevalence)
    info = dataset_info.load(config.data_dir)
    info.split(config.split)
    records = feeding.resolve_records(model_contract, image_size, config.model_path, info)
    choose = config.threshold is None and (config.choose_threshold_on_val or stored is None)
    if choose:
        info.split(config.val_split)  # names the missing split
    lacks_temperature = not model_contract or model_contract.get("temperature") is None
    needs_val = choose or (lacks_temperature and config.val_split in info.splits and config.val_split != config.split)
    return _Inputs(model, image_size, model_contract, info, records, needs_val, prevalence)


@contextlib.contextmanager
def claimed_output_dir(config: EvaluateConfig):
    """The output folder, locked and claimed for cxr-evaluate (see output_safety.claim_folder) for the
    with-block. When the run fails, a folder it created is removed with what it wrote; a folder
    that existed keeps the marker, so its files stay recognisably cxr-evaluate's."""
    folder = config.output_dir
    created = not os.path.lexists(folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with locking.exclusive_lock(locking.lock_path_beside(folder), f"--output_dir={folder}", PROGRAM):
        try:
            output_safety.claim_folder("--output_dir", folder, PROGRAM, EVALUATION_FILES, config.overwrite)
            yield folder
        except BaseException:
            if created:
                for name in (*EVALUATION_FILES, output_safety.FOLDER_MARKER):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(folder, name))
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            raise


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Runs the model over the split (or the image folder) and writes metrics.json, report.md, the
    plots, predictions.csv, MODEL_CARD.md and model_card.json."""
    from cxr_tfdata.evaluation import plots

    config = dataclasses.replace(config, output_dir=output_safety.canonical(config.output_dir))
    checked = _check_inputs(config)
    where = (f"image folder {config.images_dir}" if config.images_dir else
             f"split {config.split} of {config.data_dir} ({checked.info.num_examples(config.split)} images)")
    logging.info("evaluating %s on %s", config.model_path, where)
    if checked.unlabelled_reference is not None:
        return _estimate_prevalence(config, checked)
    with claimed_output_dir(config) as folder:
        excluded: list[inference.Excluded] = []
        if config.images_dir:
            predictions, excluded = inference.predict_folder(checked.model, checked.records, checked.image_size,
                                                   config.images_dir, config.batch_size,
                                                   int(config.max_file_mb * (1 << 20)), _patient_key(config),
                                                   config.redact_paths)
        else:
            predictions = inference.predict_split(checked.model, config.data_dir, config.split, checked.image_size,
                                        config.batch_size, checked.info)
        val_predictions = None
        if checked.needs_val:
            val_predictions = inference.predict_split(checked.model, config.data_dir, config.val_split, checked.image_size,
                                            config.batch_size, checked.info)
        operating = results.operating_point(config, checked.contract, val_predictions)
        logging.info("operating threshold %.4g: %s", operating["threshold"], operating["chosen_by"])
        metrics = results.build_metrics(config, predictions, operating,
                                results.calibration_block(predictions, checked.contract, val_predictions, config.val_split,
                                                          checked.prevalence, config.bootstrap_samples, config.seed),
                                _source(config, checked, excluded), checked.contract)
        metrics["model_file"] = runtimes.describe(checked.model, config.model_path)  # format, file, quantization
        atomic.write_text(os.path.join(folder, "predictions.csv"), results.predictions_csv(predictions, metrics))
        plots.write_all(predictions.labels, predictions.probabilities, metrics, folder,
                        results.calibrated_probabilities(predictions, metrics))
        atomic.write_text(os.path.join(folder, "report.md"), report.markdown_report(metrics, predictions))
        card = card_facts.build(metrics, checked.contract)
        atomic.write_json(os.path.join(folder, "model_card.json"), card)
        atomic.write_text(os.path.join(folder, "MODEL_CARD.md"), card_markdown.markdown(card))
        atomic.write_json(os.path.join(folder, "metrics.json"), metrics)
    if excluded:
        logging.warning("%d file(s) of %s could not be evaluated and were excluded (listed in report.md and "
                        "metrics.json), e.g. %s: %s", len(excluded), config.images_dir, excluded[0].path,
                        excluded[0].reason)
    return metrics


def _patient_key(config: EvaluateConfig):
    """The site key that hashes --images_dir's patient ids (README "Patient identity")."""
    return patient_keys.load_key(config.patient_key_file, {"--images_dir": config.images_dir,
                                                           "--output_dir": config.output_dir})


def _estimate_prevalence(config: EvaluateConfig, checked: _Inputs) -> dict[str, Any]:
    """An --images_dir of unlabelled images: the site's prevalence estimated, reported, never applied."""
    with claimed_output_dir(config) as folder:
        metrics, csv = site_prevalence.estimate(
            checked.model, checked.records, checked.image_size, config.images_dir, config.batch_size,
            int(config.max_file_mb * (1 << 20)), checked.contract, checked.unlabelled_reference,
            config.bootstrap_samples, config.seed, patient_key=_patient_key(config), redact_paths=config.redact_paths)
        metrics["model_file"] = runtimes.describe(checked.model, config.model_path)
        atomic.write_text(os.path.join(folder, "predictions.csv"), csv)
        atomic.write_text(os.path.join(folder, "report.md"), site_prevalence.markdown_report(metrics))
        atomic.write_json(os.path.join(folder, "metrics.json"), metrics)
    block = metrics["prevalence_estimate"]
    interval = block["interval"] or [float("nan"), float("nan")]
    logging.warning("unlabelled images: estimated PNEUMONIA prevalence %.3f (95%% interval %.3f-%.3f) by EM; %s; "
                    "not applied (pass --prevalence to use one)", block["value"], interval[0], interval[1],
                    site_prevalence.RELIABILITY.split(":")[0])
    return metrics


def _source(config: EvaluateConfig, checked: _Inputs, excluded: list[inference.Excluded]) -> dict[str, Any]:
    """What was evaluated: the records' split, or an image folder with the files it could not use."""
    if config.images_dir:
        return {"kind": "images_dir", "path": os.path.abspath(config.images_dir), "split": None,
                "num_unreadable": len(excluded),
                "unreadable": [{"path": e.path, "error": e.reason} for e in excluded]}
    trained_on = (checked.contract or {}).get("dataset_fingerprint")
    return {"kind": "records", "path": os.path.abspath(config.data_dir), "split": config.split,
            "num_unreadable": 0, "unreadable": [],
            "dataset_fingerprint": checked.info.fingerprint,
            "same_dataset_as_training": None if trained_on is None else trained_on == checked.info.fingerprint}
