"""Unit tests of tunvpnd.wireguard.session through two in-memory Devices and a fake clock:
handshake and data both ways, staging, keypair rotation and confirmation, and every timer rule
(wireguard-go's device/timers.go)."""

from __future__ import annotations

import os
import random

from tests.ipcraft import icmp_echo, ipv4, ipv6
from tunvpnd.wireguard import session as S
from tunvpnd.wireguard.device import Device

WALL = 1_700_000_000.0
A_EP = ("10.9.0.5", 51821)
B_EP = ("10.9.0.11", 51820)
A_IP, B_IP = "192.168.53.99", "192.168.53.1"


def kind(datagram: bytes) -> int:
    return datagram[0] if len(datagram) != 32 else 0      # 0 = keepalive


class Pair:
    """Device a (knows b's endpoint) and device b, a wire between them that can be cut per
    direction, and a fake clock."""

    def __init__(self, psk: bytes | None = None, keepalive_a: int = 0,
                 keepalive_b: int = 0, a_knows_b: bool = True) -> None:
        self.now = 1000.0
        self.a = Device(os.urandom(32), wall_offset=WALL - self.now, rng=random.Random(1))
        self.b = Device(os.urandom(32), wall_offset=WALL - self.now, rng=random.Random(2))
        self.sa = self.a.add_peer(self.b.public_key, psk, B_EP if a_knows_b else None,
                                  keepalive_a)
        self.sb = self.b.add_peer(self.a.public_key, psk, None, keepalive_b)
        self.tun = {self.a: [], self.b: []}
        self.log: list[tuple[str, float, int, bytes]] = []   # (sender, time, kind, datagram)
        self.cut = {self.a: False, self.b: False}            # drop what this side sends

    def other(self, dev: Device) -> Device:
        return self.b if dev is self.a else self.a

    def _deliver(self, dev: Device, datagram: bytes) -> None:
        name = "a" if dev is self.a else "b"
        self.log.append((name, self.now, kind(datagram), bytes(datagram)))
        if self.cut[dev]:
            return
        dst = self.other(dev)
        got = dst.receive(bytes(datagram), A_EP if dev is self.a else B_EP, self.now)
        if got is not None and got[1]:      # keepalives are (session, b"")
            self.tun[dst].append(got[1])

    def pump(self) -> None:
        for _ in range(20):
            moved = False
            for dev in (self.a, self.b):
                out = list(dev.outbox)
                dev.outbox.clear()
                for datagram, _endpoint, _local in out:
                    moved = True
                    self._deliver(dev, datagram)
            if not moved:
                return
        raise AssertionError("the devices never went quiet")

    def send(self, dev: Device, packet: bytes) -> None:
        session = self.sa if dev is self.a else self.sb
        datagram = session.encapsulate(packet, self.now)
        if datagram is not None:
            self._deliver(dev, datagram)
        self.pump()

    def advance(self, seconds: float, step: float = 0.25) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(self.now + step, end)
            for dev in (self.a, self.b):
                dev.tick(self.now)
            self.pump()

    def sent(self, name: str, what: int) -> list[float]:
        return [t for n, t, k, _d in self.log if n == name and k == what]


def ping(seq: int, src: str = A_IP, dst: str = B_IP) -> bytes:
    return icmp_echo(src, dst, ident=7, seq=seq)


def test_handshake_and_data_both_ways():
    p = Pair()
    p.send(p.a, ping(1))
    assert p.tun[p.b] == [ping(1)]
    p.send(p.b, ping(2, B_IP, A_IP))
    assert p.tun[p.a] == [ping(2, B_IP, A_IP)]
    assert [k for _n, _t, k, _d in p.log] == [1, 2, 4, 4]
    assert p.sb.endpoint == A_EP and p.sa.endpoint == B_EP
    assert p.sa.last_handshake_wall == WALL and p.sb.last_handshake_wall == WALL
    assert all(v == 0 for v in p.a.drops.values()) and all(v == 0 for v in p.b.drops.values())


def test_with_preshared_key_and_a_wrong_one():
    psk = os.urandom(32)
    p = Pair(psk=psk)
    p.send(p.a, ping(1))
    assert p.tun[p.b] == [ping(1)]
    q = Pair(psk=psk)
    q.sb.configure(os.urandom(32), None, 0)       # b expects another psk: a's response fails
    q.send(q.a, ping(1))
    assert q.tun[q.b] == [] and q.a.drops["bad_handshake"] == 1


