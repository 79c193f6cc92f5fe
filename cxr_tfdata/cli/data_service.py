"""cxr-data-service: a tf.data service dispatcher or worker, to move cxr-train's input work to other machines.

Start one dispatcher and any number of workers, then pass the dispatcher to cxr-train:

  cxr-data-service --role=dispatcher --port=5050 --work_dir=/shared/dispatcher
  cxr-data-service --role=worker --port=5051 --dispatcher_address=host:5050      # on each CPU machine
  cxr-train ... --data_service_address=grpc://host:5050

Workers read the dataset's shard files by the path cxr-train was given (--data_dir), so every
worker must see the dataset at that same path. With --work_dir the dispatcher journals its state
there and a restarted dispatcher resumes its jobs (fault-tolerant mode). Runs until stopped:
SIGTERM (a systemd or Kubernetes stop) or SIGINT stops serving and exits with status 0 within about
a second, saying so in one line. A worker first waits at most --connect_timeout seconds for its
dispatcher to answer, then fails in one line naming the address. A --port in use is refused up front.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from absl import app, flags, logging

from cxr_tfdata.core import endpoints
from cxr_tfdata.core.runner import run_main

ROLES = ("dispatcher", "worker")
# What a dispatcher writes into its --work_dir.
_WORK_DIR_ENTRIES = {"tf_data_dispatcher_journal", "datasets"}

_ROLE = flags.DEFINE_enum("role", None, list(ROLES), "Which server this process runs.")
_PORT = flags.DEFINE_integer("port", 0, "Port to listen on (0: any free port, printed at start).",
                             lower_bound=0, upper_bound=65535)
_DISPATCHER_ADDRESS = flags.DEFINE_string(
    "dispatcher_address", None, "Worker: host:port of the dispatcher (grpc:// may be given).")
_WORKER_ADDRESS = flags.DEFINE_string(
    "worker_address", None, "Worker: host:port under which the dispatcher and trainers reach this worker "
    "(default: this host's name and --port).")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", None, "Dispatcher: folder for its journal; a restarted dispatcher recovers its jobs from it. "
    "Must be new, empty, or one a dispatcher used before.")
_CONNECT_TIMEOUT = flags.DEFINE_float(
    "connect_timeout", 60.0, "Worker: seconds to wait for the dispatcher to answer before failing.")
flags.mark_flag_as_required("role")


def _check_work_dir(work_dir: str) -> str:
    from cxr_tfdata.files import output_safety

    work_dir = output_safety.canonical(work_dir)
    if os.path.lexists(work_dir):
        if not os.path.isdir(work_dir) or os.path.islink(work_dir):
            raise output_safety.UnsafeOutputError(f"--work_dir={work_dir} is not a folder")
        foreign = set(os.listdir(work_dir)) - _WORK_DIR_ENTRIES
        if foreign:
            raise output_safety.UnsafeOutputError(
                f"--work_dir={work_dir} holds {', '.join(sorted(foreign)[:5])}, which a dispatcher does not "
                f"write; choose a new or empty folder")
    return work_dir


def _serve_dispatcher(port: int, work_dir: str | None) -> None:
    import tensorflow as tf

    config = tf.data.experimental.service.DispatcherConfig(
        port=port, work_dir=work_dir, fault_tolerant_mode=bool(work_dir))
    server = _started(lambda: tf.data.experimental.service.DispatchServer(config), port)
    address = f"grpc://{socket.gethostname()}:{server.target.rsplit(':', 1)[1]}"
    _serve_until_stopped(server, f"dispatcher at {address}", (
        f"cxr-data-service: dispatcher serving at {address} (journal: {work_dir or 'none'}); pass "
        f"--data_service_address={address} to cxr-train"))


def _started(make_server, port: int):
    """The server `make_server` starts; gRPC's failure to listen (a port taken since it was checked)
    as one line naming --port."""
    try:
        return make_server()
    except RuntimeError as e:
        if "Could not start gRPC server" not in str(e):
            raise
        raise ValueError(f"--port={port}: could not listen on port {port} (in use?); choose another port, "
                         f"or --port=0 for any free one") from None


def _serve_until_stopped(server, what: str, announcement: str) -> None:
    """Prints `announcement`, serves until SIGTERM or SIGINT, then stops the server and says so in one line.

    Not server.join(): it blocks in TensorFlow, where Python's signal handlers never run. Short
    sleeps let them run; the handlers are set before the announcement, so a stop sent once the
    address is printed is never lost (a signal during start-up ends the run as runner.py does).
    """
    received = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, lambda number, frame: received.append(number))
    print(announcement, flush=True)
    while not received:
        time.sleep(0.5)
    name = signal.Signals(received[0]).name
    server.stop()
    print(f"cxr-data-service: stopped on {name}: the {what} no longer serves", file=sys.stderr, flush=True)


def _serve_worker(port: int, dispatcher: str, worker_address: str | None) -> None:
    dispatcher = dispatcher.split("://", 1)[-1]
    if port:
        endpoints.check_port_free(port)
    registered = _wait_for_dispatcher(dispatcher, _CONNECT_TIMEOUT.value)
    import tensorflow as tf

    if port == 0:
        with socket.socket() as probe:  # a fixed port, so the address given to the dispatcher is right
            probe.bind(("", 0))
            port = probe.getsockname()[1]
    address = worker_address or f"{socket.gethostname()}:{port}"
    config = tf.data.experimental.service.WorkerConfig(dispatcher_address=dispatcher, worker_address=address,
                                                       port=port)
    registered.begin()
    server = _started(lambda: tf.data.experimental.service.WorkerServer(config), port)
    registered.met()
    _serve_until_stopped(server, f"worker at {address}",
                         f"cxr-data-service: worker serving at {address} for dispatcher {dispatcher}")


def _wait_for_dispatcher(dispatcher: str, seconds: float) -> endpoints.Deadline:
    """Waits for a listener at the dispatcher's address, then bounds the worker's registration.

    TensorFlow's WorkerServer start blocks, with Python's interpreter lock held, until the dispatcher
    answers: without these checks a worker of a missing dispatcher runs silently forever.
    """
    host, port = endpoints.split_address(dispatcher, "--dispatcher_address")
    if not endpoints.wait_for_listener(host, port, seconds):
        raise ValueError(f"--dispatcher_address={dispatcher}: no dispatcher answers at {host}:{port} within "
                         f"{seconds:g} s (--connect_timeout); start cxr-data-service --role=dispatcher there first")
    from cxr_tfdata.core import console

    # Forked before TensorFlow is imported: the registration itself cannot be interrupted.
    return endpoints.Deadline(
        seconds, f"cxr-data-service: error: --dispatcher_address={dispatcher}: {host}:{port} accepts connections "
                 f"but no tf.data dispatcher registered this worker within {seconds:g} s (--connect_timeout)",
        error_fd=console.original_stderr_fd())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CONNECT_TIMEOUT.value > 0:
        raise ValueError(f"--connect_timeout: must be > 0 seconds, got {_CONNECT_TIMEOUT.value}")
    if _ROLE.value == "dispatcher" and _PORT.value:
        endpoints.check_port_free(_PORT.value)
    if _ROLE.value == "dispatcher":
        if _DISPATCHER_ADDRESS.value or _WORKER_ADDRESS.value:
            raise ValueError("--dispatcher_address and --worker_address are for --role=worker")
        work_dir = _check_work_dir(_WORK_DIR.value) if _WORK_DIR.value else None
        if work_dir is None:
            logging.warning("no --work_dir: a restarted dispatcher starts afresh and running jobs fail")
            _serve_dispatcher(_PORT.value, None)
            return 0
        from cxr_tfdata.files import locking

        os.makedirs(os.path.dirname(work_dir), exist_ok=True)
        with locking.exclusive_lock(locking.lock_path_beside(work_dir), f"--work_dir={work_dir}", "cxr-data-service"):
            _serve_dispatcher(_PORT.value, work_dir)
    else:
        if not _DISPATCHER_ADDRESS.value:
            raise ValueError("--dispatcher_address: is required with --role=worker")
        if _WORK_DIR.value:
            raise ValueError("--work_dir: is for --role=dispatcher")
        _serve_worker(_PORT.value, _DISPATCHER_ADDRESS.value, _WORKER_ADDRESS.value)
    return 0


def run():
    run_main(main, __name__, "cxr-data-service")


if __name__ == "__main__":
    run()
