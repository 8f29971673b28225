"""`tunvpnd show [NAME] [--json] [--check]` against real daemons in lab namespaces, both wires,
through the control socket RUN_DIR/NAME.sock; and what a slow or hostile client of that socket
can (not) do to forwarding.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    client_profile,
    ping,
    pinging_through,
    sent_until_hung_up,
    server_profile,
    unique,
)
from tests.test_reload import reload
from tests.test_wgtunnel import HOSTV, Keys, client_text, server_text
from tunvpnd.lab import wait_until
from tunvpnd.wireguard import keys as wgkeys


def show(daemon, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`tunvpnd show` as an operator runs it: same run directory as the daemon's."""
    env = {**os.environ, "TUNVPN_RUN_DIR": str(daemon.run_dir)}
    result = subprocess.run([sys.executable, "-m", "tunvpnd", "show", *args], env=env,
                            capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"show {args} exited {result.returncode}:\n{result.stdout}"
                             f"{result.stderr}")
    return result


def show_json(daemon) -> dict:
    return json.loads(show(daemon, daemon.name, "--json").stdout)


@pytest.fixture
def uapi_cleanup():
    """WireGuard UAPI sockets are global paths: remove the ones a test's daemons made."""
    paths: list = []
    yield paths
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def wg_profiles(keys: Keys, uapi_cleanup, psk: bool = False) -> tuple[str, str]:
    """The wgtunnel client and server profiles with unique interface names."""
    names = [unique("tws")[:15], unique("twc")[:15]]
    uapi_cleanup.extend(f"/run/wireguard/{name}.sock" for name in names)
    return (server_text(keys, psk).replace("name: tun0", f"name: {names[0]}"),
            client_text(keys, psk).replace("name: tun0", f"name: {names[1]}"))


# --- wireguard ---------------------------------------------------------------------------------


def test_show_wireguard_server_and_client(lab, daemons, sockdir, uapi_cleanup):
    keys = Keys(sockdir)
    server_yaml, client_yaml = wg_profiles(keys, uapi_cleanup, psk=True)
    server = daemons(lab, "server", server_yaml)
    client = daemons(lab, "hostu", client_yaml, name="client")
    ping(lab, "hostu", HOSTV, count=3)
    server.wait_status(lambda s: "hostu up, handshake" in s)

    # the control socket: ours only
    path = server.run_dir / "server.sock"
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600

    text = show(server, "server").stdout
    ifname = re.search(r"name: (\S+)", server_yaml).group(1)
    assert text.startswith(f"instance: server ({ifname}, wire wireguard, pid {server.pid})\n")
    assert f"  public key: {wgkeys.encode_key(keys.server_pub)}\n" in text
    assert "  listening: 0.0.0.0:9090\n" in text
    assert "  dropped: 0\n" in text
    assert "\npeer: hostu\n" in text
    assert f"  public key: {wgkeys.encode_key(keys.client_pub)}\n" in text
    assert re.search(r"  endpoint: 10\.9\.0\.5:\d+\n", text), text
    assert "  allowed ips: 192.168.53.99/32\n" in text
    assert re.search(r"  latest handshake: (Now|\d+ seconds? ago)\n", text), text
    assert re.search(r"  transfer: [\d.]+ (B|KiB) received, [\d.]+ (B|KiB) sent", text), text
    for secret in keys.secrets():
        assert secret not in text

    doc = show_json(server)
    assert (doc["name"], doc["wire"], doc["mode"], doc["pid"]) == ("server", "wireguard",
                                                                   "server", server.pid)
    (peer,) = doc["peers"]
    assert peer["public_key"] == wgkeys.encode_key(keys.client_pub)
    assert isinstance(peer["latest_handshake"], int)
    assert abs(peer["latest_handshake"] - time.time()) < 60
    # three echo requests at least: 3 * (32 + 96) bytes, plus a handshake initiation (148)
    assert peer["rx_bytes"] >= 3 * 128 + 148 and isinstance(peer["rx_bytes"], int)
    assert peer["tx_bytes"] >= 3 * 128 + 92  # the replies and the handshake response
    assert "preshared" not in json.dumps(doc) and "private" not in json.dumps(doc)
    for secret in keys.secrets():
        assert secret not in json.dumps(doc)
    assert show(server, "server", "--check").returncode == 0

    text = show(client, "client").stdout
    assert "\npeer: server\n" in text and "  endpoint: 10.9.0.11:9090\n" in text
    assert "  allowed ips: 0.0.0.0/0, ::/0\n" in text
    assert "  persistent keepalive: every 25 seconds" in text
    cdoc = show_json(client)
    # both ends count the same datagrams, as wireguard-go counts them (nothing lost here)
    wait_until(lambda: show_json(client)["peers"][0]["tx_bytes"]
               == show_json(server)["peers"][0]["rx_bytes"], 20, what="byte counts agree")
    assert cdoc["peers"][0]["latest_handshake"] == peer["latest_handshake"] or \
        abs(cdoc["peers"][0]["latest_handshake"] - peer["latest_handshake"]) <= 1


