"""End-to-end tests of the cxr-train binary: a flagfile with XLA on two replicas, resume after kill -9, flag errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import REPO_ROOT, assert_quiet, write_tiny_dataset

IMAGE_SIZE = 32

# Two logical CPU devices so --distribution=mirrored runs MirroredStrategy with 2 replicas.
_TWO_CPU_LAUNCHER = textwrap.dedent("""
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from cxr_tfdata.cli import train
    sys.argv = ["cxr-train", *sys.argv[1:]]
    train.run()
""")


def _run(args, tmp_path, launcher=None, extra_env=None, timeout=600):
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home"),
           **(extra_env or {})}
    command = [sys.executable, "-c", launcher] if launcher else [sys.executable, "-m", "cxr_tfdata.cli.train"]
    return subprocess.run([*command, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("records")
    write_tiny_dataset(path, {"train": (8, 8), "val": (5, 6), "test": (2, 2)}, image_size=IMAGE_SIZE)
    return path


@pytest.mark.slow
def test_xla_on_two_replicas_in_float16_from_a_flagfile(data_dir, tmp_path):
    model_dir = tmp_path / "model"
    flagfile = tmp_path / "train.flags"
    flagfile.write_text("\n".join([
        f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--weights=none", "--stage=frozen",
        "--frozen_epochs=2", "--frozen_batch_size=4", "--distribution=mirrored", "--jit_compile=true",
        "--mixed_precision=mixed_float16", "--augment=device", "--steps_per_loop=2",
    ]) + "\n")
    result = _run([f"--flagfile={flagfile}"], tmp_path, launcher=_TWO_CPU_LAUNCHER)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s) on 1 worker(s)" in result.stderr
    assert ("dtype policy mixed_float16, dynamic loss scaling, XLA on (per-replica step), 2 replica(s) "
            "(MirroredStrategy), global batch 8, 2 step(s) per host call") in result.stderr
    for name in ("frozen_best.keras", "final.keras", "history_frozen.csv", "metrics.json", "config.json"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["distribution"] == "mirrored" and config["jit_compile"] == "true"
    assert config["frozen"]["batch_size"] == 4 and config["augment"]["placement"] == "device"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["frozen"]["val_auc"] <= 1.0 and metrics["frozen"]["epochs_run"] == 2
    history = (model_dir / "history_frozen.csv").read_text()
    assert "train_images_per_second" in history.splitlines()[0]


@pytest.mark.parametrize("flag, fragment", [
    ("--frozen_batch_size=0", "--frozen_batch_size"),
    ("--finetune_learning_rate=2", "--finetune_learning_rate"),
    ("--rotation_range=400", "--rotation_range"),
    ("--image_size=64", "--image_size=64"),
    ("--stage=everything", "--stage"),
    ("--steps_per_epoch=-1", "--steps_per_epoch"),
])
def test_invalid_flags_are_rejected_naming_the_flag(data_dir, tmp_path, flag, fragment):
    model_dir = tmp_path / "model"
    size = [] if flag.startswith("--image_size") else [f"--image_size={IMAGE_SIZE}"]
    result = _run([f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--weights=none", *size, flag], tmp_path)
    assert result.returncode != 0
    assert fragment in result.stderr
    assert not (model_dir / "config.json").exists()


def test_imagenet_weights_offline_fail_before_any_output(data_dir, tmp_path):
    model_dir = tmp_path / "model"
    # An unreachable proxy makes the download probe fail at once, online or not.
    proxy = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = _run([f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--weights=imagenet"], tmp_path,
                  extra_env=proxy)
    assert result.returncode == 1, result.stderr[-2000:]
    expected = tmp_path / "keras_home" / "models" / "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert str(expected) in result.stderr and "--weights=" in result.stderr
    assert not model_dir.exists()


def test_bad_weights_file_fails_naming_it_before_any_output(data_dir, tmp_path):
    bad = tmp_path / "resnet.h5"
    bad.write_bytes(b"\x89HDF\r\n truncated")
    model_dir = tmp_path / "model"
    result = _run([f"--data_dir={data_dir}", f"--model_dir={model_dir}", f"--weights={bad}"], tmp_path)
    assert result.returncode == 1
    assert f"--weights={bad}" in result.stderr
    assert not model_dir.exists()


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_completed_epoch(data_dir, tmp_path):
    model_dir = tmp_path / "model"
    args = [f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--weights=none", "--stage=frozen",
            "--frozen_epochs=3", "--frozen_batch_size=8", "--augment=none", "--mixed_precision=mixed_bfloat16"]
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home")}
    state_path = model_dir / "checkpoints" / "frozen_state.json"
    process = subprocess.Popen([sys.executable, "-m", "cxr_tfdata.cli.train", *args], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (state_path.exists() and json.loads(state_path.read_text())["epochs_completed"] >= 1):
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no epoch completed in time"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)  # wherever it is: in epoch 2 or writing its files
    finally:
        process.wait()
    committed = json.loads(state_path.read_text())
    assert 1 <= committed["epochs_completed"] < 3
    result = _run(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming stage frozen after epoch {committed['epochs_completed']}" in result.stderr
    assert_quiet(result.stderr, "cxr-train", "cxr-train: Done: final.keras")
    state = json.loads(state_path.read_text())
    assert state["completed"] and [row["epoch"] for row in state["history"]] == [0, 1, 2]
    assert state["best_val_loss"] <= committed["best_val_loss"]
    assert (model_dir / "frozen_best.keras").is_file() and (model_dir / "final.keras").is_file()


@pytest.mark.slow
def test_corrupt_shard_fails_in_one_line_naming_it(tmp_path):
    data_dir = tmp_path / "records"
    manifest = write_tiny_dataset(data_dir, {"train": (8, 8), "val": (2, 2)}, image_size=IMAGE_SIZE)
    shard = data_dir / manifest["splits"]["train"]["shard_files"][0]
    payload = bytearray(shard.read_bytes())
    payload[len(payload) // 2 : len(payload) // 2 + 16] = bytes(16)  # a record no longer matches its CRC
    shard.write_bytes(bytes(payload))
    result = _run([f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'model'}", "--weights=none",
                   "--stage=frozen", "--frozen_epochs=1", "--frozen_batch_size=4", "--augment=none",
                   "--mixed_precision=float32"], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("cxr-train: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"TFRecord shard {shard} is truncated or corrupted" in errors[0]
    assert result.stderr.rstrip().endswith(errors[0])  # nothing of the TensorFlow message after it
