"""Tests of cxr_tfdata.data.input_pipeline on hand-made records whose images encode their own label and index."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from cxr_tfdata.core import dataset_info, patient_keys, record_schema
from cxr_tfdata.core.config import AugmentConfig, DataConfig
from cxr_tfdata.data import input_pipeline
from cxr_tfdata.modeling.preprocessing import to_resnet_input
from tests.helpers import labelled_image, patient_of, write_tiny_dataset

SIZE = 32
CPU_AUGMENT = AugmentConfig(placement="cpu", rotation_range=10, zoom_range=0.1,
                            width_shift_range=0.1, height_shift_range=0.1)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("records")
    write_tiny_dataset(data_dir, image_size=SIZE, num_shards=3,
                       split_sizes={"train": (12, 24), "val": (4, 4), "test": (3, 4)})
    return data_dir


def _config(data_dir, **overrides) -> DataConfig:
    return DataConfig(data_dir=str(data_dir), image_size=SIZE, shuffle_buffer=64, **overrides)


def _index(images: np.ndarray) -> np.ndarray:
    """The record index each image encodes at pixels (0, 1) and (0, 2)."""
    return images[:, 0, 1, 0].astype(int) + 256 * images[:, 0, 2, 0].astype(int)


def _records_in_file_order(data_dir, split):
    manifest = dataset_info.read_manifest(str(data_dir))
    parsed = [input_pipeline.parse_example(r) for r in
              tf.data.TFRecordDataset(dataset_info.shard_paths(str(data_dir), manifest, split))]
    return [(int(p["label"]), p["filename"].numpy().decode()) for p in parsed]


def _epoch(dataset) -> tuple[np.ndarray, np.ndarray]:
    batches = list(dataset)
    return (np.concatenate([b[0].numpy() for b in batches]), np.concatenate([b[1].numpy() for b in batches]))


def test_eval_gives_exact_pixels_labels_and_metadata_in_file_order(dataset_dir):
    dataset = input_pipeline.create_dataset(_config(dataset_dir), "val", 3, training=False, with_metadata=True)
    batches = list(dataset)
    assert [int(b[0].shape[0]) for b in batches] == [3, 3, 2]  # last partial batch kept
    images = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    filenames = [f.decode() for b in batches for f in b[2]["filename"].numpy()]
    patient_ids = [p.decode() for b in batches for p in b[2]["patient_id"].numpy()]
    assert images.dtype == np.uint8 and images.shape == (8, SIZE, SIZE, 1)
    assert labels.dtype == np.float32
    expected = _records_in_file_order(dataset_dir, "val")
    assert [(int(label), name) for label, name in zip(labels, filenames, strict=True)] == expected
    for image, label, index, patient in zip(images, labels, _index(images), patient_ids, strict=True):
        np.testing.assert_array_equal(image, labelled_image(int(label), index, SIZE))
        assert patient == patient_keys.load_key().patient(patient_of("val", index))  # the keyed hash of the id


@pytest.mark.parametrize("cache", ["memory", "file", "off"])
def test_training_keeps_images_and_labels_aligned_through_interleave_shuffle_and_cache(dataset_dir, tmp_path, cache):
    config = _config(dataset_dir, cache=cache, cache_dir=str(tmp_path / "cache"), seed=3)
    dataset = input_pipeline.create_dataset(config, "train", 5, training=True)
    for _ in range(2):
        images, labels = _epoch(dataset)
        assert images.shape == (35, SIZE, SIZE, 1)  # 36 examples, drop_remainder
        np.testing.assert_array_equal(images[:, 0, 0, 0], 200 * labels.astype(np.uint8))
        assert len(set(_index(images))) == 35
        for image, label, index in zip(images, labels, _index(images), strict=True):
            np.testing.assert_array_equal(image, labelled_image(int(label), index, SIZE))


def test_fixed_seed_and_determinism_repeat_batches_and_reshuffle_each_epoch(dataset_dir):
    config = _config(dataset_dir, seed=11, deterministic=True)
    first_run = input_pipeline.create_dataset(config, "train", 6, training=True, augment=CPU_AUGMENT)
    second_run = input_pipeline.create_dataset(config, "train", 6, training=True, augment=CPU_AUGMENT)
    epoch1, labels1 = _epoch(first_run)
    np.testing.assert_array_equal(_epoch(second_run)[0], epoch1)
    epoch2, labels2 = _epoch(first_run)
    assert not np.array_equal(epoch1, epoch2)
    # A fresh order, not the same images transformed differently.
    unaugmented = input_pipeline.create_dataset(config, "train", 6, training=True)
    order1, order2 = _index(_epoch(unaugmented)[0]), _index(_epoch(unaugmented)[0])
    assert sorted(order1) == sorted(order2) and not np.array_equal(order1, order2)
    other_seed = input_pipeline.create_dataset(dataclasses.replace(config, seed=12), "train", 6, training=True)
    assert not np.array_equal(_index(_epoch(other_seed)[0]), order1)


def test_cpu_augmentation_changes_training_images_but_never_eval(dataset_dir):
    config = _config(dataset_dir, seed=1, deterministic=True)
    plain = input_pipeline.create_dataset(config, "train", 6, training=True)
    augmented = input_pipeline.create_dataset(config, "train", 6, training=True, augment=CPU_AUGMENT)
    plain_images, plain_labels = _epoch(plain)
    aug_images, aug_labels = _epoch(augmented)
    np.testing.assert_array_equal(aug_labels, plain_labels)  # same order, same labels
    assert aug_images.dtype == np.uint8
    assert np.abs(aug_images.astype(int) - plain_images.astype(int)).mean() > 2
    device = input_pipeline.create_dataset(config, "train", 6, training=True,
                                           augment=dataclasses.replace(CPU_AUGMENT, placement="device"))
    np.testing.assert_array_equal(_epoch(device)[0], plain_images)  # "device" ships raw batches
    for split in ("val", "test"):
        raw = _epoch(input_pipeline.create_dataset(config, split, 4, training=False))[0]
        with_augment = _epoch(input_pipeline.create_dataset(config, split, 4, training=False, augment=CPU_AUGMENT))[0]
        np.testing.assert_array_equal(with_augment, raw)


@pytest.mark.parametrize("batch_dtype", ["bfloat16", "float32"])
def test_batches_hold_raw_pixel_values_and_preprocessing_maps_them_to_unit_range(dataset_dir, batch_dtype):
    config = _config(dataset_dir, batch_dtype=batch_dtype)
    images, labels = next(iter(input_pipeline.create_dataset(config, "train", 8, training=True, augment=CPU_AUGMENT)))
    assert images.dtype == tf.as_dtype(batch_dtype) and labels.dtype == tf.float32
    values = tf.cast(images, tf.float32).numpy()
    assert values.min() >= 0.0 and values.max() <= 255.0 and values.max() > 150.0
    model_input = to_resnet_input(images).numpy()
    assert model_input.shape == (8, SIZE, SIZE, 3)
    assert model_input.min() >= -1.0 and model_input.max() <= 1.0 and model_input.max() > 0.2


def test_balanced_sampling_draws_both_classes_about_equally(dataset_dir):
    config = _config(dataset_dir, balanced_sampling=True, seed=2)
    dataset = input_pipeline.create_dataset(config, "train", 12, training=True)
    labels = np.concatenate([_epoch(dataset)[1] for _ in range(8)])
    assert len(labels) == 8 * 36
    assert 0.42 < labels.mean() < 0.58  # the split itself is 2/3 positive
    images, labels = _epoch(dataset)
    np.testing.assert_array_equal(images[:, 0, 0, 0], 200 * labels.astype(np.uint8))


def test_split_sizes_and_bad_requests(dataset_dir):
    assert dataset_info.load(str(dataset_dir)).num_examples("train") == 36
    with pytest.raises(ValueError, match="available splits"):
        input_pipeline.create_dataset(_config(dataset_dir), "holdout", 4, training=False)
    with pytest.raises(ValueError, match="image_size"):
        input_pipeline.create_dataset(dataclasses.replace(_config(dataset_dir), image_size=64), "val", 4, False)


def test_input_contexts_split_the_records_between_pipelines(dataset_dir):
    seen = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id)
        images, _ = _epoch(input_pipeline.create_dataset(_config(dataset_dir), "train", 4, training=False,
                                                         input_context=context))
        seen.append(set(_index(images)))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 36


# Two replicas need two logical CPUs, which must be set before TensorFlow starts: a fresh process.
_TWO_REPLICAS = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from cxr_tfdata.core.config import DataConfig
from cxr_tfdata.data import input_pipeline
config = DataConfig(data_dir=sys.argv[1], image_size=int(sys.argv[2]), shuffle_buffer=64)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
distributed = strategy.distribute_datasets_from_function(
    lambda context: input_pipeline.create_dataset(config, "train", context.get_per_replica_batch_size(12),
                                                  training=True, input_context=context))
seen = [[], []]
iterator = iter(distributed)
for _ in range(3):  # 36 train records: three global batches of 12 are one epoch
    images, _ = next(iterator)
    for replica, local in enumerate(strategy.experimental_local_results(images)):
        local = local.numpy()
        seen[replica] += (local[:, 0, 1, 0].astype(int) + 256 * local[:, 0, 2, 0].astype(int)).tolist()
print(json.dumps(seen))
"""