def test_staged_packets_flushed_in_order_and_bounded():
    p = Pair()
    p.cut[p.a] = True
    packets = [ping(i) for i in range(S.STAGED_MAX + 3)]
    for packet in packets:
        p.send(p.a, packet)
    assert len(p.sent("a", 1)) == 1                 # one initiation, not one per packet
    assert p.a.drops["staged_overflow"] == 3
    p.cut[p.a] = False
    p.advance(6)                                    # the retransmit gets through
    assert p.tun[p.b] == packets[3:]


def test_responder_sends_only_after_confirmation():
    p = Pair()
    p.sa.initiate(p.now)                    # datagrams are moved by hand here
    init = p.a.outbox.pop()[0]
    assert p.b.receive(init, A_EP, p.now) is None
    assert p.sb.next is not None and p.sb.current is None
    assert p.sb.encapsulate(ping(5, B_IP, A_IP), p.now) is None    # staged, no keypair yet
    response = p.b.outbox.pop()[0]
    assert p.a.receive(response, B_EP, p.now) is None
    assert p.sa.current is not None and p.sa.current.is_initiator
    keepalive = p.a.outbox.pop()[0]
    assert len(keepalive) == 32 and not p.a.outbox
    assert p.b.receive(keepalive, A_EP, p.now) == (p.sb, b"")       # confirms b's keypair
    assert p.sb.current is not None and p.sb.next is None and not p.sb.staged
    staged = p.b.outbox.pop()[0]
    assert p.a.receive(staged, B_EP, p.now)[1] == ping(5, B_IP, A_IP)


def test_rekey_after_120_s_with_no_packet_lost():
    p = Pair()
    first = None
    for second in range(300):
        p.send(p.a, ping(second))
        p.send(p.b, ping(second, B_IP, A_IP))
        if first is None:
            first = p.sa.current.local_index
        p.advance(1)
    assert p.tun[p.b] == [ping(i) for i in range(300)]
    assert p.tun[p.a] == [ping(i, B_IP, A_IP) for i in range(300)]
    initiations = p.sent("a", 1)
    assert len(initiations) == 3                     # t=0, then after 120 s, after 240 s
    assert 120 < initiations[1] - initiations[0] < 122
    assert p.sa.current.local_index != first
    assert sum(p.a.drops.values()) == 0 and sum(p.b.drops.values()) == 0
    assert p.sent("b", 1) == []                      # the responder never needed to


def test_reject_after_180_s():
    p = Pair()
    p.send(p.a, ping(1))
    late = p.sa.current.seal(ping(2))
    p.advance(S.REJECT_AFTER_TIME - 1)
    assert p.b.receive(bytes(p.sa.current.seal(ping(3))), A_EP, p.now) is not None
    p.advance(1)
    assert p.b.receive(bytes(late), A_EP, p.now) is None
    assert p.b.last_drop == "no_session"
    # b sending on the 180 s old keypair stages the packet and initiates instead.
    assert p.sb.encapsulate(ping(4, B_IP, A_IP), p.now) is None
    assert kind(p.b.outbox[-1][0]) == 1


def test_rekey_after_2_to_the_60_messages_then_reject():
    """Either side (not only the initiator) starts a handshake once its keypair has sent
    REKEY_AFTER_MESSAGES; at REJECT_AFTER_MESSAGES the keypair is no longer used at all."""
    p = Pair()
    p.send(p.a, ping(1))
    p.send(p.b, ping(2, B_IP, A_IP))                 # b, the responder, has a current keypair
    p.advance(S.REKEY_TIMEOUT + 1)                   # initiate() is limited to one per 5 s
    p.sb.current.send_counter = S.REKEY_AFTER_MESSAGES + 1
    p.send(p.b, ping(3, B_IP, A_IP))
    assert p.tun[p.a][-1] == ping(3, B_IP, A_IP)     # sent on the old keypair ...
    assert len(p.sent("b", 1)) == 1                  # ... and a handshake started after it
    rotated = p.sb.current
    assert rotated.send_counter < 10
    rotated.send_counter = S.REJECT_AFTER_MESSAGES
    p.advance(S.REKEY_TIMEOUT + 1)                   # initiate() is limited to one per 5 s
    p.send(p.b, ping(4, B_IP, A_IP))                 # staged: waits for the new handshake
    assert p.tun[p.a][-1] == ping(4, B_IP, A_IP)
    assert len(p.sent("b", 1)) == 2 and p.sb.current is not rotated


