"""What the daemon tells systemd, read from a datagram socket bound as NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import socket

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


def test_a_notify_socket_nobody_reads_never_stalls_the_tunnel(lab, daemons):
    """The kernel queues at most net.unix.max_dgram_qlen (often 10) datagrams for a reader:
    a blocking send would stop the loop, and every packet with it, on the next STATUS."""
    from tests.conftest import client_profile, ping

    server = daemons(lab, "server", server_profile())
    daemons(lab, "hostu", client_profile(), name="client")
    ping(lab, "hostu", "192.168.60.5")
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    queued = 0
    try:
        while queued < 100_000:                   # the server's notify queue is full after this
            filler.sendto(b"X=1", str(server.notify_path))
            queued += 1
    except BlockingIOError:
        pass
    finally:
        filler.close()
    assert queued < 100_000
    server.signal(signal.SIGHUP)                  # RELOADING=1, READY=1, STATUS= to send now
    for _ in range(3):
        ping(lab, "hostu", "192.168.60.5")
    assert server.proc.poll() is None
