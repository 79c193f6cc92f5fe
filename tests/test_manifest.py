"""Tests of the manifest: what tfrecords_builder.manifest writes, and cxr_tfdata.dataset_info reads."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import tensorflow as tf

from cxr_tfdata import dataset_info
from tests.helpers import write_tiny_dataset

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