def test_two_mirrored_replicas_see_disjoint_examples_that_make_up_the_split(dataset_dir):
    import json
    import os
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", _TWO_REPLICAS, str(dataset_dir), str(SIZE)], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (set(indices) for indices in json.loads(result.stdout.strip().splitlines()[-1]))
    assert len(first) == len(second) == 18
    assert not first & second
    train_indices = set(_index(_epoch(input_pipeline.create_dataset(_config(dataset_dir), "train", 36,
                                                                    training=False))[0]))
    assert first | second == train_indices


def _damaged_copy(dataset_dir, tmp_path, damage):
    copy = tmp_path / "damaged"
    shutil.copytree(dataset_dir, copy)
    shard = copy / dataset_info.read_manifest(str(copy))["splits"]["train"]["shard_files"][1]
    data = bytearray(shard.read_bytes())
    shard.write_bytes(damage(data))
    return copy, str(shard)


def _truncate(data: bytearray) -> bytes:
    return bytes(data[: len(data) - 40])


def _flip_a_byte(data: bytearray) -> bytes:
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("damage, reason", [(_truncate, "truncated record"), (_flip_a_byte, "corrupted record")])
@pytest.mark.parametrize("training", [True, False])
def test_damaged_shard_fails_naming_the_shard(dataset_dir, tmp_path, damage, reason, training):
    data_dir, shard = _damaged_copy(dataset_dir, tmp_path, damage)
    dataset = input_pipeline.create_dataset(_config(data_dir), "train", 4, training=training)
    with pytest.raises(tf.errors.InvalidArgumentError, match="truncated or corrupted") as error:
        _epoch(dataset)
    assert shard in error.value.message
    from tfrecords_builder import verify

    problems = verify.verify_dataset(str(data_dir)).errors
    assert any(shard in problem and reason in problem for problem in problems), problems
    assert verify.verify_dataset(str(dataset_dir)).ok


