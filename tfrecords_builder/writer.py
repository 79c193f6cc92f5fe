"""Writes the planned splits as a TFDS dataset: a GeneratorBasedBuilder fed by a worker pool.

Workers decode, resize and encode; the builder's _generate_examples hands their already-encoded
bytes to tensorflow-datasets (tfds.features.Image stores bytes as given, without re-encoding),
which serializes, shuffles by key and shards each split and writes dataset_info.json.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import multiprocessing
import os
import signal
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.utils import shard_utils

from cxr_tfdata.core import imaging, patient_keys, record_schema
from cxr_tfdata.core.folder_scan import SourceFile
from cxr_tfdata.core.progress import Progress
from tfrecords_builder import worker

DATASET_NAME = "cxr_tfrecords"
# Auto sharding: at least this many shards per split (when it has that many images) so that
# readers can interleave files in parallel.
MIN_AUTO_SHARDS = 4


class BuildError(RuntimeError):
    """The build cannot produce a complete dataset; the message says why."""


@dataclasses.dataclass(frozen=True)
class _SplitShardConfig(shard_utils.ShardConfig):
    """A fixed shard count, or one from a target size, never more shards than examples."""

    target_shard_bytes: int = 32 << 20

    def get_number_shards(self, total_size: int, num_examples: int, uses_precise_sharding: bool = True) -> int:
        wanted = self.num_shards or max(MIN_AUTO_SHARDS, math.ceil(total_size / self.target_shard_bytes))
        return max(1, min(wanted, num_examples))


@dataclasses.dataclass
class _ShardingDownloadConfig(tfds.download.DownloadConfig):
    target_shard_bytes: int = 32 << 20

    def get_shard_config(self) -> shard_utils.ShardConfig:
        return _SplitShardConfig(num_shards=self.num_shards, target_shard_bytes=self.target_shard_bytes)


def download_config(num_shards: int, target_shard_mb: float) -> tfds.download.DownloadConfig:
    """num_shards > 0 fixes the shards per split; 0 derives them from target_shard_mb."""
    return _ShardingDownloadConfig(num_shards=num_shards or None,
                                   target_shard_bytes=max(1, int(target_shard_mb * (1 << 20))))


def _worker_signals() -> None:
    """Workers leave Ctrl-C to the parent (which stops the pool and cleans up) and die at once on
    the SIGTERM that stops the pool, instead of inheriting the parent's handlers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class WorkerPool:
    """Maps a function over tasks in worker processes, or in this process for num_workers <= 1."""

    def __init__(self, num_workers: int):
        self.num_workers = max(1, num_workers)
        self._pool = None
        if self.num_workers > 1:
            # fork, not spawn/forkserver: those re-run the __main__ script in every worker, and a
            # console script's top-level import pulls in TensorFlow (seconds per worker). The pool
            # is made before any TensorFlow op runs, and workers only ever run PIL and hashlib.
            self._pool = multiprocessing.get_context("fork").Pool(self.num_workers, initializer=_worker_signals)

    def _chunksize(self, num_tasks: int) -> int:
        return max(1, min(16, num_tasks // (self.num_workers * 8)))

    def imap_unordered(self, fn, tasks: list) -> Iterator:
        if self._pool is None:
            return map(fn, tasks)
        return self._pool.imap_unordered(fn, tasks, chunksize=self._chunksize(len(tasks)))

    def imap(self, fn, tasks: list) -> Iterator:
        """Results in task order."""
        if self._pool is None:
            return map(fn, tasks)
        return self._pool.imap(fn, tasks, chunksize=self._chunksize(len(tasks)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def hash_sources(pool: WorkerPool, paths: list[str],
                 max_bytes: int = int(imaging.DEFAULT_MAX_FILE_MB * (1 << 20))) -> dict[str, str | None]:
    """sha256 of every file that could have a byte-identical twin; None for all others.

    Only files of equal size can be identical, so only those are read before conversion (the
    workers hash every file again while converting it). Empty, unreadable and oversized files
    get None.
    """
    sizes: dict[str, int] = {}
    for path in paths:
        try:
            sizes[path] = os.stat(path).st_size
        except OSError:
            continue  # unreadable: reported when its conversion fails
    same_size = collections.Counter(sizes.values())
    candidates = [(p, max_bytes) for p, size in sizes.items() if 0 < size <= max_bytes and same_size[size] > 1]
    hashes: dict[str, str | None] = dict.fromkeys(paths)
    hashes.update(pool.imap_unordered(worker.hash_file, candidates))
    return hashes


@dataclasses.dataclass
class SplitOutcome:
    """What happened to a split's files while it was written."""

    class_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    patients: set[str] = dataclasses.field(default_factory=set)
    unparsed_patient_ids: int = 0
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    # Written, but with a near-constant picture (imaging.NEAR_CONSTANT_STD): blank or damaged.
    near_constant: list[dict] = dataclasses.field(default_factory=list)
    # Written DICOM files: {"path", "view_position", "voi_fallback"} (the manifest's "dicom" list).
    dicom: list[dict] = dataclasses.field(default_factory=list)
    # Readable files left out by --views: {"path", "view_position"} (a JPEG/PNG has no view: "not DICOM").
    excluded_views: list[dict] = dataclasses.field(default_factory=list)


class CxrTfrecords(tfds.core.GeneratorBasedBuilder):
    """Chest X-ray images (NORMAL / PNEUMONIA), single channel, resized, one record per image."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Single-channel resized images with source file, patient and size."}

    def __init__(self, *, split_files: dict[str, list[SourceFile]], options: imaging.EncodeOptions,
                 pool: WorkerPool, input_dir: str, strict: bool,
                 source_hashes: dict[str, str | None] | None = None, views: tuple[str, ...] = (), **kwargs):
        self._split_files = split_files
        self._views = tuple(views)
        self._source_hashes = source_hashes or {}
        self._options = options
        self._pool = pool
        self._input_dir = input_dir
        self._strict = strict
        self._progress = Progress(sum(len(f) for f in split_files.values()), "converted")
        self._results: Iterator | None = None
        self.outcomes: dict[str, SplitOutcome] = {}
        super().__init__(**kwargs)

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        # TFDS 4.9.x resolves a packaged builder's file through `importlib_resources`, which it only
        # requires on Python < 3.9; the class's own file is what that lookup would return.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        size = self._options.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                record_schema.IMAGE: tfds.features.Image(shape=(size, size, 1),
                                                    encoding_format=self._options.encoding),
                record_schema.LABEL: tfds.features.ClassLabel(names=list(record_schema.CLASS_NAMES)),
                record_schema.FILENAME: tfds.features.Text(),
                record_schema.PATIENT_ID: tfds.features.Text(),
                record_schema.ORIGINAL_HEIGHT: tfds.features.Scalar(dtype=np.int64),
                record_schema.ORIGINAL_WIDTH: tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=(record_schema.IMAGE, record_schema.LABEL),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # sources are local files
        return {split: self._generate_examples(split) for split in self._split_files}

    def _converted(self, split: str) -> Iterator:
        """This split's (source, converted, reason) from one ordered stream over all splits.

        One stream keeps the workers busy across split boundaries (no idle tail per split);
        TFDS generates the splits one after another in _split_generators' order.
        """
        all_files = [f for files in self._split_files.values() for f in files]
        if self._results is None:
            tasks = [(i, f.path, self._options, self._source_hashes.get(f.path))
                     for i, f in enumerate(all_files)]
            self._results = self._pool.imap(worker.convert_file, tasks)
        for source in self._split_files[split]:
            index, converted, reason = next(self._results)
            if all_files[index] is not source:
                raise BuildError(f"internal: split {split!r} was generated out of order")
            yield source, converted, reason

    def _generate_examples(self, split: str):
        files = self._split_files[split]
        outcome = self.outcomes[split] = SplitOutcome()
        counts = collections.Counter()
        for source, converted, reason in self._converted(split):
            self._progress.advance()
            rel_path = patient_keys.relative(source.path, self._input_dir)
            shown_path = patient_keys.full(source.path, self._input_dir)  # hashed with --redact_paths
            if converted is None:
                if self._strict:
                    raise BuildError(f"{shown_path}: {reason} (--strict makes bad images fatal)")
                logging.warning("skipping %s: %s", shown_path, reason)
                outcome.skipped.append({"path": rel_path, "reason": reason})
                continue
            if self._views and (converted.dicom or {}).get("view_position") not in self._views:
                view = (converted.dicom["view_position"] or "absent") if converted.dicom else "not DICOM"
                outcome.excluded_views.append({"path": rel_path, "view_position": view})
                continue
            if converted.pixel_std < imaging.NEAR_CONSTANT_STD:
                if self._strict:
                    raise BuildError(f"{shown_path}: near-constant image (pixel standard deviation "
                                     f"{converted.pixel_std:.2f}): blank, or damaged scan data behind an "
                                     f"intact header (--strict makes suspicious images fatal)")
                logging.warning("%s is near-constant (pixel standard deviation %.2f): blank, or damaged "
                                "data behind an intact header; kept, and listed in manifest.json under "
                                "\"near_constant\"", shown_path, converted.pixel_std)
                outcome.near_constant.append({"path": rel_path, "pixel_std": round(converted.pixel_std, 3)})
            if converted.dicom is not None:
                outcome.dicom.append({"path": rel_path, **converted.dicom})
            counts[source.label] += 1
            outcome.patients.add(source.patient_id)
            outcome.unparsed_patient_ids += not source.patient_id_parsed
            yield rel_path, {
                record_schema.IMAGE: converted.encoded,
                record_schema.LABEL: source.label,
                record_schema.FILENAME: source.filename,
                record_schema.PATIENT_ID: source.patient_id,
                record_schema.ORIGINAL_HEIGHT: converted.original_height,
                record_schema.ORIGINAL_WIDTH: converted.original_width,
            }
        outcome.class_counts = {name: counts[i] for i, name in enumerate(record_schema.CLASS_NAMES)}
        outcome.skipped.sort(key=lambda s: s["path"])
        outcome.near_constant.sort(key=lambda s: s["path"])
        if not sum(counts.values()):
            raise BuildError(f"no usable images in split {split!r}: all {len(files)} files were skipped")
