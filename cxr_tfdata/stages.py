"""One transfer stage, epoch by epoch: the controller around loop.Loop.

Per epoch: the learning-rate decay, a pass over the train stream, validation, early stopping and
ReduceLROnPlateau (Keras' semantics, kept as plain state so they survive a restart), then the
commit. The commit writes, in order: a new best model under a pending name (when val_loss beat
the persisted best), history_<stage>.csv, the model and optimizer checkpoint of the epoch, and the
state file, which is the commit point; the pending best model is renamed into place last, and
`settle` finishes or drops that rename after a kill. Only the chief writes the model dir; under
several workers every worker takes part in saving the checkpoint (TensorFlow's multi-worker
rule), the others into a scratch folder they delete at once.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from cxr_tfdata import atomic, loop, run_dir, tables
from cxr_tfdata.config import StageConfig
from cxr_tfdata.run_dir import StagePaths

MONITOR = "val_loss"
# ReduceLROnPlateau's improvement margin (Keras' default); EarlyStopping uses none.
PLATEAU_MIN_DELTA = 1e-4
# A progress line within an epoch at most this often.
PROGRESS_SECONDS = 30.0


@dataclasses.dataclass
class EarlyStopping:
    """Keras' EarlyStopping(monitor=val_loss, patience) with restore_best_weights."""

    patience: int
    wait: int = 0
    best: float | None = None
    best_epoch: int = 0

    def should_stop(self, epoch: int, value: float) -> bool:
        self.wait += 1
        if self.best is None or value < self.best:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return False
        return self.wait >= self.patience and epoch > 0

    def state(self) -> dict[str, Any]:
        return {"wait": self.wait, "best": self.best, "best_epoch": self.best_epoch}


@dataclasses.dataclass
class PlateauReducer:
    """Keras' ReduceLROnPlateau(monitor=val_loss, patience, factor, min_lr), cooldown 0."""

    patience: int
    factor: float
    min_learning_rate: float
    wait: int = 0
    cooldown_counter: int = 0
    best: float | None = None

    def next_learning_rate(self, value: float, current: float) -> float:
        if self.best is None or value + PLATEAU_MIN_DELTA < self.best:
            self.best, self.wait = value, 0
            return current
        self.wait += 1
        if self.wait >= self.patience and current > np.float32(self.min_learning_rate):
            self.wait = 0
            return max(current * self.factor, self.min_learning_rate)
        return current

    def state(self) -> dict[str, Any]:
        return {"wait": self.wait, "cooldown_counter": self.cooldown_counter, "best": self.best}


def initial_state(stage: StageConfig) -> dict[str, Any]:
    return {
        "epochs_completed": 0,
        "completed": False,
        "stop_training": False,
        "best_val_loss": None,
        "best_epoch": None,
        "learning_rate": stage.learning_rate,
        "early_stopping": None,
        "reduce_lr": None,
        "checkpoint": None,
        "history": [],
    }


def history_csv_text(rows: Sequence[dict[str, Any]]) -> str:
    columns = ["epoch"] + sorted({key for row in rows for key in row} - {"epoch"})
    return tables.csv_text(columns, ([row.get(column, "") for column in columns] for row in rows))


def settle(paths: StagePaths, state: dict[str, Any]) -> None:
    """After a kill: renames in the pending best model of the committed best epoch, deletes any
    other pending model, and every checkpoint but the committed one."""
    committed = paths.pending_best_model(state["best_epoch"]) if state["best_epoch"] is not None else None
    for path in paths.pending_best_models():
        if path == committed:
            os.replace(path, paths.best_model)
            logging.info("Restored %s from the committed epoch %d", paths.best_model, state["best_epoch"] + 1)
        else:
            os.remove(path)
    keep = state.get("checkpoint")
    for prefix in paths.checkpoints():
        if os.path.basename(prefix) != keep:
            remove_checkpoint(prefix)


def remove_checkpoint(prefix: str) -> None:
    """Deletes the files of the tf.train.Checkpoint written at `prefix` (its .index and .data-*)."""
    for path in glob.glob(glob.escape(prefix) + ".*"):
        os.remove(path)


@dataclasses.dataclass
class Cluster:
    """Where this process stands among the workers (one process: the chief)."""

    is_chief: bool = True
    task_id: int = 0


