"""cxr-build-tfrecords as a plain function: scan, plan, convert in parallel, write, swap into place.

Everything is written into a hidden sibling of output_dir (`.<name>.incomplete-<pid>`) and renamed
into place only when complete, manifest.json last; on any error that folder is removed, and one
left by a killed run is removed by the next build. With --overwrite the old dataset is moved to
another sibling (`.<name>.previous-<pid>`, never inside the staging folder) for the instant of the
swap: a run killed in between leaves it there, and the next build puts it back.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import tensorflow_datasets as tfds
from absl import logging

from cxr_tfdata import config as cxr_config
from tfrecords_builder import imaging, manifest, plan, scan, writer

_INCOMPLETE_MARK = ".incomplete-"
_PREVIOUS_MARK = ".previous-"
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

    def __post_init__(self):
        def require(ok: bool, flag: str, message: str) -> None:
            if not ok:
                raise ValueError(f"--{flag}: {message}")

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
        require(os.path.abspath(self.output_dir) != os.path.abspath(self.input_dir), "output_dir",
                "must differ from --input_dir")
        self.encode_options()  # validates image_size, encoding, jpeg_quality

    def encode_options(self) -> imaging.EncodeOptions:
        return imaging.EncodeOptions(self.image_size, self.resize == "pad", self.encoding, self.jpeg_quality)

    def plan_options(self) -> plan.PlanOptions:
        return plan.PlanOptions(self.val_fraction, self.seed, self.drop_leaks, self.min_val_images)

    @property
    def workers(self) -> int:
        return self.num_workers or os.cpu_count() or 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_interrupted_swap(output_dir: str) -> None:
    """Puts back a previous dataset that a killed --overwrite run had moved aside.

    Only when output_dir is missing (the run died between the two renames); when output_dir is
    there the swap completed and the leftover is the replaced dataset, which is removed.
    """
    parent, name = os.path.split(output_dir)
    prefix = f".{name}{_PREVIOUS_MARK}"
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        pid_text = entry[len(prefix):] if entry.startswith(prefix) else ""
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        previous = os.path.join(parent, entry)
        if not os.path.exists(output_dir):
            os.rename(previous, output_dir)
            logging.warning("restored %s from %s: an --overwrite build was interrupted while swapping "
                            "datasets", output_dir, previous)
        else:
            logging.info("removing %s, replaced by a completed --overwrite build", previous)
            shutil.rmtree(previous, ignore_errors=True)


def _remove_stale_staging(output_dir: str) -> None:
    """Removes staging folders of builds of the same output that were killed."""
    parent, name = os.path.split(output_dir)
    prefix = f".{name}{_INCOMPLETE_MARK}"
    for entry in os.listdir(parent):
        pid_text = entry[len(prefix):] if entry.startswith(prefix) else ""
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            logging.info("removing %s left by an interrupted build", os.path.join(parent, entry))
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _check_classes_present(outcomes: dict[str, writer.SplitOutcome], input_dir: str) -> None:
    for split in scan.REQUIRED_SPLITS:
        for name, count in outcomes[split].class_counts.items():
            if count == 0:
                raise writer.BuildError(
                    f"no usable images in {os.path.join(input_dir, split, name)}: every file was skipped")


def _write_tfds(config: BuildConfig, the_plan: plan.Plan, hashes: dict[str, str | None],
                pool: writer.WorkerPool, staging: str):
    """Runs the TFDS builder into staging/tfds and moves its version folder to staging/dataset."""
    builder = writer.CxrTfrecords(
        split_files=the_plan.splits, options=config.encode_options(), pool=pool,
        input_dir=config.input_dir, strict=config.strict, source_hashes=hashes,
        data_dir=os.path.join(staging, "tfds"))
    builder.download_and_prepare(
        download_config=writer.download_config(config.num_shards, config.target_shard_mb))
    _check_classes_present(builder.outcomes, config.input_dir)
    dataset_dir = os.path.join(staging, "dataset")
    shutil.move(os.fspath(builder.data_dir), dataset_dir)
    return builder, dataset_dir


def _swap_into_place(dataset_dir: str, output_dir: str) -> None:
    """Renames the finished dataset to output_dir; an old one (--overwrite) is removed only after.

    The old dataset waits in a sibling of its own rather than in the staging folder, which is
    deleted on any error: if the process dies between the renames, it is still there.
    """
    parent, name = os.path.split(output_dir)
    previous = os.path.join(parent, f".{name}{_PREVIOUS_MARK}{os.getpid()}")
    if os.path.exists(output_dir):
        os.rename(output_dir, previous)
    try:
        os.rename(dataset_dir, output_dir)
    except BaseException:
        if os.path.exists(previous) and not os.path.exists(output_dir):
            os.rename(previous, output_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)


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


def build_dataset(config: BuildConfig) -> dict:
    """Builds the dataset; returns the manifest. Raises scan.LayoutError or writer.BuildError."""
    start = time.monotonic()
    input_dir, output_dir = os.path.abspath(config.input_dir), os.path.abspath(config.output_dir)
    config = dataclasses.replace(config, input_dir=input_dir, output_dir=output_dir)
    by_split, strays = scan.scan_input(input_dir)
    _recover_interrupted_swap(output_dir)
    if os.path.exists(output_dir) and not config.overwrite:
        raise writer.BuildError(f"output dir {output_dir} already exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    _remove_stale_staging(output_dir)
    staging = os.path.join(os.path.dirname(output_dir),
                           f".{os.path.basename(output_dir)}{_INCOMPLETE_MARK}{os.getpid()}")
    tfds.disable_progress_bar()
    try:
        os.makedirs(staging)
        with writer.WorkerPool(config.workers) as pool:
            paths = [f.path for files in by_split.values() for f in files]
            hashes = writer.hash_sources(pool, paths)
            the_plan = plan.make_plan(by_split, hashes, input_dir, config.plan_options())
            builder, dataset_dir = _write_tfds(config, the_plan, hashes, pool, staging)
        content = manifest.make_manifest(config, the_plan, builder, strays, dataset_dir,
                                         time.monotonic() - start)
        manifest.write_manifest(dataset_dir, content)  # last: its presence marks a complete dataset
        _swap_into_place(dataset_dir, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log_split_losses(content["splits"])
    logging.info("wrote %s: %s", output_dir, {s: v["num_examples"] for s, v in content["splits"].items()})
    return content

