"""Tests of cxr_tfdata.training.train: both stages end to end on tiny records, resume after a kill, checkpoints."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from cxr_tfdata.core import dataset_info
from cxr_tfdata.core.config import AugmentConfig, DataConfig, ModelConfig, StageConfig, TrainConfig
from cxr_tfdata.data import input_pipeline
from cxr_tfdata.files import atomic
from cxr_tfdata.training import replica_steps, run_files, run_ledger, stage_runner, train
from tests.helpers import write_tiny_dataset

IMAGE_SIZE = 32


class Interrupted(RuntimeError):
    """Stands for a kill right after an epoch's checkpoint was written."""


def interrupt_after(stop_epoch: int):
    """An on_epoch_end hook that stops the run once epoch `stop_epoch` is committed."""
    def hook(stage, epoch):
        if epoch == stop_epoch:
            raise Interrupted(f"killed after {stage} epoch {epoch}")

    return hook


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("records")
    write_tiny_dataset(path, {"train": (16, 16), "val": (4, 4), "test": (2, 2)}, image_size=IMAGE_SIZE)
    return str(path)


def _config(data_dir, model_dir, stage="frozen", **overrides) -> TrainConfig:
    return TrainConfig(
        model_dir=str(model_dir),
        data=DataConfig(data_dir=data_dir, image_size=IMAGE_SIZE, seed=1),
        augment=AugmentConfig(placement="none"),
        model=ModelConfig(weights="none"),
        frozen=StageConfig(name="frozen", batch_size=8, epochs=3, learning_rate=1e-3),
        finetune=StageConfig(name="finetune", batch_size=8, epochs=2, learning_rate=1e-3,
                             lr_decay_per_epoch=0.9, early_stopping_patience=15, reduce_lr_patience=5),
        stage=stage,
        mixed_precision="mixed_bfloat16",
        **overrides,
    )


def _prepare(config, overwrite=False):
    run_files.prepare(config, "sha256:test-dataset", overwrite=overwrite)


def _history(model_dir, stage):
    with open(os.path.join(model_dir, f"history_{stage}.csv")) as f:
        return list(csv.DictReader(f))


def _state(model_dir, stage):
    with open(os.path.join(model_dir, "checkpoints", f"{stage}_state.json")) as f:
        return json.load(f)


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def frozen_run(data_dir, tmp_path_factory):
    """The frozen stage killed after its 1st epoch, then restarted with the same config."""
    model_dir = tmp_path_factory.mktemp("model")
    config = _config(data_dir, model_dir)
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config, on_epoch_end=interrupt_after(0))
    interrupted = {
        "state": _state(model_dir, "frozen"),
        "best_digest": _digest(model_dir / "frozen_best.keras"),
        "config_json": json.loads((model_dir / "config.json").read_text()),
    }
    metrics = train.train_and_evaluate(config)
    return model_dir, config, interrupted, metrics


@pytest.mark.slow
def test_interrupted_run_had_committed_its_epoch_and_its_config(frozen_run):
    model_dir, config, interrupted, _ = frozen_run
    assert interrupted["state"]["epochs_completed"] == 1
    assert not interrupted["state"]["completed"]
    assert interrupted["config_json"]["frozen"]["learning_rate"] == config.frozen.learning_rate
    assert interrupted["config_json"]["data"]["data_dir"] == config.data.data_dir


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch_and_keeps_the_best_model(frozen_run):
    model_dir, config, interrupted, metrics = frozen_run
    state = _state(model_dir, "frozen")
    assert [int(row["epoch"]) for row in _history(model_dir, "frozen")] == [0, 1, 2]
    assert state["epochs_completed"] == 3 and state["completed"]
    best_before = interrupted["state"]["best_val_loss"]
    assert state["best_val_loss"] <= best_before
    # The best model file was replaced exactly when an epoch after the restart beat the persisted best.
    replaced = _digest(model_dir / "frozen_best.keras") != interrupted["best_digest"]
    assert replaced == (state["best_epoch"] != interrupted["state"]["best_epoch"])
    val_losses = [float(row["val_loss"]) for row in _history(model_dir, "frozen")]
    assert state["best_val_loss"] == pytest.approx(min(val_losses))
    assert metrics["frozen"]["val_loss"] == pytest.approx(min(val_losses), rel=1e-3)


