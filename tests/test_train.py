"""Tests of cxr_tfdata.train: both stages end to end on tiny records, resume after a kill, checkpoints."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from cxr_tfdata import atomic, cli, input_pipeline, run_dir, train
from cxr_tfdata.config import AugmentConfig, DataConfig, ModelConfig, StageConfig, TrainConfig
from tests.helpers import write_tiny_dataset

IMAGE_SIZE = 32


class Interrupted(RuntimeError):
    """Stands for a kill right after an epoch's checkpoint was written."""


class InterruptAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupted(f"killed after epoch {epoch}")


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
    run_dir.prepare(config, "sha256:test-dataset", overwrite=overwrite)


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
        train.train_and_evaluate(config, extra_callbacks=[InterruptAfterEpoch(0)])
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
    if state["best_epoch"] < 1:  # no improvement after the restart: the very same file
        assert _digest(model_dir / "frozen_best.keras") == interrupted["best_digest"]
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
    state = train.initial_stage_state(StageConfig())
    atomic.write_json(run_dir.stage_paths(str(model_dir), "frozen").state, {**state, "epochs_completed": 1})


def test_restart_with_different_settings_is_refused_naming_them(data_dir, tmp_path):
    _prepare(_config(data_dir, tmp_path))
    _commit_an_epoch(tmp_path)
    (tmp_path / "checkpoints" / ".tmp-999999999-0123abcd-frozen_last.weights.h5").write_bytes(b"half")
    _prepare(_config(data_dir, tmp_path))  # same settings: resumes
    assert os.listdir(tmp_path / "checkpoints") == ["frozen_state.json"]  # a killed save's leftover is gone
    changed = _config(data_dir, tmp_path, steps_per_epoch=3)
    with pytest.raises(run_dir.ConfigMismatchError, match="steps_per_epoch"):
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
    faster = _config(data_dir, tmp_path, stage="finetune", jit_compile=True, distribution="default")
    faster = dataclasses.replace(faster, data=dataclasses.replace(faster.data, cache="file", cache_dir=cache_dir))
    _prepare(faster)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["jit_compile"] and written["distribution"] == "default"
    assert (written["data"]["cache"], written["data"]["cache_dir"]) == ("file", cache_dir)
    with pytest.raises(run_dir.ConfigMismatchError, match=r"\(data\.shuffle_buffer;"):
        _prepare(dataclasses.replace(
            faster, data=dataclasses.replace(faster.data, shuffle_buffer=7)))


def test_overwrite_removes_every_output_of_the_earlier_run_and_nothing_else(data_dir, tmp_path):
    _prepare(_config(data_dir, tmp_path))
    files, directories = run_dir.run_output_paths(str(tmp_path))
    for path in files:
        if os.path.basename(path) != "config.json":  # the run's own config.json marks the folder as a run
            with open(path, "w") as f:
                f.write("stale")
    for path in directories:
        os.makedirs(os.path.join(path, "train"))
        with open(os.path.join(path, "train", "events.out.tfevents.1764300000.host.7.0.v2"), "w") as f:
            f.write("stale")
    (tmp_path / "notes.txt").write_text("the user's")
    (tmp_path / "logs" / "frozen" / "plot.png").write_text("the user's")
    with open(run_dir.stage_paths(str(tmp_path), "finetune").pending_best_model(3), "w") as f:
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
                 "checkpoints/finetune_last.weights.h5"):
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


