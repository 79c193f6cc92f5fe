"""Which tf.distribute strategy a run uses, where this process stands in it, and whether XLA is on.

--distribution:
  auto          multi_worker when the cluster (TF_CONFIG or --worker_hosts) has several workers,
                mirrored with several GPUs, else one device;
  default       one device;
  mirrored      MirroredStrategy over all GPUs (or, without a GPU, all logical CPUs);
  multi_worker  MultiWorkerMirroredStrategy over the workers of TF_CONFIG.
--jit_compile=auto turns XLA on when a GPU or TPU is visible: on CPUs TensorFlow's oneDNN kernels
are faster than XLA's for this network.

Creating MultiWorkerMirroredStrategy waits inside TensorFlow until every worker has joined, and
holds Python's interpreter lock while it waits, so no thread or signal handler of this process can
interrupt it. `Watchdog` is a process forked before TensorFlow is imported: if the cluster has not
formed in time, it names the addresses that do not answer and ends the worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import socket
import time

from cxr_tfdata.core import endpoints
from cxr_tfdata.core.config import DISTRIBUTIONS

TF_CONFIG = "TF_CONFIG"


def cluster_from_flags(worker_hosts: str, task_index: int | None) -> None:
    """--worker_hosts=h1:p,h2:p --task_index=N as TF_CONFIG (as Model Garden's flags do)."""
    hosts = [h.strip() for h in worker_hosts.split(",") if h.strip()]
    if not hosts:
        raise ValueError(f"--worker_hosts: expected host:port[,host:port...], got {worker_hosts!r}")
    for host in hosts:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"--worker_hosts: {host!r} is not host:port")
    if task_index is None or not 0 <= task_index < len(hosts):
        raise ValueError(f"--task_index: must be in [0, {len(hosts) - 1}] for {len(hosts)} worker host(s), "
                         f"got {task_index}")
    if os.environ.get(TF_CONFIG):
        raise ValueError("--worker_hosts: TF_CONFIG is set too; give the cluster one way only")
    os.environ[TF_CONFIG] = json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": task_index}})


def cluster_config() -> dict | None:
    """TF_CONFIG as a dict, or None; a malformed one is an error naming it."""
    raw = os.environ.get(TF_CONFIG, "")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        workers = config["cluster"].get("worker", []) + config["cluster"].get("chief", [])
        task = config["task"]
        task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{TF_CONFIG} is not a valid cluster description ({e}): {raw[:200]}") from e
    if not workers:
        raise ValueError(f"{TF_CONFIG} names no worker: {raw[:200]}")
    return config


def cluster_addresses(config: dict) -> list[str]:
    cluster = config["cluster"]
    return [*cluster.get("chief", []), *cluster.get("worker", [])]


def own_address(config: dict) -> str:
    """This task's own address in the cluster."""
    task = config["task"]
    return config["cluster"][task["type"]][int(task["index"])]


def resolve_distribution(distribution: str) -> str:
    """The strategy --distribution=auto stands for here (without creating it)."""
    if distribution != "auto":
        return distribution
    config = cluster_config()
    if config is not None and len(cluster_addresses(config)) > 1:
        return "multi_worker"
    import tensorflow as tf

    return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"


def resolve_jit(choice: str) -> tuple[bool, str]:
    """--jit_compile: (on?, why)."""
    if choice in ("true", "false"):
        return choice == "true", "requested by --jit_compile"
    import tensorflow as tf

    accelerators = tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices("TPU")
    if accelerators:
        return True, f"auto: {len(accelerators)} accelerator(s)"
    return False, "auto: CPU only (oneDNN kernels beat XLA's on a CPU)"


