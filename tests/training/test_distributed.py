"""The training loop under every strategy, on CPU: mirrored replicas with XLA in both low precisions,
two worker processes on localhost, a worker that never comes, and the tf.data service."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests import helpers
from tests.helpers import REPO_ROOT, write_tiny_dataset

IMAGE_SIZE = 32

# Runs in a fresh interpreter: logical devices must be set before TensorFlow starts.
_LOOP_CHECKS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from cxr_tfdata.training import replica_steps

    GB, STEPS = 32, 12
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, GB * STEPS).astype(np.float32)
    x = (rng.uniform(0, 180, (GB * STEPS, 16, 16, 1)) + 60 * y[:, None, None, None]).astype(np.float32)  # learnable

    def model():
        keras.utils.set_random_seed(0)
        i = keras.Input((16, 16, 1))
        h = keras.layers.Conv2D(8, 3, activation="relu")(i / 255.0)
        h = keras.layers.GlobalAveragePooling2D()(h)
        return keras.Model(i, keras.layers.Dense(1, activation="sigmoid", dtype="float32")(h))

    def run(policy, mirrored, jit, images=x, steps_per_epoch=STEPS, epochs=4):
        keras.mixed_precision.set_global_policy(policy)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if mirrored else tf.distribute.get_strategy()
        with strategy.scope():
            m = model()
            opt = replica_steps.make_optimizer(3e-2, policy == "mixed_float16")
            opt.build(m.trainable_variables)
        step_loop = replica_steps.Loop(strategy, m, opt, replica_steps.StepSettings(GB, jit, steps_per_loop=5))
        data = tf.data.Dataset.from_tensor_slices((images, y, np.ones_like(y))).batch(GB, drop_remainder=True).repeat()
        iterator = iter(strategy.experimental_distribute_dataset(data))
        losses = [step_loop.train(iterator, steps_per_epoch)["loss"] for _ in range(epochs)]
        replicas = [[t.numpy() for t in strategy.experimental_local_results(v.value)] for v in m.weights]
        same = all(np.array_equal(r[0], r[-1]) for r in replicas)
        scale = float(opt.dynamic_scale.numpy()) if hasattr(opt, "dynamic_scale") else None
        out = {"losses": losses, "replicas_equal": same, "scale": scale, "describe": step_loop.describe(),
               "weights": [w.tolist() for w in m.get_weights()]}
        keras.mixed_precision.set_global_policy("float32")
        return out

    results = {
        "f16_xla_mirrored": run("mixed_float16", True, True),
        "bf16_xla_mirrored": run("mixed_bfloat16", True, True),
        "f32_mirrored": run("float32", True, False),
        "f32_single": run("float32", False, False),
    }
    # A non-finite gradient on replica 1 only: the step must be skipped everywhere, not applied.
    poisoned = x.copy()
    poisoned[GB // 2:GB] = np.inf
    results["f16_inf_on_replica_1"] = run("mixed_float16", True, True, images=poisoned, steps_per_epoch=1, epochs=1)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def loop_results():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", _LOOP_CHECKS], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name, scaled", [("f16_xla_mirrored", True), ("bf16_xla_mirrored", False)])
def test_xla_on_two_mirrored_replicas_trains_in_both_low_precisions(loop_results, name, scaled):
    run = loop_results[name]
    assert "XLA on" in run["describe"] and "2 replica(s)" in run["describe"]
    assert run["replicas_equal"]
    assert run["losses"][-1] < run["losses"][0] - 0.02, run["losses"]  # it learns
    assert ("dynamic loss scaling" in run["describe"]) == scaled
    assert (run["scale"] is not None) == scaled
    if scaled:
        assert run["scale"] >= 2.0  # a loss scale was applied (Keras starts at 2^15)


@pytest.mark.slow
def test_two_replicas_train_like_one_device_at_the_same_global_batch(loop_results):
    mirrored, single = loop_results["f32_mirrored"], loop_results["f32_single"]
    for a, b in zip(mirrored["weights"], single["weights"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.slow
def test_a_non_finite_gradient_on_one_replica_skips_the_step_everywhere(loop_results):
    poisoned, clean = loop_results["f16_inf_on_replica_1"], loop_results["f16_xla_mirrored"]
    assert poisoned["replicas_equal"]
    assert poisoned["scale"] == 32768.0 / 2  # the loss scale halved: the step was recognised as bad
    weights = np.concatenate([np.ravel(w) for w in poisoned["weights"]])
    assert np.isfinite(weights).all()
    assert clean["scale"] is not None


# ----------------------------------------------------------------------------------------------
# Two worker processes on localhost


def _env(tmp_path, extra=None):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "KERAS_HOME": str(tmp_path / "keras_home"), **(extra or {})}
    env.pop("TF_CONFIG", None)
    return env


def _train_command(args):
    return [sys.executable, "-m", "cxr_tfdata.cli.train", *args]


def _digests(log: str) -> list[str]:
    return re.findall(r"Stage frozen done: .* weights (sha256:[0-9a-f]+)", log)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("records")
    # 16 train examples: one global batch of 16 per step, 8 per worker, so the order in which the
    # workers read them cannot matter, and two workers must train exactly like one process.
    write_tiny_dataset(path, {"train": (8, 8), "val": (4, 4)}, image_size=IMAGE_SIZE, num_shards=2)
    return path


def _common_args(records, model_dir, epochs):
    return [f"--data_dir={records}", f"--model_dir={model_dir}", "--weights=none", "--stage=frozen",
            f"--frozen_epochs={epochs}", "--frozen_early_stopping_patience=50", "--frozen_reduce_lr_patience=50",
            "--augment=none", "--mixed_precision=float32", "--dropout_rate=0"]


@pytest.mark.slow
def test_two_workers_resume_after_a_kill_and_train_like_one_process(records, tmp_path):
    epochs = 3
    model_dir = tmp_path / "two_workers"
    hosts = ",".join(f"localhost:{p}" for p in helpers.free_ports(2))
    args = [*_common_args(records, model_dir, epochs), "--frozen_batch_size=8", f"--worker_hosts={hosts}"]
    state = model_dir / "checkpoints" / "frozen_state.json"

    def start(index):
        return subprocess.Popen(_train_command([*args, f"--task_index={index}"]), cwd=REPO_ROOT, env=_env(tmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    chief, worker = start(0), start(1)
    deadline = time.monotonic() + 300
    while not (state.exists() and json.loads(state.read_text())["epochs_completed"] >= 1):
        assert chief.poll() is None and worker.poll() is None, chief.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no epoch completed in time"
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    _, chief_err = chief.communicate(timeout=120)
    assert chief.returncode == 1, chief_err[-3000:]  # the chief notices and stops, in one line
    assert "cxr-train: error: another worker of the cluster stopped" in chief_err
    committed = json.loads(state.read_text())["epochs_completed"]
    assert 1 <= committed < epochs

    chief, worker = start(0), start(1)
    (_, chief_err), (_, worker_err) = chief.communicate(timeout=300), worker.communicate(timeout=300)
    assert chief.returncode == worker.returncode == 0, (chief_err[-3000:], worker_err[-3000:])
    assert f"Resuming stage frozen after epoch {committed}" in chief_err
    assert f"Resuming stage frozen after epoch {committed}" in worker_err
    # Both workers end with the same weights, and only the chief wrote the model dir.
    assert _digests(chief_err) == _digests(worker_err) and len(_digests(chief_err)) == 1
    assert not list((model_dir / "checkpoints").glob("workertemp_*"))
    history = (model_dir / "history_frozen.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == [str(e) for e in range(epochs)]

    single_dir = tmp_path / "one_process"
    single = subprocess.run(_train_command([*_common_args(records, single_dir, epochs), "--frozen_batch_size=16"]),
                            cwd=REPO_ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    from cxr_tfdata.modeling import loading

    two = loading.load_model(str(model_dir / "final.keras")).get_weights()
    one = loading.load_model(str(single_dir / "final.keras")).get_weights()
    for a, b in zip(two, one, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_worker_whose_peer_never_comes_fails_in_bounded_time_naming_it(records, tmp_path):
    own, missing = helpers.free_ports(2)
    started = time.monotonic()
    result = subprocess.run(
        _train_command([*_common_args(records, tmp_path / "model", 1), "--frozen_batch_size=8",
                        f"--worker_hosts=localhost:{own},localhost:{missing}", "--task_index=0",
                        "--worker_timeout=5"]),
        cwd=REPO_ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("cxr-train:")]
    assert errors == [f"cxr-train: error: the 2-worker cluster did not form within 5 s: no answer from "
                      f"localhost:{missing}; start every worker with the same cluster, or raise --worker_timeout"]
    assert not (tmp_path / "model").exists()


def test_worker_flags_are_checked_before_anything_starts(records, tmp_path):
    from cxr_tfdata.training import distribute

    with pytest.raises(ValueError, match="--task_index: must be in \\[0, 1\\]"):
        distribute.cluster_from_flags("localhost:1,localhost:2", 2)
    with pytest.raises(ValueError, match="--worker_hosts: 'nohost' is not host:port"):
        distribute.cluster_from_flags("nohost", 0)


# ----------------------------------------------------------------------------------------------
# tf.data service

_SERVICE_RUN = textwrap.dedent("""
    import collections, json, sys
    import tensorflow as tf
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://")[1]
    workers = [service.WorkerServer(service.WorkerConfig(dispatcher_address=address)) for _ in range(2)]
    from cxr_tfdata.core import config as config_lib
    from cxr_tfdata.data import input_pipeline
    from cxr_tfdata.training import train
    data_dir, model_dir = sys.argv[1], sys.argv[2]
    data = config_lib.DataConfig(data_dir=data_dir, image_size=32, data_service=dispatcher.target)
    # One pass of the stream the trainer reads: every example exactly once, over both workers.
    one_pass = input_pipeline.create_dataset(data, "train", 4, training=True, with_metadata=True,
                                             service_job="count")
    seen = collections.Counter(name.decode() for _, _, meta in one_pass for name in meta["filename"].numpy())
    # And one epoch of real training through the service.
    config = config_lib.TrainConfig(
        model_dir=model_dir, data=data, augment=config_lib.AugmentConfig(placement="cpu"),
        model=config_lib.ModelConfig(weights="none"),
        frozen=config_lib.StageConfig(name="frozen", batch_size=4, epochs=1), stage="frozen",
        mixed_precision="float32")
    metrics = train.train_and_evaluate(config)
    print(json.dumps({"seen": seen, "metrics": metrics}))
""")


@pytest.mark.slow
def test_the_data_service_feeds_training_and_delivers_each_example_once_per_pass(records, tmp_path):
    result = subprocess.run([sys.executable, "-c", _SERVICE_RUN, str(records), str(tmp_path / "model")],
                            cwd=REPO_ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(outcome["seen"]) == 16 and set(outcome["seen"].values()) == {1}
    assert outcome["metrics"]["frozen"]["epochs_run"] == 1
    assert (tmp_path / "model" / "frozen_best.keras").is_file()


def test_data_service_address_must_be_grpc():
    from cxr_tfdata.core.config import DataConfig

    with pytest.raises(ValueError, match="--data_service_address: must be grpc://host:port"):
        DataConfig(data_dir="x", data_service="localhost:5050")
