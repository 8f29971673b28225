"""A learning server under a flood of new sources, and pinned link-local endpoints (issue 8,
items 2 and 14): real daemons in the lab, a flood from another lab host, the tunnel watched
through another client's pings.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from ipaddress import IPv4Network

import pytest

from tests.conftest import client_profile, in_ns, ip_json, ping, rss_kib
from tunvpnd.core import Core
from tunvpnd.lab import wait_until
from tunvpnd.peers import PeerTable
from tunvpnd.profile import PeerConfig, ProfileError, load_profile
from tunvpnd.service import Daemon
from tunvpnd.wire import PlainWire

HOSTV = "192.168.60.5"
FLOOD = 20_000
SOCKETS = 250  # source ports: 250 endpoints x 16 addresses each could claim 4,000 > 1,024
STATUS_RE = re.compile(r"^(\d+) peers;")

LEARNING_SERVER = """\
mode: server
listen: "{listen}"
interface:
  name: tun0
  address: [192.168.53.1/24, "fd53::1/64"]
forward: true
peer_timeout: 10
{extra}
log:
  level: info
"""

ZONED_CLIENT = """\
mode: client
server: "[{server}%eth0]:9090"
interface:
  name: tun0
  address: 192.168.53.99/24
routes: [192.168.60.0/24]
"""

# Bare IP headers (IPv6: payload length 0, next header 59; IPv4: protocol 253, no payload)
# from random sources in fd53::/64 and 192.168.53.0/24 (the network, broadcast and server
# addresses included), to the server's tunnel address. Spares the real client's .99.
FLOOD_SCRIPT = """\
import random, socket, struct, sys
from tests.ipcraft import ipv4
server, count, sockets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(8)
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sockets)]
dst6 = bytes.fromhex("fd53" + "0" * 27 + "1")
for n in range(count):
    if n % 2:
        src = bytes.fromhex("fd53" + "0" * 12) + rng.getrandbits(64).to_bytes(8, "big")
        packet = struct.pack("!IHBB16s16s", 6 << 28, 0, 59, 64, src, dst6)
    else:
        host = rng.choice([h for h in range(256) if h != 99])
        packet = ipv4(f"192.168.53.{host}", "192.168.53.1", proto=253)
    socks[n * sockets // count].sendto(packet, (server, 9090))  # each socket in one run
print("sent", count, flush=True)
"""


def peers_in(status: str) -> int:
    match = STATUS_RE.match(status)
    return int(match.group(1)) if match else -1


def drops(status: str) -> dict[str, int]:
    match = re.search(r"dropped \d+ \(([^)]*)\)", status)
    return {k: int(v) for k, v in (p.rsplit(" ", 1) for p in match[1].split(", "))} if match \
        else {}


@pytest.mark.parametrize("lab", [1], indirect=True)
def test_flood_of_new_sources_stays_bounded_and_the_tunnel_keeps_working(lab, daemons):
    """20,000 datagrams with random inner sources from one other host: the learned-peer table
    stops at max_learned_peers (default 1024), memory and the log stay small, and another
    client's pings go through during the flood and during the expiry that follows."""
    server = daemons(lab, "server", LEARNING_SERVER.format(listen="0.0.0.0:9090", extra=""))
    daemons(lab, "hostu", client_profile(address="192.168.53.99/24"), name="client")
    ping(lab, "hostu", HOSTV, count=2)
    server.wait_status(lambda s: peers_in(s) == 1)
    rss_before = rss_kib(server.pid)
    lines_before = len(server.log().splitlines())

    pinger = lab.spawn("hostu", ["ping", "-q", "-n", "-c", "900", "-i", "0.05", "-W", "1", HOSTV],
                       stdout=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        result = in_ns(lab, "hostu2", [sys.executable, "-c", FLOOD_SCRIPT,
                                       lab.addresses["server"], str(FLOOD), str(SOCKETS)],
                       timeout=60)
        flood_seconds = time.monotonic() - started
        assert f"sent {FLOOD}" in result.stdout
        full = server.wait_status(lambda s: peers_in(s) == 1024 and "table_full" in s)
        rss_full = rss_kib(server.pid)
        ping(lab, "hostu", HOSTV, count=3)  # the table is full: the known client still works
        # The flood's peers fall silent: all expire after peer_timeout; the client stays.
        server.wait_status(lambda s: peers_in(s) == 1, timeout=40)
        ping(lab, "hostu", HOSTV, count=3)
    finally:
        pinger.send_signal(signal.SIGINT)
        pings = pinger.communicate(timeout=10)[0]

    counted = drops(full)
    assert counted.get("table_full", 0) > 0 and counted.get("bad_source", 0) > 0, full
    assert counted.get("endpoint_limit", 0) > 0, full
    growth_mib = (rss_full - rss_before) / 1024
    assert growth_mib < 8, f"RSS grew by {growth_mib:.1f} MiB with 1024 peers"

    log = server.log().splitlines()[lines_before:]
    assert len(log) <= 40, "\n".join(log[:60])
    text = "\n".join(log)
    assert "refused" in text and "table full, 1024 learned peers" in text
    assert "expired" in text and "more learned peers" in text
    assert "192.168.53.255" not in text and "192.168.53.0/" not in text

    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received",
                                        pings).groups())
    worst = float(re.search(r"= [\d.]+/[\d.]+/([\d.]+)/", pings)[1])
    loss = 1 - received / sent
    print(f"\nflood {FLOOD} datagrams in {flood_seconds:.2f} s; {full}; RSS {rss_before} -> "
          f"{rss_full} KiB; {len(log)} log lines; pings {received}/{sent} ({loss:.1%} loss), "
          f"max RTT {worst} ms")
    assert sent >= 50 and loss <= 0.02, pings
    assert worst < 500, pings


