"""Who holds a tunnel address on a learning server: spoofing, NAT rebinding, server restarts.

Plain mode cannot authenticate, so a datagram from a new endpoint claiming an address that
another endpoint holds is dropped and the holder is CHALLENGEd; the address moves only if the
holder stays silent for CHALLENGE_WAIT. tunvpnd clients answer challenges and announce their
addresses in every keepalive; the lab's style of client (tests/labclient.py) can do neither.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, client_profile, in_ns, ping, server_profile
from tunvpnd.core import CHALLENGE_WAIT
from tunvpnd.lab import wait_until
from tunvpnd.service import TICK  # claims are settled once a tick

HOSTV = "192.168.60.5"


class LabClient:
    """tests/labclient.py in a lab host: a raw UDP socket speaking the plain wire."""

    def __init__(self, lab, role: str, *args: str) -> None:
        self.proc = lab.spawn(role, [sys.executable, "-m", "tests.labclient", *args],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=str(REPO))
        line = self.proc.stdout.readline()
        assert line.startswith("ready "), line
        self.port = int(line.split()[1])

    def finish(self) -> dict:
        """Stop it; what it received."""
        try:
            out, _ = self.proc.communicate("", timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
        return json.loads(out.splitlines()[-1])


def ping_until(lab, role: str, address: str, deadline: float) -> float:
    """Ping every 0.2 s until one answer; the seconds it took (fails after `deadline`)."""
    start = time.monotonic()
    in_ns(lab, role, ["ping", "-4", "-c", "1", "-i", "0.2", "-w", str(int(deadline)), address],
          timeout=deadline + 5)
    return time.monotonic() - start


@pytest.mark.parametrize("lab", [1], indirect=True)
def test_a_spoofed_datagram_takes_no_address_from_idle_or_active_clients(lab, daemons):
    server = daemons(lab, "server", server_profile())
    daemons(lab, "hostu", client_profile(keepalive=25))  # a tunvpnd client, idle
    ping(lab, "hostu", HOSTV, count=1)  # learned from real traffic, then quiet
    active = LabClient(lab, "hostu2", "192.168.53.98", "--every", "0.2")  # the lab's style, busy
    attacker, pingers = None, []
    try:
        ping(lab, "hostv", "192.168.53.98", count=1)
        # HostV pings both victims for 5 s, longer than a claim takes to be settled...
        pingers = [lab.spawn("hostv", ["ping", "-4", "-c", "25", "-i", "0.2", "-W", "1", victim],
                             stdout=subprocess.PIPE, text=True)
                   for victim in ("192.168.53.99", "192.168.53.98")]
        # ...while another host sends one datagram with each victim's inner source
        attacker = LabClient(lab, "hostv", "192.168.53.99", "192.168.53.98", "--send", "1",
                             "--mute", "--server", "192.168.60.11")
        for pinger in pingers:
            out, _ = pinger.communicate(timeout=30)
            assert " 25 received" in out, out  # not one ping went astray
        wait_until(lambda: len(re.findall(r"stays at 10\.9\.0\.[56]:\d+: refused "
                                          r"192\.168\.60\.5:", server.log())) == 2,
                   2 * TICK, what="both claims refused")
        assert active.finish()["answered"] >= 25
        stolen = attacker.finish()
        assert stolen["echo_requests"] == 0, stolen
        assert "address_held 2" in server.wait_status(lambda s: "address_held" in s)
        assert "moved to" not in server.log()
    finally:
        for pinger in pingers:
            if pinger.poll() is None:
                pinger.kill()
                pinger.communicate()
        for client in (active, attacker):
            if client is not None and client.proc.poll() is None:
                client.finish()


@pytest.mark.parametrize("lab", [1], indirect=True)
def test_a_silent_lab_client_is_followed_to_its_new_endpoint(lab, daemons):
    """The trade-off: a client that cannot answer challenges is protected only while it talks;
    once it is silent, a new endpoint claiming its address gets it after CHALLENGE_WAIT."""
    server = daemons(lab, "server", server_profile())
    old = LabClient(lab, "hostu2", "192.168.53.98", "--send", "1")
    new = None
    try:
        ping(lab, "hostv", "192.168.53.98", count=1)  # reaches the old socket
        # the "rebound" client: same host, new port, it talks (e.g. after a NAT rebinding)
        new = LabClient(lab, "hostu2", "192.168.53.98", "--every", "0.2")
        claimed = time.monotonic()
        wait_until(lambda: f"moved to 10.9.0.6:{new.port}" in server.log(),
                   CHALLENGE_WAIT + 3 * TICK, what="the address to move")
        assert time.monotonic() - claimed < CHALLENGE_WAIT + 2 * TICK + 0.5, server.log()
        ping(lab, "hostv", "192.168.53.98")
        assert new.finish()["answered"] >= 3
        assert old.finish()["answered"] == 1  # only the ping from before the move
    finally:
        for client in (old, new):
            if client is not None and client.proc.poll() is None:
                client.finish()


def test_a_restarted_server_relearns_an_idle_client_from_its_keepalive(lab, daemons):
    keepalive = 2
    server = daemons(lab, "server", server_profile())
    client = daemons(lab, "hostu", client_profile(keepalive=keepalive))
    # never any traffic of its own: the server learns it from the ANNOUNCE in its keepalive
    status = server.wait_status(lambda s: s.startswith("1 peers"), 3 * keepalive + 5)
    assert "rx 0 pkts" in status and "keepalives" in status  # consumed, not written to the TUN
    assert server.stop() == 0
    server.restart()  # it knows no peers now
    assert "tx 0 pkts" in client.status()  # the client sent nothing through the tunnel
    took = ping_until(lab, "hostv", "192.168.53.99", deadline=3 * keepalive + 2)
    assert took < keepalive + 2, took  # about one keepalive interval
    assert "dropped 0" in server.status()


def test_an_idle_client_on_a_new_port_is_followed_from_its_keepalive(lab, daemons):
    """NAT rebinding of an idle tunvpnd client: its next ANNOUNCE claims the address from the
    old endpoint, which cannot answer the challenge any more."""
    keepalive = 2
    server = daemons(lab, "server", server_profile())
    client = daemons(lab, "hostu", client_profile(keepalive=keepalive))
    ping(lab, "hostu", HOSTV, count=1)
    assert client.stop() == 0
    client.restart()  # a new socket: a new source port, and nothing to send but keepalives
    took = ping_until(lab, "hostv", "192.168.53.99", deadline=keepalive + CHALLENGE_WAIT + 6)
    assert took < keepalive + CHALLENGE_WAIT + 2 * TICK + 1, took
    assert re.search(r"moved to 10\.9\.0\.5:\d+: its old endpoint did not answer",
                     server.log())
