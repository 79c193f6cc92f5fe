"""Preemption: SIGTERM to cxr-train saves a checkpoint at the next step boundary and exits 0; the
rerun resumes from that step. One process, and two localhost workers (SIGTERM to one of them)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests import helpers
from tests.helpers import REPO_ROOT, write_tiny_dataset

IMAGE_SIZE = 32
PREEMPTED = re.compile(r"^cxr-train: preempted \((SIGTERM|SIGTERM to another worker)\): saved a checkpoint at "
                       r"epoch (\d+) step (\d+) of (\d+); rerun the same command to resume from it$", re.M)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("records")
    write_tiny_dataset(path, {"train": (8, 8), "val": (2, 2)}, image_size=IMAGE_SIZE, num_shards=2)
    return path


def _env(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "KERAS_HOME": str(tmp_path / "keras_home")}
    env.pop("TF_CONFIG", None)
    return env


def _args(records, model_dir, batch_size):
    return [f"--data_dir={records}", f"--model_dir={model_dir}", "--weights=none", "--train_base", "--stage=frozen",
            "--frozen_epochs=2", f"--frozen_batch_size={batch_size}", "--steps_per_epoch=6", "--steps_per_loop=1", "--augment=none",
            "--mixed_precision=float32", "--frozen_early_stopping_patience=50", "--frozen_reduce_lr_patience=50"]


class Trainer:
    """A cxr-train process whose stderr is collected line by line as it comes."""

    def __init__(self, args, tmp_path):
        self.process = subprocess.Popen([sys.executable, "-m", "cxr_tfdata.cli.train", *args], cwd=REPO_ROOT,
                                        env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, seconds: float = 240) -> None:
        deadline = time.monotonic() + seconds
        while text not in self.log:
            assert self.process.poll() is None, self.log[-3000:]
            assert time.monotonic() < deadline, f"no {text!r} in time: {self.log[-3000:]}"
            time.sleep(0.05)

    def finish(self, seconds: float = 240) -> int:
        code = self.process.wait(timeout=seconds)
        self._reader.join(timeout=10)
        return code


def _state(model_dir):
    return json.loads((model_dir / "checkpoints" / "frozen_state.json").read_text())


def _history_epochs(model_dir):
    return [row.split(",")[0] for row in (model_dir / "history_frozen.csv").read_text().splitlines()[1:]]


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_and_the_rerun_resumes_from_that_step(records, tmp_path):
    model_dir = tmp_path / "model"
    args = _args(records, model_dir, batch_size=2)  # 6 steps per epoch
    trainer = Trainer(args, tmp_path)
    trainer.wait_for("Stage frozen epoch 1/2:")  # epoch 1 committed: epoch 2 is starting
    trainer.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert trainer.finish() == 0, trainer.log[-3000:]
    assert time.monotonic() - signalled < 20
    found = PREEMPTED.findall(trainer.log)
    assert len(found) == 1 and found[0][0] == "SIGTERM", trainer.log[-3000:]
    epoch, step, steps = map(int, found[0][1:])
    assert epoch == 2 and steps == 6 and 0 < step < steps
    state = _state(model_dir)
    assert state["epochs_completed"] == 1
    assert state["mid_epoch"]["epoch"] == 1 and state["mid_epoch"]["steps_done"] == step
    assert state["mid_epoch"]["train_sums"]["examples"] == 2 * step  # the epoch's sums so far
    name = f"frozen_epoch1_step{step}"
    assert state["checkpoint"] == name and (model_dir / "checkpoints" / f"{name}.index").exists()
    assert json.loads((model_dir / "checkpoints" / "frozen_checkpoints.json").read_text()) == [name]
    assert not list((model_dir / "checkpoints").glob("frozen_epoch0.*"))  # superseded, deleted
    assert _history_epochs(model_dir) == ["0"]

    rerun = Trainer(args, tmp_path)
    assert rerun.finish() == 0, rerun.log[-3000:]
    assert f"Resuming stage frozen at epoch 2 step {step} of 6" in rerun.log
    assert "Stage frozen epoch 1/2:" not in rerun.log and "Stage frozen epoch 2/2:" in rerun.log
    assert _history_epochs(model_dir) == ["0", "1"]
    state = _state(model_dir)
    assert state["completed"] and state["mid_epoch"] is None
    assert json.loads((model_dir / "checkpoints" / "frozen_checkpoints.json").read_text()) == ["frozen_epoch1"]
    assert (model_dir / "final.keras").exists()


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_at_the_same_step_and_both_resume(records, tmp_path):
    model_dir = tmp_path / "two_workers"
    hosts = ",".join(f"localhost:{p}" for p in helpers.free_ports(2))
    args = [*_args(records, model_dir, batch_size=2), f"--worker_hosts={hosts}"]  # global batch 4: 4 steps

    def start(index):
        return Trainer([*args, f"--task_index={index}"], tmp_path)

    chief, worker = start(0), start(1)
    chief.wait_for("Stage frozen epoch 1/2:")
    worker.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert worker.finish() == 0, worker.log[-3000:]
    assert chief.finish() == 0, chief.log[-3000:]
    assert time.monotonic() - signalled < 90  # 34 s measured on 2 busy cores: process exit under MWMS is slow
    (worker_cause, *worker_at), = PREEMPTED.findall(worker.log)
    (chief_cause, *chief_at), = PREEMPTED.findall(chief.log)
    assert (worker_cause, chief_cause) == ("SIGTERM", "SIGTERM to another worker")
    assert worker_at == chief_at, (worker_at, chief_at)  # the same step on both
    epoch, step, steps = map(int, chief_at)
    assert epoch == 2 and steps == 4 and 0 < step < steps
    state = _state(model_dir)
    assert state["mid_epoch"]["steps_done"] == step and state["checkpoint"] == f"frozen_epoch1_step{step}"
    assert not list((model_dir / "checkpoints").glob("workertemp_*"))

    chief, worker = start(0), start(1)
    assert chief.finish() == 0 and worker.finish() == 0, (chief.log[-3000:], worker.log[-3000:])
    for trainer in (chief, worker):
        assert f"Resuming stage frozen at epoch 2 step {step} of 4" in trainer.log
    digests = [re.findall(r"Stage frozen done: .* weights (sha256:[0-9a-f]+)", t.log) for t in (chief, worker)]
    assert digests[0] == digests[1] and len(digests[0]) == 1
    assert _history_epochs(model_dir) == ["0", "1"]


def test_sigterm_is_a_request_only_inside_the_loop_of_a_binary_that_opted_in(monkeypatch):
    from cxr_tfdata.core import runner

    monkeypatch.setattr(runner, "_STOP_AT_STEP_BOUNDARIES", [False])
    with runner.step_boundary_stops() as request:  # not opted in: SIGTERM is left alone
        assert signal.getsignal(signal.SIGTERM) is not None and not request.pending
    previous = signal.signal(signal.SIGTERM, runner._terminate)
    try:
        runner.stop_at_step_boundaries_on_sigterm()
        with pytest.raises(runner.Terminated):  # a second SIGTERM stops at once
            with runner.step_boundary_stops() as request:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                assert request.pending and request.signal_name == "SIGTERM"
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
        with pytest.raises(runner.Terminated):  # a request the loop never honoured still stops the program
            with runner.step_boundary_stops():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
        assert signal.getsignal(signal.SIGTERM) is runner._terminate  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
