"""absl entry points: the only modules that define flags, and how every binary reports failure.

Every binary runs through `run_main`: a failure of any kind ends the run with one line on stderr,
`<program>: error: <what is wrong, naming the file or flag>`, and exit status 1 (2 for a usage
error). The traceback is kept for debugging: set CXR_DEBUG=1 or pass --verbosity=1. What else a
binary prints is its own lines only (output.py). Entry modules import TensorFlow inside `main`,
so --help and flag errors come at once.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import signal
import sys
from collections.abc import Callable

from absl import app, flags

from cxr_tfdata.cli import output

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
        output.configure_logging(program, debugging())
        try:
            return main(argv)
        except SystemExit:
            raise
        except app.UsageError as e:
            print(f"{program}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
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
    output.filter_library_noise()
    for flag in flags.FLAGS.get_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(_guarded(main, program), flags_parser=_flags_parser(program))


@dataclasses.dataclass(frozen=True)
class RecordFlags:
    """The flags that say how the training records were built (cxr-predict and cxr-export). A model
    written by cxr-train carries these values in its contract, so they are only ever checked."""

    data_dir: flags.FlagHolder
    resize: flags.FlagHolder
    record_encoding: flags.FlagHolder
    jpeg_quality: flags.FlagHolder

    def given(self) -> dict:
        """{resize, record_encoding, jpeg_quality}: the value typed on the command line, else None."""
        return {name: holder.value if holder.present else None
                for name, holder in (("resize", self.resize), ("record_encoding", self.record_encoding),
                                     ("jpeg_quality", self.jpeg_quality))}


def define_record_flags(module_name: str) -> RecordFlags:
    """Defines --data_dir, --resize, --record_encoding and --jpeg_quality for the binary `module_name`.

    The flags are registered as that module's, so its --help (see run_main) lists them.
    """
    from tfrecords_builder import imaging

    return RecordFlags(
        data_dir=flags.DEFINE_string(
            "data_dir", None,
            "Optional: the dataset the model was trained on (cxr-build-tfrecords --output_dir), checked "
            "against the model: its image size and its build's --resize, --encoding and --jpeg_quality must "
            "match what the model's contract says.",
            module_name=module_name),
        resize=flags.DEFINE_enum(
            "resize", None, imaging.RESIZE_MODES,
            "Not needed for a model written by cxr-train (its contract says how its images are resized); "
            "a value contradicting the contract is refused. For a model without a contract: squash "
            f"(stretch to a square) or pad (keep the aspect ratio on black); default {imaging.DEFAULT_RESIZE}.",
            module_name=module_name),
        record_encoding=flags.DEFINE_enum(
            "record_encoding", None, imaging.ENCODINGS,
            "Not needed for a model written by cxr-train; a contradicting value is refused. For a model "
            "without a contract: how its training records stored images (cxr-build-tfrecords --encoding); "
            "with jpeg each resized image goes through the same JPEG round trip, so a source file meets "
            f"the model as its record did. Default {imaging.DEFAULT_ENCODING}.",
            module_name=module_name),
        jpeg_quality=flags.DEFINE_integer(
            "jpeg_quality", None,
            "Not needed for a model written by cxr-train; a contradicting value is refused. For a model "
            f"without a contract: cxr-build-tfrecords --jpeg_quality of its records (default "
            f"{imaging.DEFAULT_JPEG_QUALITY}).",
            module_name=module_name),
    )
