"""The record schema: feature keys, class names and the manifest, shared by writer and reader.

`tfrecords_builder` writes records through tensorflow-datasets with exactly these
features; `cxr_tfdata.input_pipeline` parses the same bytes with `PARSE_SPEC`.
Tests build hand-made records with `serialize_example`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import posixpath
import stat
from typing import Any

import tensorflow as tf

# Class names come from the Kaggle folder names; the label is the index here.
CLASS_NAMES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
POSITIVE_CLASS = "PNEUMONIA"

# Feature keys, as tensorflow-datasets serializes a flat FeaturesDict.
IMAGE = "image"  # encoded JPEG or PNG, single channel, image_size x image_size
LABEL = "label"  # int64 index into CLASS_NAMES
FILENAME = "filename"  # source file name relative to the split/class folder, e.g. "PNEUMONIA/person1_virus_6.jpeg"
PATIENT_ID = "patient_id"  # parsed from the file name; the file stem when it cannot be parsed
ORIGINAL_HEIGHT = "original_height"
ORIGINAL_WIDTH = "original_width"

PARSE_SPEC: dict[str, tf.io.FixedLenFeature] = {
    IMAGE: tf.io.FixedLenFeature([], tf.string),
    LABEL: tf.io.FixedLenFeature([], tf.int64),
    FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
    PATIENT_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
    ORIGINAL_HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    ORIGINAL_WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=0),
}

MANIFEST_FILENAME = "manifest.json"
_MAX_MANIFEST_BYTES = 256 << 20  # a manifest lists files and reasons: megabytes at most


def serialize_example(
    encoded_image: bytes,
    label: int,
    filename: str = "",
    patient_id: str = "",
    original_height: int = 0,
    original_width: int = 0,
) -> bytes:
    """Serializes one record the way tensorflow-datasets writes it (for tests and tools)."""

    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def _int(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                IMAGE: _bytes(encoded_image),
                LABEL: _int(label),
                FILENAME: _bytes(filename.encode("utf-8")),
                PATIENT_ID: _bytes(patient_id.encode("utf-8")),
                ORIGINAL_HEIGHT: _int(original_height),
                ORIGINAL_WIDTH: _int(original_width),
            }
        )
    )
    return example.SerializeToString()


def read_manifest(data_dir: str) -> dict[str, Any]:
    """Loads `<data_dir>/manifest.json`, naming the file in the error when it is missing or bad.

    Manifest layout (written by tfrecords_builder):
      {"format_version": 1,
       "image_size": 224, "channels": 1, "encoding": "jpeg"|"png",
       "class_names": ["NORMAL", "PNEUMONIA"],
       "splits": {"train": {"num_examples": int, "class_counts": {"NORMAL": int, "PNEUMONIA": int},
                            "num_patients": int, "num_skipped": int, "num_dropped_leaks": int,
                            "shard_files": ["relative/path-00000-of-00004", ...]},
                  "val": {...}, "test": {...}},
       "flags": {...}, "skipped": [{"path": str, "reason": str}, ...],
       "duplicates": {...}}
    Shard paths are relative to data_dir.
    """
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
    return manifest


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
