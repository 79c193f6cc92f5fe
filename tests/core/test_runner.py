"""Tests of cxr_tfdata.core.runner: TensorFlow's long op errors summarised in the one line a binary prints."""

from __future__ import annotations

import pytest

from cxr_tfdata.core import runner


@pytest.mark.parametrize("message, expected", [
    ("Graph execution error:\n\nDetected at node Assert/Assert defined at (most recent call last):\n"
     "<stack traces unavailable>\nError in user-defined function passed to MapDataset:30 transformation "
     "with iterator: Iterator::Root::Prefetch::Map: assertion failed: [TFRecord shard /d/a.tfrecord is "
     "truncated (TensorFlow\\'s reason)]\n\t [[{{node Assert/Assert}}]]\n\t [[IteratorGetNext]] "
     "[Op:__inference_multi_step_on_iterator_12624]",
     "TFRecord shard /d/a.tfrecord is truncated (TensorFlow's reason)"),
    ("Graph execution error:\n\nDetected at node Assert defined at (most recent call last):\n"
     "  File \"x.py\", line 1, in <module>\n\nassertion failed: [TFRecord shard /d/a.tfrecord is bad]\n"
     "\t [[{{node Assert}}]]\n\t [[IteratorGetNext]] [Op:__inference_multi_step_on_iterator_9]",
     "TFRecord shard /d/a.tfrecord is bad"),
    ("/d/cache.lockfile; No such file or directory [Op:IteratorGetNext]",
     "/d/cache.lockfile; No such file or directory"),
    ("Graph execution error:\n\nDetected at node Decode defined at (most recent call last):\n"
     "  File \"x.py\", line 1, in <module>\n\nInvalid PNG data\n\t [[{{node Decode}}]] [Op:f]",
     "Invalid PNG data"),
])
def test_tensorflow_errors_are_summarized_in_one_line(message, expected):
    assert runner.op_error_summary(message) == expected
