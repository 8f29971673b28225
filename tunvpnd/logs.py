"""Logging to stderr the way journald wants it.

Under systemd, stderr is a stream to the journal (JOURNAL_STREAM names it): no timestamps (the
journal adds its own) and a `<N>` syslog priority prefix on every line, so `journalctl -p warning`
works. On a terminal: timestamps and level names.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from . import packet as ip

log = logging.getLogger("tunvpnd")

PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
        # journald splits on newlines: every line carries its own priority
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    log.setLevel(LEVELS[level])


class PacketLog:
    """The lab's per-packet lines at debug priority, at most `rate` a second.

    When lines were suppressed, the next line that gets through says how many.
    """

    def __init__(self, rate: int = 20) -> None:
        # its own logger, always at debug: `log.packets: true` shows them whatever `log.level` is
        self.log = logging.getLogger("tunvpnd.packets")
        self.log.setLevel(logging.DEBUG)
        self.rate = rate
        self.window = 0.0
        self.sent = 0
        self.suppressed = 0

    def __call__(self, direction: str, packet: memoryview) -> None:
        now = time.monotonic()
        if now - self.window >= 1.0:
            self.window, self.sent = now, 0
        if self.sent >= self.rate:
            self.suppressed += 1
            return
        self.sent += 1
        if self.suppressed:
            self.log.debug("(%d packet lines suppressed)", self.suppressed)
            self.suppressed = 0
        self.log.debug("%s: %s", direction, ip.describe(packet))
