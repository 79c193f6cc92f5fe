"""cxr-build-tfrecords as a plain function: scan, plan, convert in parallel, write, swap into place.

Before anything is read or written, the output is checked (see cxr_tfdata.files.output_safety): it must not
be, contain or lie inside --input_dir, and an existing output is replaced (--overwrite) only when
it is a complete dataset written by this binary holding nothing else. A lock beside the output
(`.<name>.cxr-lock`) keeps a second build of the same output from running at the same time.
Everything is written into a hidden staging sibling of output_dir and swapped into place only when
complete, manifest.json last (cxr_tfdata.files.folder_swap: a kill at any moment loses neither the old
dataset nor leaves a half-built one); on any error the staging folder is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import time

import tensorflow_datasets as tfds
from absl import logging

from cxr_tfdata.core import config as cxr_config
from cxr_tfdata.core import folder_scan, imaging, patient_keys
from cxr_tfdata.files import folder_swap, locking, output_safety
from tfrecords_builder import manifest, plan, tables, writer

# What a staging folder holds: the TFDS builder's data_dir, and the finished dataset moved out of it.
_STAGING_ENTRIES = ("tfds", "dataset")
# A split losing more than this share of its files (unreadable, or dropped as leaks) is warned about.
LOSS_WARNING_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Every setting of one build (recorded in manifest.json under "flags")."""

    input_dir: str
    output_dir: str
    image_size: int = 224
    resize: str = imaging.DEFAULT_RESIZE  # one of imaging.RESIZE_MODES
    encoding: str = imaging.DEFAULT_ENCODING
    jpeg_quality: int = imaging.DEFAULT_JPEG_QUALITY
    val_fraction: float = 0.2
    seed: int = 0
    min_val_images: int = 100
    drop_leaks: bool = True
    strict: bool = False
    num_workers: int = 0  # 0: os.cpu_count()
    num_shards: int = 0  # 0: from target_shard_mb
    target_shard_mb: float = 32.0
    overwrite: bool = False
    max_file_mb: float = imaging.DEFAULT_MAX_FILE_MB  # larger source files are skipped unread
    # DICOM ViewPositions to keep (e.g. ("PA", "AP")); every other file is excluded and listed. (): all.
    views: tuple[str, ...] = ()
    # The site key hashing patient ids (README "Patient identity"); "": the default one, made on first use.
    patient_key_file: str = ""
    # Replace every source path in every output (records' filename, manifest, logs) by its keyed hash.
    redact_paths: bool = False
    # A label table instead of Kaggle folders (README "Label tables", tfrecords_builder/tables.py).
    labels_csv: str = ""
    labels_format: str = ""  # "" or one of table_presets.FORMATS
    image_column: str = ""
    label_column: str = ""
    label_values: tuple[str, ...] = ()  # VALUE=CLASS items
    patient_column: str = ""
    split_column: str = ""
    test_fraction: float = 0.2  # carved from train by patient when the table gives no test
    uncertain: str = "exclude"  # CheXpert's -1.0
    nih_normal: str = "not_pneumonia"

    def __post_init__(self):
        require = cxr_config.require
        require(bool(self.input_dir), "input_dir", "is required")
        require(bool(self.output_dir), "output_dir", "is required")
        require(cxr_config.MIN_IMAGE_SIZE <= self.image_size <= cxr_config.MAX_IMAGE_SIZE, "image_size",
                f"must be in [{cxr_config.MIN_IMAGE_SIZE}, {cxr_config.MAX_IMAGE_SIZE}] (what cxr-train accepts), "
                f"got {self.image_size}")
        require(self.resize in imaging.RESIZE_MODES, "resize",
                f"must be one of {imaging.RESIZE_MODES}, got {self.resize!r}")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        require(self.min_val_images >= 0, "min_val_images", f"must be >= 0, got {self.min_val_images}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.num_shards >= 0, "num_shards", f"must be >= 0, got {self.num_shards}")
        require(self.target_shard_mb > 0, "target_shard_mb", f"must be > 0, got {self.target_shard_mb}")
        require(0 < self.max_file_mb < 1 << 30, "max_file_mb",
                f"must be a number of MB in (0, 2^30), got {self.max_file_mb}")
        require(all(v in imaging.DICOM_VIEW_POSITIONS for v in self.views), "views",
                f"must be DICOM view positions from {list(imaging.DICOM_VIEW_POSITIONS)}, got {list(self.views)}")
        self.encode_options()  # validates image_size, encoding, jpeg_quality
        tables.check_flags(self)

    def encode_options(self) -> imaging.EncodeOptions:
        return imaging.EncodeOptions(self.image_size, self.resize == "pad", self.encoding, self.jpeg_quality,
                                     max_file_bytes=int(self.max_file_mb * (1 << 20)))

    def table_options(self) -> tables.TableOptions | None:
        """The label table to read, or None for Kaggle folders."""
        if not (self.labels_csv or self.labels_format):
            return None
        return tables.TableOptions(
            self.labels_csv, self.labels_format, self.image_column, self.label_column, self.label_values,
            self.patient_column, self.split_column, self.test_fraction, self.seed, self.uncertain, self.nih_normal)

    def plan_options(self) -> plan.PlanOptions:
        return plan.PlanOptions(self.val_fraction, self.seed, self.drop_leaks, self.min_val_images)

    @property
    def workers(self) -> int:
        return self.num_workers or os.cpu_count() or 1


def _check_classes_present(outcomes: dict[str, writer.SplitOutcome], input_dir: str) -> None:
    for split in folder_scan.REQUIRED_SPLITS:
        for name, count in outcomes[split].class_counts.items():
            if count == 0:
                raise writer.BuildError(
                    f"no usable images in {os.path.join(input_dir, split, name)}: every file was skipped")


def _write_tfds(config: BuildConfig, the_plan: plan.Plan, hashes: dict[str, str | None],
                pool: writer.WorkerPool, staging: str, shown: patient_keys.ShownPaths):
    """Runs the TFDS builder into staging/tfds and moves its version folder to staging/dataset."""
    builder = writer.CxrTfrecords(
        split_files=the_plan.splits, options=config.encode_options(), pool=pool,
        input_dir=shown, strict=config.strict, source_hashes=hashes, views=config.views,
        data_dir=os.path.join(staging, "tfds"))
    # tensorflow-datasets prints "Downloading and preparing dataset..." to stdout: not ours to show.
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_config=writer.download_config(config.num_shards, config.target_shard_mb))
    _check_classes_present(builder.outcomes, config.input_dir)
    dataset_dir = os.path.join(staging, "dataset")
    shutil.move(os.fspath(builder.data_dir), dataset_dir)
    return builder, dataset_dir


