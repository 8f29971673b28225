"""The underlay moves under the daemon: a server without a route, a client whose own address
changes, a server with two addresses. Real daemons in the lab, plus unit tests of the parts.

Lab: HostU 10.9.0.5 (eth0) -- 10.9.0.11 (eth0) VPN server 192.168.60.11 (eth1) -- HostV.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from ipaddress import ip_network

import pytest

from tests.conftest import REPO, client_profile, in_ns, ping, server_profile
from tests.fakesock import FakeSocket
from tests.ipcraft import icmp_echo
from tunvpnd import loop, transport
from tunvpnd.core import Core
from tunvpnd.lab import wait_until
from tunvpnd.peers import Peer, PeerTable
from tunvpnd.tun import TUN_F_CSUM, TUN_F_TSO4
from tunvpnd.wire import PlainWire

HOSTV = "192.168.60.5"
NOWHERE = "10.77.0.1"  # no route to it from HostU until a test adds one
OFF = {"TUNVPN_OFFLOAD": "0"}


def client_to(server: str, keepalive: int = 25) -> str:
    host = f"'[{server}]:9090'" if ":" in server else f"{server}:9090"
    return client_profile(keepalive=keepalive).replace("10.9.0.11:9090", host)


def pings_again(lab, role: str = "hostu", address: str = HOSTV) -> bool:
    return ping(lab, role, address, count=1, check=False).returncode == 0


def make_reachable(lab, address: str = NOWHERE) -> None:
    """Give the server `address` as a second address and HostU a route to it."""
    in_ns(lab, "server", ["ip", "addr", "add", f"{address}/32", "dev", "lo"])
    in_ns(lab, "hostu", ["ip", "route", "add", f"{address}/32", "via", "10.9.0.11"])


# -- item 6: a server that cannot be reached for now -------------------------------------------

def test_unreachable_server_at_start_is_retried_then_reached(lab, daemons):
    daemons(lab, "server", server_profile())
    client = daemons(lab, "hostu", client_to(NOWHERE))  # READY: the start does not fail
    wait_until(lambda: "retrying in 2 s" in client.log(), 15, what="a second attempt")
    assert f"cannot reach server {NOWHERE}:9090: Network is unreachable; retrying in 1 s" \
        in client.log()
    assert client.proc.poll() is None
    assert client.status().startswith(f"resolving {NOWHERE}:9090")
    make_reachable(lab)
    wait_until(lambda: f"server {NOWHERE}:9090 is at {NOWHERE}:9090" in client.log(), 15,
               what="the server reached")
    ping(lab, "hostu", HOSTV)


def test_name_resolving_to_an_unroutable_address_keeps_running(lab, daemons, sockdir):
    hosts = sockdir / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{NOWHERE} vpn-server.test\n")
    wrapper = ["/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
               f'/bin/mount --bind {hosts} /etc/hosts && exec "$0" "$@"']
    client = daemons(lab, "hostu", client_to("vpn-server.test"), wrapper=wrapper)
    wait_until(lambda: "retrying in 2 s" in client.log(), 15, what="a second attempt")
    assert (f"cannot reach server vpn-server.test:9090 at {NOWHERE}:9090: Network is "
            "unreachable; retrying in 1 s") in client.log()
    assert client.proc.poll() is None and "Traceback" not in client.log()


def test_name_resolving_inside_a_tunnel_route_is_not_connected(lab, daemons, sockdir):
    """`check` refuses a route covering a literal server; for a name, the daemon refuses the
    address it resolves to (the datagrams would loop into the TUN), keeps running, retries."""
    hosts = sockdir / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.9.0.11 vpn-server.test\n")
    wrapper = ["/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
               f'/bin/mount --bind {hosts} /etc/hosts && exec "$0" "$@"']
    daemons(lab, "server", server_profile())
    client = daemons(lab, "hostu", client_to("vpn-server.test").replace(
        "routes: [192.168.60.0/24]", "routes: [192.168.60.0/24, 10.9.0.0/25]"), wrapper=wrapper)
    wait_until(lambda: "retrying in 2 s" in client.log(), 15, what="a second attempt")
    assert ("server vpn-server.test:9090 is at 10.9.0.11, inside 10.9.0.0/25, so the tunnel "
            "would carry its own datagrams into itself: not connecting; retrying in 1 s"
            ) in client.log()
    assert client.proc.poll() is None and "Traceback" not in client.log()
    assert "resolving vpn-server.test:9090" in client.status()
    assert ping(lab, "hostu", HOSTV, count=1, check=False).returncode != 0


SPOOFER = """
import socket, sys, time
from tests.ipcraft import icmp_echo
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("10.9.0.11", 7777))
sock.sendto(icmp_echo("192.168.60.5", "192.168.53.99"), ("10.9.0.5", int(sys.argv[1])))
sock.settimeout(0.2)
got, deadline = 0, time.monotonic() + 4
while time.monotonic() < deadline:
    try:
        sock.recv(2048)
        got += 1
    except TimeoutError:
        pass