@pytest.mark.slow
def test_frozen_stage_learns_and_writes_its_outputs(frozen_run):
    model_dir, _, _, metrics = frozen_run
    history = _history(model_dir, "frozen")
    losses = [float(row["loss"]) for row in history]
    assert losses[-1] < losses[0]
    assert all(float(row["train_images_per_second"]) > 0 for row in history)
    assert all(float(row["epoch_seconds"]) > 0 for row in history)
    for name in ("frozen_best.keras", "final.keras", "config.json", "metrics.json", "history_frozen.csv"):
        assert (model_dir / name).is_file(), name
    assert os.listdir(model_dir / "logs" / "frozen")
    on_disk = json.loads((model_dir / "metrics.json").read_text())
    assert set(on_disk["frozen"]) >= {"val_loss", "val_accuracy", "val_precision", "val_recall", "val_auc"}
    assert on_disk == json.loads(json.dumps(metrics))
    assert not [n for n in os.listdir(model_dir) if n.startswith(".tmp-")]


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


@pytest.mark.slow
def test_saved_models_compute_in_float32_whatever_policy_trained_them(frozen_run, data_dir):
    model_dir, config, _, metrics = frozen_run
    assert config.mixed_precision == "mixed_bfloat16"
    keras.mixed_precision.set_global_policy("float32")
    for name in ("frozen_best.keras", "final.keras"):
        model = keras.saving.load_model(str(model_dir / name), safe_mode=True)
        mixed = [layer.name for layer in _all_layers(model) if layer.compute_dtype != "float32"]
        assert not mixed, f"{name}: {mixed}"
    # The float32 copy holds the trained weights: its val loss is the one the bfloat16 model had.
    model = keras.saving.load_model(str(model_dir / "frozen_best.keras"), safe_mode=True)
    model.compile(loss=keras.losses.BinaryCrossentropy())
    val = input_pipeline.create_dataset(config.data, "val", 8, training=False).apply(
        tf.data.experimental.assert_cardinality(1))  # the 8 val images
    val_loss = model.evaluate(val, verbose=0, return_dict=True)["loss"]
    assert val_loss == pytest.approx(metrics["frozen"]["val_loss"], rel=0.03, abs=0.01)


@pytest.mark.slow
def test_finetune_stage_starts_from_frozen_best_and_learns(frozen_run, data_dir):
    model_dir, config, _, _ = frozen_run
    frozen_digest = _digest(model_dir / "frozen_best.keras")
    frozen_history = _history(model_dir, "frozen")
    # --stage=both later in the same model_dir continues the run: the completed frozen stage is not rerun.
    metrics = train.train_and_evaluate(dataclasses.replace(config, stage="both"))
    assert _history(model_dir, "frozen") == frozen_history
    losses = [float(row["loss"]) for row in _history(model_dir, "finetune")]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert _digest(model_dir / "frozen_best.keras") == frozen_digest
    assert _digest(model_dir / "final.keras") == _digest(model_dir / "finetune_best.keras")
    model = keras.saving.load_model(str(model_dir / "final.keras"), safe_mode=True)
    # The finetune head's BatchNormalization is saved with the statistics it learned (it starts at 0/1).
    head = model.get_layer("head_batch_norm")
    assert isinstance(head, keras.layers.BatchNormalization)
    assert np.any(keras.ops.convert_to_numpy(head.moving_mean) != 0.0)
    assert np.any(keras.ops.convert_to_numpy(head.moving_variance) != 1.0)
    assert set(json.loads((model_dir / "metrics.json").read_text())) == {"frozen", "finetune"}
    assert metrics["finetune"]["epochs_run"] == 2


