"""Network endpoints of the tf.data service and the cluster, checked before TensorFlow waits on them.

TensorFlow waits without a bound, and deaf to signals, on an address where nothing answers: a
tf.data service worker's start blocks, with Python's interpreter lock held, until its dispatcher
answers, and a trainer's first batch until the dispatcher does. So a binary first checks the address
with plain sockets (`wait_for_listener`, `check_port_free`), and bounds a call that may still block
inside TensorFlow with a `Deadline`: a process forked before TensorFlow is imported, which prints
the binary's one-line error and ends it with exit status 1 when the call has not returned in time.
No TensorFlow here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import socket
import time

# The signal by which a Deadline ends its binary. Its C-level handler is libc's _exit, called with
# the signal's number: exit status 1 (SIGHUP is 1), even while Python's interpreter lock is held.
DEADLINE_SIGNAL = signal.SIGHUP


def split_address(address: str, flag: str) -> tuple[str, int]:
    """(host, port) of `host:port` or `grpc://host:port`; a ValueError naming `flag` otherwise."""
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{flag}: must be host:port with a port in [1, 65535], got {address!r}")
    return host, int(port)


def wait_for_listener(host: str, port: int, seconds: float) -> bool:
    """True once a TCP connection to host:port succeeds; False if none did within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, remaining))):
                return True
        except OSError:
            pass
        if deadline - time.monotonic() <= 0:
            return False
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def check_port_free(port: int, flag: str = "--port") -> None:
    """A ValueError naming `flag` and `port` when a server could not listen on it (gRPC binds 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server does: TIME_WAIT is free
        try:
            probe.bind(("0.0.0.0", port))
            probe.listen(1)
        except OSError as e:
            reason = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise ValueError(f"{flag}={port}: cannot listen on port {port}: {reason}; choose another port, "
                             f"or {flag}=0 for any free one") from None


def exit_one_on_deadline() -> None:
    """Makes the Deadline's signal end this process with status 1 at the C level (see the module doc)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.signal.restype = ctypes.c_void_p
        libc.signal(int(DEADLINE_SIGNAL), ctypes.cast(libc._exit, ctypes.c_void_p))
    except (OSError, AttributeError):  # no libc to call: the signal's default action ends it (status 129)
        pass


class Deadline:
    """Ends this process with one line and exit status 1 unless `met()` comes within `seconds` of `begin()`.

    Create it before TensorFlow is imported (the forked watcher only waits on a pipe, writes and
    signals), and call `begin()` just before the call it bounds, so importing TensorFlow is not counted.
    """

    def __init__(self, seconds: float, message: str, error_fd: int = 2):
        exit_one_on_deadline()
        read_end, self._write_end = os.pipe()
        parent = os.getpid()
        self._child = os.fork()
        if self._child == 0:  # the watcher
            try:
                os.close(self._write_end)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                begun = os.read(read_end, 1) == b"b"  # b"" when this process ended first
                ready, _, _ = select.select([read_end], [], [], seconds) if begun else ([read_end], [], [])
                if not ready and os.getppid() == parent:
                    os.write(error_fd, (message.rstrip("\n") + "\n").encode())
                    os.kill(parent, DEADLINE_SIGNAL)
            finally:
                os._exit(0)
        os.close(read_end)

    def begin(self) -> None:
        """Starts the clock."""
        os.write(self._write_end, b"b")

    def met(self) -> None:
        """The bounded call returned: the watcher ends without a word."""
        if self._child is None:
            return
        os.write(self._write_end, b"m")
        os.close(self._write_end)
        os.waitpid(self._child, 0)
        self._child = None