def log_split_losses(splits: dict) -> None:
    """One line per split: images written, skipped as unreadable, dropped as leaks, with shares.

    A warning when a split lost more than LOSS_WARNING_FRACTION of its files: the manifest lists
    each of them, but a build that quietly lost a tenth of a split should not look like success.
    """
    for split, entry in splits.items():
        skipped, dropped = entry["num_skipped"], entry["num_dropped_leaks"]
        total = max(1, entry["num_examples"] + skipped + dropped)
        line = (f"split {split}: {entry['num_examples']} of {total} images written; "
                f"{skipped} skipped as unreadable ({100 * skipped / total:.1f}%), "
                f"{dropped} dropped as leaks ({100 * dropped / total:.1f}%)")
        if (skipped + dropped) / total > LOSS_WARNING_FRACTION:
            logging.warning("%s: more than %.0f%% of the split is missing (manifest.json lists them "
                            "under \"skipped\" and \"dropped_leaks\")", line, 100 * LOSS_WARNING_FRACTION)
        else:
            logging.info("%s", line)


def _check_output(config: BuildConfig) -> None:
    """Refuses an output that overlaps the input, or that exists and may not be replaced."""
    output_safety.check_apart("--output_dir", config.output_dir, {"--input_dir": config.input_dir})
    if not os.path.lexists(config.output_dir):
        return
    if not config.overwrite:
        raise writer.BuildError(f"output dir {config.output_dir} already exists; pass --overwrite to "
                                f"replace it (only a dataset written by cxr-build-tfrecords is replaced)")
    output_safety.check_replaceable("--output_dir", config.output_dir, "a dataset written by cxr-build-tfrecords",
                              output_safety.dataset_problems(config.output_dir))


