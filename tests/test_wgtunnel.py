"""End to end over wire: wireguard: real daemons (and wireguard-go), real TUN devices, ping and a
1 MB TCP echo HostU <-> HostV through the lab's VPN server, in namespaces made per test.

(1) tunvpnd client <-> tunvpnd server, offloads on and off, with and without a preshared key;
(2) tunvpnd client <-> wireguard-go server; (3) wireguard-go client <-> tunvpnd server. Hostile:
a transport datagram replayed is dropped and counted `replay`; a peer whose packet claims an
inner source outside its allowed IPs is dropped and counted `not_allowed`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import in_ns, ping
from tests.test_reload import reload
from tests.test_wginterop import WireguardGo
from tunvpnd.wireguard import keys as wgkeys

HOSTV = "192.168.60.5"
ECHO_BYTES = 1024 * 1024
HAVE_WG = bool(shutil.which("wireguard-go") and shutil.which("wg"))
needs_wg = pytest.mark.skipif(not HAVE_WG, reason="wireguard-go and wg are needed")


class Keys:
    """Fresh keys written beside the profiles (the daemons' workdir), as `wg genkey` would."""

    def __init__(self, directory) -> None:
        self.dir = directory
        self.client, self.server = os.urandom(32), os.urandom(32)
        self.client_pub = wgkeys.public_key(self.client)
        self.server_pub = wgkeys.public_key(self.server)
        self.psk = os.urandom(32)
        for name, key in (("client.key", self.client), ("server.key", self.server),
                          ("shared.psk", self.psk)):
            path = directory / name
            path.write_text(wgkeys.encode_key(key) + "\n")
            path.chmod(0o600)

    def secrets(self) -> list[str]:
        return [form for key in (self.client, self.server, self.psk)
                for form in (wgkeys.encode_key(key), key.hex())]


def client_text(keys: Keys, psk: bool = False, keepalive: int = 25) -> str:
    return f"""\
mode: client
server: 10.9.0.11:9090
wire: wireguard
private_key_file: client.key
server_public_key: {wgkeys.encode_key(keys.server_pub)}
{"preshared_key_file: shared.psk" if psk else ""}
interface:
  name: tun0
  address: 192.168.53.99/24
routes: [192.168.60.0/24]
keepalive: {keepalive}
log:
  level: debug
"""


def server_text(keys: Keys, psk: bool = False, extra_peers: str = "") -> str:
    return f"""\
mode: server
listen: 0.0.0.0:9090
wire: wireguard
private_key_file: server.key
interface:
  name: tun0
  address: 192.168.53.1/24
forward: true
peers:
  - name: hostu
    public_key: {wgkeys.encode_key(keys.client_pub)}
    allowed_ips: [192.168.53.99/32]
{"    preshared_key_file: shared.psk" if psk else ""}
{extra_peers}
log:
  level: debug
"""


def tcp_echo(lab, nbytes: int = ECHO_BYTES, host: str = HOSTV) -> float:
    """A TCP echo of `nbytes` HostU -> `host` (HostV, IPv4 or IPv6) and back; seconds."""
    echo = lab.spawn("hostv", [sys.executable, "-m", "tunvpnd.lab", "echo-server", "9000"],
                     stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in echo.stdout.readline()
        started = time.monotonic()
        result = in_ns(lab, "hostu", [sys.executable, "-m", "tunvpnd.lab", "echo-client", host,
                                      "9000", str(nbytes)], timeout=60)
        took = time.monotonic() - started
        assert f"{nbytes} bytes echoed back identical" in result.stdout
        return took
    finally:
        echo.kill()
        echo.wait()
        echo.stdout.close()


def rtt(result: subprocess.CompletedProcess) -> str:
    found = re.search(r"= [\d.]+/([\d.]+)/", result.stdout)
    return found.group(1) if found else "?"


def no_secrets(text: str, keys: Keys) -> None:
    for secret in keys.secrets():
        assert secret not in text


# --- (1) tunvpnd <-> tunvpnd -----------------------------------------------------------------


@pytest.mark.parametrize("offload", ["1", "0"], ids=["offload", "no-offload"])
@pytest.mark.parametrize("psk", [False, True], ids=["no-psk", "psk"])
def test_tunvpnd_client_and_server(lab, daemons, sockdir, offload, psk):
    keys = Keys(sockdir)
    env = {"TUNVPN_OFFLOAD": offload}
    server = daemons(lab, "server", server_text(keys, psk), env=env)
    client = daemons(lab, "hostu", client_text(keys, psk), name="client", env=env)
    pinged = ping(lab, "hostu", HOSTV, count=5)
    took = tcp_echo(lab)
    print(f"offload={offload} psk={psk}: ping avg {rtt(pinged)} ms, "
          f"1 MB TCP echo {took:.2f} s")
    status = client.wait_status(lambda s: "server up, handshake" in s)
    assert status.startswith("server 10.9.0.11:9090")
    status = server.wait_status(lambda s: "hostu up, handshake" in s)
    assert "dropped 0" in status, status
    assert ("TUN checksum" in server.log()) == (offload == "1")
    for daemon in (client, server):
        no_secrets(daemon.log(), keys)
        assert "Traceback" not in daemon.log()
    assert client.stop() == 0 and server.stop() == 0


@pytest.mark.parametrize("underlay", ["4", "6"])
def test_a_server_with_two_addresses_answers_the_handshake_from_the_one_asked(
        lab, daemons, sockdir, underlay):
    """The client's connected socket discards anything from another address: without the
    arrival address kept for handshake replies (IP_PKTINFO), no handshake would complete."""
    keys = Keys(sockdir)
    if underlay == "6":
        for role, address in (("server", "fd09::11/64"), ("hostu", "fd09::5/64"),
                              ("server", "fd99::11/64")):
            in_ns(lab, role, ["ip", "addr", "add", address, "dev", "eth0", "nodad"])
        in_ns(lab, "hostu", ["ip", "-6", "route", "add", "fd99::/64", "via", "fd09::11"])
        second, listen = "'[fd99::11]:9090'", "'[::]:9090'"
    else:
        in_ns(lab, "server", ["ip", "addr", "add", "10.99.0.11/24", "dev", "eth0"])
        in_ns(lab, "hostu", ["ip", "route", "add", "10.99.0.0/24", "via", "10.9.0.11"])
        second, listen = "10.99.0.11:9090", "0.0.0.0:9090"
    server = daemons(lab, "server", server_text(keys).replace("0.0.0.0:9090", listen))
    client = daemons(lab, "hostu", client_text(keys).replace("10.9.0.11:9090", second),
                     name="client")
    ping(lab, "hostu", HOSTV, count=3)
    client.wait_status(lambda s: "server up, handshake" in s)
    assert "dropped 0" in server.status()


# --- hostile: replay, cryptokey routing -------------------------------------------------------

# Run in HostU: capture one transport datagram the client sends to the server (a raw packet
# socket on eth0), then send its UDP payload to the server again, three times.
REPLAYER = r"""
import socket, struct, sys
# ETH_P_ALL: only such sockets see outgoing packets
raw = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
raw.bind(("eth0", 3))
raw.settimeout(20)
print("ready", flush=True)
while True:
    frame, (_, proto, kind, *_rest) = raw.recvfrom(65536)
    if kind != socket.PACKET_OUTGOING or proto != 0x0800 or frame[9] != 17:
        continue
    ihl = (frame[0] & 15) * 4
    if struct.unpack_from("!H", frame, ihl + 2)[0] != 9090:
        continue
    payload = frame[ihl + 8:]
    if payload[0] == 4 and len(payload) > 32:   # transport data, not a keepalive
        break
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    udp.sendto(payload, ("10.9.0.11", 9090))
print("replayed", len(payload), flush=True)
"""


def counts(status: str) -> tuple[int, int]:
    found = re.search(r"rx (\d+) pkts", status)
    replay = re.search(r"replay (\d+)", status)
    return int(found.group(1)), int(replay.group(1)) if replay else 0


def test_replayed_datagram_is_dropped_and_counted(lab, daemons, sockdir):
    keys = Keys(sockdir)
    server = daemons(lab, "server", server_text(keys))
    daemons(lab, "hostu", client_text(keys), name="client")
    ping(lab, "hostu", HOSTV, count=2)
    replayer = lab.spawn("hostu", [sys.executable, "-c", REPLAYER], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert replayer.stdout.readline().strip() == "ready"
        ping(lab, "hostu", HOSTV, count=1)
        out, err = replayer.communicate(timeout=30)
        assert "replayed" in out, err
    finally:
        if replayer.poll() is None:
            replayer.kill()
            replayer.communicate()
    status = server.wait_status(lambda s: "replay 3" in s)
    assert counts(status) == (3, 3)  # the three echo requests, not one replayed copy
    ping(lab, "hostu", HOSTV, count=2)  # the tunnel keeps working
    server.wait_status(lambda s: counts(s) == (5, 3))


def test_inner_source_outside_allowed_ips_is_dropped(lab, daemons, sockdir):
    """HostU's client, allowed 192.168.53.99/32, sends a packet from 192.168.53.77, which is
    another peer's: the server drops it (cryptokey routing), HostV never sees it."""
    keys = Keys(sockdir)
    other = wgkeys.encode_key(wgkeys.public_key(os.urandom(32)))
    server = daemons(lab, "server", server_text(keys, extra_peers=f"""\
  - name: other
    public_key: {other}
    allowed_ips: [192.168.53.77/32]
"""))
    daemons(lab, "hostu", client_text(keys), name="client")
    ping(lab, "hostu", HOSTV, count=1)
    in_ns(lab, "hostu", ["ip", "addr", "add", "192.168.53.77/32", "dev", "tun0"])
    lost = in_ns(lab, "hostu", ["ping", "-c", "2", "-i", "0.2", "-W", "1", "-I",
                                "192.168.53.77", HOSTV], check=False)
    assert lost.returncode != 0 and "0 received" in lost.stdout
    status = server.wait_status(lambda s: "not_allowed 2" in s)
    assert "other down, no handshake yet" in status
    ping(lab, "hostu", HOSTV, count=1)


# --- (2), (3): against wireguard-go ----------------------------------------------------------


def wg_dump(lab, wg: WireguardGo) -> dict:
    fields = in_ns(lab, wg.role, ["wg", "show", wg.ifname, "dump"]).stdout.splitlines()[1]
    fields = fields.split("\t")
    return {"public_key": fields[0], "preshared_key": fields[1], "endpoint": fields[2],
            "latest_handshake": int(fields[4]), "rx": int(fields[5]), "tx": int(fields[6])}


@needs_wg
@pytest.mark.parametrize("psk", [False, True], ids=["no-psk", "psk"])
def test_tunvpnd_client_to_wireguard_go_server(lab, daemons, sockdir, wggo_factory, psk):
    keys = Keys(sockdir)
    wg = wggo_factory("server")
    keys.server, keys.server_pub = wg.private, wg.public
    argv = ["wg", "set", wg.ifname, "private-key", str(wg.keyfile), "listen-port", "9090",
            "peer", wgkeys.encode_key(keys.client_pub), "allowed-ips", "192.168.53.99/32"]
    if psk:
        argv += ["preshared-key", str(sockdir / "shared.psk")]
    in_ns(lab, "server", argv)
    in_ns(lab, "server", ["ip", "addr", "add", "192.168.53.1/24", "dev", wg.ifname])
    in_ns(lab, "server", ["ip", "link", "set", wg.ifname, "up"])
    in_ns(lab, "server", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    client = daemons(lab, "hostu", client_text(keys, psk), name="client")
    pinged = ping(lab, "hostu", HOSTV, count=5)
    took = tcp_echo(lab)
    print(f"tunvpnd -> wireguard-go psk={psk}: ping avg {rtt(pinged)} ms, "
          f"1 MB TCP echo {took:.2f} s")
    dump = wg_dump(lab, wg)
    assert dump["latest_handshake"] > 0
    assert dump["endpoint"].startswith("10.9.0.5:")
    assert dump["preshared_key"] == (wgkeys.encode_key(keys.psk) if psk else "(none)")
    assert dump["rx"] > ECHO_BYTES and dump["tx"] > ECHO_BYTES
    client.wait_status(lambda s: "server up, handshake" in s and "dropped 0" in s)
    no_secrets(client.log(), keys)


@needs_wg
@pytest.mark.parametrize("psk", [False, True], ids=["no-psk", "psk"])
def test_wireguard_go_client_to_tunvpnd_server(lab, daemons, sockdir, wggo_factory, psk):
    keys = Keys(sockdir)
    wg = wggo_factory("hostu")
    keys.client, keys.client_pub = wg.private, wg.public
    server = daemons(lab, "server", server_text(keys, psk))
    argv = ["wg", "set", wg.ifname, "private-key", str(wg.keyfile), "peer",
            wgkeys.encode_key(keys.server_pub), "allowed-ips", "192.168.53.0/24,192.168.60.0/24",
            "endpoint", "10.9.0.11:9090"]
    if psk:
        argv += ["preshared-key", str(sockdir / "shared.psk")]
    in_ns(lab, "hostu", argv)
    in_ns(lab, "hostu", ["ip", "addr", "add", "192.168.53.99/24", "dev", wg.ifname])
    in_ns(lab, "hostu", ["ip", "link", "set", wg.ifname, "up"])
    in_ns(lab, "hostu", ["ip", "route", "add", "192.168.60.0/24", "dev", wg.ifname])
    pinged = ping(lab, "hostu", HOSTV, count=5)
    took = tcp_echo(lab)
    print(f"wireguard-go -> tunvpnd psk={psk}: ping avg {rtt(pinged)} ms, "
          f"1 MB TCP echo {took:.2f} s")
    dump = wg_dump(lab, wg)
    assert dump["latest_handshake"] > 0
    assert dump["endpoint"] == "10.9.0.11:9090"
    assert dump["rx"] > ECHO_BYTES and dump["tx"] > ECHO_BYTES
    status = server.wait_status(lambda s: "hostu up, handshake" in s)
    assert "dropped 0" in status, status
    no_secrets(server.log(), keys)


def test_reload_adds_a_peer_and_keeps_the_running_session(lab, daemons, sockdir):
    """SIGHUP with one more peer: hostu's session (its keypair) stays, no new handshake, not
    one ping lost around the reload; the new peer is there."""
    keys = Keys(sockdir)
    server = daemons(lab, "server", server_text(keys))
    daemons(lab, "hostu", client_text(keys), name="client")
    ping(lab, "hostu", HOSTV, count=1)

    def handshake_age(status: str) -> int:
        found = re.search(r"hostu up, handshake (\d+)s ago", status)
        return int(found.group(1)) if found else -1

    server.wait_status(lambda s: handshake_age(s) >= 2, timeout=20)
    pinger = lab.spawn("hostu", ["ping", "-c", "20", "-i", "0.1", "-W", "1", HOSTV])
    other = wgkeys.encode_key(wgkeys.public_key(os.urandom(32)))
    server.profile.write_text(server_text(keys, extra_peers=f"""\
  - name: newcomer
    public_key: {other}
    allowed_ips: [192.168.53.77/32]
"""))
    reload(server)
    assert pinger.wait(30) == 0
    status = server.wait_status(lambda s: "newcomer down" in s)
    assert handshake_age(status) >= 2, status   # the same handshake, not a new one
    assert "dropped 0" in status