print(got, flush=True)
"""


def test_a_client_not_yet_connected_takes_no_server_from_a_datagram(lab, daemons):
    """While the server cannot be reached, the client's socket is not connected and anyone may
    send to it: a datagram from a host that guessed its port must not become the server."""
    client = daemons(lab, "hostu", client_to(NOWHERE))
    port = int(client.log().split("socket 0.0.0.0:")[1].split()[0])
    spoofer = lab.spawn("server", [sys.executable, "-c", SPOOFER, str(port)],
                        stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        client.wait_status(lambda s: "bad_endpoint 1" in s)
        ping(lab, "hostu", HOSTV, count=3, check=False)
        out, _ = spoofer.communicate(timeout=15)
    finally:
        if spoofer.poll() is None:
            spoofer.kill()
            spoofer.wait()
    assert out.strip() == "0"  # nothing of HostU's traffic went to it
    assert client.status().startswith(f"resolving {NOWHERE}:9090")
    assert "rx 0 pkts" in client.status()  # and its datagram never reached the TUN


def test_reload_to_an_unreachable_server_keeps_the_tunnel(lab, daemons):
    daemons(lab, "server", server_profile())
    client = daemons(lab, "hostu", client_profile())
    ping(lab, "hostu", HOSTV)
    client.profile.write_text(client_to(NOWHERE))
    mark = len(client.fields())
    client.signal(signal.SIGHUP)
    client.wait_for("READY=1", after=client.wait_for("RELOADING=1", after=mark))
    wait_until(lambda: "retrying in 2 s" in client.log(), 15, what="a second attempt")
    assert client.proc.poll() is None
    ping(lab, "hostu", HOSTV)  # still on the old server until the new one can be reached


def test_sends_failing_in_the_loop_are_counted(lab, daemons):
    """The route to the server goes away under a running client: pings are dropped and
    counted (send_failed), the daemon stays up, and comes back once the route does."""
    daemons(lab, "server", server_profile())
    client = daemons(lab, "hostu", client_profile())
    ping(lab, "hostu", HOSTV)
    connected = ["10.9.0.0/24", "dev", "eth0", "proto", "kernel", "scope", "link"]
    in_ns(lab, "hostu", ["ip", "route", "del", *connected])
    assert not pings_again(lab)
    client.wait_status(lambda s: "send_failed" in s)
    wait_until(lambda: "cannot reach server 10.9.0.11:9090: Network is unreachable" in
               client.log(), 10, what="the warning")
    assert client.proc.poll() is None
    in_ns(lab, "hostu", ["ip", "route", "add", *connected, "src", "10.9.0.5"])
    wait_until(lambda: pings_again(lab), 15, what="pings through the tunnel again")
    wait_until(lambda: "server 10.9.0.11:9090 is reachable again" in client.log(), 5,
               what="the all-clear")  # at once: netlink told of the route


# -- item 7: the client's own address changes --------------------------------------------------

@pytest.mark.parametrize("family", ["4", "6"])
def test_client_follows_its_own_address_change(lab, daemons, family):
    if family == "6":
        for role, address in (("server", "fd09::11/64"), ("hostu", "fd09::5/64")):
            in_ns(lab, role, ["ip", "addr", "add", address, "dev", "eth0", "nodad"])
        old, new, server = "fd09::5/64", "fd09::8/64", "fd09::11"
        listen = "'[::]:9090'"
    else:
        old, new, server, listen = "10.9.0.5/24", "10.9.0.8/24", "10.9.0.11", "0.0.0.0:9090"
    daemons(lab, "server", server_profile().replace("0.0.0.0:9090", listen))
    client = daemons(lab, "hostu", client_to(server))
    ping(lab, "hostu", HOSTV)
    # as DHCP would do it: the old address goes, a new one comes; nothing is sent meanwhile,
    # so only netlink can tell the daemon
    in_ns(lab, "hostu", ["ip", "addr", "del", old, "dev", "eth0"])
    in_ns(lab, "hostu", ["ip", "addr", "add", new, "dev", "eth0", "nodad"])
    was, now = old.split("/")[0], new.split("/")[0]
    wait_until(lambda: f"is now {now} (was {was}): reconnected" in client.log(), 10,
               what="the reconnect")
    wait_until(lambda: pings_again(lab), 15, what="pings through the tunnel again")
    assert client.proc.poll() is None


# -- item 8: a server with two addresses answers from the one asked -----------------------------

ECHO_SERVER = """\
import socket
srv = socket.create_server(("0.0.0.0", 9000))
print("listening", flush=True)
conn, _ = srv.accept()
while data := conn.recv(65536):
    conn.sendall(data)
