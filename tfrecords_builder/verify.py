"""Re-reads a built dataset: every shard's record CRCs, counts against manifest and dataset_info, every image."""

from __future__ import annotations

import collections
import dataclasses
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from cxr_tfdata.core import dataset_info, record_schema, runner
from tfrecords_builder.manifest import file_sha256


class VerifyError(ValueError):
    """A dataset failed verification; the message names its first problem."""


@dataclasses.dataclass
class VerifyReport:
    data_dir: str
    errors: list[str] = dataclasses.field(default_factory=list)
    num_examples: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """One line: OK with the counts, or how many problems and the first one."""
        if self.ok:
            return f"{self.data_dir}: OK, {self.num_examples}"
        more = f" (and {len(self.errors) - 1} more problem(s), listed above)" if len(self.errors) > 1 else ""
        return f"{self.data_dir}: {self.errors[0]}{more}"


def _parse_and_decode(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    example = tf.io.parse_single_example(record, record_schema.parse_spec())
    # channels=0 keeps what is stored, so a 3-channel image shows up as a wrong shape.
    image = tf.io.decode_image(example[record_schema.IMAGE], channels=0, expand_animations=False)
    return tf.shape(image), example[record_schema.LABEL]


def _read_shard(path: str) -> tuple[collections.Counter, list[tuple[int, ...]]]:
    """Class counts and the distinct image shapes of one shard; raises tf.errors.OpError."""
    counts: collections.Counter = collections.Counter()
    shapes: set[tuple[int, ...]] = set()
    dataset = tf.data.TFRecordDataset(path).map(_parse_and_decode, num_parallel_calls=tf.data.AUTOTUNE)
    for shape, label in dataset.as_numpy_iterator():
        counts[int(label)] += 1
        shapes.add(tuple(int(d) for d in shape))
    return counts, sorted(shapes)


def _check_split(paths, split, entry, tfds_lengths, image_size, report) -> None:
    expected_shape = (image_size, image_size, 1)
    totals: collections.Counter = collections.Counter()
    for index, path in enumerate(paths):
        if not os.path.exists(path):
            report.errors.append(f"missing shard {path}")
            continue
        try:
            counts, shapes = _read_shard(path)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
            report.errors.append(f"bad shard {path}: {type(e).__name__}: {runner.op_error_summary(e.message)}")
            continue
        if shapes and shapes != [expected_shape]:
            report.errors.append(f"bad shard {path}: image shapes {shapes}, expected {expected_shape}")
        if tfds_lengths is not None and index < len(tfds_lengths) and sum(counts.values()) != tfds_lengths[index]:
            report.errors.append(f"bad shard {path}: {sum(counts.values())} records, "
                                 f"dataset_info.json says {tfds_lengths[index]}")
        recorded = entry.get("shard_sha256") or []
        if index < len(recorded) and file_sha256(path) != recorded[index]:
            report.errors.append(f"bad shard {path}: its bytes differ from the sha256 recorded in manifest.json")
        totals.update(counts)
    report.num_examples[split] = sum(totals.values())
    if sum(totals.values()) != entry["num_examples"]:
        report.errors.append(f"split {split}: read {sum(totals.values())} records, manifest says {entry['num_examples']}")
    class_counts = {name: totals[i] for i, name in enumerate(record_schema.CLASS_NAMES)}
    if class_counts != entry.get("class_counts", class_counts):
        report.errors.append(f"split {split}: class counts {class_counts}, manifest says {entry['class_counts']}")


def _tfds_shard_lengths(data_dir: str, report: VerifyReport) -> dict[str, list[int]]:
    try:
        info = tfds.builder_from_directory(data_dir).info
    except (OSError, ValueError, KeyError, tf.errors.OpError) as e:
        cause = runner.op_error_summary(e.message) if isinstance(e, tf.errors.OpError) else " ".join(str(e).split())
        report.errors.append(f"{data_dir}: tensorflow-datasets cannot load it: {cause}")
        return {}
    return {name: list(split.shard_lengths) for name, split in info.splits.items()}


def verify_dataset(data_dir: str) -> VerifyReport:
    """Checks every shard of every split; problems are collected, each naming its shard or file."""
    report = VerifyReport(data_dir)
    try:
        manifest = dataset_info.read_manifest(data_dir)
    except (FileNotFoundError, ValueError) as e:
        report.errors.append(str(e))
        return report
    lengths = _tfds_shard_lengths(data_dir, report)
    for split, entry in manifest["splits"].items():
        if lengths and split not in lengths:
            report.errors.append(f"split {split} is in manifest.json but not in dataset_info.json")
        if lengths and split in lengths and sum(lengths[split]) != entry["num_examples"]:
            report.errors.append(f"split {split}: dataset_info.json counts {sum(lengths[split])}, "
                                 f"manifest says {entry['num_examples']}")
        try:
            paths = dataset_info.shard_paths(data_dir, manifest, split)
        except ValueError as e:  # a shard path leaving the dataset folder
            report.errors.append(str(e))
            continue
        _check_split(paths, split, entry, lengths.get(split), manifest["image_size"], report)
    return report