def build_dataset(config: BuildConfig) -> dict:
    """Builds the dataset; returns the manifest. Raises folder_scan.LayoutError, writer.BuildError or
    output_safety.UnsafeOutputError (the output may not be written); locking.LockedError when another
    build of the same output is running."""
    input_dir, output_dir = output_safety.resolved(config.input_dir), output_safety.canonical(config.output_dir)
    config = dataclasses.replace(config, input_dir=input_dir, output_dir=output_dir)
    inputs = {"--input_dir": input_dir}
    output_safety.check_apart("--output_dir", output_dir, inputs)
    if not os.path.isdir(input_dir):
        raise folder_scan.LayoutError(f"input dir {input_dir} does not exist or is not a folder")
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    with locking.exclusive_lock(locking.lock_path_beside(output_dir), f"--output_dir={output_dir}",
                                "cxr-build-tfrecords"):
        folder_swap.recover(output_dir, output_safety.dataset_problems, _STAGING_ENTRIES, inputs)
        _check_output(config)
        return _build_locked(config)


def _build_locked(config: BuildConfig) -> dict:
    start = time.monotonic()
    input_dir, output_dir = config.input_dir, config.output_dir
    key = patient_keys.load_key(config.patient_key_file, {"--input_dir": input_dir, "--output_dir": output_dir})
    shown = patient_keys.ShownPaths(input_dir, key if config.redact_paths else None)
    table = tables.scan_table(input_dir, config.table_options(), shown.full) if config.table_options() else None
    by_split, strays, unusable = (table.by_split, [], []) if table else folder_scan.scan_input(input_dir)
    for entry in unusable:
        if config.strict:
            raise writer.BuildError(f"{shown.full(entry.path)}: {entry.reason} (--strict makes unusable files fatal)")
        logging.warning("skipping %s: %s", shown.full(entry.path), entry.reason)
    if table:
        tables.report(table, config.strict, shown)
        unusable = unusable + table.skipped
    staging = folder_swap.staging_path(output_dir)
    logging.info("converting %d images from %s into %s (%d px, %s, %s, %d worker(s))",
                 sum(len(files) for files in by_split.values()), input_dir, output_dir, config.image_size,
                 config.resize, config.encoding, config.workers)
    tfds.disable_progress_bar()
    try:
        os.makedirs(staging)
        with writer.WorkerPool(config.workers) as pool:
            # The one point where raw patient identifiers (file names, tables, DICOM headers) become keyed
            # hashes: everything after (plan, leaks, records, manifest, logs) sees only hashes.
            by_split = {split: patient_keys.pseudonymize(files, key, config.redact_paths, pool.imap)
                        for split, files in by_split.items()}
            paths = [f.path for files in by_split.values() for f in files]
            hashes = writer.hash_sources(pool, paths, config.encode_options().max_file_bytes)
            the_plan = plan.make_plan(by_split, hashes, shown, config.plan_options())
            builder, dataset_dir = _write_tfds(config, the_plan, hashes, pool, staging, shown)
        content = manifest.make_manifest(config, the_plan, builder, strays, unusable, dataset_dir,
                                         time.monotonic() - start, shown=shown, patient_key=key)
        if table:
            content["table"] = tables.manifest_entry(table, shown)
        manifest.write_manifest(dataset_dir, content)  # last: its presence marks a complete dataset
        folder_swap.swap_into_place(dataset_dir, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log_split_losses(content["splits"])
    counts = ", ".join(f"{split} {entry['num_examples']}" for split, entry in content["splits"].items())
    logging.info("wrote %s: %s images (manifest.json lists every file left out, and why)", output_dir, counts)
    return content

