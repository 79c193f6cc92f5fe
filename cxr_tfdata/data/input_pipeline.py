"""The input pipeline: sharded TFRecords -> parsed, decoded, cached, shuffled, augmented, prefetched batches.

`create_dataset` composes small pure functions in one fixed order:

  shard files -> (shard by input pipeline) -> shuffle files (training) -> interleave checked reads
  -> parse + decode to uint8 [S, S, 1] -> cache (memory | file | off) -> shuffle or balanced sampling
  (training) -> batch -> augment on CPU (training, placement "cpu") -> cast to batch dtype -> prefetch

Batches hold raw pixel values (0..255) in `DataConfig.batch_dtype`; the model's `ToResNetInput` layer
does the only preprocessing. Each shard's records are checked against the file size, so a truncated
or corrupted shard fails with a `tf.errors.InvalidArgumentError` whose message names the shard
(TensorFlow's own DataLossError gives only a byte offset); cxr-verify-tfrecords gives TensorFlow's
reason for each bad shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import psutil
import tensorflow as tf
from absl import logging

from cxr_tfdata.core import dataset_info, record_schema
from cxr_tfdata.core.config import AugmentConfig, DataConfig
from cxr_tfdata.data.augment import augment_batch

AUTOTUNE = tf.data.AUTOTUNE
# Per-record framing in a TFRecord file: uint64 length, uint32 length CRC, data, uint32 data CRC.
_RECORD_OVERHEAD_BYTES = 16
# Shards read at once while training; more only adds memory on a machine with few cores.
_MAX_PARALLEL_SHARDS = 8
_READ_BUFFER_BYTES = 8 << 20


def _read_shard_checked(path: tf.Tensor, size: tf.Tensor, expected_records: tf.Tensor) -> tf.data.Dataset:
    """The records of one shard; fails naming the shard when they do not account for every byte.

    TFRecordDataset's DataLossError does not name the file, and tf.data cannot catch an error per
    element. So errors are dropped (`ignore_errors` ends the shard at the first bad record) and the
    bytes read are summed; an end-of-shard marker then compares the sum with the file size, and
    the record count with the one tensorflow-datasets recorded (when known, else -1), which also
    catches a shard cut exactly between two records.
    """
    records = tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES).ignore_errors()
    marked = records.map(lambda r: (r, False)).concatenate(
        tf.data.Dataset.from_tensors((tf.constant(b""), True))
    )

    def add_record(totals, element):
        record, is_end = element
        length = tf.cast(tf.strings.length(record), tf.int64) + _RECORD_OVERHEAD_BYTES
        consumed, count = totals
        consumed += tf.where(is_end, tf.constant(0, tf.int64), length)
        count += tf.where(is_end, tf.constant(0, tf.int64), tf.constant(1, tf.int64))
        return (consumed, count), (record, is_end, consumed, count)

    def check_end(record, is_end, consumed, count):
        whole = tf.logical_and(
            tf.equal(consumed, size), tf.logical_or(expected_records < 0, tf.equal(count, expected_records))
        )
        message = tf.strings.join([
            "TFRecord shard ", path, " is truncated or corrupted: its readable records end at byte ",
            tf.strings.as_string(consumed), " of ", tf.strings.as_string(size), " after ",
            tf.strings.as_string(count), " records (dataset_info.json: ", tf.strings.as_string(expected_records),
            "; cxr-verify-tfrecords gives TensorFlow's reason); rebuild the dataset with cxr-build-tfrecords",
        ])
        failed = tf.logical_and(is_end, tf.logical_not(whole))
        with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(failed), [message])]):
            return record, tf.identity(is_end)

    zero = tf.constant(0, tf.int64)
    checked = marked.scan((zero, zero), add_record).map(check_end)
    return checked.filter(lambda record, is_end: tf.logical_not(is_end)).map(lambda record, _: record)


def _tfds_shard_lengths(data_dir: str, split: str, paths: list[str]) -> list[int]:
    """Records per shard as tensorflow-datasets wrote them in dataset_info.json; -1 where unknown."""
    unknown = [-1] * len(paths)
    info_path = os.path.join(data_dir, "dataset_info.json")
    if not tf.io.gfile.exists(info_path):
        return unknown
    with tf.io.gfile.GFile(info_path) as f:
        info = json.load(f)
    lengths = next((s.get("shardLengths") for s in info.get("splits", []) if s.get("name") == split), None)
    if not lengths:
        return unknown
    counts = []
    for path in paths:
        match = re.search(r"-(\d{5})-of-(\d{5})$", path)
        if not match or int(match.group(2)) != len(lengths):
            return unknown
        counts.append(int(lengths[int(match.group(1))]))
    return counts


def _checked_shard_files(info: dataset_info.DatasetInfo, split: str,
                         config: DataConfig) -> tuple[list[str], list[int]]:
    """Shard paths of a split and their sizes, after checking the dataset matches the config."""
    info.require_image_size(config.image_size)
    if int(info.manifest.get("channels", 1)) != 1:
        raise ValueError(f"{info.data_dir}: expected single-channel images, manifest says {info.manifest['channels']}")
    paths = info.shard_paths(split)
    if not paths:
        raise ValueError(f"split {split!r} of {info.data_dir} lists no shard files")
    sizes = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"shard {path} listed in {info.data_dir}/manifest.json does not exist")
        sizes.append(os.path.getsize(path))
    return paths, sizes


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """One serialized record -> the features of `record_schema.parse_spec()`."""
    return tf.io.parse_single_example(serialized, record_schema.parse_spec())


def decode_image(encoded: tf.Tensor, filename: tf.Tensor, image_size: int) -> tf.Tensor:
    """JPEG or PNG bytes -> uint8 [S, S, 1]; a record of another size fails naming its file."""
    image = tf.io.decode_image(encoded, channels=1, expand_animations=False, dtype=tf.uint8)
    shape = tf.shape(image)
    same_size = tf.debugging.Assert(
        tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size)),
        ["record", filename, "holds an image of shape", shape,
         f"but the dataset and --image_size say {image_size}x{image_size}"],
    )
    with tf.control_dependencies([same_size]):
        return tf.ensure_shape(image, [image_size, image_size, 1])


def _decoded_examples(records: tf.data.Dataset, image_size: int, with_metadata: bool,
                      deterministic: bool, only_label: int | None = None) -> tf.data.Dataset:
    """Records -> (uint8 image, int64 label[, filename, patient_id]), decoded in parallel."""
    parsed = records.map(parse_example, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if only_label is not None:
        parsed = parsed.filter(lambda ex: tf.equal(ex[record_schema.LABEL], only_label))

    def decode(ex):
        image = decode_image(ex[record_schema.IMAGE], ex[record_schema.FILENAME], image_size)
        if with_metadata:
            return image, ex[record_schema.LABEL], ex[record_schema.FILENAME], ex[record_schema.PATIENT_ID]
        return image, ex[record_schema.LABEL]

    return parsed.map(decode, num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def _remove_stale_cache_lock(prefix: str) -> None:
    """Removes the lock and partial files of a file cache whose writer died before this process began.

    tf.data discards a partial cache when its iterator is destroyed, but a killed process leaves
    `<prefix>_<n>.lockfile` behind, and every later run would then refuse the cache. A lock older
    than this process cannot be its own; one cache_dir per concurrently running job is assumed.
    """
    process_start = psutil.Process().create_time()
    for lock in tf.io.gfile.glob(prefix + "_*.lockfile"):
        with tf.io.gfile.GFile(lock) as f:
            text = f.read()
        created = float(text.split(":")[-1]) if text.startswith("Created at:") else process_start
        if created < process_start - 1:
            logging.warning("removing the stale tf.data cache lock %s left by a process that ended", lock)
            for partial in tf.io.gfile.glob(lock[: -len(".lockfile")] + ".data-*tempstate*"):
                tf.io.gfile.remove(partial)
            tf.io.gfile.remove(lock)


def _cache(dataset: tf.data.Dataset, config: DataConfig, name: str) -> tf.data.Dataset:
    if config.cache == "memory":
        return dataset.cache()
    if config.cache == "file":
        tf.io.gfile.makedirs(config.cache_dir)
        prefix = os.path.join(config.cache_dir, name)
        _remove_stale_cache_lock(prefix)
        return dataset.cache(prefix)
    return dataset


def _cache_name(config: DataConfig, split: str, sizes: list[int], tag: str) -> str:
    """A cache file name unique to the dataset (path and shard sizes), split and element layout."""
    key = f"{os.path.abspath(config.data_dir)}|{sizes}|{config.image_size}|{tag}"
    return f"{split}-{config.image_size}px-{tag}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _read_records(paths: list[str], sizes: list[int], record_counts: list[int], training: bool,
                  config: DataConfig, input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    """Checked records of the shards; in manifest and file order unless training.

    With several input pipelines, training pipelines read their own shard files when there are
    enough of them; evaluation pipelines always take every n-th record of the split in file order,
    so each holds a known number of records (`records_per_pipeline`).
    """
    files = tf.data.Dataset.from_tensor_slices(
        (paths, tf.constant(sizes, tf.int64), tf.constant(record_counts, tf.int64))
    )
    shard_records_by_context = False
    if input_context is not None and input_context.num_input_pipelines > 1:
        if training and len(paths) >= input_context.num_input_pipelines:
            files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        else:
            shard_records_by_context = True
    if not training:
        records = files.interleave(_read_shard_checked, cycle_length=1, block_length=1)
    else:
        files = files.shuffle(len(paths), seed=config.seed, reshuffle_each_iteration=True)
        records = files.interleave(
            _read_shard_checked,
            cycle_length=min(len(paths), _MAX_PARALLEL_SHARDS),
            block_length=1,
            num_parallel_calls=AUTOTUNE,
            deterministic=config.deterministic,
        )
    if shard_records_by_context:
        records = records.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return records


def _balanced_examples(make_examples, config: DataConfig, num_examples: int) -> tf.data.Dataset:
    """Equal numbers of each class in expectation (minority oversampled), `num_examples` per epoch."""
    per_class = [
        make_examples(label).shuffle(config.shuffle_buffer, seed=config.seed + 1 + label,
                                     reshuffle_each_iteration=True).repeat()
        for label in range(len(record_schema.CLASS_NAMES))
    ]
    weights = [1.0 / len(per_class)] * len(per_class)
    mixed = tf.data.Dataset.sample_from_datasets(
        per_class, weights=weights, seed=config.seed, rerandomize_each_iteration=True
    )
    return mixed.take(num_examples)


def _augment_on_cpu(batches: tf.data.Dataset, augment: AugmentConfig, config: DataConfig) -> tf.data.Dataset:
    """Augments whole batches in parallel, with fresh (but seeded) transforms each epoch."""
    seeds = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True).batch(2)

    # Compiled with XLA, the gather resampler fuses into one loop: several times the throughput of
    # the ImageProjectiveTransformV3 kernel on a CPU (BUILD_NOTES.md), for the same result.
    @tf.function(jit_compile=True)
    def augment_and_cast(images, seed):
        augmented = augment_batch(images, augment, seed, xla_compatible=True)
        return _to_batch_dtype(augmented, config.batch_dtype)

    def apply(batch, seed):
        images, *rest = batch
        # Input work stays on the host even when an accelerator is visible.
        with tf.device("/CPU:0"):
            return (augment_and_cast(images, seed), *rest)

    return tf.data.Dataset.zip(batches, seeds).map(
        apply, num_parallel_calls=AUTOTUNE, deterministic=config.deterministic
    )


def _to_batch_dtype(images: tf.Tensor, dtype: str) -> tf.Tensor:
    if dtype == "uint8":
        if images.dtype == tf.uint8:
            return images
        return tf.saturate_cast(tf.round(images), tf.uint8)
    return tf.cast(images, dtype)


def _dataset_options(deterministic: bool, input_context, service: bool = False) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = True
    options.experimental_optimization.map_parallelization = True
    # With an input context each pipeline already reads its own files; without one, a distribution
    # strategy splits the data by element, which works whatever the number of shards.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF
        if input_context is not None or service
        else tf.data.experimental.AutoShardPolicy.DATA
    )
    return options


def _augment_examples_on_cpu(examples: tf.data.Dataset, augment: AugmentConfig,
                             config: DataConfig) -> tf.data.Dataset:
    """`_augment_on_cpu` for single examples (what a tf.data service worker sends)."""
    seeds = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True).batch(2)

    def apply(example, seed):
        image, *rest = example
        augmented = augment_batch(image[None], augment, seed, xla_compatible=True)[0]
        return (tf.saturate_cast(tf.round(augmented), tf.uint8), *rest)

    return tf.data.Dataset.zip(examples, seeds).map(apply, num_parallel_calls=AUTOTUNE,
                                                     deterministic=config.deterministic)


def served_examples(config: DataConfig, split: str, augment: AugmentConfig | None, job_name: str = "",
                    with_metadata: bool = False, repeat: bool = True,
                    info: dataset_info.DatasetInfo | None = None) -> tf.data.Dataset:
    """The train split's examples, read, decoded, shuffled and augmented on tf.data service workers.

    Processing mode "distributed_epoch" (ShardingPolicy.DYNAMIC): the dispatcher hands the shard
    files of each pass to the service workers one by one, so a pass delivers every example exactly
    once, spread over the workers; with `repeat` the passes follow each other without end, each
    shuffled afresh. Trainers that share `job_name` (the workers of one multi-worker run) share
    the stream: each example of a pass goes to one of them. A service worker that dies loses the
    examples of the shard it was reading in that pass (none is delivered twice); the others carry
    on. Examples travel one by one; the trainer batches them, so no example is dropped at the end
    of a pass. The decoded-image cache is not used here (it would pin each worker to the shards it
    saw first).
    """
    paths, sizes = _checked_shard_files(info or dataset_info.load(config.data_dir), split, config)
    record_counts = _tfds_shard_lengths(config.data_dir, split, paths)
    records = _read_records(paths, sizes, record_counts, True, config, input_context=None)
    examples = _decoded_examples(records, config.image_size, with_metadata, config.deterministic)
    examples = examples.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    if augment is not None and augment.placement == "cpu":
        examples = _augment_examples_on_cpu(examples, augment, config)
    if repeat:
        examples = examples.repeat()
    return examples.apply(tf.data.experimental.service.distribute(
        processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
        service=config.data_service, job_name=job_name or None))


def create_dataset(
    config: DataConfig,
    split: str,
    batch_size: int,
    training: bool,
    augment: AugmentConfig | None = None,
    input_context: tf.distribute.InputContext | None = None,
    with_metadata: bool = False,
    *,
    repeat: bool = False,
    service_job: str = "",
    info: dataset_info.DatasetInfo | None = None,
) -> tf.data.Dataset:
    """Batches of (images, labels[, {"filename", "patient_id"}]) from a split built by cxr-build-tfrecords.

    images: [B, S, S, 1] raw pixel values (0..255) in `config.batch_dtype`; labels: [B] float32 in
    {0, 1}. training=True: files and examples shuffled with `config.seed` in a fresh order each epoch
    (or balanced sampling), drop_remainder, augmented here when `augment.placement == "cpu"`, repeated
    forever when `repeat`. training=False: shards in manifest order, records in file order, no
    augmentation, last partial batch kept. With an `input_context` (from
    `strategy.distribute_datasets_from_function`), `batch_size` is the per-replica batch.
    With `config.data_service`, training examples come from the tf.data service (`served_examples`;
    service_job names the job that the trainers of one run share) and are only batched here.
    `info` is the dataset's manifest when the caller has read it already.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if training and config.data_service:
        if config.balanced_sampling:
            raise ValueError("--balanced_sampling: not available with --data_service_address (the service "
                             "splits one stream of the split's files among its workers)")
        examples = served_examples(config, split, augment, service_job, with_metadata, repeat, info)
        batches = examples.batch(batch_size, drop_remainder=True)
        # The service splits the data: no strategy may shard it again (as with an input context).
        return _finished(batches, config, with_metadata, config.deterministic, input_context, service=True)
    info = info or dataset_info.load(config.data_dir)
    paths, sizes = _checked_shard_files(info, split, config)
    record_counts = _tfds_shard_lengths(config.data_dir, split, paths)
    deterministic = config.deterministic or not training
    image_size = config.image_size

    def make_examples(only_label=None):
        records = _read_records(paths, sizes, record_counts, training, config, input_context)
        examples = _decoded_examples(records, image_size, with_metadata, deterministic, only_label)
        tag = ("meta" if with_metadata else "plain") + ("" if only_label is None else f"-class{only_label}")
        if input_context is not None:
            tag += f"-pipeline{input_context.input_pipeline_id}of{input_context.num_input_pipelines}"
        return _cache(examples, config, _cache_name(config, split, sizes, tag))

    if training and config.balanced_sampling:
        num_examples = info.num_examples(split)
        if input_context is not None:
            num_examples //= input_context.num_input_pipelines
        examples = _balanced_examples(make_examples, config, num_examples)
    elif training:
        examples = make_examples().shuffle(
            config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True
        )
    else:
        examples = make_examples()
    if training and repeat:
        examples = examples.repeat()
    batches = examples.batch(batch_size, drop_remainder=training, num_parallel_calls=AUTOTUNE,
                             deterministic=deterministic)
    if training and augment is not None and augment.placement == "cpu":
        batches = _augment_on_cpu(batches, augment, config)
    return _finished(batches, config, with_metadata, deterministic, input_context)


def _finished(batches: tf.data.Dataset, config: DataConfig, with_metadata: bool, deterministic: bool,
              input_context, service: bool = False) -> tf.data.Dataset:
    """Batch dtype, float labels, metadata as a dict, prefetch and the dataset options."""
    def finish(images, labels, *metadata):
        out = (_to_batch_dtype(images, config.batch_dtype), tf.cast(labels, tf.float32))
        if with_metadata:
            out += ({"filename": metadata[0], "patient_id": metadata[1]},)
        return out

    batches = batches.map(finish, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return batches.prefetch(AUTOTUNE).with_options(_dataset_options(deterministic, input_context, service))