def test_show_wireguard_reload_and_a_silent_peer(lab, daemons, sockdir, uapi_cleanup):
    """After a reload that adds a peer, show lists it with no handshake and --check says 1;
    with that peer gone again, --check is 0; once hostu's client is stopped, its handshake
    ages and --check (with a short --max-age) turns 1."""
    keys = Keys(sockdir)
    server_yaml, client_yaml = wg_profiles(keys, uapi_cleanup)
    server = daemons(lab, "server", server_yaml)
    client = daemons(lab, "hostu", client_yaml, name="client")
    ping(lab, "hostu", HOSTV, count=2)
    server.wait_status(lambda s: "hostu up, handshake" in s)
    assert show(server, "server", "--check").returncode == 0
    other = wgkeys.encode_key(wgkeys.public_key(os.urandom(32)))
    server.profile.write_text(server_yaml.replace("\nlog:", f"""
  - name: newcomer
    public_key: {other}
    allowed_ips: [192.168.53.77/32]
log:"""))
    reload(server)
    doc = show_json(server)
    assert [p["name"] for p in doc["peers"]] == ["hostu", "newcomer"]
    newcomer = doc["peers"][1]
    assert newcomer["latest_handshake"] is None and newcomer["rx_bytes"] == 0
    assert newcomer["allowed_ips"] == ["192.168.53.77/32"]
    text = show(server, "server").stdout
    assert "\npeer: newcomer\n" in text
    assert text.split("peer: newcomer")[1].count("latest handshake") == 0
    assert show(server, "server", "--check", check=False).returncode == 1
    server.profile.write_text(server_yaml)
    reload(server)
    assert show(server, "server", "--check").returncode == 0

    assert client.stop() == 0
    assert show(server, "server", "--check", "--max-age", "2", check=False).returncode in (0, 1)
    wait_until(lambda: show(server, "server", "--check", "--max-age", "2",
                            check=False).returncode == 1, 20, what="--check turns 1")
    assert show(server, "server", "--check").returncode == 0  # 180 s: not yet


def test_show_not_running_and_every_instance(lab, daemons, sockdir, uapi_cleanup):
    keys = Keys(sockdir)
    server_yaml, _ = wg_profiles(keys, uapi_cleanup)
    server = daemons(lab, "server", server_yaml)
    result = show(server, "nosuch", "--check", check=False)
    assert result.returncode == 3 and "not running" in result.stderr
    assert show(server, "nosuch", check=False).returncode == 3
    everything = show(server).stdout  # no name: every instance in the run directory
    assert everything.startswith("instance: server (")
    assert json.loads(show(server, "--json").stdout)[0]["name"] == "server"
    assert server.stop() == 0
    assert not (server.run_dir / "server.sock").exists()  # removed on stop
    assert show(server, "server", "--check", check=False).returncode == 3


# --- plain -------------------------------------------------------------------------------------


def test_show_plain_learned_peer_and_client(lab, daemons):
    server = daemons(lab, "server", server_profile())
    client = daemons(lab, "hostu", client_profile(keepalive=1), name="client")
    ping(lab, "hostu", HOSTV, count=3)
    wait_until(lambda: show_json(server)["peers"], 15, what="a learned peer")
    text = show(server, "server").stdout
    assert text.startswith(f"instance: server (tun0, wire plain, pid {server.pid})\n")
    assert "public key" not in text and "handshake" not in text
    assert "\npeer: learned-192.168.53.99/32\n" in text
    assert re.search(r"  latest packet: (Now|\d+ seconds? ago)\n", text), text
    doc = show_json(server)
    (peer,) = doc["peers"]
    assert peer["learned"] and "public_key" not in peer and "latest_handshake" not in peer
    assert peer["endpoint"].startswith("10.9.0.5:")
    # three echo requests of 84 bytes each, and the keepalives' ANNOUNCEs (20 bytes each):
    # whole payloads, the control packets included
    assert peer["rx_bytes"] >= 3 * 84 and (peer["rx_bytes"] - 3 * 84) % 20 == 0
    wait_until(lambda: show_json(server)["peers"][0]["rx_bytes"] >= 3 * 84 + 2 * 20, 15,
               what="keepalives counted")
    assert peer["tx_bytes"] >= 3 * 84
    assert show(server, "server", "--check").returncode == 0  # learned only: nothing to miss

    cdoc = show_json(client)
    (server_peer,) = cdoc["peers"]
    assert server_peer["name"] == "server" and server_peer["endpoint"] == "10.9.0.11:9090"
    # the client's keepalives and the server's echoes are counted on both ends
    wait_until(lambda: show_json(client)["peers"][0]["tx_bytes"]
               == show_json(server)["peers"][0]["rx_bytes"], 20, what="plain counts agree")
    assert show(client, "client", "--check").returncode == 0
    # the server goes away: the client's --check turns 1 once its last packet is old
    assert server.stop() == 0
    wait_until(lambda: show(client, "client", "--check", "--max-age", "3",
                            check=False).returncode == 1, 20, what="plain --check turns 1")


