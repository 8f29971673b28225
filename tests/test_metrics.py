"""`metrics:` (tunvpnd.metrics): Prometheus's text format at http://ADDRESS/metrics, scraped
with an HTTP client from inside the daemon's lab namespace and parsed with prometheus_client's
own parser, against real daemons on both wires; reload turning it on, moving and off; and what
a slow or hostile HTTP client can (not) do to forwarding.
"""

from __future__ import annotations

import http.client
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import netns

from tests.conftest import (
    client_profile,
    ping,
    pinging_through,
    sent_until_hung_up,
    server_profile,
)
from tests.test_reload import reload
from tests.test_show import show_json, wg_profiles
from tests.test_show import uapi_cleanup as uapi_cleanup  # a fixture, used by name
from tests.test_wgtunnel import HOSTV, Keys
from tunvpnd.lab import wait_until
from tunvpnd.wireguard import keys as wgkeys

PORT = 9586


# --- an HTTP client inside a lab namespace -----------------------------------------------------


def ns_sockets(lab, role: str, count: int = 1, family: int = socket.AF_INET) -> list:
    """`count` TCP sockets that live in `role`'s network namespace: made by a thread that
    joined it (setns changes only the calling thread), used from ours."""
    made: list = []
    failed: list = []

    def make() -> None:
        try:
            netns.setns(lab.hosts[role], flags=0)
            made.extend(socket.socket(family, socket.SOCK_STREAM) for _ in range(count))
        except BaseException as error:  # noqa: BLE001 - reported below
            failed.append(error)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join(30)
    if failed:
        raise failed[0]
    return made


