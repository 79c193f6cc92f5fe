"""A model's probabilities over a records split or a labelled image folder, with each image's file
name, patient id and label: what every metric and report is computed from."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from cxr_tfdata.core import config as config_lib
from cxr_tfdata.core import dataset_info, record_schema
from cxr_tfdata.core.progress import Progress
from cxr_tfdata.modeling import image_scoring


@dataclasses.dataclass(frozen=True)
class SplitPredictions:
    """Per-image model outputs of a split, aligned with the records' labels and metadata."""

    filenames: list[str]
    patient_ids: list[str]
    labels: np.ndarray  # int64 in {0, 1}
    probabilities: np.ndarray  # float32 in [0, 1]


def predict_split(model, data_dir: str, split: str, image_size: int, batch_size: int,
                  info: dataset_info.DatasetInfo | None = None) -> SplitPredictions:
    """Runs `model` over a split through the evaluation pipeline (fixed order, no augmentation)."""
    from cxr_tfdata.data import input_pipeline

    data_config = config_lib.DataConfig(
        data_dir=data_dir, image_size=image_size, cache="off", deterministic=True
    )
    dataset = input_pipeline.create_dataset(
        data_config, split, batch_size=batch_size, training=False, with_metadata=True, info=info
    )
    filenames, patient_ids, labels, probabilities = [], [], [], []
    info = info or dataset_info.load(data_dir)
    progress = Progress(info.num_examples(split), f"evaluated split {split}")
    for images, batch_labels, metadata in dataset:
        progress.advance(int(images.shape[0]))
        probabilities.append(np.asarray(model.predict_on_batch(images), np.float32).reshape(-1))
        labels.append(np.asarray(batch_labels).reshape(-1))
        filenames.extend(_decode_strings(metadata["filename"]))
        patient_ids.extend(_decode_strings(metadata["patient_id"]))
    if not labels:
        raise ValueError(f"split {split!r} of {data_dir} yielded no records")
    return SplitPredictions(
        filenames=filenames,
        patient_ids=patient_ids,
        labels=np.rint(np.concatenate(labels)).astype(np.int64),
        probabilities=np.concatenate(probabilities),
    )


def _decode_strings(tensor) -> list[str]:
    return [v.decode("utf-8") for v in np.asarray(tensor).reshape(-1).tolist()]


@dataclasses.dataclass(frozen=True)
class Excluded:
    """A file of an --images_dir that was not evaluated, and why."""

    path: str
    reason: str


def predict_folder(model, records, image_size: int, images_dir: str, batch_size: int,
                   max_file_bytes: int, patient_key=None, redact_paths: bool = False
                   ) -> tuple[SplitPredictions, list[Excluded]]:
    """Runs `model` over a folder of NORMAL/ and PNEUMONIA/ images, prepared as `records`
    (feeding.RecordSettings) say, through cxr-predict's decode path; the folder is listed exactly as
    the converter lists one split (same files, names and patient ids). Files that cannot be read are
    returned as excluded. Patient ids are keyed hashes under `patient_key` (patient_keys.PatientKey; None:
    the site's default key); redact_paths hashes every file's name and path too."""
    from cxr_tfdata.core import folder_scan, patient_keys

    try:
        files, strays, unusable = folder_scan.scan_labelled_folder(images_dir)
    except folder_scan.LayoutError as e:
        raise ValueError(f"--images_dir: {e}") from e
    patient_key = patient_key or patient_keys.load_key("", {"--images_dir": images_dir})
    files = patient_keys.pseudonymize(files, patient_key, redact_paths)
    shown = patient_keys.ShownPaths(os.path.abspath(images_dir), patient_key if redact_paths else None)
    excluded = [Excluded(shown.full(path), "not inside NORMAL/ or PNEUMONIA/; not evaluated") for path in strays]
    excluded += [Excluded(shown.full(entry.path), entry.reason) for entry in unusable]
    rows = image_scoring.predict_rows(
        model, [f.path for f in files], image_size, records.resize == "pad", record_schema.DEFAULT_THRESHOLD, batch_size,
        records.record_encoding, records.jpeg_quality, max_file_bytes, keep_pixels=False)
    kept = []
    for source, row in zip(files, rows, strict=True):
        if row.error:
            excluded.append(Excluded(shown.full(source.path), row.error))
        else:
            kept.append((source, row.probability))
    if not kept:
        raise ValueError(f"--images_dir: no image of {images_dir} could be read ({len(excluded)} excluded)")
    predictions = SplitPredictions(
        filenames=[source.filename for source, _ in kept],
        patient_ids=[source.patient_id for source, _ in kept],
        labels=np.asarray([source.label for source, _ in kept], np.int64),
        probabilities=np.asarray([p for _, p in kept], np.float32),
    )
    return predictions, sorted(excluded, key=lambda e: e.path)
