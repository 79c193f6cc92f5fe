"""How every binary runs: one-line errors, exit statuses, signals, and only its own lines printed.

Every binary (cxr_tfdata.cli and tfrecords_builder.cli) runs through `run_main`: a failure of any kind ends the run with one line on stderr,
`<program>: error: <what is wrong, naming the file or flag>`, and exit status 1 (2 for a usage
error). The traceback is kept for debugging: set CXR_DEBUG=1 or pass --verbosity=1. What else a
binary prints is its own lines only (console.py). Entry modules import TensorFlow inside `main`,
so --help and flag errors come at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from absl import app, flags

from cxr_tfdata.core import console

DEBUG_ENVIRONMENT_VARIABLE = "CXR_DEBUG"
# What a failed system call means to a user, by errno.
_OS_ERROR_MEANING = {
    errno.ENOSPC: "no space left on the device (disk full); earlier outputs are intact",
    errno.EDQUOT: "disk quota exceeded; earlier outputs are intact",
    errno.EFBIG: "file too large for the file system or the process's file size limit; earlier outputs are intact",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
}


def debugging() -> bool:
    """True when tracebacks should be shown: CXR_DEBUG set (not 0), or --verbosity >= 1."""
    if os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "") not in ("", "0"):
        return True
    return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1


def op_error_summary(message: str) -> str:
    """The cause in a TensorFlow error message, in one line: e.g. the input pipeline's assertion
    naming a corrupt shard, without the "Graph execution error" preamble, the node's stack, the
    tf.data iterator path and the op names TensorFlow adds."""
    noise = ("Graph execution error", "Detected at node", "File ", "[[", "<stack traces unavailable>")
    lines = [line.strip() for line in message.splitlines()]
    cause = next((line for line in lines if line and not line.startswith(noise)), " ".join(message.split()))
    if "with iterator: " in cause:  # raised in a tf.data function: "...with iterator: <path>: <cause>"
        cause = cause.split("with iterator: ", 1)[1].partition(": ")[2] or cause
    cause = re.sub(r"\{\{[^}]*\}\}\s*", "", cause.split(" [Op:")[0]).strip()  # {{function_node ...}}
    if cause.startswith("assertion failed: [") and cause.endswith("]"):
        cause = cause[len("assertion failed: ["):-1]
    if "Collective ops is aborted" in cause or "Connection reset by peer" in cause:
        cause = (f"another worker of the cluster stopped ({cause}); rerun every worker's command to resume "
                 f"from the last completed epoch")
    return cause.replace("\\'", "'")  # tf.debugging.Assert prints strings with quotes escaped


def _with_meaning(text: str) -> str:
    """Adds what a system error quoted inside a library's message means (TensorFlow and
    tensorflow-datasets wrap an ENOSPC as "...; No space left on device")."""
    for code in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        if os.strerror(code) in text and _OS_ERROR_MEANING[code] not in text:
            return f"{text} ({_OS_ERROR_MEANING[code]})"
    return text


def error_line(error: BaseException) -> str:
    """One line saying what went wrong, naming the file where the error knows it."""
    if isinstance(error, OSError) and error.errno is not None:
        where = f"{error.filename}: " if error.filename else ""
        return where + (_OS_ERROR_MEANING.get(error.errno) or error.strerror or str(error))
    if type(error).__module__.startswith("tensorflow") and hasattr(error, "message"):
        return _with_meaning(op_error_summary(error.message))
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, OSError, RuntimeError, LookupError)):
        return _with_meaning(text)
    return f"{type(error).__name__}: {text} (unexpected; set {DEBUG_ENVIRONMENT_VARIABLE}=1 for the traceback)"


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so every clean-up (staging folders, locks) runs."""


def _terminate(signum, frame):
    del frame
    raise Terminated(signum)


class Preempted(BaseException):
    """A loop stopped on request (SIGTERM) at a step boundary after saving what a rerun resumes
    from. Its text is the line printed after "<program>: "; the exit status is 0 (stopped as asked,
    nothing lost)."""


class StopRequest:
    """Whether SIGTERM asked a loop to stop at its next step boundary (see `step_boundary_stops`)."""

    def __init__(self) -> None:
        self.signal_name = ""  # "SIGTERM" once requested
        self.honoured = False

    @property
    def pending(self) -> bool:
        return bool(self.signal_name)


_STOP_AT_STEP_BOUNDARIES = [False]


def stop_at_step_boundaries_on_sigterm() -> None:
    """Opts a binary in (cxr-train): inside `step_boundary_stops()`, SIGTERM becomes a request its
    loop honours at the next step boundary (save, then stop) instead of an immediate stop.
    Elsewhere, and for a second SIGTERM, SIGTERM still stops at once; Ctrl-C always does."""
    _STOP_AT_STEP_BOUNDARIES[0] = True


@contextlib.contextmanager
def step_boundary_stops() -> Iterator[StopRequest]:
    """Yields the StopRequest that SIGTERM sets while the block runs (only in a binary that opted in,
    on the main thread; otherwise it never becomes pending and SIGTERM is untouched). A request the
    block did not honour stops the program when the block ends, as SIGTERM does elsewhere."""
    request = StopRequest()
    if not _STOP_AT_STEP_BOUNDARIES[0] or threading.current_thread() is not threading.main_thread():
        yield request
        return

    def on_sigterm(signum, frame):
        del frame
        if request.pending:  # a second SIGTERM: stop now
            raise Terminated(signum)
        request.signal_name = signal.Signals(signum).name
        print(f"{console_program()}: {request.signal_name} received: saving a checkpoint at the next step "
              f"boundary, then stopping (send it again to stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield request
        if request.pending and not request.honoured:
            raise Terminated(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


_PROGRAM = ["cxr"]


def console_program() -> str:
    """The name of the running binary, as its lines start."""
    return _PROGRAM[0]


def _flags_parser(program: str) -> Callable:
    """absl's flag parsing, with a bad flag reported in one line (absl prints two and exits 1)."""
    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            print(f"{program}: error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(2)

    return parse


def _guarded(main: Callable, program: str) -> Callable:
    def guarded(argv):
        signal.signal(signal.SIGTERM, _terminate)
        _PROGRAM[0] = program
        console.configure_logging(program, debugging())
        try:
            return main(argv)
        except SystemExit:
            raise
        except app.UsageError as e:
            print(f"{program}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        except Preempted as e:  # stopped as asked, with its work saved
            print(f"{program}: {e}", file=sys.stderr)
            return 0
        except (KeyboardInterrupt, Terminated) as e:
            if debugging():
                raise
            print(f"{program}: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
            return 143 if isinstance(e, Terminated) else 130
        except Exception as e:  # noqa: BLE001 -- every failure becomes one line; CXR_DEBUG=1 re-raises it
            if debugging():
                raise
            print(f"{program}: error: {error_line(e)}", file=sys.stderr)
            return 1

    return guarded


def run_main(main: Callable, module_name: str, program: str) -> None:
    """app.run(main) for the binary `program`, with --help listing the flags of `module_name`.

    absl's --help shows only the key flags of the script being run, and a console script's
    __main__ is a wrapper that defines none, so each binary registers its own module's flags.
    """
    console.filter_library_noise()
    for flag in flags.FLAGS.get_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(_guarded(main, program), flags_parser=_flags_parser(program))