"""


@pytest.mark.parametrize("offload", ["on", "off"])
@pytest.mark.parametrize("underlay", ["4", "4-on-dual-stack", "6"])
def test_server_answers_from_the_address_asked(lab, daemons, underlay, offload):
    """The client targets the server's second address; without IP_PKTINFO the replies would
    leave from the first one and the client's connected socket would discard them. Pings,
    keepalive replies and, with offloads, a TCP stream (GSO batches, GRO receives)."""
    if underlay == "6":
        for role, address in (("server", "fd09::11/64"), ("hostu", "fd09::5/64"),
                              ("server", "fd99::11/64")):
            in_ns(lab, role, ["ip", "addr", "add", address, "dev", "eth0", "nodad"])
        in_ns(lab, "hostu", ["ip", "-6", "route", "add", "fd99::/64", "via", "fd09::11"])
        second = "fd99::11"
    else:
        in_ns(lab, "server", ["ip", "addr", "add", "10.99.0.11/24", "dev", "eth0"])
        in_ns(lab, "hostu", ["ip", "route", "add", "10.99.0.0/24", "via", "10.9.0.11"])
        second = "10.99.0.11"
    listen = "0.0.0.0:9090" if underlay == "4" else "'[::]:9090'"
    env = OFF if offload == "off" else None
    server = daemons(lab, "server", server_profile().replace("0.0.0.0:9090", listen), env=env)
    client = daemons(lab, "hostu", client_to(second, keepalive=1), env=env)
    ping(lab, "hostu", HOSTV)
    # keepalives: the server echoes each, from the address it came to
    client.wait_status(lambda s: "keepalives 2" in s or "keepalives 3" in s)
    if offload == "on" and "offloads: off" not in server.log():
        assert "GSO on, GRO on" in server.log()
        echo = lab.spawn("hostv", [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE,
                         text=True)
        try:
            assert "listening" in echo.stdout.readline()
            nbytes = 1024 * 1024
            result = in_ns(lab, "hostu", [sys.executable, "-m", "tunvpnd.lab", "echo-client",
                                          HOSTV, "9000", str(nbytes)])
            assert f"{nbytes} bytes echoed back identical" in result.stdout
        finally:
            echo.kill()
            echo.wait()
            echo.stdout.close()
        assert "refused" not in server.log()
    status = server.status()
    assert "send_failed" not in status and "malformed" not in status, status
    assert "no reply from server" not in client.log()


# -- item 14: errors name their address --------------------------------------------------------

HOLD_PORT = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9090))
print("bound", flush=True)
sys.stdin.read()
"""


