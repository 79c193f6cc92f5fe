"""The mixed-precision policy: which one the hardware calls for, and whether it needs loss scaling."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import keras
import tensorflow as tf
from absl import logging

# CPU feature flags (Linux /proc/cpuinfo) that make bfloat16 matrix math faster than float32.
FAST_BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# Tensor cores (fast float16) start with Volta, compute capability 7.0.
MIN_TENSOR_CORE_CAPABILITY = (7, 0)
CPUINFO_PATH = "/proc/cpuinfo"


def cpu_has_fast_bfloat16(cpuinfo_path: str = CPUINFO_PATH) -> bool:
    """True when the CPU advertises native bfloat16 instructions (False where cpuinfo is absent)."""
    if not os.path.exists(cpuinfo_path):
        return False
    with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return any(flag in flags for flag in FAST_BFLOAT16_CPU_FLAGS)
    return False


def _gpus_have_tensor_cores(gpus: list) -> bool:
    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability is None or tuple(capability) < MIN_TENSOR_CORE_CAPABILITY:
            return False
    return True


def choose_precision_policy(requested: str, cpuinfo_path: str = CPUINFO_PATH) -> tuple[str, str]:
    """Resolves --mixed_precision to a Keras policy name and the reason for it.

    "auto": mixed_float16 on CUDA GPUs that all have tensor cores (compute capability >= 7.0),
    mixed_bfloat16 on TPUs and on CPUs with native bfloat16 (avx512_bf16 / amx_bf16),
    float32 otherwise (older GPUs, CPUs without bfloat16 instructions).
    """
    if requested != "auto":
        return requested, "requested by --mixed_precision"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if _gpus_have_tensor_cores(gpus):
            return "mixed_float16", f"{len(gpus)} GPU(s) with compute capability >= 7.0"
        return "float32", "GPU(s) without tensor cores (compute capability < 7.0)"
    if tf.config.list_physical_devices("TPU"):
        return "mixed_bfloat16", "TPU"
    if cpu_has_fast_bfloat16(cpuinfo_path):
        return "mixed_bfloat16", f"CPU with one of {FAST_BFLOAT16_CPU_FLAGS}"
    return "float32", "CPU without native bfloat16 instructions"


def set_precision_policy(requested: str) -> str:
    """Chooses, sets globally and logs the mixed-precision policy; returns its name."""
    policy, reason = choose_precision_policy(requested)
    keras.mixed_precision.set_global_policy(policy)
    logging.info("Mixed precision policy %s (%s)", policy, reason)
    return policy


@contextlib.contextmanager
def global_policy_scope(policy: str) -> Iterator[None]:
    """Models built inside use `policy` (e.g. float32 copies for saving); the old policy returns after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def needs_loss_scaling() -> bool:
    """float16 needs dynamic loss scaling (small gradients underflow); bfloat16 and float32 do not."""
    return keras.config.dtype_policy().compute_dtype == "float16"