def link_local(lab, role: str) -> str:
    """`role`'s eth0 link-local address, once duplicate address detection is done with it."""
    def ready() -> str | None:
        for link in ip_json(lab, role, "-6", "addr", "show", "dev", "eth0", "scope", "link"):
            for addr in link.get("addr_info", []):
                if not addr.get("tentative"):
                    return addr["local"]
        return None

    wait_until(lambda: ready() is not None, 10, 0.1, f"{role} link-local address")
    return ready()


def test_pinned_link_local_endpoint_with_a_zone(lab, daemons):
    """A peer pinned to "fe80::...%eth0" matched nothing: recvfrom() reports the source as
    ('fe80::...', port, 0, ifindex), without the zone in the text."""
    hostu, server_ll = link_local(lab, "hostu"), link_local(lab, "server")
    extra = (f"peers:\n  - name: hostu\n    allowed_ips: [192.168.53.99/32]\n"
             f"    endpoint: \"{hostu}%eth0\"\n")
    server = daemons(lab, "server", LEARNING_SERVER.format(listen="[::]:9090", extra=extra))
    daemons(lab, "hostu", ZONED_CLIENT.format(server=server_ll), name="client")
    ping(lab, "hostu", HOSTV, count=3)
    status = server.wait_status(lambda s: "rx 3 pkts" in s)
    assert "bad_endpoint" not in status


# -- the profile keys -------------------------------------------------------------------------

def write(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_profile_limits_default_and_configured(tmp_path):
    base = "mode: server\ninterface: {address: 192.168.53.1/24}\n"
    profile = load_profile(write(tmp_path, base))
    assert (profile.max_learned_peers, profile.max_addresses_per_endpoint) == (1024, 16)
    profile = load_profile(write(tmp_path, base + "max_learned_peers: 100000\n"
                                 "max_addresses_per_endpoint: 1\n"))
    assert (profile.max_learned_peers, profile.max_addresses_per_endpoint) == (100000, 1)


@pytest.mark.parametrize("text, problem", [
    ("mode: server\nmax_learned_peers: 0\n", "2: max_learned_peers: must be from 1 to 1000000"),
    ("mode: server\nmax_addresses_per_endpoint: many\n",
     "2: max_addresses_per_endpoint: must be an integer"),
    ("mode: client\nserver: 10.9.0.11\nmax_learned_peers: 5\n",
     "3: max_learned_peers: only allowed in server mode"),
])
def test_profile_limits_errors(tmp_path, text, problem):
    path = write(tmp_path, text + "interface: {address: 192.168.53.1/24}\n")
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    assert any(p.startswith(f"{path}:{problem}") for p in error.value.problems), error.value


# -- reload with thousands of configured peers ------------------------------------------------

def test_reload_with_4000_peers_is_quick_and_logs_one_short_line(tmp_path, caplog):
    """Swapping in 4,000 configured peers takes milliseconds (the loop waits for it) and logs
    a line of ten names and a count, not 4,000 names."""
    base = load_profile(write(tmp_path, "mode: server\ninterface: {address: 10.0.0.1/16}\n"))
    configs = tuple(PeerConfig(f"p{i}", (IPv4Network((0x0A010000 + (i << 4), 28)),),
                               (f"10.9.{i >> 8}.{i & 255}", 9000 if i % 2 else None))
                    for i in range(4000))
    daemon = Daemon(base)
    daemon.core = Core(PeerTable(), PlainWire())
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        daemon.sock = sock
        caplog.set_level(logging.INFO, logger="tunvpnd")
        started = time.perf_counter()
        daemon._replace_peers(replace(base, peers=configs))
        took = time.perf_counter() - started
    assert len(daemon.core.peers) == 4000 and took < 1.0, f"{took:.2f} s"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("peers:")]
    assert lines == ["peers: p0, p1, p2, p3, p4, p5, p6, p7, p8, p9 and 3990 more"]
    assert daemon.core.peers.lookup(4, 0x0A010011).endpoint == ("::ffff:10.9.0.1", 9000, 0, 0)
