"""Tests of cxr_tfdata.files.locking: one writer per output, released when its holder dies, never
written over a file that is not a lock."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cxr_tfdata.files import locking
from tests.helpers import lock_held_by_another_process


def test_a_lock_is_released_when_its_holder_is_killed(tmp_path):
    lock = str(tmp_path / "x.lock")
    with lock_held_by_another_process(lock, "cxr-train"):
        with pytest.raises(locking.LockedError):
            with locking.exclusive_lock(lock, "x"):
                pass
        time.sleep(0)  # the holder is killed on leaving the with-block
    with locking.exclusive_lock(lock, "x"):
        assert json.loads(Path(lock).read_text())["pid"] == os.getpid()
    assert not os.path.exists(lock)


def test_a_file_named_like_a_lock_is_never_written_over(tmp_path):
    out = tmp_path / "ds"
    lock = Path(locking.lock_path_beside(str(out)))
    lock.write_text("my own notes")
    with pytest.raises(locking.LockedError, match="not a lock file"):
        with locking.exclusive_lock(str(lock), "--output_dir=ds"):
            pass
    assert lock.read_text() == "my own notes"
