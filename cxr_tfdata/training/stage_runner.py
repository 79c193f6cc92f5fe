"""One transfer stage, epoch by epoch: the controller around replica_steps.Loop.

Per epoch: the learning-rate decay, a pass over the train stream, validation, early stopping and
ReduceLROnPlateau (Keras' semantics, kept as plain state so they survive a restart), then the
commit. The commit writes, in order: a new best model under a pending name (when val_loss beat
the persisted best), history_<stage>.csv, the model and optimizer checkpoint of the epoch, and the
state file, which is the commit point; the pending best model is renamed into place last, and
`settle` finishes or drops that rename after a kill. Only the chief writes the model dir; under
several workers every worker takes part in saving the checkpoint (TensorFlow's multi-worker
rule), the others into a scratch folder they delete at once. Only files the run recorded writing
(the ledgers of run_files) are ever deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from cxr_tfdata.core.config import StageConfig
from cxr_tfdata.core.runner import Preempted, StopRequest, step_boundary_stops
from cxr_tfdata.files import atomic, table_cells
from cxr_tfdata.training import replica_steps, run_files, run_ledger
from cxr_tfdata.training.run_files import StagePaths

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
        # {"name", "identity"} of the best epoch's model as written under its pending name (see settle).
        "pending_best_model": None,
        "history": [],
        # Set by a preemption (SIGTERM): {"epoch", "steps_done", "steps", "train_sums"} of the epoch
        # the checkpoint stopped inside; the rerun runs its remaining steps.
        "mid_epoch": None,
    }


def history_csv_text(rows: Sequence[dict[str, Any]]) -> str:
    columns = ["epoch"] + sorted({key for row in rows for key in row} - {"epoch"})
    return table_cells.csv_text(columns, ([row.get(column, "") for column in columns] for row in rows))


def settle(paths: StagePaths, state: dict[str, Any]) -> None:
    """After a kill: renames in the pending best model of the committed best epoch (when the file
    under its name is still the one the run wrote), deletes the other pending models the run
    recorded writing, and every recorded checkpoint but the committed one. A file merely named like
    a pending model or a checkpoint is never touched."""
    pending = state.get("pending_best_model")
    committed = pending.get("name") if isinstance(pending, dict) else None
    if committed is not None and run_ledger.is_plain_name(committed):
        path = os.path.join(paths.checkpoint_dir, committed)
        if pending.get("identity") is not None and run_ledger.file_identity(path) == pending["identity"]:
            os.replace(path, paths.best_model)
            logging.info("Restored %s from the committed epoch %d", paths.best_model, state["best_epoch"] + 1)
    elif "pending_best_model" not in state:
        _settle_older_run(paths, state)
    recorded = tuple(paths.recorded_pending_models())
    for name in recorded:  # uncommitted: written before a kill ended the epoch
        path = os.path.join(paths.checkpoint_dir, name)
        if name != committed and run_ledger.file_identity(path) is not None:
            os.remove(path)
    if recorded:
        paths.record_pending_models(remove=recorded)
    keep = state.get("checkpoint")
    dropped = tuple(name for name in paths.recorded_checkpoints() if name != keep)
    for name in dropped:  # only checkpoints the run recorded writing: a file named like one is not ours
        remove_checkpoint(os.path.join(paths.checkpoint_dir, name))
    if dropped:
        paths.record_checkpoints(remove=dropped)


def _settle_older_run(paths: StagePaths, state: dict[str, Any]) -> None:
    """A state file of an older version, which kept no record of its pending best models: the
    committed epoch's model is copied into place (a kill between its commit and its rename leaves it
    only there), and no such file is deleted, since a name is not ownership."""
    named = sorted(paths.pending_best_models())
    committed = paths.pending_best_model(state["best_epoch"]) if state.get("best_epoch") is not None else None
    if committed in named and not state.get("completed") and run_ledger.file_identity(committed) is not None:
        atomic.copy_file(committed, paths.best_model)
        logging.warning("Restored %s from %s, the committed epoch %d's model of a run of an older version",
                        paths.best_model, committed, state["best_epoch"] + 1)
    if named:
        logging.warning("Left %s in place: a run of an older version kept no record of the pending best "
                        "models it wrote, so these may not be its own; delete them yourself if they are",
                        ", ".join(named))


def remove_checkpoint(prefix: str) -> None:
    """Deletes the files of the tf.train.Checkpoint written at `prefix` (its .index and .data-*,
    by their exact names)."""
    for path in run_ledger.checkpoint_files_at(os.path.dirname(prefix), os.path.basename(prefix)):
        os.remove(path)


@dataclasses.dataclass
class Cluster:
    """Where this process stands among the workers (one process: the chief)."""

    is_chief: bool = True
    task_id: int = 0
    # True when the flag is true on any worker (a collective under several workers).
    any_worker: Callable[[bool], bool] = bool


class StageRunner:
    """Trains one stage to completion, or resumes it, writing the model dir as it goes."""

    def __init__(self, stage: StageConfig, paths: StagePaths, model: keras.Model, optimizer,
                 step_loop: replica_steps.Loop, export_model: keras.Model, cluster: Cluster,
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
        mid = state.get("mid_epoch")
        if state["epochs_completed"] == 0 and not mid:
            return
        prefix = os.path.join(os.path.dirname(self.paths.state), state["checkpoint"])
        self.checkpoint.read(prefix).assert_existing_objects_matched()
        replica_steps.set_learning_rate(self.optimizer, state["learning_rate"])
        if os.path.exists(self.paths.best_model):
            self.best_weights = keras.saving.load_model(self.paths.best_model, compile=False,
                                                        safe_mode=True).get_weights()
        if mid:
            logging.info("Resuming stage %s at epoch %d step %d of %d (lr %g) from %s", self.stage.name,
                         mid["epoch"] + 1, mid["steps_done"], mid["steps"], state["learning_rate"], prefix)
            return
        logging.info("Resuming stage %s after epoch %d (lr %g) from %s", self.stage.name,
                     state["epochs_completed"], state["learning_rate"], prefix)

    # Epochs --------------------------------------------------------------------------------

    def run(self, train_iterator, steps: int, val_dataset, val_steps: int, images_per_step: int) -> None:
        stopping = EarlyStopping(self.stage.early_stopping_patience, **(self.state["early_stopping"] or {}))
        plateau = PlateauReducer(self.stage.reduce_lr_patience, self.stage.reduce_lr_factor,
                                 self.stage.min_learning_rate, **(self.state["reduce_lr"] or {}))
        with step_boundary_stops() as request:  # SIGTERM: save at the next step boundary, then stop
            self._epochs(request, train_iterator, steps, val_dataset, val_steps, images_per_step, stopping, plateau)

    def _epochs(self, request: StopRequest, train_iterator, steps, val_dataset, val_steps, images_per_step,
                stopping: EarlyStopping, plateau: PlateauReducer) -> None:
        durations = []
        for epoch in range(self.state["epochs_completed"], self.stage.epochs):
            if self.state["stop_training"]:
                break
            mid = self.state.get("mid_epoch") if (self.state.get("mid_epoch") or {}).get("epoch") == epoch else None
            if epoch > 0 and self.stage.lr_decay_per_epoch != 1.0 and mid is None:  # a resumed epoch had its decay
                replica_steps.set_learning_rate(self.optimizer, replica_steps.learning_rate(self.optimizer) * self.stage.lr_decay_per_epoch)
            started = time.monotonic()
            logs = self._train_and_validate(epoch, train_iterator, steps, val_dataset, val_steps, images_per_step,
                                            mid, request)
            stop = stopping.should_stop(epoch, logs[MONITOR])
            new_lr = plateau.next_learning_rate(logs[MONITOR], logs["learning_rate"])
            if new_lr != logs["learning_rate"]:
                logging.info("Epoch %d: ReduceLROnPlateau lowers the learning rate to %g", epoch + 1, new_lr)
                replica_steps.set_learning_rate(self.optimizer, new_lr)
            self._commit(epoch, logs, stop, stopping, plateau)
            durations.append(time.monotonic() - started)
            self._log_epoch(epoch, logs, durations)
            if self.on_epoch_end is not None:
                self.on_epoch_end(self.stage.name, epoch)
            if stop:
                logging.info("Epoch %d: early stopping (val_loss did not improve for %d epochs)",
                             epoch + 1, self.stage.early_stopping_patience)
            if self.cluster.any_worker(request.pending):  # SIGTERM during validation: the commit was the save
                self._stop(request, epoch, steps, steps)

    def _train_and_validate(self, epoch, train_iterator, steps, val_dataset, val_steps, images_per_step,
                            mid: dict[str, Any] | None, request: StopRequest):
        started = time.monotonic()
        last_line = [started]
        # A preempted epoch continues with its remaining steps (from a fresh iterator: the input
        # pipeline's shuffle position is not saved) and the train sums of the steps it had run.
        first = min(mid["steps_done"], steps) if mid else 0
        carried = mid["train_sums"] if mid else None

        def progress(run: int) -> None:
            now, done = time.monotonic(), first + run
            if now - last_line[0] >= PROGRESS_SECONDS and done < steps:
                last_line[0] = now
                rate = run * images_per_step / (now - started)
                eta = (steps - done) * images_per_step / max(rate, 1e-9)
                logging.info("Stage %s epoch %d: step %d/%d, %.1f images/s, epoch ETA %s", self.stage.name,
                             epoch + 1, done, steps, rate, _clock(eta))

        stop_now = [False]

        def should_stop() -> bool:  # after each host call; every worker asks at the same step
            stop_now[0] = self.cluster.any_worker(request.pending)
            return stop_now[0]

        learning_rate = replica_steps.learning_rate(self.optimizer)
        self.loop.train_metrics.reset()
        done = first + self.loop.train_steps(train_iterator, steps - first, progress, should_stop)
        if stop_now[0]:
            self._save_mid_epoch(epoch, done, steps, self.loop.train_metrics.totals(carried), request)
        train = self.loop.train_metrics.result(carried)
        train_seconds = time.monotonic() - started
        val = self.loop.evaluate(val_dataset, val_steps)
        logs = {**train, **{f"val_{key}": value for key, value in val.items()}}
        logs.update(learning_rate=learning_rate, epoch_seconds=time.monotonic() - started,
                    train_images_per_second=(steps - first) * images_per_step / max(train_seconds, 1e-9))
        return logs

    def _save_mid_epoch(self, epoch: int, done: int, steps: int, train_sums: dict, request: StopRequest) -> None:
        """Preempted inside an epoch: model and optimizer at this step, then the state file naming
        them with the step and the epoch's train sums so far (the commit point), then stop."""
        previous = self.state["checkpoint"]
        self.state.update(checkpoint=self._save_checkpoint(epoch, step=done),
                          learning_rate=replica_steps.learning_rate(self.optimizer),
                          mid_epoch={"epoch": epoch, "steps_done": done, "steps": steps, "train_sums": train_sums})
        if self.cluster.is_chief:
            atomic.write_json(self.paths.state, self.state)  # the commit point
            if previous and previous != self.state["checkpoint"]:
                self._remove_checkpoint(previous)
        self._stop(request, epoch, done, steps)

    def _stop(self, request: StopRequest, epoch: int, done: int, steps: int) -> None:
        request.honoured = True
        cause = request.signal_name or "SIGTERM to another worker"
        raise Preempted(f"preempted ({cause}): saved a checkpoint at epoch {epoch + 1} step {done} of {steps}; "
                        f"rerun the same command to resume from it")

    def _commit(self, epoch: int, logs: dict[str, float], stop: bool, stopping: EarlyStopping,
                plateau: PlateauReducer) -> None:
        val_loss = logs[MONITOR]
        best = self.state["best_val_loss"]
        improved = best is None or val_loss < best
        if improved:
            self.best_weights = self.model.get_weights()
            pending = None
            if self.cluster.is_chief:
                self.export_model.set_weights(self.best_weights)
                pending = self._write_pending_best_model(epoch)
            self.state.update(best_val_loss=val_loss, best_epoch=epoch, pending_best_model=pending)
        self.state["history"].append({"epoch": epoch, **logs})
        previous_checkpoint = self.state["checkpoint"]
        self.state.update(
            epochs_completed=epoch + 1, stop_training=stop, learning_rate=replica_steps.learning_rate(self.optimizer),
            early_stopping=stopping.state(), reduce_lr=plateau.state(), mid_epoch=None,
            checkpoint=self._save_checkpoint(epoch))
        if self.cluster.is_chief:
            atomic.write_text(self.paths.history_csv, history_csv_text(self.state["history"]))
            atomic.write_json(self.paths.state, self.state)  # the commit point
            if improved:
                name = self.state["pending_best_model"]["name"]
                os.replace(os.path.join(self.paths.checkpoint_dir, name), self.paths.best_model)
                self.paths.record_pending_models(remove=(name,))  # renamed in: the name is no longer the run's
                logging.info("Stage %s epoch %d: new best val_loss %.5f, saved %s", self.stage.name, epoch + 1,
                             val_loss, self.paths.best_model)
            if previous_checkpoint:
                self._remove_checkpoint(previous_checkpoint)
        self._write_summaries(epoch, logs)

    def _write_pending_best_model(self, epoch: int) -> dict[str, Any]:
        """Saves the new best model under a pending name, recorded in the pending ledger before it is
        written; returns its name and file identity for the state file that commits it."""
        name = self.paths.pending_best_name(epoch)
        self.paths.record_pending_models(add=(name,))  # recorded before written: a kill leaves it claimed
        path = os.path.join(self.paths.checkpoint_dir, name)
        atomic.write_with(path, self.export_model.save, suffix=".keras")
        return {"name": name, "identity": run_ledger.file_identity(path)}

    def _save_checkpoint(self, epoch: int, step: int | None = None) -> str:
        """Writes model + optimizer after `epoch` (or `step` steps into it: a preemption), every
        worker: the chief into checkpoints/, the others into a scratch folder removed at once;
        returns the checkpoint's name."""
        if self.cluster.is_chief:
            name = self.paths.checkpoint_name(epoch, step)
            self.paths.record_checkpoints(add=(name,))  # recorded before written: a kill leaves it claimed
            self.checkpoint.write(os.path.join(self.paths.checkpoint_dir, name))
        else:  # its files, then its ledger, then the folder if that empties it: nothing else there is deleted
            name = run_ledger.scratch_checkpoint_name(self.paths.stage, epoch, step)
            scratch = self.paths.worker_scratch(self.cluster.task_id)
            ledger = run_ledger.worker_ledger(scratch)  # the worker's own: the chief's is written by the chief only
            os.makedirs(scratch, exist_ok=True)
            written = run_ledger.free_checkpoint_name(scratch, name, set(run_ledger.recorded_names(ledger)))
            run_ledger.record_names(ledger, add=(written,))  # recorded before written: a kill leaves it claimed
            self.checkpoint.write(os.path.join(scratch, written))
            for path in run_ledger.checkpoint_files_at(scratch, written):
                os.remove(path)
            run_ledger.record_names(ledger, remove=(written,), drop_empty=True)
            with contextlib.suppress(OSError):
                os.rmdir(scratch)
        return name

    def _remove_checkpoint(self, name: str) -> None:
        remove_checkpoint(os.path.join(self.paths.checkpoint_dir, name))
        self.paths.record_checkpoints(remove=(name,))

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
        # best_epoch counts from 0, as history_<stage>.csv's epoch column (and earlier readers);
        # best_epoch_number from 1, as the log's "epoch N/M" lines.
        metrics.update(best_epoch=self.state["best_epoch"], best_epoch_number=self.state["best_epoch"] + 1,
                       epochs_run=self.state["epochs_completed"],
                       steps_per_epoch=steps, seconds_this_run=round(seconds, 1))
        if self.cluster.is_chief and seal is not None:
            metrics.update(seal())
        # Every worker logs the digest of the weights it ends with: equal digests, equal models.
        logging.info("Stage %s done: best epoch %d, val_loss %.5f, weights %s", self.stage.name,
                     self.state["best_epoch"] + 1, metrics["val_loss"], weights_digest(self.best_weights))
        self.state["completed"] = True
        if self.cluster.is_chief:
            run_files.record_stage_metrics(os.path.dirname(self.paths.best_model), self.stage.name, metrics)
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