def test_listen_errors_name_the_address(lab, daemons):
    holder = lab.spawn("server", [sys.executable, "-c", HOLD_PORT], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "bound"
        server = daemons(lab, "server", server_profile(), wait=False)
        assert server.proc.wait(15) != 0
        assert "cannot listen on 0.0.0.0:9090: Address already in use" in server.log()
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
    other = daemons(lab, "server", server_profile().replace("0.0.0.0:9090", "10.9.0.99:9090"),
                    name="other", wait=False)
    assert other.proc.wait(15) != 0
    assert "cannot listen on 10.9.0.99:9090: Cannot assign requested address" in other.log()


# -- unit tests ----------------------------------------------------------------------------------

class FailingSocket(FakeSocket):
    """A connected UDP socket whose sends fail with `error` (sendmsg with GSO: `gso_error`)."""

    def __init__(self, devnull, error: int, gso_error: int | None = None) -> None:
        super().__init__(devnull)
        self.error, self.gso_error = error, gso_error or error

    def sendmsg(self, buffers, control, *args) -> int:
        raise OSError(self.gso_error, os.strerror(self.gso_error))

    def send(self, data) -> int:
        raise OSError(self.error, os.strerror(self.error))


@pytest.mark.parametrize("code", [errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EINVAL])
def test_a_send_error_that_may_mean_a_lost_address_asks_for_a_rebind(code):
    with open(os.devnull) as devnull:
        core = Core(PeerTable(), PlainWire())
        forwarder = loop.Forwarder(devnull.fileno(), FailingSocket(devnull, code), core)
        forwarder.peer_endpoint = ("10.9.0.11", 9090)
        assert not forwarder.send(b"x", None)
        assert forwarder.rebind_wanted and core.counters.send_failed == 1


def test_a_full_buffer_does_not_ask_for_a_rebind():
    with open(os.devnull) as devnull:
        core = Core(PeerTable(), PlainWire())
        forwarder = loop.Forwarder(devnull.fileno(), FailingSocket(devnull, errno.ENOBUFS), core)
        forwarder.peer_endpoint = ("10.9.0.11", 9090)
        forwarder.send(b"x", None)
        assert not forwarder.rebind_wanted and core.counters.send_failed == 1


def test_gso_stays_on_when_single_sends_fail_the_same_way(caplog):
    """EINVAL because the source address is gone is not GSO's fault: the batch is counted,
    GSO stays on for when the address is back."""
    with open(os.devnull) as devnull:
        core = Core(PeerTable(), PlainWire())
        sock = FailingSocket(devnull, errno.EINVAL)
        forwarder = loop.Forwarder(devnull.fileno(), sock, core, TUN_F_CSUM | TUN_F_TSO4)
        forwarder.peer_endpoint = ("10.9.0.11", 9090)
        assert forwarder.gso
        for _ in range(4):
            forwarder._batch.add(memoryview(bytes(100)), forwarder.peer_endpoint)
        forwarder._batch.flush()
        assert forwarder.gso and core.counters.send_failed == 4 and forwarder.rebind_wanted
    assert "GSO refused" not in caplog.text


def test_local_addresses_become_send_control_messages():
    v4 = transport.LocalAddresses(socket.IPPROTO_IP, transport.IP_PKTINFO)
    received = (7).to_bytes(4, sys.byteorder) + socket.inet_aton("10.99.0.11") * 2
    (control,) = v4[received]
    assert control == (socket.IPPROTO_IP, transport.IP_PKTINFO,
                       bytes(4) + socket.inet_aton("10.99.0.11") + bytes(4))
    assert v4[received] is v4[bytes(received)]  # one list per address: compared by identity
    v6 = transport.LocalAddresses(socket.IPPROTO_IPV6, transport.IPV6_PKTINFO)
    index = (3).to_bytes(4, sys.byteorder)
    for address, kept in (("fd99::11", bytes(4)), ("fe80::1", index)):
        packed = socket.inet_pton(socket.AF_INET6, address)
        assert v6[packed + index] == [(socket.IPPROTO_IPV6, transport.IPV6_PKTINFO,
                                       packed + kept)]
    for n in range(2 * v6.LIMIT):
        v6[n.to_bytes(20, "big")]
    assert len(v6) <= v6.LIMIT


def test_pktinfo_only_on_a_wildcard_socket():
    with transport.open_udp("127.0.0.1", 0) as bound, transport.open_udp("0.0.0.0", 0) as any4:
        assert not transport.enable_pktinfo(bound)
        assert transport.enable_pktinfo(any4)


def test_disconnect_forgets_the_source_address():
    with transport.open_udp("0.0.0.0", 0) as sock:
        sock.connect(("127.0.0.1", 9))
        assert sock.getsockname()[0] == "127.0.0.1"
        transport.disconnect(sock)
        assert sock.getsockname()[0] == "0.0.0.0"
        with pytest.raises(OSError) as raised:
            sock.getpeername()
        assert raised.value.errno == errno.ENOTCONN


def test_open_udp_names_the_address_it_cannot_bind():
    with transport.open_udp("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as raised:
            transport.open_udp("127.0.0.1", port)
    assert str(raised.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert raised.value.errno == errno.EADDRINUSE


def test_core_keeps_the_address_a_peer_talks_to():
    """A datagram's arrival address (core.received_at) becomes the peer's Peer.local, from data
    and keepalives alike; the keepalive echo leaves from it, and outbound() hands it back
    (core.send_from) for the packets that follow."""
    table = PeerTable()
    peer = Peer("hostu", [ip_network("192.168.53.99/32")])
    table.add(peer)
    core = Core(table, PlainWire(), echo_keepalives=True)
    first, second = [("first",)], [("second",)]
    core.received_at = first
    packet = icmp_echo("192.168.53.99", "192.168.60.5")
    assert core.inbound(memoryview(packet), ("10.9.0.5", 4000)) is not None
    assert peer.local is first
    core.received_at = second
    assert core.inbound(memoryview(b""), ("10.9.0.5", 4000)) is None  # a keepalive
    assert peer.local is second and core.reply == (b"", ("10.9.0.5", 4000), second)
    sealed = core.outbound(memoryview(icmp_echo("192.168.60.5", "192.168.53.99")))
    assert sealed is not None and sealed[1] == ("10.9.0.5", 4000)
    assert core.send_from is second