def _commit_an_epoch(model_dir):
    """What a completed epoch leaves: a state file (the resume checks look for one)."""
    state = stage_runner.initial_state(StageConfig())
    atomic.write_json(run_files.stage_paths(str(model_dir), "frozen").state, {**state, "epochs_completed": 1})


def test_restart_with_different_settings_is_refused_naming_them(data_dir, tmp_path):
    _prepare(_config(data_dir, tmp_path))
    _commit_an_epoch(tmp_path)
    (tmp_path / "checkpoints" / ".tmp-999999999-0123abcd-frozen_last.weights.h5").write_bytes(b"half")
    _prepare(_config(data_dir, tmp_path))  # same settings: resumes
    assert os.listdir(tmp_path / "checkpoints") == ["frozen_state.json"]  # a killed save's leftover is gone
    changed = _config(data_dir, tmp_path, steps_per_epoch=3)
    with pytest.raises(run_files.ConfigMismatchError, match="steps_per_epoch"):
        _prepare(changed)
    _prepare(changed, overwrite=True)
    assert json.loads((tmp_path / "config.json").read_text())["steps_per_epoch"] == 3


def test_a_run_without_a_completed_epoch_takes_corrected_settings_without_overwrite(data_dir, tmp_path):
    _prepare(_config(data_dir, tmp_path, steps_per_epoch=3))
    _prepare(_config(data_dir, tmp_path, steps_per_epoch=2))  # nothing to resume: no --overwrite needed
    assert json.loads((tmp_path / "config.json").read_text())["steps_per_epoch"] == 2


def test_resume_may_change_settings_that_do_not_change_results(data_dir, tmp_path):
    _prepare(_config(data_dir, tmp_path))
    _commit_an_epoch(tmp_path)
    cache_dir = str(tmp_path / "cache")
    faster = _config(data_dir, tmp_path, stage="finetune", jit_compile="true", distribution="default",
                     steps_per_loop=3)
    faster = dataclasses.replace(faster, data=dataclasses.replace(faster.data, cache="file", cache_dir=cache_dir))
    _prepare(faster)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["jit_compile"] == "true" and written["distribution"] == "default"
    assert written["steps_per_loop"] == 3
    assert (written["data"]["cache"], written["data"]["cache_dir"]) == ("file", cache_dir)
    with pytest.raises(run_files.ConfigMismatchError, match=r"\(data\.shuffle_buffer;"):
        _prepare(dataclasses.replace(
            faster, data=dataclasses.replace(faster.data, shuffle_buffer=7)))


