"""SIGHUP against hostile or huge profiles: the daemon keeps running and keeps forwarding.

Real daemons in lab namespaces; what is asserted is what an operator or a user of the tunnel
sees: the daemon still there, the error in its log, pings answered in time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

from tests.conftest import client_profile, ping, server_profile
from tunvpnd.lab import wait_until

HOSTV = "192.168.60.5"


def reload(daemon, timeout: float = 20.0) -> None:
    """SIGHUP, then wait for systemd's RELOADING=1 and the READY=1 that ends it."""
    mark = len(daemon.fields())
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("READY=1", timeout, after=daemon.wait_for("RELOADING=1", timeout, after=mark))


def peers(count: int) -> str:
    """hostu's peer plus `count` others, each with one /32 of its own."""
    return "peers:\n  - name: hostu\n    allowed_ips: [192.168.53.99/32]\n" + "".join(
        f"  - name: p{i}\n    allowed_ips: [172.16.{i >> 8}.{i & 255}/32]\n"
        for i in range(count))


def test_reload_survives_any_profile(lab, daemons):
    daemons(lab, "server", server_profile())
    client = daemons(lab, "hostu", client_profile())
    path = client.profile
    good = path.read_text()
    hostile = [
        (good.replace("keepalive: 25", "keepalive: 0x" + "f" * 4000),
         "keepalive: must be from 0 to 3600"),
        (good.replace("keepalive: 25", "keepalive: 1:" + ":".join(["59"] * 3000)),
         "keepalive: must be from 0 to 3600"),
        (good.replace("log:", "log: " + "[" * 5000 + "]" * 5000 + "\nlog:"),
         "(file): nested more than 64 levels deep"),
        (client_profile(routes="0.0.0.0/1"), "routes[0]: 0.0.0.0/1 covers the server 10.9.0.11"),
        (good + "# " + "x" * (2 << 20) + "\n", "larger than the limit of 1048576"),
    ]
    for text, message in hostile:
        path.write_text(text)
        reload(client)
        assert message in client.log(), client.log()[-2000:]
    for kind in ("fifo", "device"):
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")
        reload(client)
        assert f"{path}:1: (file): is a {'FIFO' if kind == 'fifo' else 'character device'}, " \
            "not a profile" in client.log()
    assert client.log().count("reload failed: keeping the running profile") == 7
    assert "Traceback" not in client.log()
    path.unlink()
    path.write_text(good)
    reload(client)
    ping(lab, "hostu", HOSTV)
    assert client.proc.poll() is None


class Pinger:
    """ping at a short interval in a lab host; its reply lines collected as they come."""

    def __init__(self, lab, role: str, count: int, interval: float) -> None:
        self.proc = lab.spawn(role, ["ping", "-c", str(count), "-i", str(interval), "-W", "2",
                                     HOSTV], stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def replies(self) -> int:
        return sum("bytes from" in line for line in self.lines)

    def finish(self) -> tuple[int, int, float]:
        """(sent, received, slowest reply in ms) once ping is done."""
        self.proc.wait(60)
        self.reader.join(10)
        self.proc.stdout.close()
        text = "".join(self.lines)
        sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received",
                                            text).groups())
        slowest = float(re.search(r"= [\d.]+/[\d.]+/([\d.]+)/", text)[1])
        return sent, received, slowest


def test_reloading_thousands_of_peers_does_not_stall_forwarding(lab, daemons):
    server = daemons(lab, "server", server_profile(extra=peers(0)))
    daemons(lab, "hostu", client_profile())
    ping(lab, "hostu", HOSTV, count=1)
    server.profile.write_text(server_profile(extra=peers(4000)))
    pinger = Pinger(lab, "hostu", count=250, interval=0.02)  # 5 s, a ping every 20 ms
    try:
        wait_until(lambda: pinger.replies() >= 10, 15, what="pings flowing")
        reload(server)
        server.wait_status(lambda s: s.startswith("4001 peers"))
        assert pinger.proc.poll() is None, "the reload outlasted 5 s of pings"
    finally:
        sent, received, slowest = pinger.finish()
    # before: the loop read and checked the file itself, and stopped forwarding for seconds
    assert (sent, received) == (250, 250)
    assert slowest < 250, f"a reply took {slowest} ms"  # about 10 ms


def hup_pending(pid: int) -> bool:
    """Whether a SIGHUP sent to the process has not been delivered to any of its threads."""
    status = Path(f"/proc/{pid}/status").read_text()
    pending = int(re.search(r"^ShdPnd:\s*([0-9a-f]+)$", status, re.M)[1], 16)
    return bool(pending & 1 << (signal.SIGHUP - 1))


def test_sighups_during_a_reload_make_one_more_reload(lab, daemons):
    server = daemons(lab, "server", server_profile(extra=peers(3000)))
    new = server.profile.with_suffix(".new")
    new.write_text(server_profile(extra=peers(3001)))
    mark = len(server.fields())
    server.signal(signal.SIGHUP)
    first = server.wait_for("RELOADING=1", after=mark)
    os.replace(new, server.profile)  # changed while the first reload reads: must not be lost
    for _ in range(3):  # each one delivered on its own, not merged by the kernel
        server.signal(signal.SIGHUP)
        wait_until(lambda: not hup_pending(server.pid), 10, 0.001, "SIGHUP delivered")
    server.wait_status(lambda s: s.startswith("3002 peers"), timeout=30)
    reload(server)  # and a last one, after which every earlier SIGHUP has been handled
    fields = server.fields()[first:]
    assert fields.count("RELOADING=1") == 3  # the first, one for the three, the last
    assert fields.count("READY=1") == 3
    assert server.proc.poll() is None


def test_sigterm_during_a_reload_stops_at_once_and_cleanly(lab, daemons):
    server = daemons(lab, "server", server_profile(extra=peers(0)))
    server.profile.write_text(server_profile(extra=peers(10_000)))  # about 1 s to read
    mark = len(server.fields())
    server.signal(signal.SIGHUP)
    server.wait_for("RELOADING=1", after=mark)
    server.signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0  # it used to finish reading and checking first (a minute)
    assert "stopped;" in server.log()
    assert not any(server.run_dir.glob("*.state"))
