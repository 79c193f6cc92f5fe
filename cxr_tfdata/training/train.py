"""train_and_evaluate(config): both ResNet50V2 transfer stages under any tf.distribute strategy.

This module checks a run and wires it together: the model dir (run_dir.py), the datasets, the
strategy and XLA choice (distribute.py), the per-replica steps (loop.py) and the epoch controller
of each stage (stages.py). Everything that can be checked before training (weights, dataset,
batch sizes, --fine_tune_at, the model dir) is checked before config.json is written and the first
step runs. Resume: rerun the same command; each stage continues from its last committed epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from cxr_tfdata.core import dataset_info, record_schema
from cxr_tfdata.core.config import StageConfig, TrainConfig
from cxr_tfdata.data import input_pipeline
from cxr_tfdata.files import atomic, locking, output_safety
from cxr_tfdata.metrics import calibration
from cxr_tfdata.modeling import contract as contract_lib
from cxr_tfdata.modeling import model as model_lib
from cxr_tfdata.training import distribute, replica_steps, run_files, stage_runner, val_calibration
from cxr_tfdata.training import precision as precision_lib
from cxr_tfdata.training.run_files import stage_paths

PROGRAM = "cxr-train"


def class_weights_from_counts(class_counts: dict[str, int]) -> dict[int, float]:
    """Loss weight per class index for class counts by name, like scikit-learn's "balanced": n / (k * n_c)."""
    unknown = sorted(set(class_counts) - set(record_schema.CLASS_NAMES))
    if unknown:
        raise ValueError(f"unknown class names {unknown}; expected {list(record_schema.CLASS_NAMES)}")
    counts = [int(class_counts.get(name, 0)) for name in record_schema.CLASS_NAMES]
    empty = [name for name, count in zip(record_schema.CLASS_NAMES, counts, strict=True) if count <= 0]
    if empty:
        raise ValueError(f"class weights need examples of every class; none of {empty}")
    total = sum(counts)
    return {index: total / (len(counts) * count) for index, count in enumerate(counts)}


def train_class_weights(config: TrainConfig, class_counts: dict[str, int]) -> dict[int, float] | None:
    """The loss weights that correct the train split's class imbalance, or None with balanced sampling.

    Balanced sampling already draws both classes equally; weighting the loss as well would
    correct the imbalance twice and bias the model towards the rarer class.
    """
    if config.data.balanced_sampling:
        logging.info("Class imbalance corrected by balanced sampling (train counts %s); no class weights",
                     class_counts)
        return None
    class_weights = class_weights_from_counts(class_counts)
    logging.info("Class imbalance corrected by class weights %s from train counts %s", class_weights,
                 class_counts)
    return class_weights


def steps_per_epoch(config: TrainConfig, stage: StageConfig, replicas: int, num_train: int) -> int:
    """Train steps per epoch; a batch that the train split cannot fill is an error naming its flag."""
    global_batch = stage.batch_size * replicas
    if num_train < global_batch:
        raise ValueError(f"--{stage.name}_batch_size={stage.batch_size} x {replicas} replica(s) = "
                         f"{global_batch} is more than the {num_train} train examples in {config.data.data_dir}")
    steps = num_train // global_batch
    return min(steps, config.steps_per_epoch) if config.steps_per_epoch else steps


def _with_weights(dataset: tf.data.Dataset, class_weights: dict[int, float] | None) -> tf.data.Dataset:
    """(images, labels) -> (images, labels, per-example loss weights): class weights, or ones."""
    table = tf.constant([class_weights[i] for i in range(len(class_weights))] if class_weights else [1.0, 1.0],
                        tf.float32)

    def add_weights(images, labels):
        return images, labels, tf.gather(table, tf.cast(labels, tf.int32))

    return dataset.map(add_weights, num_parallel_calls=tf.data.AUTOTUNE)


