"""Replacing a whole output folder (a dataset, a SavedModel) so that a kill at any moment loses nothing.

The new folder is built in a hidden sibling, `.<name>.incomplete-<pid>`, and renamed into place
only when complete. An existing output (--overwrite) waits in a sibling of its own,
`.<name>.previous-<pid>`, for the instant between the two renames and is removed after. A run
killed in between leaves it there and the next run for the same output puts it back; staging
folders of killed runs are removed. A leftover is only ever touched when it is recognisably one
(an output of ours, or a staging folder holding only what staging holds) and is no input of the
run; anything else of those names is left alone with a warning. Call these under the output's
lock (locking.lock_path_beside). No TensorFlow import here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping

from absl import logging

from cxr_tfdata.files import atomic, output_safety

_INCOMPLETE_MARK = ".incomplete-"
_PREVIOUS_MARK = ".previous-"


def _leftovers(output_dir: str, mark: str) -> list[str]:
    """Siblings `.<name><mark><pid>` of output_dir whose process has ended."""
    parent, name = os.path.split(os.path.abspath(output_dir))
    prefix = f".{name}{mark}"
    found = []
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        pid_text = entry[len(prefix):] if entry.startswith(prefix) else ""
        path = os.path.join(parent, entry)
        if pid_text.isdigit() and not atomic.pid_alive(int(pid_text)) and os.path.isdir(path):
            found.append(path)
    return found


def _is_input(path: str, inputs: Mapping[str, str]) -> bool:
    try:
        output_safety.check_apart("leftover", path, inputs)
    except output_safety.UnsafeOutputError:
        return True
    return False


def recover(output_dir: str, problems_of: Callable[[str], list[str]], staging_entries: Iterable[str],
            inputs: Mapping[str, str]) -> None:
    """Settles what killed runs for output_dir left behind.

    A previous output moved aside is put back when output_dir is missing (the kill came between
    the two renames) and removed when output_dir is a complete output (the swap had completed);
    staging folders are removed. problems_of(folder) says why a folder is not an output of ours
    ([] when it is); staging_entries are the names a staging folder may hold.
    """
    for previous in _leftovers(output_dir, _PREVIOUS_MARK):
        if _is_input(previous, inputs) or problems_of(previous):
            logging.warning("left %s alone: it is an input or not an output of ours", previous)
        elif not os.path.lexists(output_dir):
            os.rename(previous, output_dir)
            logging.warning("restored %s from %s: a run replacing it was interrupted between two renames",
                            output_dir, previous)
        elif not problems_of(output_dir):
            logging.info("removing %s, replaced by a completed run", previous)
            shutil.rmtree(previous)
        else:
            logging.warning("left %s alone: %s is not an output of ours", previous, output_dir)
    allowed = set(staging_entries)
    for staging in _leftovers(output_dir, _INCOMPLETE_MARK):
        if _is_input(staging, inputs) or os.path.islink(staging) or not set(os.listdir(staging)) <= allowed:
            logging.warning("left %s alone: it is an input or holds more than a staging folder holds", staging)
            continue
        logging.info("removing %s left by an interrupted run", staging)
        shutil.rmtree(staging)


def staging_path(output_dir: str) -> str:
    parent, name = os.path.split(os.path.abspath(output_dir))
    return os.path.join(parent, f".{name}{_INCOMPLETE_MARK}{os.getpid()}")


def swap_into_place(new_dir: str, output_dir: str) -> None:
    """Renames the finished new_dir to output_dir; an old output_dir is removed only after.

    The old folder waits in a sibling of its own rather than in the staging folder, which is
    deleted on any error: if the process dies between the renames, it is still there.
    """
    parent, name = os.path.split(os.path.abspath(output_dir))
    previous = os.path.join(parent, f".{name}{_PREVIOUS_MARK}{os.getpid()}")
    if os.path.lexists(output_dir):
        os.rename(output_dir, previous)
    try:
        os.rename(new_dir, output_dir)
    except BaseException:
        if os.path.lexists(previous) and not os.path.lexists(output_dir):
            os.rename(previous, output_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)