class StageRunner:
    """Trains one stage to completion, or resumes it, writing the model dir as it goes."""

    def __init__(self, stage: StageConfig, paths: StagePaths, model: keras.Model, optimizer,
                 step_loop: loop.Loop, export_model: keras.Model, cluster: Cluster,
                 on_epoch_end: Callable[[str, int], None] | None = None):
        self.stage, self.paths = stage, paths
        self.model, self.optimizer, self.loop = model, optimizer, step_loop
        self.export_model, self.cluster = export_model, cluster
        self.on_epoch_end = on_epoch_end
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self.state = initial_state(stage)
        self.best_weights: list[np.ndarray] | None = None

    # Resume --------------------------------------------------------------------------------

    def resume(self, state: dict[str, Any]) -> None:
        """Loads a committed epoch: model and optimizer checkpoint, learning rate, best weights."""
        self.state = state
        if state["epochs_completed"] == 0:
            return
        prefix = os.path.join(os.path.dirname(self.paths.state), state["checkpoint"])
        self.checkpoint.read(prefix).assert_existing_objects_matched()
        loop.set_learning_rate(self.optimizer, state["learning_rate"])
        if os.path.exists(self.paths.best_model):
            self.best_weights = keras.saving.load_model(self.paths.best_model, compile=False,
                                                        safe_mode=True).get_weights()
        logging.info("Resuming stage %s after epoch %d (lr %g) from %s", self.stage.name,
                     state["epochs_completed"], state["learning_rate"], prefix)

    # Epochs --------------------------------------------------------------------------------

    def run(self, train_iterator, steps: int, val_dataset, val_steps: int, images_per_step: int) -> None:
        stopping = EarlyStopping(self.stage.early_stopping_patience, **(self.state["early_stopping"] or {}))
        plateau = PlateauReducer(self.stage.reduce_lr_patience, self.stage.reduce_lr_factor,
                                 self.stage.min_learning_rate, **(self.state["reduce_lr"] or {}))
        durations = []
        for epoch in range(self.state["epochs_completed"], self.stage.epochs):
            if self.state["stop_training"]:
                break
            if epoch > 0 and self.stage.lr_decay_per_epoch != 1.0:
                loop.set_learning_rate(self.optimizer, loop.learning_rate(self.optimizer) * self.stage.lr_decay_per_epoch)
            started = time.monotonic()
            logs = self._train_and_validate(epoch, train_iterator, steps, val_dataset, val_steps, images_per_step)
            stop = stopping.should_stop(epoch, logs[MONITOR])
            new_lr = plateau.next_learning_rate(logs[MONITOR], logs["learning_rate"])
            if new_lr != logs["learning_rate"]:
                logging.info("Epoch %d: ReduceLROnPlateau lowers the learning rate to %g", epoch + 1, new_lr)
                loop.set_learning_rate(self.optimizer, new_lr)
            self._commit(epoch, logs, stop, stopping, plateau)
            durations.append(time.monotonic() - started)
            self._log_epoch(epoch, logs, durations)
            if self.on_epoch_end is not None:
                self.on_epoch_end(self.stage.name, epoch)
            if stop:
                logging.info("Epoch %d: early stopping (val_loss did not improve for %d epochs)",
                             epoch + 1, self.stage.early_stopping_patience)

    def _train_and_validate(self, epoch, train_iterator, steps, val_dataset, val_steps, images_per_step):
        started = time.monotonic()
        last_line = [started]

        def progress(done: int) -> None:
            now = time.monotonic()
            if now - last_line[0] >= PROGRESS_SECONDS and done < steps:
                last_line[0] = now
                rate = done * images_per_step / (now - started)
                eta = (steps - done) * images_per_step / max(rate, 1e-9)
                logging.info("Stage %s epoch %d: step %d/%d, %.1f images/s, epoch ETA %s", self.stage.name,
                             epoch + 1, done, steps, rate, _clock(eta))

        learning_rate = loop.learning_rate(self.optimizer)
        train = self.loop.train(train_iterator, steps, progress)
        train_seconds = time.monotonic() - started
        val = self.loop.evaluate(val_dataset, val_steps)
        logs = {**train, **{f"val_{key}": value for key, value in val.items()}}
        logs.update(learning_rate=learning_rate, epoch_seconds=time.monotonic() - started,
                    train_images_per_second=steps * images_per_step / max(train_seconds, 1e-9))
        return logs

    def _commit(self, epoch: int, logs: dict[str, float], stop: bool, stopping: EarlyStopping,
                plateau: PlateauReducer) -> None:
        val_loss = logs[MONITOR]
        best = self.state["best_val_loss"]
        improved = best is None or val_loss < best
        if improved:
            self.best_weights = self.model.get_weights()
            if self.cluster.is_chief:
                self.export_model.set_weights(self.best_weights)
                atomic.write_with(self.paths.pending_best_model(epoch), self.export_model.save, suffix=".keras")
            self.state.update(best_val_loss=val_loss, best_epoch=epoch)
        self.state["history"].append({"epoch": epoch, **logs})
        previous_checkpoint = self.state["checkpoint"]
        self.state.update(
            epochs_completed=epoch + 1, stop_training=stop, learning_rate=loop.learning_rate(self.optimizer),
            early_stopping=stopping.state(), reduce_lr=plateau.state(),
            checkpoint=self._save_checkpoint(epoch))
        if self.cluster.is_chief:
            atomic.write_text(self.paths.history_csv, history_csv_text(self.state["history"]))
            atomic.write_json(self.paths.state, self.state)  # the commit point
            if improved:
                os.replace(self.paths.pending_best_model(epoch), self.paths.best_model)
                logging.info("Stage %s epoch %d: new best val_loss %.5f, saved %s", self.stage.name, epoch + 1,
                             val_loss, self.paths.best_model)
            if previous_checkpoint:
                self._remove_checkpoint(previous_checkpoint)
        self._write_summaries(epoch, logs)

    def _save_checkpoint(self, epoch: int) -> str:
        """Writes model + optimizer (every worker: the chief into checkpoints/, the others into a
        scratch folder removed at once); returns the checkpoint's name."""
        name = self.paths.checkpoint_name(epoch)
        if self.cluster.is_chief:
            self.checkpoint.write(os.path.join(os.path.dirname(self.paths.state), name))
        else:
            scratch = self.paths.worker_scratch(self.cluster.task_id)
            self.checkpoint.write(os.path.join(scratch, name))
            shutil.rmtree(scratch, ignore_errors=True)
        return name

    def _remove_checkpoint(self, name: str) -> None:
        remove_checkpoint(os.path.join(os.path.dirname(self.paths.state), name))

    def _write_summaries(self, epoch: int, logs: dict[str, float]) -> None:
        if not self.cluster.is_chief:
            return
        for part, prefix in (("train", ""), ("validation", "val_")):
            writer = tf.summary.create_file_writer(os.path.join(self.paths.log_dir, part))
            with writer.as_default(step=epoch):
                for key in ("loss", "accuracy", "precision", "recall", "auc"):
                    if prefix + key in logs:
                        tf.summary.scalar(f"epoch_{key}", logs[prefix + key])
                if part == "train":
                    tf.summary.scalar("epoch_learning_rate", logs["learning_rate"])
            writer.close()

    def _log_epoch(self, epoch: int, logs: dict[str, float], durations: list[float]) -> None:
        remaining = self.stage.epochs - epoch - 1
        eta = f"; at most {remaining} more epoch(s), ETA {_clock(remaining * float(np.mean(durations)))}" if remaining else ""
        logging.info(
            "Stage %s epoch %d/%d: %.1f s, %.1f images/s; loss %.4f, auc %.4f; val_loss %.4f, val_auc %.4f, "
            "val_recall %.4f; lr %.3g%s", self.stage.name, epoch + 1, self.stage.epochs, logs["epoch_seconds"],
            logs["train_images_per_second"], logs["loss"], logs["auc"], logs["val_loss"], logs["val_auc"],
            logs["val_recall"], logs["learning_rate"], eta)

    # End of stage --------------------------------------------------------------------------

    def finish(self, val_dataset, val_steps: int, steps: int, seconds: float,
               seal: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """The best epoch's weights back in the model, their val metrics, then (chief only) `seal`
        (which stores the operating threshold and calibration in the best model and returns them for
        the metrics), then the stage marked complete. Sealing comes after the evaluation every worker
        takes part in, so no worker waits in a collective while the chief seals; a run killed before
        the stage is marked complete seals again when resumed."""
        if self.best_weights is None:
            raise FileNotFoundError(f"{self.paths.best_model} not found: no epoch of stage {self.stage.name} "
                                    f"completed")
        self.model.set_weights(self.best_weights)
        metrics = {f"val_{key}": value for key, value in self.loop.evaluate(val_dataset, val_steps).items()}
        metrics.update(best_epoch=self.state["best_epoch"], epochs_run=self.state["epochs_completed"],
                       steps_per_epoch=steps, seconds_this_run=round(seconds, 1))
        if self.cluster.is_chief and seal is not None:
            metrics.update(seal())
        # Every worker logs the digest of the weights it ends with: equal digests, equal models.
        logging.info("Stage %s done: best epoch %d, val_loss %.5f, weights %s", self.stage.name,
                     self.state["best_epoch"] + 1, metrics["val_loss"], weights_digest(self.best_weights))
        self.state["completed"] = True
        if self.cluster.is_chief:
            run_dir.record_stage_metrics(os.path.dirname(self.paths.best_model), self.stage.name, metrics)
            atomic.write_json(self.paths.state, self.state)
        return metrics


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """sha256 of a model's weights, in order: the same on every worker of a synchronous run."""
    digest = hashlib.sha256()
    for array in weights:
        digest.update(np.ascontiguousarray(array).tobytes())
    return f"sha256:{digest.hexdigest()[:16]}"


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
