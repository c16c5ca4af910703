"""Resident memory of this process: :func:`rss` now, and :class:`PeakRSS`, the peak while a
block runs (sampled every millisecond by a thread).

Example:
    >>> from rss import PeakRSS
    >>> with PeakRSS() as peak:
    ...     block = bytearray(64 << 20)
    >>> peak.added >= 0
    True
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

__all__ = ["rss", "PeakRSS"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Bytes of this process's resident set (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """``with PeakRSS() as peak: ...``: ``peak.before`` (RSS on entry), ``peak.peak`` (the
    largest RSS seen while the block ran) and ``peak.added`` (their difference)."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.before = self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = rss()
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def added(self) -> int:
        return self.peak - self.before
