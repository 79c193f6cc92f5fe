"""Tests of cxr_tfdata.core.dataset_info: the manifest tfrecords_builder.manifest writes, read back; shard
paths that leave the dataset folder or are no regular file, and garbled manifests, named."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest
import tensorflow as tf

from cxr_tfdata.core import dataset_info
from tests.helpers import write_tiny_dataset

IMAGE_SIZE = 32
SPLITS = {"train": (6, 10), "val": (2, 3), "test": (3, 2)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("records")
    return data_dir, write_tiny_dataset(data_dir, SPLITS, image_size=32, num_shards=2)


def test_the_manifest_counts_what_the_shards_hold(built):
    data_dir, manifest = built
    assert manifest == json.loads((data_dir / "manifest.json").read_text())
    first_index = 0
    for split, (normal, pneumonia) in SPLITS.items():
        entry = manifest["splits"][split]
        assert entry["class_counts"] == {"NORMAL": normal, "PNEUMONIA": pneumonia}
        assert entry["num_examples"] == normal + pneumonia
        # write_tiny_dataset names two consecutive images per patient, within a split.
        indices = range(first_index, first_index + normal + pneumonia)
        assert entry["num_patients"] == len({index // 2 for index in indices})
        first_index += normal + pneumonia
        paths = [data_dir / name for name in entry["shard_files"]]
        assert sum(1 for path in paths for _ in tf.data.TFRecordDataset(str(path))) == entry["num_examples"]
        assert entry["shard_sha256"] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
        assert entry["num_skipped"] == entry["num_dropped_leaks"] == entry["num_near_constant"] == 0
    assert manifest["image_size"] == 32 and manifest["encoding"] == "png" and manifest["channels"] == 1
    assert manifest["val_source"] == "given" and manifest["flags"]["num_shards"] == 2


def test_dataset_info_answers_from_one_read(built):
    data_dir, manifest = built
    info = dataset_info.load(str(data_dir))
    assert info.image_size == 32 and info.splits == ["test", "train", "val"]
    assert info.num_examples("train") == 16 and info.class_counts("val") == {"NORMAL": 2, "PNEUMONIA": 3}
    assert info.shard_paths("test") == [str(data_dir / name) for name in manifest["splits"]["test"]["shard_files"]]
    info.require_image_size(32)
    with pytest.raises(ValueError, match="--image_size=64: the dataset in .* holds 32x32 images"):
        info.require_image_size(64)
    with pytest.raises(ValueError, match=r"split 'holdout' not in dataset .*\['test', 'train', 'val'\]"):
        info.split("holdout")


def test_the_fingerprint_ignores_how_a_build_ran_but_not_what_it_wrote(built):
    _, manifest = built
    fingerprint = dataset_info.manifest_fingerprint(manifest)
    same = copy.deepcopy(manifest)
    same["build_seconds"] += 10
    same["flags"].update(output_dir="/elsewhere", num_workers=8, overwrite=True)
    assert dataset_info.manifest_fingerprint(same) == fingerprint
    for change in (lambda m: m["splits"]["train"].update(num_examples=15),
                   lambda m: m["splits"]["train"]["shard_sha256"].reverse(),
                   lambda m: m["flags"].update(seed=1),
                   lambda m: m.update(image_size=64)):
        other = copy.deepcopy(manifest)
        change(other)
        assert dataset_info.manifest_fingerprint(other) != fingerprint


def test_a_missing_manifest_says_the_folder_is_no_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a dataset built by cxr-build-tfrecords"):
        dataset_info.load(str(tmp_path))


def test_a_shard_path_leaving_the_dataset_folder_is_refused(tmp_path):
    from tfrecords_builder import verify

    data_dir = tmp_path / "records"
    manifest = write_tiny_dataset(data_dir, {"train": (2, 2), "val": (2, 2)}, image_size=IMAGE_SIZE, num_shards=1)
    manifest["splits"]["train"]["shard_files"] = ["../../../../etc/passwd"]
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="outside the dataset folder"):
        dataset_info.shard_paths(str(data_dir), dataset_info.read_manifest(str(data_dir)), "train")
    report = verify.verify_dataset(str(data_dir))
    assert any("outside the dataset folder" in error for error in report.errors)


@pytest.mark.parametrize("kind", ["fifo", "outside"])
def test_a_shard_that_is_a_fifo_or_leads_outside_is_refused(tmp_path, kind):
    data_dir = tmp_path / "records"
    manifest = write_tiny_dataset(data_dir, {"train": (2, 2), "val": (2, 2)}, image_size=IMAGE_SIZE, num_shards=1)
    shard = data_dir / manifest["splits"]["train"]["shard_files"][0]
    shard.unlink()
    if kind == "fifo":
        os.mkfifo(shard)
    else:
        (tmp_path / "elsewhere").write_bytes(b"")
        shard.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not a regular file|outside the dataset folder"):
        dataset_info.shard_paths(str(data_dir), dataset_info.read_manifest(str(data_dir)), "train")


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe not utf-8", "is not valid JSON"),
    (json.dumps({"image_size": "abc", "class_names": ["NORMAL", "PNEUMONIA"], "splits": {}}).encode(),
     "'image_size' is 'abc'"),
    (json.dumps({"image_size": 32, "class_names": ["NORMAL", "PNEUMONIA"],
                 "splits": {"train": {"num_examples": 1}}}).encode(), "no list of 'shard_files'"),
])
def test_a_garbled_manifest_is_named_with_what_is_wrong(tmp_path, content, fragment):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ValueError, match=fragment) as refused:
        dataset_info.read_manifest(str(tmp_path))
    assert str(tmp_path / "manifest.json") in str(refused.value)


@pytest.mark.parametrize("name", dataset_info.TFDS_METADATA_FILES)
def test_missing_tfds_metadata_gets_one_verdict_from_every_tool(built, tmp_path, name):
    """Training and evaluation (dataset_info.load) refuse what cxr-verify-tfrecords refuses, in the
    same words, and no TensorFlow-internal text reaches the verify report."""
    import shutil

    from tfrecords_builder import verify

    data_dir, _ = built
    copy = tmp_path / "records"
    shutil.copytree(data_dir, copy)
    (copy / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"{name} is missing: the dataset's tensorflow-datasets metadata"):
        dataset_info.load(str(copy))
    report = verify.verify_dataset(str(copy))
    assert any(f"{name} is missing" in error for error in report.errors), report.errors
    assert not any("{{" in error or "old" in error.lower() for error in report.errors), report.errors
