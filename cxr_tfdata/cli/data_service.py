"""cxr-data-service: a tf.data service dispatcher or worker, to move cxr-train's input work to other machines.

Start one dispatcher and any number of workers, then pass the dispatcher to cxr-train:

  cxr-data-service --role=dispatcher --port=5050 --work_dir=/shared/dispatcher
  cxr-data-service --role=worker --port=5051 --dispatcher_address=host:5050      # on each CPU machine
  cxr-train ... --data_service_address=grpc://host:5050

Workers read the dataset's shard files by the path cxr-train was given (--data_dir), so every
worker must see the dataset at that same path. With --work_dir the dispatcher journals its state
there and a restarted dispatcher resumes its jobs (fault-tolerant mode). Runs until stopped.
"""

from __future__ import annotations

import os
import socket

from absl import app, flags, logging

from cxr_tfdata.cli import run_main

ROLES = ("dispatcher", "worker")
# What a dispatcher writes into its --work_dir.
_WORK_DIR_ENTRIES = {"tf_data_dispatcher_journal", "datasets"}

_ROLE = flags.DEFINE_enum("role", None, list(ROLES), "Which server this process runs.")
_PORT = flags.DEFINE_integer("port", 0, "Port to listen on (0: any free port, printed at start).", lower_bound=0)
_DISPATCHER_ADDRESS = flags.DEFINE_string(
    "dispatcher_address", None, "Worker: host:port of the dispatcher (grpc:// may be given).")
_WORKER_ADDRESS = flags.DEFINE_string(
    "worker_address", None, "Worker: host:port under which the dispatcher and trainers reach this worker "
    "(default: this host's name and --port).")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", None, "Dispatcher: folder for its journal; a restarted dispatcher recovers its jobs from it. "
    "Must be new, empty, or one a dispatcher used before.")
flags.mark_flag_as_required("role")


def _check_work_dir(work_dir: str) -> str:
    from cxr_tfdata import outputs

    work_dir = outputs.canonical(work_dir)
    if os.path.lexists(work_dir):
        if not os.path.isdir(work_dir) or os.path.islink(work_dir):
            raise outputs.UnsafeOutputError(f"--work_dir={work_dir} is not a folder")
        foreign = set(os.listdir(work_dir)) - _WORK_DIR_ENTRIES
        if foreign:
            raise outputs.UnsafeOutputError(
                f"--work_dir={work_dir} holds {', '.join(sorted(foreign)[:5])}, which a dispatcher does not "
                f"write; choose a new or empty folder")
    return work_dir


def _serve_dispatcher(port: int, work_dir: str | None) -> None:
    import tensorflow as tf

    config = tf.data.experimental.service.DispatcherConfig(
        port=port, work_dir=work_dir, fault_tolerant_mode=bool(work_dir))
    server = tf.data.experimental.service.DispatchServer(config)
    address = f"grpc://{socket.gethostname()}:{server.target.rsplit(':', 1)[1]}"
    print(f"cxr-data-service: dispatcher serving at {address} (journal: {work_dir or 'none'}); pass "
          f"--data_service_address={address} to cxr-train", flush=True)
    server.join()


def _serve_worker(port: int, dispatcher: str, worker_address: str | None) -> None:
    import tensorflow as tf

    dispatcher = dispatcher.split("://", 1)[-1]
    if port == 0:
        with socket.socket() as probe:  # a fixed port, so the address given to the dispatcher is right
            probe.bind(("", 0))
            port = probe.getsockname()[1]
    address = worker_address or f"{socket.gethostname()}:{port}"
    config = tf.data.experimental.service.WorkerConfig(dispatcher_address=dispatcher, worker_address=address,
                                                       port=port)
    server = tf.data.experimental.service.WorkerServer(config)
    print(f"cxr-data-service: worker serving at {address} for dispatcher {dispatcher}", flush=True)
    server.join()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _ROLE.value == "dispatcher":
        if _DISPATCHER_ADDRESS.value or _WORKER_ADDRESS.value:
            raise ValueError("--dispatcher_address and --worker_address are for --role=worker")
        work_dir = _check_work_dir(_WORK_DIR.value) if _WORK_DIR.value else None
        if work_dir is None:
            logging.warning("no --work_dir: a restarted dispatcher starts afresh and running jobs fail")
            _serve_dispatcher(_PORT.value, None)
            return 0
        from cxr_tfdata import locking

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
