"""Services that stop when told to, and waits with a bound.

Real processes on 127.0.0.1 only: cxr-data-service as a dispatcher and a worker stops on SIGTERM and
SIGINT with status 0 and one line; a worker whose dispatcher is missing, or is not a dispatcher, and
cxr-train with a dispatcher that does not answer fail within their flag's bound, naming the address;
--port out of range or in use is refused in one line naming --port, with no raw gRPC line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO_ROOT

STOP_SECONDS = 10
STARTUP_SECONDS = 120  # importing TensorFlow on a busy machine


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell may have left SIGINT ignored


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxr_tfdata.cli.data_service", *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _run(module: str, *args: str, timeout: float = STARTUP_SECONDS, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=timeout, **kwargs)
    return result, time.monotonic() - started


def _wait_for_line(process: subprocess.Popen, marker: str) -> str:
    """Reads stdout until the line holding `marker` (the server's "serving at" line)."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if marker in line:
            return line
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"no {marker!r} line: {process.communicate()}")


def _stop(process: subprocess.Popen, signum: int) -> tuple[int, str, float]:
    started = time.monotonic()
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"still running {STOP_SECONDS} s after signal {signum}") from None
    return process.returncode, stderr, time.monotonic() - started


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_dispatcher_stops_on_sigterm_with_status_0_and_one_line(tmp_path):
    port = _free_port()
    dispatcher = _start("--role=dispatcher", f"--port={port}", f"--work_dir={tmp_path / 'journal'}")
    _wait_for_line(dispatcher, "dispatcher serving at")
    status, stderr, seconds = _stop(dispatcher, signal.SIGTERM)
    assert status == 0, stderr
    assert _lines(stderr) == [f"cxr-data-service: stopped on SIGTERM: the dispatcher at grpc://"
                              f"{socket.gethostname()}:{port} no longer serves"], stderr
    assert seconds < STOP_SECONDS
    # Stopped, not abandoned: the port is free again and a new dispatcher may take the same journal.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("0.0.0.0", port))


def test_worker_stops_on_sigterm_and_dispatcher_on_sigint(tmp_path):
    dispatcher_port, worker_port = _free_port(), _free_port()
    dispatcher = _start("--role=dispatcher", f"--port={dispatcher_port}", f"--work_dir={tmp_path / 'journal'}")
    try:
        _wait_for_line(dispatcher, "dispatcher serving at")
        worker = _start("--role=worker", f"--port={worker_port}", f"--dispatcher_address=127.0.0.1:{dispatcher_port}",
                        f"--worker_address=127.0.0.1:{worker_port}", "--connect_timeout=60")
        try:
            _wait_for_line(worker, "worker serving at")
            status, stderr, _ = _stop(worker, signal.SIGTERM)
            assert status == 0, stderr
            assert _lines(stderr) == [f"cxr-data-service: stopped on SIGTERM: the worker at 127.0.0.1:{worker_port} "
                                      f"no longer serves"], stderr
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
        status, stderr, _ = _stop(dispatcher, signal.SIGINT)
        assert status == 0, stderr
        assert _lines(stderr)[-1].startswith("cxr-data-service: stopped on SIGINT: the dispatcher at"), stderr
        assert len([line for line in _lines(stderr) if "stopped" in line]) == 1, stderr
    finally:
        if dispatcher.poll() is None:
            dispatcher.kill()
            dispatcher.communicate()


def test_worker_without_a_dispatcher_fails_within_connect_timeout_naming_the_address():
    closed = _free_port()
    result, seconds = _run("cxr_tfdata.cli.data_service", "--role=worker", f"--port={_free_port()}",
                           f"--dispatcher_address=grpc://127.0.0.1:{closed}", "--connect_timeout=1", timeout=30)
    assert result.returncode == 1, result.stderr
    errors = _lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("cxr-data-service: error: --dispatcher_address=")
    assert f"127.0.0.1:{closed}" in errors[0] and "--connect_timeout" in errors[0], errors
    assert seconds < 15


