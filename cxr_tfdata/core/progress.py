"""A throttled progress line for anything that takes more than a few seconds: done/total, rate, ETA."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from absl import logging

# At most one line this often (and one when the work is done).
PROGRESS_SECONDS = 5.0


class Progress:
    """`<label>: <done>/<total> images (<percent>%), <rate> images/s, ETA hh:mm:ss`, logged as work advances."""

    def __init__(self, total: int, label: str, clock: Callable[[], float] = time.monotonic,
                 every_seconds: float = PROGRESS_SECONDS):
        self.total, self.label, self._clock, self._every = total, label, clock, every_seconds
        self.done = 0
        self.start = self._last = clock()

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = self._clock()
        if now - self._last >= self._every or self.done == self.total:
            self._last = now
            logging.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now if now is not None else self._clock()) - self.start)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        return (f"{self.label}: {self.done}/{self.total} images ({100 * self.done / max(1, self.total):.0f}%), "
                f"{rate:.1f} images/s, ETA {eta_text}")
