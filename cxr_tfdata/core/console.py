"""What a binary prints: its own lines, not the libraries' start-up chatter.

TensorFlow's C++ runtime writes straight to file descriptor 2 (its oneDNN notice, "Could not find
cuda drivers", "failed call to cuInit", "All log messages before absl::InitializeLog()", the
buffer-size notes of its readers...), before and regardless of Python's logging, and
TF_CPP_MIN_LOG_LEVEL does not reach all of it. So a binary's standard error is a pipe read by a
thread that drops those known lines and forwards every other byte, genuine warnings and errors
included. Python-side logs get the same treatment at the logging level: our own INFO lines print as
`<program>: <message>`, and libraries' INFO lines (tensorflow-datasets' per-split notes, Keras',
TensorFlow's) are dropped; warnings and errors of any origin are kept.

Set CXR_DEBUG=1, or pass --verbosity=1, to see everything as the libraries print it.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

# Lines written by TensorFlow's C++ runtime that say nothing a user can act on.
_NOISE = [re.compile(pattern) for pattern in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    r"^I\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.]+:\d+\] ",  # every C++ INFO line
    r"^[WE]\d{4} \d\d:\d\d:[\d.]+ +\d+ (cuda_platform|cuda_executor|cudart_stub|cuda_diagnostics)\.cc:\d+\] ",
    # An op error on its way to Python, which reports it (end of sequence, a damaged shard...).
    r"^W\d{4} \d\d:\d\d:[\d.]+ +\d+ local_rendezvous\.cc:\d+\] Local rendezvous is aborting with status: ",
    # oneDNN saying it leaves int32 ops (an index gather) to Eigen: a choice of kernel, not an error.
    r"^E\d{4} \d\d:\d\d:[\d.]+ +\d+ util\.cc:\d+\] oneDNN supports DT_INT32 only on platforms with AVX-512\. ",
    r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$",
    # tf.data dropping the partial contents of a file cache when an iterator ends before its input
    # does (a failed run's shutdown, or an iterator TensorFlow makes and drops in the first epoch):
    # the pipeline reads every split to its end, so the caches a run keeps are complete.
    r"^W\d{4} \d\d:\d\d:[\d.]+ +\d+ cache_dataset_ops\.cc:\d+\] The calling iterator did not fully read the dataset being cached",
    # gRPC failing to listen: cxr-data-service reports it in one line naming --port and the port.
    r"^E\d{4} \d\d:\d\d:[\d.]+ +\d+ add_port\.cc:\d+\] Failed to add port to server",
)]
_OUR_PACKAGES = (f"{os.sep}cxr_tfdata{os.sep}", f"{os.sep}tfrecords_builder{os.sep}", f"{os.sep}benchmarks{os.sep}")

_state = {"original_fd": None, "passthrough": False, "thread": None}


_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.]+:\d+\] ")


def is_noise(line: str) -> bool:
    return any(pattern.search(line) for pattern in _NOISE)


class _Lines:
    """Decides line by line; the continuation lines of a dropped message (a configuration TensorFlow
    prints over several lines) go with it, until a line that starts a message of its own."""

    def __init__(self):
        self.in_dropped_message = False

    def keep(self, line: str) -> bool:
        if _state["passthrough"]:
            return True
        starts_message = (_LOG_LINE.match(line) or line.startswith(("cxr-", "Traceback"))
                          or "Error" in line or "Warning" in line)
        if self.in_dropped_message and not starts_message:
            return False
        self.in_dropped_message = is_noise(line)
        return not self.in_dropped_message


def original_stderr_fd() -> int:
    """The real standard error, for a process that must write past the filter (a watchdog)."""
    return _state["original_fd"] if _state["original_fd"] is not None else 2


def _forward(read_fd: int, original_fd: int) -> None:
    buffered, lines = b"", _Lines()
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            buffered += chunk
            *complete, buffered = buffered.split(b"\n")
            for line in complete:
                if lines.keep(line.decode("utf-8", errors="replace")):
                    os.write(original_fd, line + b"\n")
    if buffered and lines.keep(buffered.decode("utf-8", errors="replace")):
        os.write(original_fd, buffered)


def filter_library_noise() -> None:
    """Routes file descriptor 2 through the noise filter for the rest of the process (idempotent).

    Call it before TensorFlow is imported. Does nothing with CXR_DEBUG set.
    """
    if _state["thread"] is not None or os.environ.get("CXR_DEBUG", "") not in ("", "0"):
        return
    sys.stderr.flush()
    original_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    os.set_inheritable(original_fd, False)
    thread = threading.Thread(target=_forward, args=(read_fd, original_fd), name="stderr-filter", daemon=True)
    thread.start()
    _state.update(original_fd=original_fd, thread=thread)
    atexit.register(_stop)


def _stop() -> None:
    """Puts the real stderr back and lets the filter forward what is left in the pipe."""
    if _state["thread"] is None:
        return
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(_state["original_fd"], 2)  # closes this process's write end of the pipe
    _state["thread"].join(timeout=2.0)
    _state["thread"] = None


def pass_everything() -> None:
    """Stops dropping lines (for --verbosity=1, known only once the flags are parsed)."""
    _state["passthrough"] = True


class _OwnLines(logging.Filter):
    """INFO and below only from this package's modules; warnings and errors from anywhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or any(part in record.pathname for part in _OUR_PACKAGES)


class _ProgramFormatter(logging.Formatter):
    """`<program>: message`, with `warning:` or `error:` after the program name for those levels."""

    def __init__(self, program: str):
        super().__init__()
        self.program = program

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        text = f"{self.program}: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(program: str, debug: bool) -> None:
    """Our lines in our format, libraries' INFO lines dropped; with debug, absl's format for all."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler().python_handler
    for existing in list(handler.filters):
        if isinstance(existing, _OwnLines):
            handler.removeFilter(existing)
    if debug:
        pass_everything()
        handler.setFormatter(absl_logging.PythonFormatter())
        return
    handler.addFilter(_OwnLines())
    handler.setFormatter(_ProgramFormatter(program))
