"""One writer at a time: an exclusive lock on an output, held for the whole run.

The lock is `flock` on a small file beside the output, `.<name>.cxr-lock`, that names its holder
(pid, host, start time, program). Every binary locks its output the same way, so two different
binaries writing one path exclude each other too. The operating system releases the lock when the
holder's process ends however it ends, kill -9 included, so a crash never leaves a stale lock (only
an empty file the next run reuses); a second run asking for a held lock fails at once, naming the
holder. The file is removed when the holder releases it; a run that finds the file it locked
already unlinked (a race with that removal) simply takes the lock again on a fresh file. A file of
that name that is not a lock is never written over.
No TensorFlow import here.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import stat
import sys
from collections.abc import Iterator

LOCK_SUFFIX = ".cxr-lock"


class LockedError(RuntimeError):
    """Another process holds the lock; the message names it."""


def lock_path_beside(path: str) -> str:
    """The lock of an output (a folder or a file): a hidden sibling, `.<name>.cxr-lock`, of the
    output's resolved path (every symlink followed, as the writes follow them), so that every
    spelling of one output (a symlink to it, `..` through a link, a relative path) takes one lock."""
    parent, name = os.path.split(os.path.realpath(os.fspath(path)).rstrip(os.sep))
    return os.path.join(parent, f".{name}{LOCK_SUFFIX}")


def _read_holder(fd: int) -> dict | None:
    """The holder a lock file names; {} when the file is empty, None when it is not a lock file."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    if not raw:
        return {}
    try:
        holder = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def _holder_text(fd: int) -> str:
    holder = _read_holder(fd)
    if not holder:
        return "another process (it has not yet written its name)"
    return (f"{holder.get('program', 'a cxr-tfdata run')} (pid {holder.get('pid')} on host "
            f"{holder.get('host')}, started {holder.get('started')})")


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
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as e:  # a read-only or missing folder: say which output, not only the lock file
            raise OSError(e.errno, e.strerror, f"{what} (its lock file {lock_path})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise LockedError(f"{what} is in use by {holder}; wait for it to finish or choose another "
                              f"path (lock file {lock_path})") from None
        if _same_file(fd, lock_path):
            if _read_holder(fd) is None or not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise LockedError(f"{lock_path} exists and is not a lock file of cxr-tfdata; it is left as "
                                  f"it is: move it away to use {what}")
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
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(holder).encode("utf-8"))
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)  # still held: nobody can lock this file between the two calls
        os.close(fd)