def _padded_eval_batches(dataset: tf.data.Dataset, batch_size: int, num_batches: int, image_size: int,
                         dtype: tf.DType) -> tf.data.Dataset:
    """Exactly num_batches whole batches: the last partial batch and the missing ones are filled with
    blank examples of weight 0, which the metrics skip. Every replica then runs the same number of
    whole steps, which a distributed evaluation needs."""
    def pad(images, labels):
        missing = batch_size - tf.shape(images)[0]
        weights = tf.concat([tf.ones_like(labels), tf.zeros([missing], tf.float32)], 0)
        images = tf.pad(images, [[0, missing], [0, 0], [0, 0], [0, 0]])
        return images, tf.pad(labels, [[0, missing]]), weights

    blank = tf.data.Dataset.from_tensors((
        tf.zeros([batch_size, image_size, image_size, 1], dtype), tf.zeros([batch_size], tf.float32),
        tf.zeros([batch_size], tf.float32))).repeat(num_batches)
    # take_while looks at one element past the last it keeps, so the split's own data is always read
    # to its end: a file cache (--cache=file) sees its input finish and is kept, where take() would
    # stop just before the end when the split fills every batch, and tf.data would discard the cache.
    def within(index, batch):
        return index < num_batches

    def without_index(index, batch):
        return batch

    return dataset.map(pad).concatenate(blank).enumerate().take_while(within).map(without_index)


def make_datasets(config: TrainConfig, stage: StageConfig, strategy: tf.distribute.Strategy,
                  class_weights: dict[int, float] | None, info: dataset_info.DatasetInfo, service_job: str = ""):
    """(distributed train dataset repeating forever, distributed val dataset, val steps per replica).

    Train batches carry class weights (or ones); val batches are padded so that every replica runs
    the same number of whole steps, padding weighted 0.
    """
    global_batch = stage.batch_size * strategy.num_replicas_in_sync
    augment = config.augment if config.augment.placement == "cpu" else None
    pipelines = distribute.num_input_pipelines(strategy)
    replicas_per_pipeline = strategy.num_replicas_in_sync // pipelines
    # Every pipeline reads at most ceil(num_val / pipelines) val records, in batches of one replica's share.
    num_val = info.num_examples("val")
    val_steps = math.ceil(math.ceil(num_val / pipelines) / (stage.batch_size * replicas_per_pipeline))

    def train_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = input_context.get_per_replica_batch_size(global_batch)
        dataset = input_pipeline.create_dataset(
            config.data, "train", per_replica, training=True, augment=augment,
            input_context=input_context, repeat=True, service_job=service_job, info=info)
        return _with_weights(dataset, class_weights)

    def val_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = input_context.get_per_replica_batch_size(global_batch)
        dataset = input_pipeline.create_dataset(config.data, "val", per_replica, training=False,
                                                input_context=input_context, info=info)
        return _padded_eval_batches(dataset, per_replica, val_steps * replicas_per_pipeline,
                                    config.data.image_size, tf.as_dtype(config.data.batch_dtype))

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    train = strategy.distribute_datasets_from_function(train_fn, options)
    val = strategy.distribute_datasets_from_function(val_fn, options)
    return train, val, val_steps


def _stage_architecture(config: TrainConfig, stage: StageConfig, contract: dict | None = None) -> keras.Model:
    model = model_lib.build_model(
        config.data.image_size, config.model, config.augment,
        head_batch_norm=stage.name == "finetune", seed=config.data.seed, contract=contract,
    )
    model_lib.configure_trainable(model, stage.name, config.model)
    return model


def _start_from_frozen_best(config: TrainConfig, model: keras.Model) -> None:
    frozen_best = stage_paths(config.model_dir, "frozen").best_model
    if not os.path.exists(frozen_best):
        raise FileNotFoundError(
            f"{frozen_best} not found: the finetune stage starts from the frozen stage's best "
            f"model; run --stage=frozen (or --stage=both) with this --model_dir first"
        )
    source = keras.saving.load_model(frozen_best, compile=False, safe_mode=True)
    model_lib.transfer_weights(source, model)
    logging.info("Stage finetune starts from %s", frozen_best)


