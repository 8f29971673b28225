"""The WireGuard UAPI of a wireguard-mode instance, /run/wireguard/IFNAME.sock, read by the real
`wg` binary: the same commands against tunvpnd and against wireguard-go in the same test, so
the formats are proven equal, not assumed; `wg show IF dump` against `tunvpnd show --json`;
`set=1` refused; the socket's life (removed on stop, a live holder respected, a stale one
replaced); hostile clients.

UAPI socket paths are global (not per network namespace): every test uses unique interface
names and removes the sockets it may have left, even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time

import pytest

from tests.conftest import in_ns, ping, pinging_through, sent_until_hung_up, unique
from tests.test_show import show, show_json
from tests.test_wgtunnel import (
    HAVE_WG,
    HOSTV,
    Keys,
    client_text,
    server_text,
)
from tunvpnd.lab import wait_until
from tunvpnd.wireguard import keys as wgkeys

needs_wg = pytest.mark.skipif(not HAVE_WG, reason="wireguard-go and wg are needed")
UAPI_DIR = "/run/wireguard"


@pytest.fixture
def ifnames():
    """Unique interface names; their UAPI sockets removed at the end whatever happened."""
    made: list[str] = []

    def make(prefix: str) -> str:
        name = unique(prefix)[:15]
        made.append(name)
        return name

    yield make
    for name in made:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{UAPI_DIR}/{name}.sock")


def dump(lab, role: str, ifname: str) -> tuple[list[str], list[list[str]]]:
    """`wg show IF dump`: the interface's fields and each peer's."""
    lines = in_ns(lab, role, ["wg", "show", ifname, "dump"]).stdout.splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def labels(text: str) -> list[str]:
    """The line labels of `wg show IF` (`interface`, `public key`, ...), in order."""
    return [line.split(":")[0].strip() for line in text.splitlines() if line.strip()]


def conf_keys(text: str) -> list[str]:
    """The section headers and keys of `wg showconf IF`, in order."""
    return [line.split("=")[0].strip() for line in text.splitlines() if line.strip()]


def quiet(lab, server_role: str, server_if: str, client_role: str, client_if: str) -> None:
    """Wait until nothing is in flight: each side's tx equals the other's rx, twice in a row."""
    def agreed() -> bool:
        server, client = dump(lab, server_role, server_if)[1][0], \
            dump(lab, client_role, client_if)[1][0]
        return (server[5], server[6]) == (client[6], client[5])

    wait_until(lambda: agreed() and (time.sleep(0.3) or agreed()), 30,
               what="byte counts agree on both ends")


@needs_wg
def test_wg_reads_tunvpnd_as_it_reads_wireguard_go(lab, daemons, sockdir, ifnames,
                                                   wggo_factory):
    """wireguard-go client (hostu) <-> tunvpnd server, a preshared key: every `wg` view of each
    end has the same shape, and the numbers agree across the tunnel (tx of one is rx of the
    other: one byte definition) and with `tunvpnd show --json`."""
    keys = Keys(sockdir)
    wg = wggo_factory("hostu")
    keys.client, keys.client_pub = wg.private, wg.public
    ours = ifnames("tvu")
    server = daemons(lab, "server", server_text(keys, psk=True).replace("name: tun0",
                                                                        f"name: {ours}"))
    in_ns(lab, "hostu", ["wg", "set", wg.ifname, "private-key", str(wg.keyfile), "listen-port",
                         "51820", "peer", wgkeys.encode_key(keys.server_pub), "preshared-key",
                         str(sockdir / "shared.psk"), "allowed-ips",
                         "192.168.53.0/24,192.168.60.0/24", "endpoint", "10.9.0.11:9090"])
    in_ns(lab, "hostu", ["ip", "addr", "add", "192.168.53.99/24", "dev", wg.ifname])
    in_ns(lab, "hostu", ["ip", "link", "set", wg.ifname, "up"])
    in_ns(lab, "hostu", ["ip", "route", "add", "192.168.60.0/24", "dev", wg.ifname])
    ping(lab, "hostu", HOSTV, count=3)
    quiet(lab, "server", ours, "hostu", wg.ifname)

    # wg show IF dump: the same fields, the keys crossed, the bytes crossed
    (our_if, (our_peer,)), (go_if, (go_peer,)) = dump(lab, "server", ours), \
        dump(lab, "hostu", wg.ifname)
    assert len(our_if) == len(go_if) == 4 and len(our_peer) == len(go_peer) == 8
    assert our_if[0] == wgkeys.encode_key(keys.server)  # private key, as wg shows it to root
    assert our_if[1] == go_peer[0] == wgkeys.encode_key(keys.server_pub)
    assert go_if[1] == our_peer[0] == wgkeys.encode_key(keys.client_pub)
    assert (our_if[2], our_if[3]) == ("9090", "off") and (go_if[2], go_if[3]) == ("51820", "off")
    assert our_peer[1] == go_peer[1] == wgkeys.encode_key(keys.psk)
    assert our_peer[2] == "10.9.0.5:51820" and go_peer[2] == "10.9.0.11:9090"
    assert our_peer[3] == "192.168.53.99/32"
    assert go_peer[3] == "192.168.53.0/24,192.168.60.0/24"
    assert abs(int(our_peer[4]) - int(go_peer[4])) <= 1 and int(our_peer[4]) > 0
    assert (our_peer[5], our_peer[6]) == (go_peer[6], go_peer[5])  # rx here is tx there
    assert int(our_peer[5]) > 3 * 128 and our_peer[7] == "off" and go_peer[7] == "off"

    # ... and what tunvpnd show --json says, field by field
    doc = show_json(server)
    (peer,) = doc["peers"]
    assert doc["public_key"] == our_if[1] and doc["listen_port"] == int(our_if[2])
    assert peer["public_key"] == our_peer[0]
    assert peer["endpoint"] == our_peer[2]
    assert ",".join(peer["allowed_ips"]) == our_peer[3]
    assert peer["latest_handshake"] == int(our_peer[4])
    assert (peer["rx_bytes"], peer["tx_bytes"]) == (int(our_peer[5]), int(our_peer[6]))
    assert (peer["persistent_keepalive"] or "off") == our_peer[7]

    # wg show IF, wg show IF latest-handshakes, wg showconf IF: the same shape on both
    ours_text = in_ns(lab, "server", ["wg", "show", ours]).stdout
    go_text = in_ns(lab, "hostu", ["wg", "show", wg.ifname]).stdout
    assert labels(ours_text) == labels(go_text), (ours_text, go_text)
    assert f"interface: {ours}\n" in ours_text and "private key: (hidden)" in ours_text
    assert "preshared key: (hidden)" in ours_text
    assert re.search(r"latest handshake: (Now|\d+ seconds? ago)", ours_text), ours_text
    hs = in_ns(lab, "server", ["wg", "show", ours, "latest-handshakes"]).stdout.split()
    go_hs = in_ns(lab, "hostu", ["wg", "show", wg.ifname, "latest-handshakes"]).stdout.split()
    assert hs == [our_peer[0], our_peer[4]] and len(go_hs) == 2
    conf = in_ns(lab, "server", ["wg", "showconf", ours]).stdout
    go_conf = in_ns(lab, "hostu", ["wg", "showconf", wg.ifname]).stdout
    assert conf_keys(conf) == conf_keys(go_conf), (conf, go_conf)
    assert f"PrivateKey = {wgkeys.encode_key(keys.server)}" in conf
    assert f"PresharedKey = {wgkeys.encode_key(keys.psk)}" in conf
    # `wg show` with no name finds us among the userspace interfaces
    assert ours in in_ns(lab, "server", ["wg", "show", "interfaces"]).stdout.split()

    # and the keys never reach tunvpnd show
    text = json.dumps(doc) + show(server, "server").stdout
    for secret in (wgkeys.encode_key(keys.server), wgkeys.encode_key(keys.psk),
                   keys.server.hex(), keys.psk.hex()):
        assert secret not in text


@needs_wg
def test_wg_reads_a_tunvpnd_client_as_a_wireguard_go_server_reads(
        lab, daemons, sockdir, ifnames, wggo_factory):
    """tunvpnd client (hostu) -> wireguard-go server: the client's view (no listen port of its
    choosing, a persistent keepalive, the server peer allowed everything) in the same shape."""
    keys = Keys(sockdir)
    wg = wggo_factory("server")
    keys.server, keys.server_pub = wg.private, wg.public
    in_ns(lab, "server", ["wg", "set", wg.ifname, "private-key", str(wg.keyfile), "listen-port",
                          "9090", "peer", wgkeys.encode_key(keys.client_pub), "allowed-ips",
                          "192.168.53.99/32", "persistent-keepalive", "25"])
    in_ns(lab, "server", ["ip", "addr", "add", "192.168.53.1/24", "dev", wg.ifname])
    in_ns(lab, "server", ["ip", "link", "set", wg.ifname, "up"])
    in_ns(lab, "server", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    ours = ifnames("tvc")
    client = daemons(lab, "hostu", client_text(keys).replace("name: tun0", f"name: {ours}"),
                     name="client")
    ping(lab, "hostu", HOSTV, count=3)
    quiet(lab, "server", wg.ifname, "hostu", ours)
    (our_if, (our_peer,)), (go_if, (go_peer,)) = dump(lab, "hostu", ours), \
        dump(lab, "server", wg.ifname)
    assert our_if[1] == go_peer[0] and go_if[1] == our_peer[0]
    assert our_peer[1] == go_peer[1] == "(none)"
    assert our_peer[2] == "10.9.0.11:9090" and go_peer[2] == f"10.9.0.5:{our_if[2]}"
    assert our_peer[3] == "0.0.0.0/0,::/0"
    assert our_peer[7] == go_peer[7] == "25"
    assert (our_peer[5], our_peer[6]) == (go_peer[6], go_peer[5])
    assert labels(in_ns(lab, "hostu", ["wg", "show", ours]).stdout) == \
        labels(in_ns(lab, "server", ["wg", "show", wg.ifname]).stdout)
    doc = show_json(client)
    assert doc["listen_port"] == int(our_if[2])
    assert (doc["peers"][0]["rx_bytes"], doc["peers"][0]["tx_bytes"]) == \
        (int(our_peer[5]), int(our_peer[6]))


@needs_wg
def test_wg_set_is_refused_and_the_profile_stays_the_truth(lab, daemons, sockdir, ifnames):
    keys = Keys(sockdir)
    ours = ifnames("tvs")
    server = daemons(lab, "server", server_text(keys).replace("name: tun0", f"name: {ours}"))
    before = dump(lab, "server", ours)
    result = in_ns(lab, "server", ["wg", "set", ours, "listen-port", "1234", "peer",
                                   wgkeys.encode_key(os.urandom(32)), "allowed-ips",
                                   "10.0.0.0/8"], check=False)
    assert result.returncode != 0
    assert "Operation not permitted" in result.stderr, result.stderr
    assert dump(lab, "server", ours) == before
    wait_until(lambda: "refused a WireGuard UAPI set" in server.log(), 10, what="the log line")
    line = next(line for line in server.log().splitlines() if "UAPI set" in line)
    assert str(server.profile) in line and "systemctl reload tunvpnd@server" in line
    # the connection stays usable, as with wireguard-go: get after set on one connection
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(f"{UAPI_DIR}/{ours}.sock")
        sock.sendall(b"set=1\nlisten_port=1\n\nget=1\n\n")
        answer = b""
        while not answer.endswith(b"errno=0\n\n"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"errno=-1\n\nprivate_key=")
    assert b"listen_port=9090\n" in answer


def test_uapi_socket_life(lab, daemons, sockdir, ifnames):
    """0600 while running, gone after a stop; a live holder of the path is left alone (the
    tunnel runs without a UAPI); a stale socket file is replaced."""
    keys = Keys(sockdir)
    ours = ifnames("tvl")
    path = f"{UAPI_DIR}/{ours}.sock"
    text = server_text(keys).replace("name: tun0", f"name: {ours}")
    server = daemons(lab, "server", text)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert server.stop() == 0
    assert not os.path.exists(path)

    os.makedirs(UAPI_DIR, exist_ok=True)
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        holder.bind(path)
        holder.listen(1)
        busy = daemons(lab, "server", text, name="busy")
        assert "in use by another live process" in busy.log()
        daemons(lab, "hostu", client_text(keys), name="client")
        ping(lab, "hostu", HOSTV, count=2)  # the tunnel works without the UAPI
        assert busy.stop() == 0
        assert os.path.exists(path)  # not ours: not removed
    finally:
        holder.close()
    # now stale: nobody listens on the file
    stale = daemons(lab, "server", text, name="stale")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"get=1\n\n")
        assert sock.recv(65536).startswith(b"private_key=")
    assert stale.stop() == 0
    assert not os.path.exists(path)


def test_hostile_uapi_clients(lab, daemons, sockdir, ifnames):
    """A set=1 that never ends (10 MB), a client that never finishes its line, 1,000
    connections: pings keep flowing, `wg`-style get still answered, memory stays put."""
    keys = Keys(sockdir)
    ours = ifnames("tvh")
    path = f"{UAPI_DIR}/{ours}.sock"
    server = daemons(lab, "server", server_text(keys).replace("name: tun0", f"name: {ours}"))
    daemons(lab, "hostu", client_text(keys), name="client")
    ping(lab, "hostu", HOSTV, count=1)

    with pinging_through(lab, server, 40) as held:
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                continue
            held.append(sock)
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(path)
        slow.sendall(b"get=")
        flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        flood.connect(path)
        flood.settimeout(10)
        flood.sendall(b"set=1\n")
        sent = sent_until_hung_up(flood, b"listen_port=1\n" * 4096)
        assert sent < 10 * 1024 * 1024, "the daemon read 10 MB of a set=1"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b"get=1\n\n")
            assert sock.recv(65536).startswith(b"private_key=")
        slow.settimeout(15)
        assert slow.recv(100) == b""  # hung up on at the deadline
    assert "Traceback" not in server.log()


# --- the protocol alone --------------------------------------------------------------------------


def test_protocol_answers_like_wireguard_go():
    from tunvpnd.uapi import SET_LIMIT, Protocol

    protocol = Protocol(lambda: "private_key=00\nerrno=0\n\n", "/etc/tunvpn/x.yaml", "reload")
    assert protocol(bytearray(b"get=")) is None  # wait for the rest
    assert protocol(bytearray(b"get=1\n")) is None
    assert protocol(bytearray(b"get=1\n\nget=1\n\n")) == (b"private_key=00\nerrno=0\n\n", 7,
                                                         False)
    assert protocol(bytearray(b"get=1\nx")) == (b"errno=-22\n\n", 7, True)  # trailing char
    assert protocol(bytearray(b"set=1\nlisten_port=1\n")) is None
    assert protocol(bytearray(b"set=1\nlisten_port=1\n\n")) == (b"errno=-1\n\n", 21, False)
    assert protocol(bytearray(b"set=1\n\n")) == (b"errno=-1\n\n", 7, False)
    endless = bytearray(b"set=1\n" + b"a=b\n" * (SET_LIMIT // 4))
    assert protocol(endless) == (b"errno=-1\n\n", len(endless), True)
    assert protocol(bytearray(b"hello\n")) == (b"", 6, True)  # unknown: hang up


def test_get_text_fields_and_order():
    from types import SimpleNamespace

    from tunvpnd.uapi import get_text

    peer = SimpleNamespace(allowed_ips=["192.168.53.99/32", "fd00::/64"])
    session = SimpleNamespace(
        user=peer, public_key=bytes(range(32)),
        noise_peer=SimpleNamespace(preshared_key=bytes(32)),
        endpoint=("::ffff:10.9.0.5", 40321, 0, 0), last_handshake_wall=1700000000.25,
        tx_bytes=476, rx_bytes=532, persistent_keepalive=25)
    text = get_text(b"\x01" * 32, 9090, [session])
    assert text.splitlines() == [
        "private_key=" + "01" * 32, "listen_port=9090",
        "public_key=" + bytes(range(32)).hex(), "preshared_key=" + "00" * 32,
        "protocol_version=1", "endpoint=10.9.0.5:40321",
        "last_handshake_time_sec=1700000000", "last_handshake_time_nsec=250000000",
        "tx_bytes=476", "rx_bytes=532", "persistent_keepalive_interval=25",
        "allowed_ip=192.168.53.99/32", "allowed_ip=fd00::/64", "errno=0", ""]
    assert text.endswith("errno=0\n\n")
