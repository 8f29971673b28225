"""Rate limits for log lines about things a sender outside can make happen in bulk.

A flood of new sources, or the expiry of every peer it left behind, must not become a flood of
log lines: a few events are logged one by one, the rest are counted and summed up in one line,
at most once per interval.
"""

from __future__ import annotations

LOG_INTERVAL = 10.0  # seconds: at most one summary line per kind of event in this time
LOG_BURST = 5        # events logged one by one per interval


class RateLimit:
    def __init__(self, burst: int = LOG_BURST, interval: float = LOG_INTERVAL) -> None:
        self.burst = burst
        self.interval = interval
        self.pending = 0            # events not logged one by one, waiting for a summary
        self._window_end = -1.0     # end of the current interval of one-by-one lines
        self._shown = 0
        self._next_summary = -1.0

    def take(self, now: float, count: int) -> int:
        """How many of `count` new events may be logged one by one now; the rest are pending."""
        if now >= self._window_end:
            self._window_end, self._shown = now + self.interval, 0
        shown = max(0, min(count, self.burst - self._shown))
        self._shown += shown
        self.pending += count - shown
        return shown

    def add(self, count: int) -> None:
        """`count` new events to be summed up only."""
        self.pending += count

    def summary(self, now: float) -> int:
        """The number of pending events to log in one line now (0: none, or too soon)."""
        if not self.pending or now < self._next_summary:
            return 0
        count, self.pending = self.pending, 0
        self._next_summary = now + self.interval
        return count
