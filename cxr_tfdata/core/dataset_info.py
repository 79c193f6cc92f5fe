"""The dataset a binary reads, described once: manifest.json read and checked into a DatasetInfo.

cxr-build-tfrecords writes manifest.json beside the shards (tfrecords_builder/manifest.py). Every
binary reads it once per run (`load`) and passes the DatasetInfo along. No TensorFlow import here,
so flag errors and dataset errors come before TensorFlow loads.

Manifest layout:
  {"format_version": 1,
   "image_size": 224, "channels": 1, "encoding": "jpeg"|"png", "resize": "squash"|"pad",
   "class_names": ["NORMAL", "PNEUMONIA"],
   "splits": {"train": {"num_examples": int, "class_counts": {"NORMAL": int, "PNEUMONIA": int},
                        "num_patients": int, "num_skipped": int, "num_dropped_leaks": int,
                        "num_near_constant": int, "shard_files": ["relative/path-00000-of-00004", ...],
                        "shard_sha256": [...]},
              "val": {...}, "test": {...}},
   "flags": {...}, "skipped": [{"path": str, "reason": str}, ...], "near_constant": [...],
   "duplicates": {...}, "dropped_leaks": [...], "tfds": {...}, "build_seconds": float}
Shard paths are relative to the dataset folder.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import posixpath
import stat
from typing import Any

from cxr_tfdata.core.record_schema import CLASS_NAMES

MANIFEST_FILENAME = "manifest.json"
_MAX_MANIFEST_BYTES = 256 << 20  # a manifest lists files and reasons: megabytes at most


def read_manifest(data_dir: str) -> dict[str, Any]:
    """Loads `<data_dir>/manifest.json`, naming the file in the error when it is missing or bad."""
    path = os.path.join(data_dir, MANIFEST_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {data_dir!r} is not a dataset built by cxr-build-tfrecords"
        )
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file")
    if os.path.getsize(path) > _MAX_MANIFEST_BYTES:
        raise ValueError(f"{path} is larger than {_MAX_MANIFEST_BYTES >> 20} MB: not a manifest of cxr-build-tfrecords")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    _check_manifest_layout(manifest, path)
    _check_tfds_metadata(data_dir)
    return manifest


# What tensorflow-datasets needs beside the shards to read the dataset (cxr-build-tfrecords writes both).
TFDS_METADATA_FILES = ("dataset_info.json", "features.json")


def _check_tfds_metadata(data_dir: str) -> None:
    """Fails naming the file when the dataset's tensorflow-datasets metadata is missing: every tool
    (verify, train, evaluate, predict --data_dir) gives this one verdict, before reading a shard."""
    for name in TFDS_METADATA_FILES:
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            what = "is not a regular file" if os.path.lexists(path) else "is missing"
            raise FileNotFoundError(
                f"{path} {what}: the dataset's tensorflow-datasets metadata, written by cxr-build-tfrecords "
                f"beside manifest.json, is incomplete; restore the file or rebuild the dataset")


def _check_manifest_layout(manifest: Any, path: str) -> None:
    """Fails naming the file and the entry when the manifest lacks what readers use."""
    def require(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{path}: {what}; not a manifest of cxr-build-tfrecords (rebuild the dataset)")

    require(isinstance(manifest, dict), "not a JSON object")
    for key in ("image_size", "class_names", "splits"):
        require(key in manifest, f"no {key!r} entry")
    require(isinstance(manifest["image_size"], int) and not isinstance(manifest["image_size"], bool)
            and manifest["image_size"] > 0, f"'image_size' is {manifest['image_size']!r}, not a positive integer")
    require(isinstance(manifest["class_names"], list) and tuple(manifest["class_names"]) == CLASS_NAMES,
            f"names classes {manifest['class_names']!r}, expected {list(CLASS_NAMES)}")
    require(isinstance(manifest["splits"], dict), "'splits' is not an object")
    for split, entry in manifest["splits"].items():
        require(isinstance(entry, dict), f"split {split!r} is not an object")
        require(isinstance(entry.get("num_examples"), int), f"split {split!r} has no integer 'num_examples'")
        shards = entry.get("shard_files")
        require(isinstance(shards, list) and all(isinstance(name, str) for name in shards),
                f"split {split!r} has no list of 'shard_files'")
        counts = entry.get("class_counts", {})
        require(isinstance(counts, dict) and all(isinstance(v, int) for v in counts.values()),
                f"split {split!r} has 'class_counts' that are not integers")


# Manifest entries that say how a build ran, not what it wrote: two builds differing only in
# these hold the same records.
_NOT_CONTENT = ("build_seconds",)
_NOT_CONTENT_FLAGS = ("output_dir", "overwrite", "num_workers")


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """"sha256:<hex>" of the manifest's content: the same for two builds of the same records.

    Everything the manifest says about the records (splits, counts, shard files, image settings,
    what was skipped and dropped, the source folder and the build flags) is hashed; only how the
    build ran (its duration, output path, worker count, --overwrite) is left out.
    """
    content = copy.deepcopy(manifest)
    for key in _NOT_CONTENT:
        content.pop(key, None)
    for key in _NOT_CONTENT_FLAGS:
        (content.get("flags") or {}).pop(key, None)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def split_info(manifest: dict[str, Any], split: str, data_dir: str = "") -> dict[str, Any]:
    """Returns one split's manifest entry, listing the splits there are when it is missing."""
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(
            f"split {split!r} not in dataset {data_dir or ''}; available splits: {sorted(splits)}"
        )
    return splits[split]


