"""One writer at a time: an exclusive lock on an output, held for the whole run.

The lock is `flock` on a small file that names its holder (pid, host, start time, program). The
operating system releases it when the holder's process ends however it ends, kill -9 included,
so a crash never leaves a stale lock; a second run asking for a held lock fails at once, naming
the holder. The file is removed when the holder releases it; a run that finds the file it locked
already unlinked (a race with that removal) simply takes the lock again on a fresh file.
No TensorFlow import here.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator

# Inside a folder that a run writes into (a model dir, an evaluation folder).
LOCK_NAME = ".cxr-tfdata.lock"


class LockedError(RuntimeError):
    """Another process holds the lock; the message names it."""


def lock_path_inside(folder: str) -> str:
    return os.path.join(folder, LOCK_NAME)


def lock_path_beside(path: str) -> str:
    """For an output that is replaced as a whole (a dataset, a SavedModel): a sibling file."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.cxr-lock")


def _holder_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096).decode("utf-8", errors="replace")
    try:
        holder = json.loads(raw)
        return (f"{holder.get('program', 'a cxr-tfdata run')} (pid {holder.get('pid')} on host "
                f"{holder.get('host')}, started {holder.get('started')})")
    except (ValueError, AttributeError):
        return "another process (it has not yet written its name)"


def _same_file(fd: int, path: str) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


@contextlib.contextmanager
def exclusive_lock(lock_path: str, what: str, program: str = "") -> Iterator[None]:
    """Holds an exclusive lock on `lock_path` for the with-block; `what` names the output in errors.

    Raises LockedError at once when another live process holds it.
    """
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise LockedError(f"{what} is in use by {holder}; wait for it to finish or choose another "
                              f"path (lock file {lock_path})") from None
        if _same_file(fd, lock_path):
            break
        os.close(fd)  # the previous holder removed this file after we opened it: lock a fresh one
    holder = {
        "program": program or os.path.basename(sys.argv[0]),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode("utf-8"))
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)  # still held: nobody can lock this file between the two calls
        os.close(fd)