def test_overwrite_removes_every_output_of_the_earlier_run_and_nothing_else(data_dir, tmp_path):
    _prepare(_config(data_dir, tmp_path))
    for name in ("frozen_epoch2.index", "frozen_epoch2.data-00000-of-00001", "workertemp_1/frozen_epoch2.index"):
        os.makedirs(os.path.dirname(tmp_path / "checkpoints" / name), exist_ok=True)
        (tmp_path / "checkpoints" / name).write_text("stale")
    # The earlier run recorded its checkpoint in its ledger, as a run does before writing one; a file
    # merely named like a checkpoint is the user's (test_hardening_train covers that).
    run_files.stage_paths(str(tmp_path), "frozen").record_checkpoints(add=("frozen_epoch2",))
    run_ledger.record_names(run_ledger.worker_ledger(str(tmp_path / "checkpoints" / "workertemp_1")),
                           add=("frozen_epoch2",))
    pending = run_files.stage_paths(str(tmp_path), "finetune")
    pending.record_pending_models(add=(os.path.basename(pending.pending_best_model(3)),))
    files, directories = run_files.run_output_paths(str(tmp_path))
    for path in files:
        # The run's own config.json marks the folder as a run; its ledgers name what it wrote.
        if os.path.basename(path) not in ("config.json", "frozen_checkpoints.json", "finetune_pending_models.json",
                                          "worker_checkpoints.json"):
            with open(path, "w") as f:
                f.write("stale")
    for path in directories:
        os.makedirs(os.path.join(path, "train"))
        with open(os.path.join(path, "train", "events.out.tfevents.1764300000.host.7.0.v2"), "w") as f:
            f.write("stale")
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "logs" / "frozen" / "plot.png").write_text("the user's")
    with open(run_files.stage_paths(str(tmp_path), "finetune").pending_best_model(3), "w") as f:
        f.write("stale")
    (tmp_path / "checkpoints" / "mine.txt").write_text("the user's")
    _prepare(_config(data_dir, tmp_path), overwrite=True)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["checkpoints/mine.txt", "config.json", "logs/frozen/plot.png", "notes.txt"]
    assert (tmp_path / "logs" / "frozen" / "plot.png").read_text() == "the user's"
    assert not (tmp_path / "logs" / "finetune").exists()
    assert json.loads((tmp_path / "config.json").read_text())["stage"] == "frozen"
    for name in ("frozen_best.keras", "finetune_best.keras", "final.keras", "metrics.json",
                 "history_frozen.csv", "history_finetune.csv", "checkpoints/frozen_state.json",
                 "checkpoints/frozen_epoch2.index", "checkpoints/frozen_epoch2.data-00000-of-00001",
                 "checkpoints/frozen_checkpoints.json"):
        assert os.path.join(str(tmp_path), name) in files, name


def test_finetune_after_overwrite_does_not_start_from_the_old_runs_frozen_model(data_dir, tmp_path):
    _prepare(_config(data_dir, tmp_path))
    stale = tmp_path / "frozen_best.keras"
    stale.write_bytes(b"a model of the discarded run")
    with pytest.raises(FileNotFoundError, match="frozen_best.keras not found.*--stage=frozen"):
        train.train_and_evaluate(_config(data_dir, tmp_path, stage="finetune"), overwrite=True)
    assert not stale.exists()


def test_image_size_other_than_the_datasets_names_the_flag(data_dir, tmp_path):
    config = dataclasses.replace(_config(data_dir, tmp_path), data=DataConfig(data_dir=data_dir, image_size=64))
    with pytest.raises(ValueError, match="--image_size=64"):
        train.train_and_evaluate(config)
    assert not (tmp_path / "config.json").exists()


def test_class_weights_follow_sklearn_balanced():
    sklearn_utils = pytest.importorskip("sklearn.utils")
    counts = {"NORMAL": 1136, "PNEUMONIA": 3274}
    weights = train.class_weights_from_counts(counts)
    y = np.repeat([0, 1], [1136, 3274])
    expected = sklearn_utils.class_weight.compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    assert weights == pytest.approx({0: expected[0], 1: expected[1]})
    with pytest.raises(ValueError, match="NORMAL"):
        train.class_weights_from_counts({"NORMAL": 0, "PNEUMONIA": 5})
    with pytest.raises(ValueError, match="COVID"):
        train.class_weights_from_counts({"COVID": 3, "PNEUMONIA": 5})


def test_balanced_sampling_replaces_class_weights_instead_of_adding_to_them(data_dir, tmp_path, caplog):
    counts = {"NORMAL": 4, "PNEUMONIA": 12}
    weighted = _config(data_dir, tmp_path)
    assert train.train_class_weights(weighted, counts) == pytest.approx({0: 2.0, 1: 2 / 3})
    balanced = dataclasses.replace(weighted, data=dataclasses.replace(weighted.data, balanced_sampling=True))
    with caplog.at_level(logging.INFO, logger="absl"):
        assert train.train_class_weights(balanced, counts) is None
    assert "balanced sampling" in caplog.text
    strategy = tf.distribute.get_strategy()
    info = dataset_info.load(data_dir)
    train_batches, _, _ = train.make_datasets(balanced, balanced.frozen, strategy, None, info)
    _, _, weights = next(iter(train_batches))
    np.testing.assert_array_equal(weights.numpy(), np.ones(8))  # balanced: every example counts once
    train_batches, _, _ = train.make_datasets(weighted, weighted.frozen, strategy, {0: 2.0, 1: 0.5}, info)
    _, labels, weights = next(iter(train_batches))
    np.testing.assert_allclose(weights.numpy(), np.where(labels.numpy() == 1, 0.5, 2.0))


