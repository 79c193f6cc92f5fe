"""train_and_evaluate(config): both ResNet50V2 transfer stages, their callbacks, checkpoints and resume.

The model dir's files, config.json and the resume checks are `run_dir`'s; every file is written
through `atomic`. Resume: the per-epoch checkpoint holds the model and optimizer variables (Keras
`save_weights` includes the optimizer of a compiled model); the state file holds the epoch, the
best val_loss, the EarlyStopping and ReduceLROnPlateau counters and the learning rate, which
Keras' own BackupAndRestore does not keep. A restarted run reloads both and continues at the next
epoch; the best model is only replaced when val_loss improves on the persisted best, and only
once the state file that records that epoch as the best is written (a kill in between is settled
on restart). Everything that can be checked before training (weights, dataset, batch sizes,
--fine_tune_at, the model dir) is checked before config.json is written and the first step runs.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from cxr_tfdata import atomic, features, input_pipeline, locking, outputs, run_dir
from cxr_tfdata import model as model_lib
from cxr_tfdata import precision as precision_lib
from cxr_tfdata.config import StageConfig, TrainConfig
from cxr_tfdata.run_dir import StagePaths, stage_paths

MONITOR = "val_loss"
PROGRAM = "cxr-train"


def save_model_atomic(model: keras.Model, path: str) -> None:
    atomic.write_with(path, model.save, suffix=".keras")


def save_weights_atomic(model: keras.Model, path: str) -> None:
    atomic.write_with(path, model.save_weights, suffix=".weights.h5")


def initial_stage_state(stage: StageConfig) -> dict[str, Any]:
    return {
        "epochs_completed": 0,
        "completed": False,
        "stop_training": False,
        "best_val_loss": None,
        "best_epoch": None,
        "learning_rate": stage.learning_rate,
        "early_stopping": None,
        "reduce_lr": None,
        "history": [],
    }


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose counters (and best weights) survive a restart."""

    def __init__(self, *args, initial_state=None, initial_best_weights=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._initial_state = initial_state
        self._initial_best_weights = initial_best_weights

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._initial_state:
            self.wait = self._initial_state["wait"]
            self.best = self._initial_state["best"]
            self.best_epoch = self._initial_state["best_epoch"]
            self.best_weights = self._initial_best_weights

    def get_state(self) -> dict[str, Any]:
        best = None if self.best is None else float(self.best)
        return {"wait": int(self.wait), "best": best, "best_epoch": int(self.best_epoch)}


class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose wait/cooldown/best survive a restart (the LR lives in the optimizer)."""

    def __init__(self, *args, initial_state=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._initial_state = initial_state

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._initial_state:
            self.wait = self._initial_state["wait"]
            self.cooldown_counter = self._initial_state["cooldown_counter"]
            self.best = self._initial_state["best"]

    def get_state(self) -> dict[str, Any]:
        best = None if self.best is None else float(self.best)
        return {"wait": int(self.wait), "cooldown_counter": int(self.cooldown_counter), "best": best}


class EpochLearningRateDecay(keras.callbacks.Callback):
    """Multiplies the LR by `rate` at the start of every epoch after the first.

    The notebook's exponential decay, expressed per epoch and relative to the current LR, so that
    ReduceLROnPlateau (which needs a settable float LR, not a LearningRateSchedule) can still
    lower the same LR and both effects compound. Resume-safe: the LR at the end of the last
    completed epoch is restored, and the next epoch applies its decay once.
    """

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def on_epoch_begin(self, epoch, logs=None):
        if epoch > 0 and self.rate != 1.0:
            optimizer = self.model.optimizer
            optimizer.learning_rate = float(optimizer.learning_rate) * self.rate


class EpochTimer(keras.callbacks.Callback):
    """Adds epoch_seconds and train_images_per_second (training steps only, no validation) to the logs."""

    def __init__(self, images_per_step: int, steps_per_epoch: int):
        super().__init__()
        self.images_per_epoch = images_per_step * steps_per_epoch
        self._epoch_start = self._train_end = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.monotonic()
        self._train_end = 0.0

    def on_test_begin(self, logs=None):
        self._train_end = self._train_end or time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        train_seconds = (self._train_end or now) - self._epoch_start
        if logs is not None:
            logs["epoch_seconds"] = now - self._epoch_start
            logs["train_images_per_second"] = self.images_per_epoch / max(train_seconds, 1e-9)


def _learning_rate(model: keras.Model) -> float:
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


class StageCheckpoint(keras.callbacks.Callback):
    """At each epoch end: the new best model (if val_loss improved on the persisted best) to a
    pending name, history CSV, last weights (model + optimizer), the state file, and then the
    pending best model renamed into place. The state file is the commit point: a kill before it
    costs at most the epoch being saved, and `settle_pending_best` finishes or drops the rename
    on restart, so the best model always belongs to the state's best epoch."""

    def __init__(self, paths: StagePaths, state: dict[str, Any], early_stopping, reduce_lr,
                 export_model: keras.Model | None = None):
        super().__init__()
        # An uncompiled float32 twin of the model: best-model files then hold no optimizer state
        # (less than half the size in the finetune stage), load anywhere with compile=False and
        # compute in float32 whatever policy trained them.
        self.export_model = export_model
        self.paths = paths
        self.state = state
        self.early_stopping = early_stopping
        self.reduce_lr = reduce_lr

    def on_epoch_end(self, epoch, logs=None):
        logs = {key: float(value) for key, value in (logs or {}).items()}
        val_loss = logs.get(MONITOR)
        if val_loss is None:
            raise ValueError(f"no {MONITOR} in the epoch logs {sorted(logs)}: validation did not run")
        best = self.state["best_val_loss"]
        improved = best is None or val_loss < best
        if improved:
            if self.export_model is not None:
                self.export_model.set_weights(self.model.get_weights())
            save_model_atomic(self.export_model or self.model, self.paths.pending_best_model(epoch))
            self.state["best_val_loss"] = val_loss
            self.state["best_epoch"] = epoch
        self.state["history"].append({"epoch": epoch, **logs})
        atomic.write_text(self.paths.history_csv, history_csv_text(self.state["history"]))
        save_weights_atomic(self.model, self.paths.last_weights)
        self.state.update(
            epochs_completed=epoch + 1,
            stop_training=bool(self.model.stop_training),
            learning_rate=_learning_rate(self.model),
            early_stopping=self.early_stopping.get_state(),
            reduce_lr=self.reduce_lr.get_state(),
        )
        atomic.write_json(self.paths.state, self.state)
        if improved:
            os.replace(self.paths.pending_best_model(epoch), self.paths.best_model)
            logging.info("Epoch %d: val_loss %.5f improved on %s, saved %s", epoch + 1, val_loss, best,
                         self.paths.best_model)


def settle_pending_best(paths: StagePaths, state: dict[str, Any]) -> None:
    """After a kill between the state file and the best model's rename: renames in the pending
    best model of the state's committed best epoch, and deletes any other (uncommitted) one."""
    committed = paths.pending_best_model(state["best_epoch"]) if state["best_epoch"] is not None else None
    for path in paths.pending_best_models():
        if path == committed:
            os.replace(path, paths.best_model)
            logging.info("Restored %s from the committed epoch %d", paths.best_model, state["best_epoch"] + 1)
        else:
            os.remove(path)


def history_csv_text(rows: Sequence[dict[str, Any]]) -> str:
    columns = ["epoch"] + sorted({key for row in rows for key in row} - {"epoch"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def stage_callbacks(
    stage: StageConfig, paths: StagePaths, state: dict[str, Any], best_weights=None,
    export_model: keras.Model | None = None, images_per_step: int = 0, steps_per_epoch: int = 0,
) -> list[keras.callbacks.Callback]:
    """EarlyStopping and ReduceLROnPlateau before the checkpoint, so it records their new state."""
    early_stopping = ResumableEarlyStopping(
        monitor=MONITOR, patience=stage.early_stopping_patience, restore_best_weights=True,
        verbose=1, initial_state=state["early_stopping"], initial_best_weights=best_weights,
    )
    reduce_lr = ResumableReduceLROnPlateau(
        monitor=MONITOR, patience=stage.reduce_lr_patience, factor=stage.reduce_lr_factor,
        min_lr=stage.min_learning_rate, verbose=1, initial_state=state["reduce_lr"],
    )
    return [
        EpochTimer(images_per_step, steps_per_epoch),
        EpochLearningRateDecay(stage.lr_decay_per_epoch),
        early_stopping,
        reduce_lr,
        StageCheckpoint(paths, state, early_stopping, reduce_lr, export_model),
        *_tensorboard(paths.log_dir),
    ]


def _tensorboard(log_dir: str) -> list[keras.callbacks.Callback]:
    # TensorFlow >= 2.20 no longer installs TensorBoard; training must not depend on it.
    if importlib.util.find_spec("tensorboard") is None:
        logging.warning("TensorBoard is not installed (pip install tensorboard): no logs in %s", log_dir)
        return []
    return [keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False, profile_batch=0)]


def _with_sample_weights(dataset: tf.data.Dataset, class_weights: dict[int, float]) -> tf.data.Dataset:
    """Class weights as per-example sample weights (works for distributed datasets too)."""
    table = tf.constant([class_weights[i] for i in range(len(class_weights))], tf.float32)

    def add_weights(images, labels):
        return images, labels, tf.gather(table, tf.cast(labels, tf.int32))

    return dataset.map(add_weights, num_parallel_calls=tf.data.AUTOTUNE)


def train_class_weights(config: TrainConfig, class_counts: dict[str, int]) -> dict[int, float] | None:
    """The loss weights that correct the train split's class imbalance, or None with balanced sampling.

    Balanced sampling already draws both classes equally; weighting the loss as well would
    correct the imbalance twice and bias the model towards the rarer class.
    """
    if config.data.balanced_sampling:
        logging.info("Class imbalance corrected by balanced sampling (train counts %s); no class weights",
                     class_counts)
        return None
    class_weights = input_pipeline.class_weights_from_counts(class_counts)
    logging.info("Class imbalance corrected by class weights %s from train counts %s", class_weights,
                 class_counts)
    return class_weights


def steps_per_epoch(config: TrainConfig, stage: StageConfig, replicas: int, num_train: int,
                    num_val: int) -> int:
    """Train steps per epoch; a batch that the splits cannot fill is an error naming its flag."""
    global_batch = stage.batch_size * replicas
    where = f"{replicas} replica(s) = {global_batch}"
    if num_train < global_batch:
        raise ValueError(f"--{stage.name}_batch_size={stage.batch_size} x {where} is more than the "
                         f"{num_train} train examples in {config.data.data_dir}")
    if replicas > 1 and num_val < global_batch:
        # Keras builds the model from the first val batch, which must be a whole global batch.
        raise ValueError(f"--{stage.name}_batch_size={stage.batch_size} x {where} is more than the "
                         f"{num_val} val examples in {config.data.data_dir}: with several replicas val "
                         f"must hold one global batch")
    steps = num_train // global_batch
    return min(steps, config.steps_per_epoch) if config.steps_per_epoch else steps


def make_datasets(config: TrainConfig, stage: StageConfig, strategy: tf.distribute.Strategy,
                  class_weights: dict[int, float] | None):
    """(distributed train dataset repeating forever, val dataset, steps per epoch).

    With class_weights the train batches carry them as per-example sample weights.
    """
    replicas = strategy.num_replicas_in_sync
    global_batch = stage.batch_size * replicas
    num_train = input_pipeline.split_num_examples(config.data.data_dir, "train")
    num_val = input_pipeline.split_num_examples(config.data.data_dir, "val")
    steps = steps_per_epoch(config, stage, replicas, num_train, num_val)
    augment = config.augment if config.augment.placement == "cpu" else None

    def train_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = input_context.get_per_replica_batch_size(global_batch)
        dataset = input_pipeline.create_dataset(
            config.data, "train", per_replica, training=True, augment=augment,
            input_context=input_context, repeat=True,
        )
        return dataset if class_weights is None else _with_sample_weights(dataset, class_weights)

    train = strategy.distribute_datasets_from_function(train_fn)
    # Val keeps its last partial batch; Keras splits each global batch over the replicas itself.
    # (Keras 3 builds the model from the first val batch, so with several replicas the val split
    # must hold at least one full global batch.) A known length spares Keras a run-out warning.
    val = input_pipeline.create_dataset(config.data, "val", global_batch, training=False).apply(
        tf.data.experimental.assert_cardinality(-(-num_val // global_batch)))
    logging.info("Stage %s: global batch %d (%d x %d replicas), %d steps per epoch",
                 stage.name, global_batch, stage.batch_size, replicas, steps)
    return train, val, steps


def compile_for_stage(model: keras.Model, stage: StageConfig, config: TrainConfig) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=stage.learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.AUC(name="auc"),
        ],
        jit_compile=config.jit_compile,
    )


def _load_model_weights(path: str, what: str) -> list:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {what}")
    return keras.saving.load_model(path, compile=False, safe_mode=True).get_weights()


def _stage_architecture(config: TrainConfig, stage: StageConfig) -> keras.Model:
    model = model_lib.build_model(
        config.data.image_size, config.model, config.augment,
        head_batch_norm=stage.name == "finetune", seed=config.data.seed,
    )
    model_lib.configure_trainable(model, stage.name, config.model)
    return model


def build_stage_model(config: TrainConfig, stage: StageConfig, state: dict[str, Any],
                      paths: StagePaths) -> keras.Model:
    """The stage's model, compiled; from its last checkpoint when resuming, else from its start
    point (random/ImageNet base for frozen, the frozen stage's best model for finetune)."""
    model = _stage_architecture(config, stage)
    if stage.name == "finetune" and state["epochs_completed"] == 0:
        frozen_best = stage_paths(config.model_dir, "frozen").best_model
        if not os.path.exists(frozen_best):
            raise FileNotFoundError(
                f"{frozen_best} not found: the finetune stage starts from the frozen stage's best "
                f"model; run --stage=frozen (or --stage=both) with this --model_dir first"
            )
        source = keras.saving.load_model(frozen_best, compile=False, safe_mode=True)
        model_lib.transfer_weights(source, model)
    compile_for_stage(model, stage, config)
    if state["epochs_completed"] > 0:
        model.optimizer.build(model.trainable_variables)
        model.load_weights(paths.last_weights)
        model.optimizer.learning_rate = state["learning_rate"]
        logging.info("Resuming stage %s after epoch %d (lr %g) from %s", stage.name,
                     state["epochs_completed"], state["learning_rate"], paths.last_weights)
    return model


def run_stage(config: TrainConfig, stage: StageConfig, strategy: tf.distribute.Strategy,
              class_weights: dict[int, float] | None, extra_callbacks=()) -> dict[str, float]:
    """Trains one stage to completion (or resumes it) and returns its best model's val metrics."""
    paths = stage_paths(config.model_dir, stage.name)
    state = run_dir.read_json(paths.state) if os.path.exists(paths.state) else initial_stage_state(stage)
    settle_pending_best(paths, state)
    if state["completed"]:
        logging.info("Stage %s already completed in %s; not rerun", stage.name, config.model_dir)
        return run_dir.read_json(os.path.join(config.model_dir, run_dir.METRICS_FILE))[stage.name]
    train, val, steps = make_datasets(config, stage, strategy, class_weights)
    with strategy.scope():
        model = build_stage_model(config, stage, state, paths)
    best_weights = None
    if state["early_stopping"] is not None:
        best_weights = _load_model_weights(paths.best_model, "the best model of the resumed stage")
    # Saved models compute in float32: a file that kept the training policy would run evaluation,
    # prediction and export in bfloat16/float16 on every machine. Variables are float32 under
    # either policy, so the weights copy over exactly.
    with precision_lib.global_policy_scope("float32"):
        export_model = _stage_architecture(config, stage)
    global_batch = stage.batch_size * strategy.num_replicas_in_sync
    callbacks = stage_callbacks(stage, paths, state, best_weights, export_model, global_batch, steps)
    callbacks += list(extra_callbacks)
    started = time.monotonic()
    if not state["stop_training"] and state["epochs_completed"] < stage.epochs:
        # A corrupt shard stops fit with the pipeline's InvalidArgumentError naming the shard.
        model.fit(
            train, validation_data=val, epochs=stage.epochs, initial_epoch=state["epochs_completed"],
            steps_per_epoch=steps, callbacks=callbacks, verbose=2, shuffle=False,  # tf.data shuffles
        )
        # EarlyStopping(restore_best_weights) has put the best epoch's weights back.
    else:
        model.set_weights(_load_model_weights(paths.best_model, "no epoch of this stage completed"))
    results = model.evaluate(val, return_dict=True, verbose=0)
    metrics = {f"val_{key}": float(value) for key, value in results.items()}
    metrics.update(best_epoch=state["best_epoch"], epochs_run=state["epochs_completed"],
                   steps_per_epoch=steps, seconds_this_run=round(time.monotonic() - started, 1))
    run_dir.record_stage_metrics(config.model_dir, stage.name, metrics)
    state["completed"] = True
    atomic.write_json(paths.state, state)
    return metrics


def _check_weights_before_data(config: TrainConfig) -> None:
    """Weights problems surface before any dataset is built or any file is written."""
    if config.model.weights == "imagenet":
        how = model_lib.check_imagenet_weights_available()
        logging.info("ImageNet weights %s", how)
    elif config.model.weights_path:
        # Loading into a throwaway base costs seconds and catches a wrong file before any output.
        model_lib.build_base(config.data.image_size, config.model)
        keras.backend.clear_session()


def _check_dataset(config: TrainConfig) -> dict[str, Any]:
    """The dataset's manifest, once its image size and splits are known to suit the run."""
    manifest = features.read_manifest(config.data.data_dir)
    if int(manifest["image_size"]) != config.data.image_size:
        raise ValueError(
            f"--image_size={config.data.image_size}: the dataset in {config.data.data_dir} holds "
            f"{manifest['image_size']}x{manifest['image_size']} images; pass that size or rebuild the "
            f"dataset with cxr-build-tfrecords --image_size={config.data.image_size}"
        )
    for split in ("train", "val"):
        features.split_info(manifest, split, config.data.data_dir)
    return manifest


def _check_batches_fit(config: TrainConfig, manifest: dict[str, Any], replicas: int) -> None:
    """The batch size of every stage to run against the splits."""
    num_train, num_val = (int(manifest["splits"][split]["num_examples"]) for split in ("train", "val"))
    for name in config.stages:
        steps_per_epoch(config, config.frozen if name == "frozen" else config.finetune, replicas,
                        num_train, num_val)


def train_and_evaluate(config: TrainConfig, overwrite: bool = False,
                       extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict[str, Any]:
    """Runs the configured stages in `config.model_dir` (resuming a killed run) and returns the
    val metrics of each stage's best model (also in metrics.json).

    Nothing is written until every check has passed; the model dir is locked for the whole run.
    """
    config = dataclasses.replace(config, model_dir=outputs.canonical(config.model_dir))
    run_dir.check_model_dir(config)
    manifest = _check_dataset(config)
    # Both checks build throwaway models and clear Keras' session, which resets the precision policy.
    _check_weights_before_data(config)
    if "finetune" in config.stages and not config.model.train_base:
        model_lib.check_fine_tune_at(config.model.fine_tune_at)
    precision_lib.set_precision_policy(config.mixed_precision)
    strategy = precision_lib.choose_strategy(config.distribution)
    _check_batches_fit(config, manifest, strategy.num_replicas_in_sync)
    os.makedirs(os.path.dirname(config.model_dir), exist_ok=True)
    with locking.exclusive_lock(locking.lock_path_beside(config.model_dir),
                                f"--model_dir={config.model_dir}", PROGRAM):
        run_dir.prepare(config, features.manifest_fingerprint(manifest), overwrite=overwrite)
        keras.utils.set_random_seed(config.data.seed)
        if config.data.deterministic:
            tf.config.experimental.enable_op_determinism()
        counts = features.split_info(manifest, "train", config.data.data_dir)["class_counts"]
        class_weights = train_class_weights(config, counts)
        results = {}
        for name in config.stages:
            stage = config.frozen if name == "frozen" else config.finetune
            results[name] = run_stage(config, stage, strategy, class_weights, extra_callbacks)
        last_best = stage_paths(config.model_dir, config.stages[-1]).best_model
        atomic.copy_file(last_best, os.path.join(config.model_dir, run_dir.FINAL_MODEL_FILE))
    return results
