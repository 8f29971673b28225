"""Unit tests of wire.WireGuardWire inside the packet core (core.Core), on plain bytes: two
cores, each with a Device, a peer table and a fake clock, and the datagrams passed by hand.

What the core does with a wire that proves its sender: staged packets are not drops, handshake
messages are consumed without counting `malformed`, keepalives are counted, the inner source
must lie in the sending peer's allowed IPs (cryptokey routing: `not_allowed`), and the plain
wire's learning and control packets never run.
"""

from __future__ import annotations

import os
import random
from ipaddress import ip_network

from tests.ipcraft import announce, icmp_echo
from tunvpnd.core import Core
from tunvpnd.peers import Peer, PeerTable
from tunvpnd.wire import PlainWire, WireGuardWire
from tunvpnd.wireguard.device import Device

A_EP = ("10.9.0.5", 40000)
B_EP = ("10.9.0.11", 9090)
A_IP, B_IP, OTHER_IP, HOSTV = "192.168.53.99", "192.168.53.1", "192.168.53.77", "192.168.60.5"


def echo(src: str, dst: str, seq: int = 1) -> memoryview:
    return memoryview(bytearray(icmp_echo(src, dst, seq=seq)))


class Side:
    def __init__(self, rng: int) -> None:
        self.device = Device(os.urandom(32), wall_offset=0.0, rng=random.Random(rng))
        self.wire = WireGuardWire(self.device)
        self.table = PeerTable()
        self.core = Core(self.table, self.wire)

    def peer(self, name: str, other: Side, allowed: list[str], endpoint=None) -> Peer:
        peer = Peer(name, [ip_network(n) for n in allowed])
        session = self.device.add_peer(other.device.public_key, None, endpoint, 0)
        session.user, peer.session = peer, session
        peer.endpoint = endpoint
        self.table.add(peer)
        return peer

    def set_now(self, now: float) -> None:
        self.core.now = self.wire.now = now


class Pair:
    """a: a client whose server peer holds everything; b: a server with peer `hostu` (a)
    allowed 192.168.53.99/32 and `other` allowed 192.168.53.77/32."""

    def __init__(self) -> None:
        self.a, self.b = Side(1), Side(2)
        self.server = self.a.peer("server", self.b, ["0.0.0.0/0"], endpoint=B_EP)
        self.hostu = self.b.peer("hostu", self.a, [f"{A_IP}/32"])
        third = Device(os.urandom(32), wall_offset=0.0)
        other = Peer("other", [ip_network(f"{OTHER_IP}/32")])
        other.session = self.b.device.add_peer(third.public_key)
        other.session.user = other
        self.b.table.add(other)
        self.now = 100.0
        for side in (self.a, self.b):
            side.set_now(self.now)
        self.tun: dict[Side, list[bytes]] = {self.a: [], self.b: []}

    def deliver(self, side: Side, datagram: bytes) -> None:
        """`side` sent `datagram`: the other side's core takes it in."""
        to = self.b if side is self.a else self.a
        got = to.core.inbound(memoryview(bytearray(datagram)), A_EP if side is self.a else B_EP)
        if got is not None:
            self.tun[to].append(bytes(got))

    def pump(self) -> None:
        for _ in range(20):
            moved = False
            for side in (self.a, self.b):
                out = list(side.wire.outbox)
                side.wire.outbox.clear()
                for datagram, _endpoint, _local in out:
                    moved = True
                    self.deliver(side, datagram)
            if not moved:
                return
        raise AssertionError("never quiet")

    def send(self, side: Side, packet: memoryview) -> tuple | None:
        sealed = side.core.outbound(packet)
        if sealed is not None:
            self.deliver(side, sealed[0])
        self.pump()
        return sealed


def test_first_packet_is_staged_then_delivered_after_the_handshake():
    p = Pair()
    assert p.send(p.a, echo(A_IP, HOSTV)) is None
    c = p.a.core.counters
    assert (c.staged, c.dropped, c.tx_packets) == (1, 0, 1)
    assert p.tun[p.b] == [bytes(echo(A_IP, HOSTV))]
    assert p.b.core.counters.dropped == 0 and p.b.core.counters.rx_packets == 1
    assert p.hostu.endpoint == A_EP           # the Device's roaming, mirrored for the core
    # now both ways directly, equal-size packets give equal-size datagrams (GSO batches)
    reply = p.send(p.b, echo(HOSTV, A_IP))
    assert reply is not None and reply[1] == A_EP
    assert p.tun[p.a] == [bytes(echo(HOSTV, A_IP))]
    again = p.send(p.b, echo(HOSTV, A_IP, 2))
    assert len(again[0]) == len(reply[0])
    assert p.a.core.counters.drops() == {} and p.b.core.counters.drops() == {}
    assert p.a.wire.drops() == {} and p.b.wire.drops() == {}


def test_keepalive_is_counted_not_malformed():
    p = Pair()
    p.send(p.a, echo(A_IP, HOSTV))
    p.a.wire.outbox.clear()
    p.server.session.send_keepalive(p.now)
    ((keepalive, _, _),) = p.a.wire.outbox
    p.a.wire.outbox.clear()
    assert len(keepalive) == 32
    before = p.b.core.counters.keepalives
    p.deliver(p.a, keepalive)
    assert p.b.core.counters.keepalives == before + 1
    assert p.b.core.counters.drops() == {} and p.b.wire.drops() == {}
    assert p.b.wire.outbox == []  # no plain echo of keepalives: WireGuard has its own


def test_inner_source_of_another_peer_is_not_allowed():
    p = Pair()
    p.send(p.a, echo(A_IP, HOSTV))
    for source in (OTHER_IP, "10.1.2.3"):   # another peer's address; nobody's address
        p.send(p.a, echo(source, HOSTV))
    assert p.tun[p.b] == [bytes(echo(A_IP, HOSTV))]
    assert p.b.core.counters.drops() == {"not_allowed": 2}
    assert p.b.core.counters.rx_packets == 1


def test_replayed_and_garbage_datagrams_are_the_devices_drops():
    p = Pair()
    sealed = p.send(p.a, echo(A_IP, HOSTV, 1))
    sealed = p.send(p.a, echo(A_IP, HOSTV, 2))
    p.deliver(p.a, sealed[0])
    p.deliver(p.a, os.urandom(100))
    p.deliver(p.a, b"")
    assert len(p.tun[p.b]) == 2
    assert p.b.wire.drops() == {"replay": 1, "bad_size": 2}
    assert p.b.core.counters.drops() == {}     # not counted twice, nor as malformed


def test_control_packets_are_ordinary_traffic_on_wireguard():
    """A bare-header ANNOUNCE from an authenticated peer is neither consumed nor learned
    from: it is checked like any packet (and here its source is not allowed)."""
    p = Pair()
    p.send(p.a, echo(A_IP, HOSTV))
    p.send(p.a, memoryview(bytearray(announce(OTHER_IP))))
    assert p.b.core.counters.drops() == {"not_allowed": 1}
    assert p.b.core.counters.keepalives == 0 and len(p.b.table) == 2


def test_plain_wire_has_nothing_of_its_own():
    wire = PlainWire()
    assert wire.outbox == [] and wire.drops() == {}
    view = memoryview(b"x")
    assert wire.seal(view, Peer("p", [])) is view
