"""Tests of cxr_tfdata.training.precision: which policy the hardware calls for, loss scaling, scoped policies."""

from __future__ import annotations

import keras
import pytest
import tensorflow as tf

from cxr_tfdata.training import precision


@pytest.fixture(autouse=True)
def float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def cpu_only(monkeypatch):
    """The host seen as having no GPU and no TPU, whatever it has: "auto" then follows the CPU's flags."""
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda device_type=None: [] if device_type in ("GPU", "TPU") else real(device_type))


@pytest.mark.parametrize("flags_line, expected", [
    ("flags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni", "mixed_bfloat16"),
    ("flags\t\t: fpu sse2 amx_bf16 amx_tile", "mixed_bfloat16"),
    ("flags\t\t: fpu sse2 avx2 avx512f", "float32"),
])
def test_auto_precision_on_a_cpu_follows_its_bfloat16_flags(cpu_only, tmp_path, flags_line, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{flags_line}\n")
    policy, reason = precision.choose_precision_policy("auto", cpuinfo_path=str(cpuinfo))
    assert policy == expected
    assert reason.startswith("CPU with one of" if expected == "mixed_bfloat16" else "CPU without")


def test_a_cpu_without_cpuinfo_gets_float32(cpu_only, tmp_path):
    policy, reason = precision.choose_precision_policy("auto", cpuinfo_path=str(tmp_path / "missing"))
    assert (policy, reason) == ("float32", "CPU without native bfloat16 instructions")


def test_set_policy_applies_it_and_only_float16_needs_loss_scaling(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu\n")
    for requested, scaled in (("mixed_float16", True), ("mixed_bfloat16", False), ("float32", False)):
        assert precision.set_precision_policy(requested) == requested
        assert keras.config.dtype_policy().name == requested
        assert precision.needs_loss_scaling() is scaled


def test_a_scoped_policy_is_restored_even_when_the_block_fails():
    precision.set_precision_policy("mixed_bfloat16")
    with pytest.raises(RuntimeError), precision.global_policy_scope("float32"):
        assert keras.config.dtype_policy().name == "float32"
        layer = keras.layers.Dense(1)
        raise RuntimeError("inside")
    assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert layer.compute_dtype == "float32"
