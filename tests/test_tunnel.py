"""End to end: real daemons, real TUN devices, real ping and TCP, in namespaces made per test.

The lab topology: HostU 10.9.0.5 -- VPN server 10.9.0.11 / 192.168.60.11 -- HostV 192.168.60.5.
Every daemon runs with PATH empty, so any attempt to run `ip` or a shell would fail.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    EXAMPLES,
    REPO,
    client_profile,
    forwarding,
    in_ns,
    ip_json,
    ping,
    server_profile,
    tun_links,
)
from tunvpnd.core import CHALLENGE_WAIT
from tunvpnd.lab import wait_until
from tunvpnd.netconf import RTPROT_TUNVPND
from tunvpnd.service import TICK

HOSTV = "192.168.60.5"


def tunnel(lab, daemons, server_extra: str = ""):
    server = daemons(lab, "server", server_profile(extra=server_extra))
    client = daemons(lab, "hostu", client_profile())
    return server, client


def our_routes(lab, role: str, family: str = "-4") -> list[str]:
    return sorted(r["dst"] for r in ip_json(lab, role, family, "route", "show", "proto",
                                            str(RTPROT_TUNVPND)))


def test_lab_ping_and_tcp_echo(lab, daemons):
    """The lab's Task 5 outcome, with the shipped example profiles."""
    daemons(lab, "server", (EXAMPLES / "server.yaml").read_text())
    daemons(lab, "hostu", (EXAMPLES / "client.yaml").read_text(), name="client")
    ping(lab, "hostu", HOSTV)
    echo = lab.spawn("hostv", [sys.executable, "-m", "tunvpnd.lab", "echo-server", "9000"],
                     stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in echo.stdout.readline()
        result = in_ns(lab, "hostu", [sys.executable, "-m", "tunvpnd.lab", "echo-client", HOSTV,
                                      "9000", str(200 * 1024)])
        assert "204800 bytes echoed back identical" in result.stdout
    finally:
        echo.kill()
        echo.wait()
        echo.stdout.close()


def test_status_counts_packets_and_peers(lab, daemons):
    server, client = tunnel(lab, daemons)
    ping(lab, "hostu", HOSTV, count=5)
    status = server.wait_status(lambda s: s.startswith("1 peers") and "rx 5 pkts" in s)
    assert "dropped 0" in status
    status = client.wait_status(lambda s: "rx 5 pkts" in s)
    assert status.startswith("server 10.9.0.11:9090")


@pytest.mark.parametrize("lab", [1], indirect=True)
def test_two_clients_each_get_their_own_replies(lab, daemons):
    server = daemons(lab, "server", server_profile())
    daemons(lab, "hostu", client_profile(address="192.168.53.99/24"), name="client1")
    daemons(lab, "hostu2", client_profile(address="192.168.53.98/24"), name="client2")
    first = lab.spawn("hostu", ["ping", "-c", "10", "-i", "0.1", "-W", "2", HOSTV])
    second = lab.spawn("hostu2", ["ping", "-c", "10", "-i", "0.1", "-W", "2", HOSTV])
    assert first.wait(30) == 0 and second.wait(30) == 0
    # and clients reach each other through the server (hub and spoke)
    ping(lab, "hostu", "192.168.53.98")
    status = server.wait_status(lambda s: s.startswith("2 peers"))
    assert "dropped 0" in status


def test_ipv6_inside_the_tunnel(lab, daemons):
    daemons(lab, "server", server_profile(address="[192.168.53.1/24, 'fd53::1/64']"))
    daemons(lab, "hostu", client_profile(address="[192.168.53.99/24, 'fd53::99/64']",
                                         routes="192.168.60.0/24, 'fd60::/64'"))
    in_ns(lab, "hostv", ["ip", "addr", "add", "fd60::5/64", "dev", "eth0", "nodad"])
    in_ns(lab, "hostv", ["ip", "-6", "route", "add", "fd53::/64", "via", "fd60::11"])
    in_ns(lab, "server", ["ip", "addr", "add", "fd60::11/64", "dev", "eth1", "nodad"])
    # IPv6 forwarding has no per-interface netlink switch; the operator turns it on.
    in_ns(lab, "server", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    assert our_routes(lab, "hostu", "-6") == ["fd60::/64"]
    ping(lab, "hostu", "fd53::1", family="-6")
    ping(lab, "hostu", "fd60::5", family="-6")


def test_sighup_adds_a_route_live(lab, daemons):
    server, client = tunnel(lab, daemons)
    ping(lab, "hostu", HOSTV)
    (index,) = [link["ifindex"] for link in tun_links(lab, "hostu")]
    pinger = lab.spawn("hostu", ["ping", "-c", "30", "-i", "0.1", "-W", "1", HOSTV])
    client.profile.write_text(client_profile(routes="192.168.60.0/24, 192.168.70.0/24"))
    mark = len(client.fields())
    client.signal(signal.SIGHUP)
    reloading = client.wait_for("RELOADING=1", after=mark)
    client.wait_for("READY=1", after=reloading)
    assert our_routes(lab, "hostu") == ["192.168.60.0/24", "192.168.70.0/24"]
    assert [link["ifindex"] for link in tun_links(lab, "hostu")] == [index]
    assert client.proc.poll() is None
    assert pinger.wait(30) == 0  # not one of the 30 pings was lost around the reload
    assert "reloaded" in client.log()


def test_sighup_with_broken_profile_keeps_running(lab, daemons):
    server, client = tunnel(lab, daemons)
    client.profile.write_text(client_profile() + "bogus: 1\n")
    mark = len(client.fields())
    client.signal(signal.SIGHUP)
    client.wait_for("READY=1", after=client.wait_for("RELOADING=1", after=mark))
    assert f"{client.profile}:10: bogus: unknown key" in client.log()
    assert "keeping the running profile" in client.log()
    ping(lab, "hostu", HOSTV)


def test_sigterm_puts_everything_back(lab, daemons):
    before_server = forwarding(lab, "server")
    assert set(before_server.values()) == {0}
    server, client = tunnel(lab, daemons)
    assert set(forwarding(lab, "server").values()) == {1}
    ping(lab, "hostu", HOSTV)
    assert client.stop() == 0 and server.stop() == 0
    for role in ("hostu", "server"):
        assert tun_links(lab, role) == []
        assert our_routes(lab, role) == []
    assert forwarding(lab, "server") == before_server
    assert "STOPPING=1" in client.fields() and "STOPPING=1" in server.fields()
    assert not any(server.run_dir.glob("*.state"))


def test_kill9_then_restart_restores_forwarding(lab, daemons):
    before = forwarding(lab, "server")
    server = daemons(lab, "server", server_profile())
    assert set(forwarding(lab, "server").values()) == {1}
    server.proc.kill()
    server.proc.wait(10)
    # the kernel removed the TUN with its routes; the forwarding flags outlive the process
    wait_until(lambda: tun_links(lab, "server") == [], 10, what="TUN gone after kill -9")
    assert set(forwarding(lab, "server").values()) == {1}
    server.restart()  # same profile, same run directory: finds the dead run's state file
    assert "undid what an earlier run left behind" in server.log()
    assert server.stop() == 0
    assert forwarding(lab, "server") == before


@pytest.mark.parametrize("lab", [1], indirect=True)
def test_hostile_datagrams_are_dropped_and_counted(lab, daemons):
    peers = """peers:
  - name: hostu
    allowed_ips: [192.168.53.99/32]
    endpoint: 10.9.0.5
"""
    server, client = tunnel(lab, daemons, server_extra=peers)
    ping(lab, "hostu", HOSTV)
    attack = (
        "import os, socket\n"
        "from tests.ipcraft import icmp_echo\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "to = ('10.9.0.11', 9090)\n"
        "for _ in range(50): s.sendto(os.urandom(200), to)\n"
        "good = icmp_echo('192.168.53.99', '192.168.60.5')\n"
        "for cut in (1, 10, 19, 30): s.sendto(good[:cut], to)\n"
        "s.sendto(os.urandom(65507), to)\n"
        "s.sendto(good, to)\n"  # spoofed: right inner source, wrong endpoint (10.9.0.6)
        "s.sendto(icmp_echo('192.168.53.50', '192.168.60.5'), to)\n"  # no such peer
    )
    assert lab.run("hostu2", [sys.executable, "-c", attack], cwd=str(REPO)).returncode == 0
    status = server.wait_status(lambda s: "malformed 55" in s and "bad_endpoint 1" in s
                                and "unknown_source 1" in s)
    assert server.proc.poll() is None
    ping(lab, "hostu", HOSTV)
    assert "dropped 57" in status


def test_client_restart_on_a_new_port_is_followed(lab, daemons):
    """NAT rebinding, for real: a new client socket means a new source port. The server first
    challenges the old endpoint (it is gone), then follows the client: within a few seconds."""
    server, client = tunnel(lab, daemons)
    ping(lab, "hostu", HOSTV)
    assert client.stop() == 0
    client.restart()
    start = time.monotonic()
    in_ns(lab, "hostu", ["ping", "-4", "-c", "1", "-i", "0.2", "-w", "8", HOSTV])  # till answered
    assert time.monotonic() - start < CHALLENGE_WAIT + 2 * TICK + 1
    ping(lab, "hostu", HOSTV)
    server.wait_status(lambda s: s.startswith("1 peers") and "address_held" in s)
    assert "moved to 10.9.0.5:" in server.log()


@pytest.mark.parametrize("lab", [1], indirect=True)
def test_sighup_applies_a_new_peer_list(lab, daemons):
    hostu = """peers:
  - name: hostu
    allowed_ips: [192.168.53.99/32]
"""
    hostu2 = hostu + """  - name: hostu2
    allowed_ips: [192.168.53.98/32]
    endpoint: 10.9.0.6
"""
    server = daemons(lab, "server", server_profile(extra=hostu))
    daemons(lab, "hostu", client_profile(), name="client1")
    daemons(lab, "hostu2", client_profile(address="192.168.53.98/24"), name="client2")
    ping(lab, "hostu", HOSTV)
    assert ping(lab, "hostu2", HOSTV, count=1, check=False).returncode != 0
    server.wait_status(lambda s: "unknown_source" in s)
    server.profile.write_text(server_profile(extra=hostu2))
    mark = len(server.fields())
    server.signal(signal.SIGHUP)
    server.wait_for("READY=1", after=server.wait_for("RELOADING=1", after=mark))
    ping(lab, "hostu2", HOSTV)
    ping(lab, "hostu", HOSTV)  # the peer that stayed kept its endpoint
    assert "peers: hostu, hostu2" in server.log()


def test_ipv6_underlay(lab, daemons):
    for role, address in (("server", "fd09::11/64"), ("hostu", "fd09::5/64")):
        in_ns(lab, role, ["ip", "addr", "add", address, "dev", "eth0", "nodad"])
    server = daemons(lab, "server", server_profile().replace("0.0.0.0:9090", "'[::]:9090'"))
    client = daemons(lab, "hostu", client_profile().replace("10.9.0.11:9090", "'[fd09::11]:9090'"))
    ping(lab, "hostu", HOSTV)
    assert client.status().startswith("server [fd09::11]:9090")
    server.wait_status(lambda s: s.startswith("1 peers") and "rx 3 pkts" in s)