def test_worker_whose_dispatcher_address_is_not_a_dispatcher_fails_within_connect_timeout():
    """A listener that never speaks gRPC: TensorFlow's worker start would block forever, deaf to signals."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        address = f"127.0.0.1:{mute.getsockname()[1]}"
        result, _ = _run("cxr_tfdata.cli.data_service", "--role=worker", f"--port={_free_port()}",
                         f"--dispatcher_address={address}", "--connect_timeout=3")
    assert result.returncode == 1, result.stderr
    errors = _lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"cxr-data-service: error: --dispatcher_address={address}: "), errors
    assert "--connect_timeout" in errors[0] and "within 3 s" in errors[0], errors


@pytest.mark.parametrize("port", ["70000", "65536", "-1"])
def test_port_out_of_range_is_refused_naming_the_flag(port):
    result, seconds = _run("cxr_tfdata.cli.data_service", "--role=dispatcher", f"--port={port}", timeout=30)
    assert result.returncode == 2, result.stderr
    errors = _lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith("cxr-data-service: error:"), result.stderr
    assert "--port" in errors[0] and port in errors[0], errors


@pytest.mark.parametrize("role", ["dispatcher", "worker"])
def test_port_in_use_is_refused_naming_the_flag_and_port_without_grpc_lines(role):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        extra = [f"--dispatcher_address=127.0.0.1:{_free_port()}", "--connect_timeout=1"] if role == "worker" else []
        result, _ = _run("cxr_tfdata.cli.data_service", f"--role={role}", f"--port={port}", *extra, timeout=60)
    assert result.returncode == 1, result.stderr
    errors = _lines(result.stderr)
    assert errors == [f"cxr-data-service: error: --port={port}: cannot listen on port {port}: already in use; "
                      f"choose another port, or --port=0 for any free one"], result.stderr
    assert "add_port" not in result.stderr and "gRPC" not in result.stderr


def test_train_with_a_silent_data_service_fails_fast_naming_the_flag(records, tmp_path):
    closed = _free_port()
    model_dir = tmp_path / "model"
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home")}
    result, seconds = _run("cxr_tfdata.cli.train", f"--data_dir={records}", f"--model_dir={model_dir}",
                           "--weights=none", "--stage=frozen", f"--data_service_address=grpc://127.0.0.1:{closed}",
                           "--data_service_timeout=1", timeout=60, env=env)
    assert result.returncode == 1, result.stderr
    errors = _lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"cxr-train: error: --data_service_address=grpc://127.0.0.1:{closed}: "), errors
    assert "--data_service_timeout" in errors[0], errors
    assert seconds < 30
    assert not model_dir.exists()  # nothing written


@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_timeouts_are_refused_naming_the_flag(value, tmp_path):
    result, _ = _run("cxr_tfdata.cli.data_service", "--role=worker", "--dispatcher_address=127.0.0.1:1",
                     f"--connect_timeout={value}", timeout=30)
    assert result.returncode == 1 and _lines(result.stderr) == [
        f"cxr-data-service: error: --connect_timeout: must be > 0 seconds, got {float(value)}"], result.stderr
    result, _ = _run("cxr_tfdata.cli.train", "--data_dir=unused", f"--model_dir={tmp_path / 'model'}",
                     f"--worker_timeout={value}", timeout=60)
    assert result.returncode == 1 and _lines(result.stderr) == [
        f"cxr-train: error: --worker_timeout: must be > 0 seconds, got {float(value)}"], result.stderr


def test_multi_worker_timeout_exits_1_with_one_line(tmp_path, records):
    own, missing = _free_port(), _free_port()
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home")}
    result, _ = _run("cxr_tfdata.cli.train", f"--data_dir={records}", f"--model_dir={tmp_path / 'model'}",
                     "--weights=none", "--stage=frozen", f"--worker_hosts=127.0.0.1:{own},127.0.0.1:{missing}",
                     "--task_index=0", "--worker_timeout=8", env=env)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    errors = [line for line in _lines(result.stderr) if "error" in line]
    assert errors == [f"cxr-train: error: the 2-worker cluster did not form within 8 s: no answer from "
                      f"127.0.0.1:{missing}; start every worker with the same cluster, or raise --worker_timeout"]