def test_jpeg_records_decode_to_single_channel_images(tmp_path):
    import io
    import json

    from PIL import Image

    write_tiny_dataset(tmp_path, image_size=SIZE, split_sizes={"val": (1, 1)}, num_shards=1)
    manifest = json.loads((tmp_path / dataset_info.MANIFEST_FILENAME).read_text())
    shard = tmp_path / manifest["splits"]["val"]["shard_files"][0]
    expected = [labelled_image(label, index, SIZE) for label, index in ((0, 0), (1, 1))]
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for label, pixels in enumerate(expected):
            buffer = io.BytesIO()
            Image.fromarray(pixels[..., 0], mode="L").save(buffer, format="JPEG", quality=95)
            writer.write(record_schema.serialize_example(buffer.getvalue(), label, filename=f"x{label}.jpeg"))
    images, labels = _epoch(input_pipeline.create_dataset(_config(tmp_path), "val", 2, training=False))
    assert images.shape == (2, SIZE, SIZE, 1) and list(labels) == [0.0, 1.0]
    for image, pixels in zip(images, expected, strict=True):
        assert np.abs(image.astype(int) - pixels.astype(int)).mean() < 6  # lossy, but the same image


def test_record_of_another_size_than_the_manifest_fails_naming_the_file(tmp_path):
    import json

    write_tiny_dataset(tmp_path, image_size=40, split_sizes={"val": (2, 2)})
    manifest_path = tmp_path / dataset_info.MANIFEST_FILENAME
    manifest = json.loads(manifest_path.read_text())
    manifest["image_size"] = SIZE
    manifest_path.write_text(json.dumps(manifest))
    dataset = input_pipeline.create_dataset(_config(tmp_path), "val", 2, training=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"VAL-IM-\d{4}-\d{4}\.png.*holds an image of shape"):
        _epoch(dataset)


def test_file_cache_left_locked_by_a_killed_run_is_reused(dataset_dir, tmp_path):
    import time

    cache_dir = tmp_path / "cache"
    config = _config(dataset_dir, cache="file", cache_dir=str(cache_dir))
    _epoch(input_pipeline.create_dataset(config, "train", 4, training=True))
    (index_file,) = cache_dir.glob("*.index")
    prefix = str(index_file)[: -len(".index")]
    for path in cache_dir.iterdir():
        path.unlink()
    # What a process killed in its first epoch leaves behind (tf.data's own file names and format).
    lock = Path(prefix + "_0.lockfile")
    lock.write_text(f"Created at: {int(time.time()) - 3600}")
    Path(prefix + "_0.data-00000-of-00001.tempstate123").write_bytes(b"partial")
    images, labels = _epoch(input_pipeline.create_dataset(config, "train", 4, training=True))
    assert len(images) == 36
    np.testing.assert_array_equal(images[:, 0, 0, 0], 200 * labels.astype(np.uint8))
    assert not lock.exists() and (cache_dir / index_file.name).exists()


def test_shard_cut_between_two_records_is_caught_by_the_recorded_shard_lengths(dataset_dir, tmp_path):
    import json

    copy = tmp_path / "cut"
    shutil.copytree(dataset_dir, copy)
    shard_files = dataset_info.read_manifest(str(copy))["splits"]["train"]["shard_files"]
    lengths = [sum(1 for _ in tf.data.TFRecordDataset(str(copy / name))) for name in shard_files]
    info = {"splits": [{"name": "train", "shardLengths": [str(n) for n in lengths]}]}
    (copy / "dataset_info.json").write_text(json.dumps(info))
    assert len(_epoch(input_pipeline.create_dataset(_config(copy), "train", 4, training=False))[0]) == 36
    shard = copy / shard_files[2]
    last_record = list(tf.data.TFRecordDataset(str(shard)))[-1].numpy()
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - len(last_record) - 16])  # a whole record gone, framing intact
    with pytest.raises(tf.errors.InvalidArgumentError, match=str(shard)):
        _epoch(input_pipeline.create_dataset(_config(copy), "train", 4, training=True))
