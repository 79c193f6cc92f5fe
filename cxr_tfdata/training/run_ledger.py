"""The ledgers of what a training run wrote: a name is the run's only when a ledger records it.

A ledger is a JSON list of plain file names, written (atomically) before the files it names, so a
kill between the two leaves the name claimed, never a file of the run's that nothing claims. Every
deletion in a model dir goes by these exact names; a file merely named like one of the run's is the
user's.
"""

from __future__ import annotations

import json
import os
import re
import stat
from typing import Any

from cxr_tfdata.files import atomic

# A non-chief worker's scratch folder, and the ledger of the checkpoints it wrote there.
_WORKER_SCRATCH = re.compile(r"workertemp_\d+")


WORKER_LEDGER = "worker_checkpoints.json"


def checkpoint_files_at(folder: str, name: str) -> list[str]:
    """The files tf.train.Checkpoint.write wrote at folder/name, by their exact names only:
    `<name>.index` and `<name>.data-NNNNN-of-NNNNN`."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    data = re.compile(re.escape(name) + r"\.data-\d{5}-of-\d{5}")
    return sorted(os.path.join(folder, e) for e in entries
                  if (e == f"{name}.index" or data.fullmatch(e)) and not os.path.islink(os.path.join(folder, e)))


def scratch_checkpoint_name(stage: str, epoch: int, step: int | None = None) -> str:
    """`<stage>_epoch<N>[_step<S>]`: a checkpoint's name before any `-<k>` (a non-chief worker's as is)."""
    return f"{stage}_epoch{epoch}" + (f"_step{step}" if step is not None else "")


def is_plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", os.curdir, os.pardir) and os.path.basename(name) == name


def recorded_names(ledger: str) -> list[str]:
    """The plain file names a ledger (a JSON list) holds; none when it is missing or unreadable."""
    try:
        with open(ledger, encoding="utf-8") as f:
            names = json.load(f)
    except (OSError, ValueError):
        names = None
    return sorted({n for n in names if is_plain_name(n)}) if isinstance(names, list) else []


def record_names(ledger: str, add: tuple[str, ...] = (), remove: tuple[str, ...] = (),
                 drop_empty: bool = False) -> None:
    """Updates a ledger: `add` before those files are written, `remove` after they are deleted (or
    renamed away). drop_empty: delete the ledger itself when that leaves it empty."""
    names = sorted((set(recorded_names(ledger)) | set(add)) - set(remove))
    if names or not drop_empty:
        atomic.write_json(ledger, names)
    elif os.path.lexists(ledger):
        os.remove(ledger)


def file_identity(path: str) -> list[int] | None:
    """[inode, size, mtime_ns] of a regular file (a rename keeps them; a copy does not), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


def free_checkpoint_name(folder: str, base: str, recorded: set[str]) -> str:
    """`base`, or `base-<k>` with the first k under which no file exists: a name the run recorded
    is its own, any other already on disk is not."""
    name, k = base, 0
    while name not in recorded and (checkpoint_files_at(folder, name)
                                    or os.path.lexists(os.path.join(folder, f"{name}_temp"))):
        k += 1
        name = f"{base}-{k}"
    return name


def worker_ledger(scratch: str) -> str:
    """A non-chief worker's own ledger of the scratch checkpoints it wrote in `scratch`."""
    return os.path.join(scratch, WORKER_LEDGER)


def worker_scratch_folders(checkpoints: str) -> list[str]:
    """The folders `workertemp_<N>` of checkpoints/ that hold a worker's ledger (a worker killed
    between writing and deleting its scratch copy leaves one); other folders are not the run's."""
    try:
        entries = os.listdir(checkpoints)
    except OSError:
        return []
    folders = (os.path.join(checkpoints, e) for e in sorted(entries) if _WORKER_SCRATCH.fullmatch(e))
    return [f for f in folders if not os.path.islink(f) and os.path.isdir(f)
            and file_identity(worker_ledger(f)) is not None]