def test_show_plain_after_reload_with_configured_peers(lab, daemons):
    server = daemons(lab, "server", server_profile())
    daemons(lab, "hostu", client_profile(keepalive=1), name="client")
    ping(lab, "hostu", HOSTV, count=1)
    server.profile.write_text(server_profile(extra="""\
peers:
  - name: hostu
    allowed_ips: [192.168.53.99/32]
  - name: silent
    allowed_ips: [192.168.53.77/32]
"""))
    reload(server)
    doc = show_json(server)
    assert [(p["name"], p["learned"]) for p in doc["peers"]] == [("hostu", False),
                                                                 ("silent", False)]
    assert doc["peers"][1]["latest_packet"] is None
    assert show(server, "server", "--check", check=False).returncode == 1  # silent never spoke
    ping(lab, "hostu", HOSTV, count=1)
    assert show_json(server)["peers"][0]["latest_packet"] is not None


# --- hostile clients ---------------------------------------------------------------------------


def test_hostile_clients_cannot_stall_forwarding(lab, daemons):
    """Clients that never send a newline, send 10 MB, or open 1,000 connections: pings
    through the tunnel keep flowing meanwhile, the daemon's memory stays put, and an honest
    `show` still gets its answer."""
    server = daemons(lab, "server", server_profile())
    daemons(lab, "hostu", client_profile(), name="client")
    ping(lab, "hostu", HOSTV, count=1)
    path = str(server.run_dir / "server.sock")

    with pinging_through(lab, server, 40) as held:
        # 1,000 connections, each left open without a word
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except (BlockingIOError, ConnectionRefusedError, OSError):
                sock.close()
                continue
            held.append(sock)
        # no newline, ever: a request that only grows
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(path)
        slow.sendall(b"show")
        # 10 MB without a newline: the daemon hangs up after its limit
        flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        flood.connect(path)
        flood.settimeout(10)
        sent = sent_until_hung_up(flood, b"x" * 65536)
        assert sent < 10 * 1024 * 1024, "the daemon read 10 MB of garbage"
        # an honest client is answered meanwhile
        assert show_json(server)["name"] == "server"
        # the slow client is hung up on after the deadline
        slow.settimeout(15)
        assert slow.recv(100) == b""
    assert show(server, "server", "--check").returncode == 0
    ping(lab, "hostu", HOSTV, count=2)


# --- the text form and the check, alone ---------------------------------------------------------


def test_text_like_wg():
    from tunvpnd.status import ago, duration, healthy, render, size

    assert (size(0), size(1023), size(1024), size(1268777), size(3 << 30)) == (
        "0 B", "1023 B", "1.00 KiB", "1.21 MiB", "3.00 GiB")
    assert duration(72) == "1 minute, 12 seconds" and duration(25) == "25 seconds"
    assert duration(3600 * 24 + 1) == "1 day, 1 second"
    assert ago(0) == "Now" and ago(12) == "12 seconds ago"
    doc = {"name": "server", "ifname": "tun0", "wire": "wireguard", "pid": 812, "now": 1000,
           "public_key": "K=", "listen": "0.0.0.0:9090", "dropped": 3,
           "drops": {"replay": 2, "bad_mac": 1},
           "peers": [{"name": "hostu", "learned": False, "public_key": "P=",
                      "endpoint": "10.9.0.5:40321", "allowed_ips": ["192.168.53.99/32"],
                      "latest_packet": 995, "latest_handshake": 988, "rx_bytes": 1268777,
                      "tx_bytes": 3565158, "persistent_keepalive": 25}]}
    assert render(doc) == """\
instance: server (tun0, wire wireguard, pid 812)
  public key: K=
  listening: 0.0.0.0:9090
  dropped: 3 (replay 2, bad_mac 1)

peer: hostu
  public key: P=
  endpoint: 10.9.0.5:40321
  allowed ips: 192.168.53.99/32
  latest handshake: 12 seconds ago
  transfer: 1.21 MiB received, 3.40 MiB sent
  persistent keepalive: every 25 seconds"""
    assert healthy(doc) and not healthy(doc, max_age=12)
    doc["peers"][0]["latest_handshake"] = None
    assert not healthy(doc)
    doc["peers"][0]["learned"] = True  # learned peers are not configured: not required
    assert healthy(doc)