def _tiny_runner(tmp_path, state=None, stage=None):
    """A StageRunner around a tiny model: enough to drive its commit logic without training."""
    stage = stage or StageConfig()
    paths = run_files.stage_paths(str(tmp_path), stage.name)
    os.makedirs(paths.checkpoint_dir, exist_ok=True)

    def tiny():
        return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])

    model, export_model = tiny(), tiny()
    optimizer = replica_steps.make_optimizer(stage.learning_rate, loss_scaling=False)
    optimizer.build(model.trainable_variables)
    runner = stage_runner.StageRunner(stage, paths, model, optimizer, None, export_model, stage_runner.Cluster())
    runner.state = state or stage_runner.initial_state(stage)
    return runner


def _commit(runner, epoch, val_loss):
    stopping, plateau = stage_runner.EarlyStopping(5), stage_runner.PlateauReducer(2, 0.2, 1e-7)
    runner._commit(epoch, {"loss": 0.5, "val_loss": val_loss, "learning_rate": 1e-3}, False, stopping, plateau)


def test_best_model_is_replaced_only_when_val_loss_improves_on_the_persisted_best(tmp_path):
    state = stage_runner.initial_state(StageConfig())
    state["best_val_loss"] = 0.5  # persisted by an earlier, killed run
    runner = _tiny_runner(tmp_path, state)
    _commit(runner, 3, 0.6)
    assert not os.path.exists(runner.paths.best_model)
    assert _state(tmp_path, "frozen")["epochs_completed"] == 4
    _commit(runner, 4, 0.4)
    assert os.path.exists(runner.paths.best_model)
    saved = _state(tmp_path, "frozen")
    assert saved["best_val_loss"] == pytest.approx(0.4) and saved["best_epoch"] == 4
    assert [int(row["epoch"]) for row in _history(tmp_path, "frozen")] == [3, 4]
    # Only the committed epoch's checkpoint is kept.
    assert runner.paths.checkpoints() == [os.path.join(runner.paths.checkpoint_dir, "frozen_epoch4")]


def test_best_model_always_belongs_to_the_committed_best_epoch(tmp_path, monkeypatch):
    runner = _tiny_runner(tmp_path)
    _commit(runner, 0, 0.6)
    paths = runner.paths
    epoch0_model = _digest(paths.best_model)
    runner.model.set_weights([w + 1.0 for w in runner.model.get_weights()])  # epoch 1 learned something better

    def killed(path, obj):
        raise Interrupted(f"killed before writing {path}")

    # Killed after saving epoch 1's better model, before the state file committed epoch 1.
    committed = run_files.read_json(paths.state)
    with monkeypatch.context() as patch:
        patch.setattr(atomic, "write_json", killed)
        with pytest.raises(Interrupted):
            _commit(_tiny_runner(tmp_path, committed), 1, 0.4)
    assert _digest(paths.best_model) == epoch0_model
    restarted = run_files.read_json(paths.state)
    assert restarted["best_epoch"] == 0
    stage_runner.settle(paths, restarted)
    assert _digest(paths.best_model) == epoch0_model and not paths.pending_best_models()
    assert paths.checkpoints() == [os.path.join(paths.checkpoint_dir, "frozen_epoch0")]  # epoch 1's is gone
    shutil.copyfile(paths.best_model, tmp_path / "epoch0.keras")

    # Killed after the state file committed epoch 1 as the best, before its model was renamed in.
    runner = _tiny_runner(tmp_path, restarted)
    runner.model.set_weights([w + 1.0 for w in runner.model.get_weights()])
    _commit(runner, 1, 0.4)
    epoch1_model = _digest(paths.best_model)
    assert epoch1_model != epoch0_model
    os.replace(paths.best_model, paths.pending_best_model(1))
    shutil.copyfile(tmp_path / "epoch0.keras", paths.best_model)
    stage_runner.settle(paths, run_files.read_json(paths.state))
    assert _digest(paths.best_model) == epoch1_model and not paths.pending_best_models()