@dataclasses.dataclass
class Placement:
    """The strategy of a run and this process's place in it."""

    strategy: object
    is_chief: bool = True
    task_id: int = 0
    num_workers: int = 1
    jit_compile: bool = False
    jit_reason: str = ""

    def barrier(self, what: str) -> None:
        """Waits until every worker gets here (one collective); nothing to wait for on one worker."""
        if self.num_workers <= 1:
            return
        import tensorflow as tf

        strategy = self.strategy
        total = strategy.reduce(tf.distribute.ReduceOp.SUM,
                                strategy.run(lambda: tf.constant(1.0)), axis=None)
        if int(total.numpy()) != strategy.num_replicas_in_sync:
            raise RuntimeError(f"workers disagree at '{what}'")

    def any_worker(self, flag: bool) -> bool:
        """True when `flag` is true on any worker: one all-reduce, which every worker must make at
        the same point (the train loop makes it after each host call). One worker: `flag` itself."""
        if self.num_workers <= 1:
            return bool(flag)
        import tensorflow as tf

        strategy, value = self.strategy, 1.0 if flag else 0.0
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(value)), axis=None)
        return float(total.numpy()) > 0.0

    def describe(self) -> str:
        role = "chief" if self.is_chief else f"worker {self.task_id}"
        kind = {"CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy",
                "_DefaultDistributionStrategy": "one device (no tf.distribute strategy)"}.get(
                    type(self.strategy).__name__, type(self.strategy).__name__)
        return (f"{kind} with {self.strategy.num_replicas_in_sync} replica(s) on "
                f"{self.num_workers} worker(s) (this process: {role}); XLA {'on' if self.jit_compile else 'off'} "
                f"({self.jit_reason})")


def num_input_pipelines(strategy) -> int:
    """Input pipelines distribute_datasets_from_function makes: one per worker."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 1
    spec = resolver.cluster_spec().as_dict()
    return len(spec.get("worker", [])) + len(spec.get("chief", []))


def choose_placement(distribution: str, jit_choice: str = "auto") -> Placement:
    """Creates the strategy for --distribution and resolves --jit_compile.

    Under multi_worker call this before any other TensorFlow op (TensorFlow requires it).
    """
    import tensorflow as tf
    from absl import logging

    kind = resolve_distribution(distribution)
    if kind == "multi_worker":
        config = cluster_config()
        if config is None:
            raise ValueError("--distribution=multi_worker: set TF_CONFIG, or pass --worker_hosts and --task_index")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        task_type, task_id = resolver.task_type, int(resolver.task_id)
        spec = resolver.cluster_spec().as_dict()
        is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in spec)
        workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
        placement = Placement(strategy, is_chief, task_id, workers)
    elif kind == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        placement = Placement(tf.distribute.MirroredStrategy(devices=devices))
    elif kind == "default":
        placement = Placement(tf.distribute.get_strategy())
    else:
        raise ValueError(f"--distribution: must be one of {DISTRIBUTIONS}, got {distribution!r}")
    placement.jit_compile, placement.jit_reason = resolve_jit(jit_choice)
    logging.info("Distribution: %s", placement.describe())
    return placement


def unreachable(addresses: list[str], timeout: float = 2.0) -> list[str]:
    """The host:port addresses that accept no TCP connection within timeout seconds."""
    dead = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
        except (OSError, ValueError):
            dead.append(address)
    return dead


class Watchdog:
    """Ends this process when the multi-worker cluster has not formed within `seconds`.

    Fork it before TensorFlow is imported (a forked TensorFlow runtime is not safe) and call
    `cluster_formed()` once the strategy exists. If that does not come in time, the watchdog
    prints one line naming the other workers' addresses that accept no connection, and kills the
    worker: the
    worker itself is stuck in TensorFlow with Python's interpreter lock held, where neither a
    thread nor a signal handler can act.
    """

    def __init__(self, seconds: float, addresses: list[str], program: str, cluster_size: int, error_fd: int = 2):
        endpoints.exit_one_on_deadline()  # the kill below ends the worker with status 1, not 137
        read_end, self._write_end = os.pipe()
        parent = os.getpid()
        self._child = os.fork()
        if self._child == 0:  # the watchdog
            os.close(self._write_end)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            ready, _, _ = select.select([read_end], [], [], seconds)
            if not ready:
                dead = unreachable(addresses)
                where = (f"no answer from {', '.join(dead)}" if dead else
                         f"every address answers ({', '.join(addresses)}) but the workers did not all join")
                message = (f"{program}: error: the {cluster_size}-worker cluster did not form within "
                           f"{seconds:g} s: {where}; start every worker with the same cluster, or raise "
                           f"--worker_timeout\n")
                os.write(error_fd, message.encode())
                os.kill(parent, endpoints.DEADLINE_SIGNAL)
            os._exit(0)
        os.close(read_end)
        self._started = time.monotonic()

    def cluster_formed(self) -> None:
        os.write(self._write_end, b"1")
        os.close(self._write_end)
        os.waitpid(self._child, 0)
