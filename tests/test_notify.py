"""What the daemon tells systemd, read from a datagram socket bound as NOTIFY_SOCKET."""

from __future__ import annotations

import signal

from tests.conftest import server_profile
from tunvpnd.lab import wait_until

WATCHDOG_USEC = 600_000


def test_notify_sequence(lab, daemons):
    server = daemons(lab, "server", server_profile(),
                     env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    fields = server.fields()
    # READY=1 comes with a first STATUS, once the TUN, its routes and the socket exist
    assert fields[0] == "READY=1" and fields[1].startswith("STATUS=0 peers;")

    def watchdog_times() -> list[float]:
        return [t for t, m in server.poll_messages() if "WATCHDOG=1" in m.split("\n")]

    wait_until(lambda: len(watchdog_times()) >= 6, 10, what="six WATCHDOG=1 pings")
    times = watchdog_times()
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) < WATCHDOG_USEC / 1e6 / 2, gaps  # systemd's advice: ping at < half

    wait_until(lambda: sum(f.startswith("STATUS=") for f in server.fields()) >= 2, 15,
               what="a periodic STATUS")

    mark = len(server.fields())
    server.signal(signal.SIGHUP)
    reloading = server.wait_for("RELOADING=1", after=mark)
    after_reload = server.fields()[reloading:]
    assert any(f.startswith("MONOTONIC_USEC=") for f in after_reload)
    server.wait_for("READY=1", after=reloading)

    mark = len(server.fields())
    assert server.stop() == 0
    stopping = server.wait_for("STOPPING=1", after=mark)
    assert all(not f.startswith("READY") for f in server.fields()[stopping:])


def test_no_watchdog_without_watchdog_usec(lab, daemons):
    server = daemons(lab, "server", server_profile())
    wait_until(lambda: sum(f.startswith("STATUS=") for f in server.fields()) >= 2, 15,
               what="a periodic STATUS")
    assert "WATCHDOG=1" not in server.fields()