def _keras_callback_trace(callback, val_losses, learning_rate=1e-3):
    """What a Keras callback does over a sequence of epochs: (stop_training, learning rate) per epoch."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    callback.set_model(model)
    callback.on_train_begin()
    trace = []
    for epoch, value in enumerate(val_losses):
        callback.on_epoch_end(epoch, {"val_loss": value})
        trace.append((bool(model.stop_training), float(model.optimizer.learning_rate)))
    return trace


_VAL_LOSSES = [0.9, 0.8, 0.80005, 0.81, 0.79995, 0.7, 0.7, 0.71, 0.72, 0.73, 0.69, 0.7, 0.7, 0.7, 0.7, 0.7]


def test_early_stopping_and_plateau_keep_keras_semantics():
    keras_stop = _keras_callback_trace(
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True), _VAL_LOSSES)
    keras_lr = _keras_callback_trace(
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=2, factor=0.2, min_lr=1e-5), _VAL_LOSSES)
    stopping, plateau, lr = stage_runner.EarlyStopping(3), stage_runner.PlateauReducer(2, 0.2, 1e-5), 1e-3
    stops, rates = [], []
    for epoch, value in enumerate(_VAL_LOSSES):
        stops.append(stopping.should_stop(epoch, value))
        lr = plateau.next_learning_rate(value, lr)
        rates.append(lr)
    # Training ends at the first stop; Keras' flag stays set after it.
    assert stops.index(True) == [stop for stop, _ in keras_stop].index(True) == 8
    assert rates == pytest.approx([rate for _, rate in keras_lr], rel=1e-6)
    assert min(rates) < 1e-3  # the sequence does trigger reductions


def test_stopping_and_plateau_state_survives_a_restart():
    stopping, plateau = stage_runner.EarlyStopping(5), stage_runner.PlateauReducer(2, 0.5, 1e-7)
    for epoch, value in enumerate([0.3, 0.25, 0.26]):
        stopping.should_stop(epoch, value)
        plateau.next_learning_rate(value, 1e-3)
    saved = json.loads(json.dumps({"early_stopping": stopping.state(), "reduce_lr": plateau.state()}))
    restored_stopping = stage_runner.EarlyStopping(5, **saved["early_stopping"])
    restored_plateau = stage_runner.PlateauReducer(2, 0.5, 1e-7, **saved["reduce_lr"])
    assert restored_stopping == stopping and restored_plateau == plateau
    # The next epoch without improvement runs out the plateau's patience, as it would have.
    assert restored_plateau.next_learning_rate(0.3, 1e-3) == pytest.approx(5e-4)


@pytest.mark.slow
def test_corrupt_train_shard_is_named(tmp_path):
    data_dir = tmp_path / "records"
    manifest = write_tiny_dataset(data_dir, {"train": (8, 8), "val": (2, 2)}, image_size=IMAGE_SIZE)
    shard = data_dir / manifest["splits"]["train"]["shard_files"][1]
    payload = bytearray(shard.read_bytes())
    middle = len(payload) // 2
    payload[middle : middle + 16] = bytes(16)  # a record's bytes no longer match its CRC
    shard.write_bytes(bytes(payload))
    config = dataclasses.replace(_config(str(data_dir), tmp_path / "model"), steps_per_epoch=2)
    # The pipeline's checked reader fails with an in-graph assertion naming the shard.
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"TFRecord shard {re.escape(str(shard))} is truncated or corrupted"):
        train.train_and_evaluate(config)