def test_retransmit_every_5_s_then_give_up():
    p = Pair()
    p.cut[p.a] = True
    p.send(p.a, ping(1))
    p.advance(130, step=0.05)
    times = p.sent("a", 1)
    # wireguard-go: the first initiation and MAX_TIMER_HANDSHAKES + 1 retries.
    assert len(times) == S.MAX_TIMER_HANDSHAKES + 2
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(5.0 <= g <= 5.0 + S.REKEY_TIMEOUT_JITTER_MAX + 0.06 for g in gaps), gaps
    assert len({round(g, 2) for g in gaps}) > 3     # jittered
    assert p.a.drops["handshake_timeout"] == 1 and not p.sa.staged
    assert 95 < times[-1] - times[0] < 102


def test_at_most_one_initiation_per_rekey_timeout():
    p = Pair()
    p.cut[p.a] = True
    for _ in range(10):
        p.send(p.a, ping(1))
        p.advance(0.4)
    assert len(p.sent("a", 1)) == 1


def test_passive_keepalive_after_10_s():
    p = Pair()
    p.send(p.a, ping(1))
    p.advance(9.5)
    assert p.sent("b", 0) == []
    p.advance(1)
    assert len(p.sent("b", 0)) == 1 and p.tun[p.a] == []      # a keepalive: nothing on a's TUN
    p.advance(30)
    assert len(p.sent("b", 0)) == 1                          # once, not forever


def test_new_handshake_when_sent_data_gets_no_answer():
    p = Pair()
    p.send(p.a, ping(1))
    p.send(p.b, ping(1, B_IP, A_IP))
    p.cut[p.b] = True
    start = p.now
    p.send(p.a, ping(2))
    p.advance(14.9, step=0.05)
    assert len(p.sent("a", 1)) == 1
    p.advance(0.5, step=0.05)
    again = p.sent("a", 1)
    assert len(again) == 2 and 15 <= again[1] - start <= 15.4


def test_persistent_keepalive():
    p = Pair(keepalive_a=25)
    p.advance(0.25)                                  # speaks up at once: a handshake
    assert len(p.sent("a", 1)) == 1 and len(p.sent("a", 0)) == 1
    assert p.sb.current is not None
    p.advance(100)
    keepalives = p.sent("a", 0)
    assert len(keepalives) == 5
    assert all(abs(b - a - 25) < 0.3 for a, b in zip(keepalives, keepalives[1:], strict=False))


def test_key_material_zeroed_after_540_s():
    p = Pair()
    p.send(p.a, ping(1))
    p.send(p.b, ping(1, B_IP, A_IP))
    p.advance(S.ZERO_KEY_MATERIAL_AFTER - 1, step=1)
    assert p.sa.current is not None and p.sb.current is not None
    p.advance(2, step=1)
    for dev, s in ((p.a, p.sa), (p.b, p.sb)):
        assert (s.previous, s.current, s.next, s.initiation) == (None, None, None, None)
        assert dev.index == {}


def test_replayed_transport_dropped():
    p = Pair()
    p.send(p.a, ping(1))
    datagram = bytes(p.sa.current.seal(ping(2)))
    assert p.b.receive(datagram, A_EP, p.now)[1] == ping(2)
    assert p.b.receive(datagram, A_EP, p.now) is None
    assert p.b.last_drop == "replay" and p.b.drops["replay"] == 1


def test_endpoint_follows_authenticated_packets_only():
    p = Pair()
    p.send(p.a, ping(1))
    moved = ("10.9.0.6", 4000)
    datagram = bytes(p.sa.current.seal(ping(2)))
    forged = datagram[:-1] + bytes([datagram[-1] ^ 1])
    assert p.b.receive(forged, moved, p.now) is None and p.sb.endpoint == A_EP
    assert p.b.receive(datagram, moved, p.now) is not None and p.sb.endpoint == moved


def test_ipv6_inside():
    p = Pair()
    packet = ipv4(A_IP, B_IP, b"x" * 3)
    six = ipv6("fd00::99", "fd00::1", b"y" * 5)
    p.send(p.a, packet)
    p.send(p.a, six)
    assert p.tun[p.b] == [packet, six]