def run_stage(config: TrainConfig, stage: StageConfig, placement: distribute.Placement,
              class_weights: dict[int, float] | None, info: dataset_info.DatasetInfo,
              on_epoch_end: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Trains one stage to completion (or resumes it) and returns its best model's val metrics."""
    strategy = placement.strategy
    paths = stage_paths(config.model_dir, stage.name)
    state = run_files.read_json(paths.state) if os.path.exists(paths.state) else stage_runner.initial_state(stage)
    if placement.is_chief:
        stage_runner.settle(paths, state)
    if state["completed"]:
        logging.info("Stage %s already completed in %s; not rerun", stage.name, config.model_dir)
        return run_files.read_json(os.path.join(config.model_dir, run_files.METRICS_FILE))[stage.name]
    steps = steps_per_epoch(config, stage, strategy.num_replicas_in_sync, info.num_examples("train"))
    # Trainers of one run share one tf.data service job; a resumed run starts a new one.
    run_id = hashlib.sha1(config.model_dir.encode()).hexdigest()[:8]
    mid_epoch = state.get("mid_epoch") or {}
    service_job = (f"cxr-train-{run_id}-{stage.name}-{state['epochs_completed']}"
                   + (f"-step{mid_epoch['steps_done']}" if mid_epoch else ""))
    train, val, val_steps = make_datasets(config, stage, strategy, class_weights, info, service_job)
    global_batch = stage.batch_size * strategy.num_replicas_in_sync
    with strategy.scope():
        model = _stage_architecture(config, stage)
        if stage.name == "finetune" and state["epochs_completed"] == 0:
            _start_from_frozen_best(config, model)
        optimizer = replica_steps.make_optimizer(stage.learning_rate, precision_lib.needs_loss_scaling())
        optimizer.build(model.trainable_variables)
    step_loop = replica_steps.Loop(strategy, model, optimizer,
                          replica_steps.StepSettings(global_batch, placement.jit_compile, config.steps_per_loop))
    # Saved models compute in float32: a file that kept the training policy would run evaluation,
    # prediction and export in bfloat16/float16 on every machine. Variables are float32 under
    # either policy, so the weights copy over exactly. Only saved models carry the contract.
    new_contract = contract_lib.for_dataset(info.manifest, info.fingerprint,
                                            run_files.run_record(config, info.fingerprint), stage.name)
    with precision_lib.global_policy_scope("float32"):
        export_model = _stage_architecture(config, stage, new_contract)
    runner = stage_runner.StageRunner(stage, paths, model, optimizer, step_loop, export_model,
                                stage_runner.Cluster(placement.is_chief, placement.task_id, placement.any_worker),
                                on_epoch_end)
    runner.resume(state)
    logging.info("Stage %s: %s; %d steps per epoch, %d val steps", stage.name, step_loop.describe(), steps,
                 val_steps)
    started = time.monotonic()
    runner.run(iter(train), steps, val, val_steps, global_batch)
    return runner.finish(val, val_steps, steps, time.monotonic() - started,
                         seal=lambda: _seal_best_model(config, paths, export_model, runner.best_weights, info,
                                                       class_weights))


def _seal_best_model(config: TrainConfig, paths: run_files.StagePaths, export_model: keras.Model,
                     best_weights, info: dataset_info.DatasetInfo,
                     class_weights: dict[int, float] | None) -> dict[str, Any]:
    """The stage's best model gains its operating threshold and temperature (fitted on val) and is
    saved again, atomically, before the stage is marked complete: a run killed here redoes this."""
    export_model.set_weights(best_weights)
    logit_shift = calibration.prior_logit_shift(class_weights, info.class_counts("train"),
                                                config.data.balanced_sampling)
    values = val_calibration.seal(export_model, config.data.data_dir, info, config.target_recall, logit_shift=logit_shift)
    if values:
        atomic.write_with(paths.best_model, export_model.save, suffix=".keras")
        logging.info("Stage %s: stored them in %s", paths.stage, paths.best_model)
    return {key: values[key] for key in ("operating_threshold", "temperature", "logit_shift") if key in values}


def _check_weights_before_data(config: TrainConfig) -> None:
    """Weights problems surface before any dataset is built or any file is written."""
    if config.model.weights == "imagenet":
        how = model_lib.check_imagenet_weights_available()
        logging.info("ImageNet weights %s", how)
    elif config.model.weights_path:
        # Loading into a throwaway base costs seconds and catches a wrong file before any output.
        model_lib.build_base(config.data.image_size, config.model)
        keras.backend.clear_session()


def _check_dataset(config: TrainConfig) -> dataset_info.DatasetInfo:
    """The dataset, read once, after its image size and splits are known to suit the run."""
    info = dataset_info.load(config.data.data_dir)
    info.require_image_size(config.data.image_size)
    for split in ("train", "val"):
        info.split(split)
        info.check_counts(split)  # class weights and steps come from these counts
    return info


def _check_batches_fit(config: TrainConfig, info: dataset_info.DatasetInfo, replicas: int) -> None:
    """The batch size of every stage to run against the train split."""
    num_train = info.num_examples("train")
    for stage in config.stage_configs:
        steps_per_epoch(config, stage, replicas, num_train)


def train_and_evaluate(config: TrainConfig, overwrite: bool = False,
                       on_epoch_end: Callable[[str, int], None] | None = None,
                       placement: distribute.Placement | None = None) -> dict[str, Any]:
    """Runs the configured stages in `config.model_dir` (resuming a killed run) and returns the
    val metrics of each stage's best model (also in metrics.json).

    Nothing is written until every check has passed; the chief locks the model dir for the whole
    run. on_epoch_end(stage, epoch) is called after each committed epoch. `placement` (the strategy
    and this process's place in it) is chosen from the config when not given; a multi-worker
    strategy must exist before any other TensorFlow op, so the CLI makes it first.
    """
    placement = placement or distribute.choose_placement(config.distribution, config.jit_compile)
    config = dataclasses.replace(config, model_dir=output_safety.canonical(config.model_dir))
    run_files.check_model_dir(config)
    info = _check_dataset(config)
    logging.info("Training stage(s) %s on %s (train %d, val %d images at %d px) into %s", ", ".join(config.stages),
                 config.data.data_dir, info.num_examples("train"), info.num_examples("val"), info.image_size,
                 config.model_dir)
    # Both checks build throwaway models and clear Keras' session, which resets the precision policy.
    _check_weights_before_data(config)
    if "finetune" in config.stages:  # under --train_base too: a name that matches no layer is a mistake there as well
        model_lib.check_fine_tune_at(config.model.fine_tune_at)
    precision_lib.set_precision_policy(config.mixed_precision)
    _check_batches_fit(config, info, placement.strategy.num_replicas_in_sync)
    with _model_dir_writer(config, placement):
        if placement.is_chief:
            run_files.prepare(config, info.fingerprint, overwrite=overwrite)
        placement.barrier("config.json written")
        keras.utils.set_random_seed(config.data.seed)
        if config.data.deterministic:
            tf.config.experimental.enable_op_determinism()
        class_weights = train_class_weights(config, info.class_counts("train"))
        results = {}
        for stage in config.stage_configs:
            results[stage.name] = run_stage(config, stage, placement, class_weights, info, on_epoch_end)
        if placement.is_chief:
            last_best = stage_paths(config.model_dir, config.stages[-1]).best_model
            atomic.copy_file(last_best, os.path.join(config.model_dir, run_files.FINAL_MODEL_FILE))
    return results


def _model_dir_writer(config: TrainConfig, placement: distribute.Placement):
    """The chief holds the model dir's lock for the run; the other workers take none (they share
    the model dir on one machine, and write only their scratch checkpoints)."""
    if not placement.is_chief:
        return contextlib.nullcontext()
    os.makedirs(os.path.dirname(config.model_dir), exist_ok=True)
    return locking.exclusive_lock(locking.lock_path_beside(config.model_dir), f"--model_dir={config.model_dir}",
                                  PROGRAM)