def shard_paths(data_dir: str, manifest: dict[str, Any], split: str) -> list[str]:
    """Shard file paths of a split. A listed path that leaves data_dir, by its name or through a
    symbolic link, is refused, and so is a shard that is not a regular file (a FIFO would block
    every reader forever)."""
    paths = []
    root = os.path.realpath(data_dir)
    for rel in split_info(manifest, split, data_dir)["shard_files"]:
        parts = posixpath.normpath(str(rel).replace(os.sep, "/")).split("/")
        path = os.path.join(data_dir, str(rel))
        real = os.path.realpath(path)
        if (not rel or posixpath.isabs(str(rel)) or os.path.isabs(str(rel)) or ".." in parts
                or not real.startswith(root.rstrip(os.sep) + os.sep)):
            raise ValueError(f"{os.path.join(data_dir, MANIFEST_FILENAME)} lists shard file {rel!r} of split "
                             f"{split!r}, which is outside the dataset folder; refusing to read it")
        if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"shard {path} of split {split!r} is not a regular file; refusing to read it")
        paths.append(path)
    return paths


def count_records(path: str) -> int:
    """The records in one (uncompressed) TFRecord file, counted from their length headers alone:
    each record is an 8-byte length, a 4-byte CRC, the data and a 4-byte CRC, so one small read and
    one seek per record, never the data. ValueError naming the file when it cannot be read or ends
    inside a record."""
    count = 0
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            position = 0
            while position < size:
                header = f.read(8)
                position += 12 + int.from_bytes(header, "little") + 4
                if len(header) < 8 or position > size:
                    raise ValueError(f"shard {path} ends inside a record (truncated); rebuild the dataset")
                f.seek(position)
                count += 1
    except OSError as e:
        raise ValueError(f"shard {path} cannot be read: {e.strerror or e}") from None
    return count


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """One dataset's manifest, read once, with the questions binaries ask of it."""

    data_dir: str
    manifest: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.data_dir, MANIFEST_FILENAME)

    @functools.cached_property
    def fingerprint(self) -> str:
        return manifest_fingerprint(self.manifest)

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest["splits"])

    def split(self, name: str) -> dict[str, Any]:
        return split_info(self.manifest, name, self.data_dir)

    def num_examples(self, split: str) -> int:
        return int(self.split(split)["num_examples"])

    def class_counts(self, split: str) -> dict[str, int]:
        return dict(self.split(split)["class_counts"])

    def shard_paths(self, split: str) -> list[str]:
        return shard_paths(self.data_dir, self.manifest, split)

    def check_counts(self, split: str) -> None:
        """Fails, naming manifest.json, when its counts of `split` are not what the shards hold: its
        class counts must add up to num_examples, and num_examples must be the records the shards
        hold (counted from their headers: the shards are the authority, where dataset_info.json's
        shard lengths are one more editable copy). Cheap: no record is read or decoded, so a class
        count moved to the other class with the same total is left to cxr-verify-tfrecords."""
        entry, advice = self.split(split), "rebuild the dataset, or run cxr-verify-tfrecords on it"
        counts, num_examples = entry.get("class_counts") or {}, int(entry["num_examples"])
        if counts and sum(counts.values()) != num_examples:
            raise ValueError(f"{self.manifest_path}: split {split!r} has class counts {counts} adding up to "
                             f"{sum(counts.values())}, not its num_examples {num_examples}: the file was edited; {advice}")
        held = sum(count_records(path) for path in self.shard_paths(split))
        if held != num_examples:
            raise ValueError(f"{self.manifest_path}: split {split!r} counts {num_examples} examples ({counts}), "
                             f"but its shards hold {held} records: the file was edited or the shards changed; {advice}")

    def require_image_size(self, image_size: int, flag: str = "--image_size") -> None:
        """Fails naming the flag when the records are not image_size x image_size."""
        if image_size != self.image_size:
            raise ValueError(
                f"{flag}={image_size}: the dataset in {self.data_dir} holds {self.image_size}x{self.image_size} "
                f"images (manifest.json); pass that size or rebuild the dataset with cxr-build-tfrecords "
                f"--image_size={image_size}")


def load(data_dir: str) -> DatasetInfo:
    """The dataset in data_dir, its manifest read and checked once."""
    return DatasetInfo(data_dir, read_manifest(data_dir))
