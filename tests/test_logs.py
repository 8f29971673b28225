"""Logging: journald priority prefixes when stderr is the journal, timestamps on a terminal."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

from tests.conftest import REPO
from tests.ipcraft import icmp_echo
from tunvpnd.logs import PacketLog

EMIT = (
    "import logging; from tunvpnd.logs import setup_logging; setup_logging('debug');"
    "log = logging.getLogger('tunvpnd');"
    "log.debug('d'); log.info('i'); log.warning('w'); log.error('e\\nsecond line')"
)


def emit(tmp_path, journal: bool) -> list[str]:
    out = tmp_path / "stderr"
    with open(out, "wb") as stderr:
        st = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journal else ""}
        subprocess.run([sys.executable, "-c", EMIT], stderr=stderr, env=env, cwd=REPO,
                       check=True, timeout=30)
    return out.read_text().splitlines()


def test_journal_stream_gets_priorities_and_no_timestamps(tmp_path):
    assert emit(tmp_path, journal=True) == ["<7>d", "<6>i", "<4>w", "<3>e", "<3>second line"]


def test_terminal_gets_timestamps_and_levels(tmp_path):
    lines = emit(tmp_path, journal=False)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING w$", lines[2])
    assert not any(line.startswith("<") for line in lines)


def test_journal_stream_of_another_file_is_ignored(tmp_path):
    out = tmp_path / "stderr"
    with open(out, "wb") as stderr:
        env = {**os.environ, "JOURNAL_STREAM": "1:2"}
        subprocess.run([sys.executable, "-c", EMIT], stderr=stderr, env=env, cwd=REPO,
                       check=True, timeout=30)
    assert not out.read_text().startswith("<")


def test_packet_lines_are_rate_limited_with_a_count(caplog):
    packet = memoryview(icmp_echo("192.168.53.99", "192.168.60.5"))
    plog = PacketLog(rate=5)
    with caplog.at_level(logging.DEBUG, logger="tunvpnd.packets"):
        for _ in range(50):
            plog("From tun ==>", packet)
        plog.window -= 1.0  # the next second begins
        plog("From socket <==", packet)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:5] == ["From tun ==>: 192.168.53.99 --> 192.168.60.5"] * 5
    assert messages[5:] == ["(45 packet lines suppressed)",
                            "From socket <==: 192.168.53.99 --> 192.168.60.5"]
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
