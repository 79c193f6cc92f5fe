"""Tests of cxr_tfdata.core.console: which library lines a binary drops, and that genuine ones pass."""

from __future__ import annotations

import pytest

from cxr_tfdata.core import console


@pytest.mark.parametrize("line", [
    "I0000 00:00:1796630458.630067   11746 port.cc:153] oneDNN custom operations are on.",
    "W0000 00:00:1796630458.630067   11746 cache_dataset_ops.cc:330] The calling iterator did not fully read the "
    "dataset being cached. In order to avoid unexpected truncation of the dataset, the partially cached contents "
    "of the dataset  will be discarded.",
    "E0000 00:00:1796630458.630067   11746 add_port.cc:83] Failed to add port to server: No address added",
])
def test_known_library_chatter_is_dropped(line):
    assert console.is_noise(line)


@pytest.mark.parametrize("line", [
    "W0000 00:00:1796630458.630067   11746 other_op.cc:12] a warning nobody has classified",
    "cxr-train: error: TFRecord shard x is truncated or corrupted",
    "E0000 00:00:1796630458.630067   11746 cache_dataset_ops.cc:330] an error of the cache",
])
def test_genuine_lines_are_kept(line):
    assert not console.is_noise(line)
