"""Training throughput: does the input pipeline keep up with the trainer's step, and is the loop fast?

Runs the trainer's own frozen-stage step (cxr_tfdata.training.replica_steps, the model cxr-train builds, its
precision policy) on one device, fed by:
  real          the train split through the full input pipeline (cxr_tfdata.training.train.make_datasets);
  synthetic     in-memory batches of the same shape and dtype (no input work at all);
  data_service  the same pipeline served by a tf.data service (a dispatcher and one worker in this
                process);
and times Keras `model.fit` on the real pipeline against the loop (`loop` is the `real` figure).
real / synthetic near 1 means the input never holds the step back. Images/s after warm-up steps;
the decoded-image cache is filled before timing, as in every epoch after the first.

  python benchmarks/bench_train.py --data_dir=/tmp/cxr128_records --image_size=128 --json=train.json
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from cxr_tfdata.core import dataset_info
from cxr_tfdata.core.config import AugmentConfig, DataConfig, ModelConfig, StageConfig, TrainConfig
from cxr_tfdata.data import input_pipeline
from cxr_tfdata.files import atomic
from cxr_tfdata.training import distribute, precision, replica_steps, train

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset written by cxr-build-tfrecords.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Image size; default: the dataset's.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch per step.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per measurement.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup_steps", 5, "Steps before timing (compilation, cache).", lower_bound=1)
_PRECISION = flags.DEFINE_enum("mixed_precision", "auto", ["auto", "float32", "mixed_float16", "mixed_bfloat16"],
                               "Precision policy, as cxr-train's flag.")
_AUGMENT = flags.DEFINE_enum("augment", "device", ["cpu", "device", "none"], "Where augmentation runs.")
_STEPS_PER_LOOP = flags.DEFINE_integer("steps_per_loop", 10, "Loop steps per host call.", lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "Write {real, synthetic, data_service, fit, loop} in images/s here.")
flags.mark_flag_as_required("data_dir")


def _config(data_service: str = "") -> TrainConfig:
    image_size = _IMAGE_SIZE.value or dataset_info.load(_DATA_DIR.value).image_size
    return TrainConfig(
        model_dir="unused", data=DataConfig(data_dir=_DATA_DIR.value, image_size=image_size, data_service=data_service),
        augment=AugmentConfig(placement=_AUGMENT.value), model=ModelConfig(weights="none"),
        frozen=StageConfig(name="frozen", batch_size=_BATCH_SIZE.value), stage="frozen",
        mixed_precision=_PRECISION.value, steps_per_loop=_STEPS_PER_LOOP.value)


def _new_loop(config: TrainConfig, strategy) -> replica_steps.Loop:
    with strategy.scope():
        model = train._stage_architecture(config, config.frozen)
        optimizer = replica_steps.make_optimizer(config.frozen.learning_rate, precision.needs_loss_scaling())
        optimizer.build(model.trainable_variables)
    return replica_steps.Loop(strategy, model, optimizer, replica_steps.StepSettings(config.frozen.batch_size, False,
                                                                   config.steps_per_loop))


def _time_loop(step_loop: replica_steps.Loop, iterator, warmup: int, steps: int, batch: int) -> float:
    step_loop.train(iterator, warmup)
    started = time.perf_counter()
    step_loop.train(iterator, steps)
    return steps * batch / (time.perf_counter() - started)


def _fill_cache(config: TrainConfig, strategy, num_train: int) -> object:
    """The real train iterator, after one pass over the split has filled the decoded-image cache."""
    dataset, _, _ = train.make_datasets(config, config.frozen, strategy, None, dataset_info.load(config.data.data_dir))
    iterator = iter(dataset)
    for _ in range(max(1, num_train // config.frozen.batch_size)):
        next(iterator)
    return iterator


def measure_real(config: TrainConfig, strategy, num_train: int) -> float:
    return _time_loop(_new_loop(config, strategy), _fill_cache(config, strategy, num_train),
                      _WARMUP.value, _STEPS.value, config.frozen.batch_size)


def measure_synthetic(config: TrainConfig, strategy) -> float:
    size, batch = config.data.image_size, config.frozen.batch_size
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8))
    labels = tf.constant(rng.integers(0, 2, batch).astype(np.float32))
    dataset = tf.data.Dataset.from_tensors((images, labels, tf.ones([batch]))).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    return _time_loop(_new_loop(config, strategy), iterator, _WARMUP.value, _STEPS.value, batch)


def measure_data_service(config: TrainConfig, strategy) -> float:
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    worker = service.WorkerServer(service.WorkerConfig(dispatcher_address=dispatcher.target.split("://")[1]))
    served = _config(data_service=dispatcher.target)
    dataset, _, _ = train.make_datasets(served, served.frozen, strategy, None, dataset_info.load(served.data.data_dir),
                                        service_job="bench")
    rate = _time_loop(_new_loop(served, strategy), iter(dataset), _WARMUP.value * 4, _STEPS.value,
                      served.frozen.batch_size)
    del worker, dispatcher  # stopped with the process
    return rate


def measure_fit(config: TrainConfig, strategy, num_train: int) -> float:
    """Keras model.fit, compiled exactly as cxr-train compiled it before the loop (its metrics, no XLA,
    one step per call), on the same pipeline."""
    batch = config.frozen.batch_size
    augment = config.augment if config.augment.placement == "cpu" else None
    dataset = input_pipeline.create_dataset(config.data, "train", batch, training=True, augment=augment,
                                            repeat=True)
    with strategy.scope():
        model = train._stage_architecture(config, config.frozen)
        model.compile(
            optimizer=keras.optimizers.Adam(config.frozen.learning_rate), loss=keras.losses.BinaryCrossentropy(),
            metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.Precision(name="precision"),
                     keras.metrics.Recall(name="recall"), keras.metrics.AUC(name="auc")],
            jit_compile=False)
    # The first call compiles and fills the decoded-image cache, which later iterators reuse.
    fill = max(1, num_train // batch) + _WARMUP.value
    model.fit(dataset, steps_per_epoch=fill, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(dataset, steps_per_epoch=_STEPS.value, epochs=1, verbose=0)
    return _STEPS.value * batch / (time.perf_counter() - started)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    placement = distribute.choose_placement("default", "false")
    config = _config()
    precision.set_precision_policy(config.mixed_precision)
    info = dataset_info.load(_DATA_DIR.value)
    num_train = info.num_examples("train")
    results = {}
    for name, measure in (("synthetic", lambda: measure_synthetic(config, placement.strategy)),
                          ("real", lambda: measure_real(config, placement.strategy, num_train)),
                          ("data_service", lambda: measure_data_service(config, placement.strategy)),
                          ("fit", lambda: measure_fit(config, placement.strategy, num_train))):
        results[name] = measure()
        print(f"{name:14s} {results[name]:9.1f} images/s", flush=True)
    results["loop"] = results["real"]
    print(f"real / synthetic = {results['real'] / results['synthetic']:.3f} (input keeps up when near 1); "
          f"loop / fit = {results['loop'] / results['fit']:.3f} (image size {config.data.image_size}, batch "
          f"{config.frozen.batch_size}, {keras.config.dtype_policy().name}, augment {config.augment.placement})")
    if _JSON.value:
        atomic.write_json(_JSON.value, results)


if __name__ == "__main__":
    app.run(main)
