"""The model dir of a cxr-train run: its files, config.json, resume checks and --overwrite.

Files in a model dir:
  config.json                      the run's settings and its dataset's fingerprint, written once
                                   every check has passed, before the first step
  frozen_best.keras, finetune_best.keras   best model of each stage (lowest val_loss)
  final.keras                      the best model of the last stage run
  history_frozen.csv, history_finetune.csv   one row per completed epoch
  metrics.json                     val metrics of each stage's best model; its best_epoch counts from 0
                                   (as the histories' epoch column), best_epoch_number from 1 (as the log)
  logs/<stage>/{train,validation}/ TensorBoard
  checkpoints/<stage>_state.json   the stage's committed state: epoch, best, counters, learning rate
  checkpoints/<stage>_epoch<N>.{index,data-*}   model and optimizer after epoch N (tf.train.Checkpoint;
                                   `-<k>` is appended to N when a file of that name is not the run's)
  checkpoints/<stage>_epoch<N>_step<S>.{index,data-*}   the same, S steps into epoch N, written on
                                   SIGTERM (preemption); the state file's `mid_epoch` names the step
  checkpoints/<stage>_checkpoints.json   the ledger: the name of every checkpoint the run wrote, recorded
                                   before it is written. Only checkpoints it (or the state file) names
                                   are ever deleted: a name that looks like ours is not ours
  checkpoints/<stage>_best-epoch<N>.keras   a new best model until the state file commits it and it is
                                   renamed into place (`-<k>` appended when a file of that name is not the run's)
  checkpoints/<stage>_pending_models.json   the ledger of those pending best models: each name is recorded
                                   before the model is written and dropped once it is renamed in or deleted;
                                   only names it holds are ever deleted (by a rerun or --overwrite). The state
                                   file names the committed one with its file identity (inode, size, mtime):
                                   a rerun renames it in only when that identity still matches
  checkpoints/workertemp_<task>/   a non-chief worker's scratch copy of a checkpoint, removed at once;
                                   the worker records its name first in its own ledger there,
                                   `worker_checkpoints.json` (no other process writes it). --overwrite
                                   deletes only the files that ledger names, the ledger, then the folder
                                   if that left it empty
Beside the model dir (not in it), `.<name>.cxr-lock`, named after the resolved path, is held while a
run writes here (see files/locking.py).
Every file is written through `atomic`, so a kill at any moment leaves either the old or the new
version, never half a file. Nothing else in a model dir is ever written or deleted.

A rerun of the same command resumes. It is refused when the settings differ (except
RESTARTABLE_WITH_OTHER) or when --data_dir now holds other records (the manifest fingerprint
differs), unless no epoch has completed yet: then there is nothing to resume and the new settings
simply start the run. Paths are compared resolved (symlinks followed), so ds/, ./ds and /abs/ds
name the same dataset.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

from absl import logging

from cxr_tfdata.core.config import TrainConfig, to_dict
from cxr_tfdata.files import atomic, output_safety
from cxr_tfdata.training import run_ledger

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
FINAL_MODEL_FILE = "final.keras"
STAGES = ("frozen", "finetune")
DATASET_FINGERPRINT_KEY = "dataset_fingerprint"
# Settings a run may be resumed with other values of (config.json keys): the stage to run, and
# how data is cached, served and steps are compiled, looped and placed, which change speed but not
# what is learned. (The batch size is per replica: a different replica count changes the global batch.)
# target_recall only chooses the threshold stored when a stage ends, not what is trained.
RESTARTABLE_WITH_OTHER = {"stage", "data.cache", "data.cache_dir", "data.data_service", "jit_compile",
                          "distribution", "steps_per_loop", "target_recall"}
# Path-valued settings, compared after resolving.
_PATH_KEYS = ("model_dir", "data.data_dir", "data.cache_dir")
# The top-level keys of a config.json written by cxr-train.
_CONFIG_KEYS = {"model_dir", "data", "augment", "model", "frozen", "finetune", "stage"}
_TENSORBOARD_FILE_PREFIXES = ("events.out.tfevents.",)


class ConfigMismatchError(ValueError):
    """A model_dir holds a run started with different settings or on other data."""


@dataclasses.dataclass(frozen=True)
class StagePaths:
    stage: str
    best_model: str
    state: str
    history_csv: str
    log_dir: str
    checkpoint_dir: str

    def pending_best_model(self, epoch: int) -> str:
        """Where epoch's new best model waits for the state file that commits it (before any `-<k>`;
        an older version's name as is)."""
        return os.path.join(self.checkpoint_dir, f"{self.stage}_best-epoch{epoch}.keras")

    def pending_best_name(self, epoch: int) -> str:
        """The name of epoch's pending best model: a name of the run's own, or one under which no
        file exists (`-<k>` appended until one is free)."""
        recorded, base = set(self.recorded_pending_models()), f"{self.stage}_best-epoch{epoch}"
        name, k = f"{base}.keras", 0
        while name not in recorded and os.path.lexists(os.path.join(self.checkpoint_dir, name)):
            k += 1
            name = f"{base}-{k}.keras"
        return name

    def pending_best_models(self) -> list[str]:
        """Files merely NAMED like a pending best model: to report, never to delete (see
        recorded_pending_models)."""
        return glob.glob(os.path.join(glob.escape(self.checkpoint_dir), f"{self.stage}_best-epoch*.keras"))

    @property
    def pending_ledger(self) -> str:
        """The names of the pending best models this stage's runs wrote (see the module docstring)."""
        return os.path.join(self.checkpoint_dir, f"{self.stage}_pending_models.json")

    def recorded_pending_models(self) -> list[str]:
        return run_ledger.recorded_names(self.pending_ledger)

    def record_pending_models(self, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> None:
        """Updates the pending ledger: `add` before those models are written, `remove` after they are
        renamed into place or deleted."""
        run_ledger.record_names(self.pending_ledger, add, remove)

    def pending_model_files(self) -> list[str]:
        """The recorded pending best models on disk (never a file merely named like one)."""
        paths = (os.path.join(self.checkpoint_dir, name) for name in self.recorded_pending_models())
        return [path for path in paths if run_ledger.file_identity(path) is not None]

    @property
    def ledger(self) -> str:
        """The names of the checkpoints this stage's runs wrote (see the module docstring)."""
        return os.path.join(self.checkpoint_dir, f"{self.stage}_checkpoints.json")

    def recorded_checkpoints(self) -> list[str]:
        """Names of the checkpoints the run wrote: its ledger's, and the one its state file commits
        (a run of an older version kept no ledger)."""
        names = run_ledger.recorded_names(self.ledger)
        state = _read_json_or_none(self.state)
        if isinstance(state, dict) and run_ledger.is_plain_name(state.get("checkpoint")):
            names.append(state["checkpoint"])
        return sorted(set(names))

    def record_checkpoints(self, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> None:
        """Updates the ledger: `add` before those checkpoints are written, `remove` after they are deleted."""
        run_ledger.record_names(self.ledger, add, remove)

    def checkpoint_name(self, epoch: int, step: int | None = None) -> str:
        """The name (prefix) of the model and optimizer checkpoint written after `epoch` (or, when
        preempted, after `step` steps of it: `_step<S>`): a name of the run's own, or one under
        which no file exists (`-<k>` appended until one is free)."""
        return run_ledger.free_checkpoint_name(self.checkpoint_dir, run_ledger.scratch_checkpoint_name(self.stage, epoch, step),
                                    set(self.recorded_checkpoints()))

    def checkpoints(self) -> list[str]:
        """Prefixes of this stage's recorded checkpoints on disk, committed or not."""
        return sorted(os.path.join(self.checkpoint_dir, name) for name in self.recorded_checkpoints()
                      if run_ledger.checkpoint_files_at(self.checkpoint_dir, name))

    def checkpoint_files(self) -> list[str]:
        """Every file of this stage's recorded checkpoints (never a file merely named like one)."""
        return [path for name in self.recorded_checkpoints() for path in run_ledger.checkpoint_files_at(self.checkpoint_dir, name)]

    def worker_scratch(self, task_id: int) -> str:
        """Where a non-chief worker writes its checkpoint copy (TensorFlow's multi-worker guide)."""
        return os.path.join(self.checkpoint_dir, f"workertemp_{task_id}")


def stage_paths(model_dir: str, stage: str) -> StagePaths:
    return StagePaths(
        stage=stage,
        best_model=os.path.join(model_dir, f"{stage}_best.keras"),
        state=os.path.join(model_dir, "checkpoints", f"{stage}_state.json"),
        history_csv=os.path.join(model_dir, f"history_{stage}.csv"),
        log_dir=os.path.join(model_dir, "logs", stage),
        checkpoint_dir=os.path.join(model_dir, "checkpoints"),
    )


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_output_paths(model_dir: str) -> tuple[list[str], list[str]]:
    """(files, TensorBoard folders) a run writes in model_dir, as listed in the module docstring.

    Resume state first and config.json last: deleting them in this order, a kill part way leaves
    no state that would resume from a deleted model, and config.json still guards the rest.
    """
    stages = [stage_paths(model_dir, stage) for stage in STAGES]
    files = [paths.state for paths in stages]
    files += [path for paths in stages for path in paths.checkpoint_files() + paths.pending_model_files()]
    files += [path for paths in stages for path in (paths.ledger, paths.pending_ledger)]  # after the files they name
    for scratch in run_ledger.worker_scratch_folders(os.path.join(model_dir, "checkpoints")):
        files += [path for name in run_ledger.recorded_names(run_ledger.worker_ledger(scratch)) for path in run_ledger.checkpoint_files_at(scratch, name)]
        files.append(run_ledger.worker_ledger(scratch))
    files += [path for paths in stages for path in (paths.best_model, paths.history_csv)]
    files += [os.path.join(model_dir, name) for name in (FINAL_MODEL_FILE, METRICS_FILE, CONFIG_FILE)]
    return files, [paths.log_dir for paths in stages]


def has_completed_epochs(model_dir: str) -> bool:
    """True when some epoch of the run in model_dir was committed (there is something to resume)."""
    paths = [stage_paths(model_dir, stage) for stage in STAGES]
    return any(os.path.exists(p.state) or os.path.exists(p.best_model) for p in paths)


def is_train_config(obj: Any) -> bool:
    return isinstance(obj, dict) and _CONFIG_KEYS <= set(obj)


def _remove_tensorboard_logs(log_dir: str) -> list[str]:
    """Deletes TensorBoard's event files under log_dir and the folders they leave empty; returns
    anything else found there, which is left alone."""
    kept = []
    for root, dirs, files in os.walk(log_dir, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if name.startswith(_TENSORBOARD_FILE_PREFIXES) and not os.path.islink(path):
                os.remove(path)
            else:
                kept.append(path)
        for name in dirs:
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
                os.rmdir(path)
    if os.path.isdir(log_dir) and not os.listdir(log_dir):
        os.rmdir(log_dir)
    return kept


def _remove_worker_scratch(folders: list[str]) -> None:
    """Removes the worker scratch folders whose recorded files and ledger were just deleted, each
    only when that left it empty: anything else there is the user's."""
    for scratch in folders:
        if not os.path.isdir(scratch):
            continue
        if os.listdir(scratch):
            logging.warning("--overwrite left %s: it holds files no worker of the run recorded writing", scratch)
        else:
            os.rmdir(scratch)


def remove_run_outputs(model_dir: str) -> None:
    """Deletes an earlier run's outputs, and only those: other files in model_dir are the user's."""
    scratch = run_ledger.worker_scratch_folders(os.path.join(model_dir, "checkpoints"))  # known by their ledgers, deleted next
    files, log_dirs = run_output_paths(model_dir)
    for path in files:
        if os.path.lexists(path):
            os.remove(path)
    _remove_worker_scratch(scratch)
    kept = [path for log_dir in log_dirs if os.path.isdir(log_dir) for path in _remove_tensorboard_logs(log_dir)]
    logs = os.path.join(model_dir, "logs")
    if os.path.isdir(logs) and not os.path.islink(logs) and not os.listdir(logs):
        os.rmdir(logs)
    if kept:
        logging.warning("--overwrite left %d file(s) under %s/logs that TensorBoard did not write, e.g. %s",
                        len(kept), model_dir, kept[0])
    logging.info("--overwrite: removed the earlier run's outputs in %s", model_dir)


def check_model_dir(config: TrainConfig) -> None:
    """Refuses a model_dir that is a file, overlaps the dataset or holds files cxr-train did not write.

    Read-only: nothing is created. A model dir holding run files (models, histories, ...) without a
    config.json written by cxr-train is not a run this tool can resume or replace.
    """
    model_dir = config.model_dir
    if os.path.lexists(model_dir) and not os.path.isdir(model_dir):
        raise output_safety.UnsafeOutputError(f"--model_dir={model_dir} is a file, not a folder")
    output_safety.check_apart("--model_dir", model_dir, {"--data_dir": config.data.data_dir})
    if config.data.cache == "file":
        output_safety.check_apart("--cache_dir", config.data.cache_dir, {"--data_dir": config.data.data_dir})
    if not os.path.isdir(model_dir):
        return
    config_path = os.path.join(model_dir, CONFIG_FILE)
    existing = _read_json_or_none(config_path)
    if os.path.exists(config_path) and not is_train_config(existing):
        raise output_safety.UnsafeOutputError(
            f"--model_dir={model_dir} holds a {CONFIG_FILE} that cxr-train did not write; choose another "
            f"--model_dir (nothing there is replaced, --overwrite included)")
    if existing is None:
        files, _ = run_output_paths(model_dir)
        present = [os.path.basename(p) for p in files if os.path.lexists(p)]
        if present:
            raise output_safety.UnsafeOutputError(
                f"--model_dir={model_dir} holds {', '.join(present)} but no {CONFIG_FILE} of cxr-train, so "
                f"they are not a run this tool wrote; choose another --model_dir (nothing there is replaced, "
                f"--overwrite included)")


def _read_json_or_none(path: str) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def run_record(config: TrainConfig, dataset_fingerprint: str) -> dict[str, Any]:
    """What config.json holds: the config with resolved paths, and the dataset's fingerprint."""
    record = json.loads(json.dumps(to_dict(config)))
    for key in _PATH_KEYS:
        section, _, name = key.rpartition(".")
        holder = record[section] if section else record
        if holder.get(name):
            holder[name] = output_safety.resolved(holder[name])
    record[DATASET_FINGERPRINT_KEY] = dataset_fingerprint
    return record


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [k for key in keys for k in _differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _changed_settings(existing: dict[str, Any], wanted: dict[str, Any]) -> set[str]:
    changed = set(_differing_keys(existing, wanted))
    for key in _PATH_KEYS:  # a config.json of an older version may hold relative paths
        section, _, name = key.rpartition(".")
        old = (existing.get(section) or {}) if section else existing
        new = wanted[section] if section else wanted
        if key in changed and old.get(name) and new.get(name) and output_safety.resolved(old[name]) == new[name]:
            changed.discard(key)
    if DATASET_FINGERPRINT_KEY not in existing and DATASET_FINGERPRINT_KEY in changed:
        logging.warning("%s records no dataset fingerprint (written by an older version): the dataset "
                        "cannot be checked against the one the run started on", CONFIG_FILE)
        changed.discard(DATASET_FINGERPRINT_KEY)
    elif DATASET_FINGERPRINT_KEY not in changed:
        changed.discard("data.data_dir")  # the same records, moved: the fingerprint says they are the same
    return changed


def prepare(config: TrainConfig, dataset_fingerprint: str, overwrite: bool = False) -> None:
    """Creates model_dir and writes config.json; call under the model dir's lock, after every check.

    An existing run with other settings is an error (except RESTARTABLE_WITH_OTHER, e.g. a
    frozen-only run continued with --stage=finetune), and so is a dataset whose fingerprint
    differs, unless that run never completed an epoch. overwrite=True first deletes every output of
    the earlier run (models, metrics, histories, TensorBoard logs, checkpoints and state), and
    nothing else, so a later stage cannot start from the old run's models.
    """
    check_model_dir(config)
    path = os.path.join(config.model_dir, CONFIG_FILE)
    if overwrite and os.path.isdir(config.model_dir):
        remove_run_outputs(config.model_dir)
    os.makedirs(os.path.join(config.model_dir, "checkpoints"), exist_ok=True)
    wanted = run_record(config, dataset_fingerprint)
    existing = _read_json_or_none(path)
    if existing is not None:
        changed = _changed_settings(existing, wanted)
        if not changed - RESTARTABLE_WITH_OTHER:
            if changed:
                logging.info("Resuming %s with other %s", config.model_dir, ", ".join(sorted(changed)))
        elif not has_completed_epochs(config.model_dir):
            logging.info("%s holds no completed epoch: starting afresh with the new settings (%s)",
                         config.model_dir, ", ".join(sorted(changed)))
        else:
            raise ConfigMismatchError(_mismatch_message(config, path, existing, wanted, changed))
    atomic.remove_temporary_files(config.model_dir)
    atomic.remove_temporary_files(os.path.join(config.model_dir, "checkpoints"))
    atomic.write_json(path, wanted)


def _mismatch_message(config, path, existing, wanted, changed) -> str:
    advice = ("Restart with the same flags and data to resume, use another --model_dir, or pass "
              "--overwrite to discard that run.")
    if DATASET_FINGERPRINT_KEY in changed:
        return (f"--data_dir={config.data.data_dir} does not hold the dataset the run in "
                f"--model_dir={config.model_dir} was started on: its manifest fingerprint is "
                f"{wanted[DATASET_FINGERPRINT_KEY][:23]}..., the run's is "
                f"{str(existing.get(DATASET_FINGERPRINT_KEY))[:23]}... (see {path}). The dataset was "
                f"rebuilt or replaced; resuming would mix two datasets. {advice}")
    differing = sorted(changed - RESTARTABLE_WITH_OTHER)
    return (f"--model_dir={config.model_dir} holds a run with different settings "
            f"({', '.join(differing)}; see {path}). {advice}")


def record_stage_metrics(model_dir: str, stage: str, metrics: dict[str, Any]) -> None:
    path = os.path.join(model_dir, METRICS_FILE)
    all_metrics = read_json(path) if os.path.exists(path) else {}
    all_metrics[stage] = metrics
    atomic.write_json(path, all_metrics)
