"""Files written whole or not at all: a temporary name in the target's folder, then a rename.

Every writer of the package goes through here, so a kill or a full disk at any moment leaves
either the old file or the new one, never half of one, and the temporary files of a killed run
carry one recognisable prefix (`TEMPORARY_PREFIX`) for `remove_temporary_files` to clear.
New files get the mode open() gives (0o666 less the umask), not mkstemp's 0600.
No TensorFlow import here: the converter uses it before forking workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

TEMPORARY_PREFIX = ".tmp-"
_TEMPORARY_NAME = re.compile(r"^\.tmp-(?P<pid>\d+)-[0-9a-f]{8}-")


def temporary_path(path: str, suffix: str = "") -> str:
    """A fresh name beside `path`: `.tmp-<pid>-<random>-<name><suffix>`."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f"{TEMPORARY_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}{suffix}")


@contextlib.contextmanager
def replacing(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path to write; renames it over `path` on success, removes it on failure.

    `suffix` keeps an extension some writers insist on (Keras: ".keras", ".weights.h5").
    """
    tmp = temporary_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if e.errno is not None and e.filename in (None, tmp):  # name the file meant, not its temporary
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), path) from e
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    with replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_with(path: str, writer: Callable[[str], None], suffix: str = "") -> None:
    """`writer(tmp_path)` writes the file (a Keras save, a figure); it is then renamed over `path`."""
    with replacing(path, suffix) as tmp:
        writer(tmp)


def copy_file(source: str, path: str) -> None:
    with replacing(path) as tmp:
        shutil.copyfile(source, tmp)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temporary_files(directory: str) -> list[str]:
    """Deletes the temporary files that writers no longer alive left in `directory`; returns them.

    Only names of `temporary_path`'s exact form whose process has ended: never a user's file,
    never the file another live writer is still writing.
    """
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        match = _TEMPORARY_NAME.match(name)
        if match and not pid_alive(int(match["pid"])) and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            removed.append(path)
    return removed