def test_balanced_sampling_replaces_class_weights_instead_of_adding_to_them(data_dir, tmp_path, caplog):
    counts = {"NORMAL": 4, "PNEUMONIA": 12}
    weighted = _config(data_dir, tmp_path)
    assert train.train_class_weights(weighted, counts) == pytest.approx({0: 2.0, 1: 2 / 3})
    balanced = dataclasses.replace(weighted, data=dataclasses.replace(weighted.data, balanced_sampling=True))
    with caplog.at_level("INFO"):
        assert train.train_class_weights(balanced, counts) is None
    assert "balanced sampling" in caplog.text
    strategy = tf.distribute.get_strategy()
    train_batches, _, _ = train.make_datasets(balanced, balanced.frozen, strategy, None)
    assert len(next(iter(train_batches))) == 2  # images and labels: no sample weights
    train_batches, _, _ = train.make_datasets(weighted, weighted.frozen, strategy, {0: 2.0, 1: 0.5})
    _, labels, weights = next(iter(train_batches))
    np.testing.assert_allclose(weights.numpy(), np.where(labels.numpy() == 1, 0.5, 2.0))


def _tiny_compiled_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    return model


def test_best_model_is_replaced_only_when_val_loss_improves_on_the_persisted_best(tmp_path):
    stage = StageConfig()
    paths = run_dir.stage_paths(str(tmp_path), "frozen")
    os.makedirs(os.path.dirname(paths.state))
    model = _tiny_compiled_model()
    state = train.initial_stage_state(stage)
    state["best_val_loss"] = 0.5  # persisted by an earlier, killed run
    callbacks = train.stage_callbacks(stage, paths, state)
    checkpoint = next(c for c in callbacks if isinstance(c, train.StageCheckpoint))
    for c in callbacks:
        c.set_model(model)
        c.on_train_begin()
    checkpoint.on_epoch_end(3, {"loss": 0.7, "val_loss": 0.6})
    assert not os.path.exists(paths.best_model)
    assert _state(tmp_path, "frozen")["epochs_completed"] == 4
    checkpoint.on_epoch_end(4, {"loss": 0.6, "val_loss": 0.4})
    assert os.path.exists(paths.best_model)
    saved = _state(tmp_path, "frozen")
    assert saved["best_val_loss"] == pytest.approx(0.4) and saved["best_epoch"] == 4
    assert [int(row["epoch"]) for row in _history(tmp_path, "frozen")] == [3, 4]


def _checkpoint_callback(paths, state, model):
    callbacks = train.stage_callbacks(StageConfig(), paths, state)
    for c in callbacks:
        c.set_model(model)
        c.on_train_begin()
    return next(c for c in callbacks if isinstance(c, train.StageCheckpoint))


def test_best_model_always_belongs_to_the_committed_best_epoch(tmp_path, monkeypatch):
    paths = run_dir.stage_paths(str(tmp_path), "frozen")
    os.makedirs(os.path.dirname(paths.state))
    model = _tiny_compiled_model()
    _checkpoint_callback(paths, train.initial_stage_state(StageConfig()), model).on_epoch_end(
        0, {"loss": 0.7, "val_loss": 0.6})
    epoch0_model = _digest(paths.best_model)
    model.set_weights([w + 1.0 for w in model.get_weights()])  # epoch 1 learned something better

    def killed(path, obj):
        raise Interrupted(f"killed before writing {path}")

    # Killed after saving epoch 1's better model, before the state file committed epoch 1.
    committed = run_dir.read_json(paths.state)
    with monkeypatch.context() as patch:
        patch.setattr(atomic, "write_json", killed)
        with pytest.raises(Interrupted):
            _checkpoint_callback(paths, committed, model).on_epoch_end(1, {"loss": 0.5, "val_loss": 0.4})
    assert _digest(paths.best_model) == epoch0_model
    restarted = run_dir.read_json(paths.state)
    assert restarted["best_epoch"] == 0
    train.settle_pending_best(paths, restarted)
    assert _digest(paths.best_model) == epoch0_model and not paths.pending_best_models()
    shutil.copyfile(paths.best_model, tmp_path / "epoch0.keras")

    # Killed after the state file committed epoch 1 as the best, before its model was renamed in.
    _checkpoint_callback(paths, restarted, model).on_epoch_end(1, {"loss": 0.5, "val_loss": 0.4})
    epoch1_model = _digest(paths.best_model)
    assert epoch1_model != epoch0_model
    os.replace(paths.best_model, paths.pending_best_model(1))
    shutil.copyfile(tmp_path / "epoch0.keras", paths.best_model)
    train.settle_pending_best(paths, run_dir.read_json(paths.state))
    assert _digest(paths.best_model) == epoch1_model and not paths.pending_best_models()