def request(lab, role: str, address=("127.0.0.1", PORT), method: str = "GET",
            path: str = "/metrics", timeout: float = 10) -> tuple[int, dict, bytes]:
    """One HTTP request from inside `role`: (status, headers, body)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    (sock,) = ns_sockets(lab, role, 1, family)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    connection = http.client.HTTPConnection(*address[:2], timeout=timeout)
    connection.sock = sock  # already connected, in the namespace
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def scrape(lab, role: str, address=("127.0.0.1", PORT)) -> dict:
    """The metrics at `address`, parsed by prometheus_client: family name -> family."""
    status, headers, body = request(lab, role, address)
    assert status == 200, (status, body)
    assert headers["Content-Type"].startswith("text/plain; version=")
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def samples(families: dict, family: str, sample: str | None = None) -> list:
    return [s for s in families[family].samples if s.name == (sample or family)]


def value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    found = [s.value for s in samples(families, family, sample)
             if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, labels, families.get(family))
    return found[0]


def refused(lab, role: str, address) -> bool:
    try:
        request(lab, role, address, timeout=5)
    except ConnectionRefusedError:
        return True
    return False


# --- wireguard ---------------------------------------------------------------------------------


def test_metrics_wireguard_counters_and_handshake(lab, daemons, sockdir, uapi_cleanup):
    keys = Keys(sockdir)
    server_yaml, client_yaml = wg_profiles(keys, uapi_cleanup)
    ifname = re.search(r"name: (\S+)", server_yaml).group(1)
    server = daemons(lab, "server", server_yaml + f"metrics: 127.0.0.1:{PORT}\n")
    client = daemons(lab, "hostu", client_yaml + f'metrics: "[::1]:{PORT}"\n', name="client")
    ping(lab, "hostu", HOSTV, count=3)
    server.wait_status(lambda s: "hostu up, handshake" in s)

    status, headers, body = request(lab, "server")
    for secret in keys.secrets():
        assert secret.encode() not in body
    got = {f.name: f for f in text_string_to_metric_families(body.decode())}
    # prometheus_wireguard_exporter's names, types and labels, plus `name`
    assert got["wireguard_sent_bytes"].type == "counter"
    assert got["wireguard_received_bytes"].type == "counter"
    assert got["wireguard_latest_handshake_seconds"].type == "gauge"
    peer = {"interface": ifname, "public_key": wgkeys.encode_key(keys.client_pub),
            "allowed_ips": "192.168.53.99/32", "name": "hostu"}
    (sent,) = samples(got, "wireguard_sent_bytes", "wireguard_sent_bytes_total")
    assert sent.labels == peer
    received = value(got, "wireguard_received_bytes", "wireguard_received_bytes_total", **peer)
    assert received >= 3 * 128 + 148  # three echo requests and a handshake initiation
    handshake = value(got, "wireguard_latest_handshake_seconds", **peer)
    assert abs(handshake - time.time()) < 60 and handshake == int(handshake)
    assert abs(value(got, "tunvpnd_latest_packet_seconds", **peer) - time.time()) < 60
    assert value(got, "tunvpnd_up", interface=ifname, wire="wireguard", mode="server") == 1
    assert value(got, "tunvpnd_peers", interface=ifname) == 1
    drops = {s.labels["reason"]: s.value
             for s in samples(got, "tunvpnd_dropped_packets", "tunvpnd_dropped_packets_total")}
    assert {"replay", "bad_mac", "not_allowed", "malformed"} <= set(drops), drops
    assert set(drops.values()) == {0}
    # the same definition as `tunvpnd show --json` (both read the same snapshot)
    doc = show_json(server)
    assert doc["peers"][0]["latest_handshake"] == handshake

    # the counters move with traffic
    ping(lab, "hostu", HOSTV, count=5)
    wait_until(lambda: value(scrape(lab, "server"), "wireguard_received_bytes",
                             "wireguard_received_bytes_total", **peer) >= received + 5 * 128,
               20, what="received bytes grow by five echo requests")
    assert value(scrape(lab, "server"), "wireguard_sent_bytes", "wireguard_sent_bytes_total",
                 **peer) >= sent.value + 5 * 128

    # the client, over IPv6 loopback: its one peer is the server
    cgot = scrape(lab, "hostu", ("::1", PORT))
    (csent,) = samples(cgot, "wireguard_sent_bytes", "wireguard_sent_bytes_total")
    assert csent.labels["name"] == "server" and csent.labels["allowed_ips"] == "0.0.0.0/0,::/0"
    assert csent.labels["public_key"] == wgkeys.encode_key(keys.server_pub)
    assert csent.value >= 8 * 128

    # a new handshake (the client restarts): the gauge moves to its time
    assert client.stop() == 0
    wait_until(lambda: time.time() >= handshake + 1.5, 5, what="a second later")
    client.restart()
    ping(lab, "hostu", HOSTV, count=2)
    wait_until(lambda: value(scrape(lab, "server"), "wireguard_latest_handshake_seconds",
                             **peer) > handshake, 20, what="the handshake gauge moves")


# --- plain -------------------------------------------------------------------------------------


def test_metrics_plain_learned_peer(lab, daemons):
    """Plain peers: byte counters with an empty public_key, no handshake gauge, and the time
    of the latest packet."""
    server = daemons(lab, "server", server_profile(extra=f"metrics: 127.0.0.1:{PORT}"))
    daemons(lab, "hostu", client_profile(keepalive=1), name="client")
    ping(lab, "hostu", HOSTV, count=3)
    wait_until(lambda: show_json(server)["peers"], 15, what="a learned peer")
    got = scrape(lab, "server")
    assert "wireguard_latest_handshake_seconds" not in got
    (sent,) = samples(got, "wireguard_sent_bytes", "wireguard_sent_bytes_total")
    peer = {"interface": "tun0", "public_key": "", "allowed_ips": "192.168.53.99/32",
            "name": "learned-192.168.53.99/32"}
    assert sent.labels == peer and sent.value >= 3 * 84
    received = value(got, "wireguard_received_bytes", "wireguard_received_bytes_total", **peer)
    assert received >= 3 * 84
    assert abs(value(got, "tunvpnd_latest_packet_seconds", **peer) - time.time()) < 60
    assert value(got, "tunvpnd_up", interface="tun0", wire="plain", mode="server") == 1
    ping(lab, "hostu", HOSTV, count=4)
    wait_until(lambda: value(scrape(lab, "server"), "wireguard_received_bytes",
                             "wireguard_received_bytes_total", **peer) >= received + 4 * 84,
               20, what="plain received bytes grow")


# --- reload ------------------------------------------------------------------------------------


def test_metrics_on_moved_and_off_by_reload(lab, daemons):
    plain = server_profile()
    server = daemons(lab, "server", plain)
    first, second = ("127.0.0.1", PORT), ("127.0.0.1", PORT + 1)
    assert refused(lab, "server", first)  # off by default

    server.profile.write_text(server_profile(extra=f"metrics: 127.0.0.1:{PORT}"))
    reload(server)
    assert scrape(lab, "server", first)["tunvpnd_up"]

    server.profile.write_text(server_profile(extra=f"metrics: 127.0.0.1:{PORT + 1}"))
    reload(server)
    assert scrape(lab, "server", second)["tunvpnd_up"]
    assert refused(lab, "server", first)  # the old port is closed

    server.profile.write_text(server_profile(extra="metrics: false"))
    reload(server)
    assert refused(lab, "server", second)

    server.profile.write_text(server_profile(extra=f"metrics: 127.0.0.1:{PORT}"))
    reload(server)  # and on again on the first port
    assert scrape(lab, "server", first)["tunvpnd_up"]
    server.profile.write_text(plain)
    reload(server)  # the key removed
    assert refused(lab, "server", first)
    ping(lab, "server", "192.168.53.1", count=1)  # still alive
    assert "metrics: serving http://127.0.0.1:9587/metrics" in server.log()


def test_metrics_port_in_use_is_logged_and_the_tunnel_runs(lab, daemons):
    (holder,) = ns_sockets(lab, "server")
    try:
        holder.bind(("127.0.0.1", PORT))
        holder.listen(1)
        server = daemons(lab, "server", server_profile(extra=f"metrics: 127.0.0.1:{PORT}"))
        daemons(lab, "hostu", client_profile(), name="client")
        ping(lab, "hostu", HOSTV, count=2)
        assert "metrics: cannot serve on 127.0.0.1:9586" in server.log()
    finally:
        holder.close()
    reload(server)  # a reload tries again, and the port is free now
    assert scrape(lab, "server")["tunvpnd_up"]


# --- hostile clients ---------------------------------------------------------------------------


def test_hostile_http_clients_cannot_stall_forwarding(lab, daemons):
    """A request head that never ends, 10 MB without one, then 1,000 connections left open:
    pings through the tunnel keep flowing, the daemon's memory stays put, the slow client is
    hung up on, and an honest scrape gets its answer."""
    server = daemons(lab, "server", server_profile(extra=f"metrics: 127.0.0.1:{PORT}"))
    daemons(lab, "hostu", client_profile(), name="client")
    ping(lab, "hostu", HOSTV, count=1)
    scrape(lab, "server")  # rendered once: what a first scrape allocates is not growth

    with pinging_through(lab, server, 100) as held:
        slow, flood = ns_sockets(lab, "server", 2)
        slow.settimeout(15)
        slow.connect(("127.0.0.1", PORT))
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        flood.settimeout(10)
        flood.connect(("127.0.0.1", PORT))
        sent = sent_until_hung_up(flood, b"X-Junk: " + b"x" * 65528)
        assert sent < 10 * 1024 * 1024, "the daemon read 10 MB of request head"
        started = time.monotonic()
        try:  # hung up on after the deadline (5 s), unanswered
            assert slow.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 10

        held.extend(ns_sockets(lab, "server", 1000))
        for sock in held:  # 1,000 connections, each left open without a word
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", PORT))
            except (BlockingIOError, OSError):
                pass  # in progress, or refused by a full backlog: either way, held

        def honest() -> bool:  # may lose its place to a held connection: then again
            try:
                return "tunvpnd_up" in scrape(lab, "server")
            except (OSError, http.client.HTTPException):
                return False

        wait_until(honest, 30, what="an honest scrape answered")
    ping(lab, "hostu", HOSTV, count=2)
    assert "tunvpnd_up" in scrape(lab, "server")


# --- the HTTP side and the collector, alone ----------------------------------------------------


def test_http_answers():
    from tunvpnd.metrics import Endpoint

    calls = []

    def snapshot() -> dict:
        calls.append(1)
        return {"ifname": "tun0", "wire": "plain", "mode": "server", "drops": {"malformed": 2},
                "peers": []}

    endpoint = Endpoint(snapshot, ["malformed", "unknown_source"])
    assert endpoint(bytearray(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")) is None  # more to come
    asked = b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    out, consumed, close = endpoint(bytearray(asked))
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and close and consumed == len(asked)
    assert f"Content-Length: {len(body)}".encode() in head
    got = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {s.labels["reason"]: s.value for s in got["tunvpnd_dropped_packets"].samples
            if s.name.endswith("_total")} == {"malformed": 2, "unknown_source": 0}
    assert got["tunvpnd_peers"].samples[0].value == 0
    endpoint(bytearray(b"GET /metrics HTTP/1.1\r\n\r\n"))
    assert len(calls) == 1  # a second scrape within RENDER_INTERVAL: the same rendering
    out, _, _ = endpoint(bytearray(b"HEAD /metrics HTTP/1.1\r\n\r\n"))
    assert out.endswith(b"\r\n\r\n") and b"Content-Length: 0" not in out
    assert endpoint(bytearray(b"GET / HTTP/1.1\r\n\r\n"))[0].startswith(b"HTTP/1.1 404 ")
    answer = endpoint(bytearray(b"POST /metrics HTTP/1.1\r\n\r\n"))[0]
    assert answer.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD\r\n" in answer
    assert endpoint(bytearray(b"\x16\x03\x01 hello\r\n\r\n"))[0].startswith(b"HTTP/1.1 400 ")

    def broken() -> dict:
        raise KeyError("a bug")

    failing = Endpoint(broken)  # answered with 500 and logged, never raised into the loop
    assert failing(bytearray(b"GET /metrics HTTP/1.1\r\n\r\n"))[0].startswith(b"HTTP/1.1 500 ")


@pytest.mark.parametrize("text, problem", [
    ("metrics: 9586", "metrics: must be an address and TCP port like 127.0.0.1:9586"),
    ("metrics: true", "metrics: must be an address and TCP port"),
    ("metrics: localhost:9586", "metrics: 'localhost:9586': 'localhost' is not an IP address"),
    ("metrics: 127.0.0.1:70000",
     "metrics: '127.0.0.1:70000': port must be a number from 1 to 65535"),
    ("metrics: [127.0.0.1]", "metrics: must be an address and TCP port"),
])
def test_metrics_key_errors(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(server_profile(extra=text))
    line = 1 + server_profile(extra=text).splitlines().index(text)
    result = subprocess.run([sys.executable, "-m", "tunvpnd", "check", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78, result
    assert f"{path}:{line}: {problem}" in result.stderr, result.stderr


def test_metrics_key_values(tmp_path):
    from tunvpnd.profile import load_profile

    path = tmp_path / "p.yaml"
    for text, want in (("", None), ("metrics: false", None), ("metrics:", None),
                       ("metrics: 127.0.0.1:9586", ("127.0.0.1", 9586)),
                       ('metrics: "[::1]:9100"', ("::1", 9100)),
                       ("metrics: 0.0.0.0", ("0.0.0.0", 9586))):
        path.write_text(server_profile(extra=text))
        assert load_profile(path).metrics == want, text