def test_callback_state_survives_a_restart(tmp_path):
    stage = StageConfig(early_stopping_patience=5, reduce_lr_patience=2)
    persisted = {"wait": 3, "best": 0.25, "best_epoch": 6}
    early_stopping = train.ResumableEarlyStopping(
        monitor="val_loss", patience=5, restore_best_weights=True, initial_state=persisted,
        initial_best_weights=[np.zeros((2, 1), np.float32), np.zeros((1,), np.float32)])
    reduce_lr = train.ResumableReduceLROnPlateau(
        monitor="val_loss", patience=stage.reduce_lr_patience, factor=0.5,
        initial_state={"wait": 1, "cooldown_counter": 0, "best": 0.25})
    model = _tiny_compiled_model()
    for callback in (early_stopping, reduce_lr):
        callback.set_model(model)
        callback.on_train_begin()
    assert early_stopping.get_state() == persisted
    # One more epoch without improvement: ReduceLROnPlateau's patience (2) runs out, as it would have.
    lr_before = float(model.optimizer.learning_rate)
    reduce_lr.on_epoch_end(7, {"val_loss": 0.3})
    assert float(model.optimizer.learning_rate) == pytest.approx(lr_before * 0.5)
    early_stopping.on_epoch_end(7, {"val_loss": 0.3})
    early_stopping.on_epoch_end(8, {"val_loss": 0.3})
    assert model.stop_training and early_stopping.get_state()["wait"] == 5


def test_per_epoch_decay_compounds_with_plateau_reductions():
    model = _tiny_compiled_model()
    decay = train.EpochLearningRateDecay(0.5)
    decay.set_model(model)
    decay.on_epoch_begin(0)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    model.optimizer.learning_rate = 1e-4  # as ReduceLROnPlateau would set it
    decay.on_epoch_begin(1)
    assert float(model.optimizer.learning_rate) == pytest.approx(5e-5)


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


@pytest.mark.parametrize("message, expected", [
    ("Graph execution error:\n\nDetected at node Assert/Assert defined at (most recent call last):\n"
     "<stack traces unavailable>\nError in user-defined function passed to MapDataset:30 transformation "
     "with iterator: Iterator::Root::Prefetch::Map: assertion failed: [TFRecord shard /d/a.tfrecord is "
     "truncated (TensorFlow\\'s reason)]\n\t [[{{node Assert/Assert}}]]\n\t [[IteratorGetNext]] "
     "[Op:__inference_multi_step_on_iterator_12624]",
     "TFRecord shard /d/a.tfrecord is truncated (TensorFlow's reason)"),
    ("Graph execution error:\n\nDetected at node Assert defined at (most recent call last):\n"
     "  File \"x.py\", line 1, in <module>\n\nassertion failed: [TFRecord shard /d/a.tfrecord is bad]\n"
     "\t [[{{node Assert}}]]\n\t [[IteratorGetNext]] [Op:__inference_multi_step_on_iterator_9]",
     "TFRecord shard /d/a.tfrecord is bad"),
    ("/d/cache.lockfile; No such file or directory [Op:IteratorGetNext]",
     "/d/cache.lockfile; No such file or directory"),
    ("Graph execution error:\n\nDetected at node Decode defined at (most recent call last):\n"
     "  File \"x.py\", line 1, in <module>\n\nInvalid PNG data\n\t [[{{node Decode}}]] [Op:f]",
     "Invalid PNG data"),
])
def test_tensorflow_errors_are_summarized_in_one_line(message, expected):
    assert cli.op_error_summary(message) == expected
