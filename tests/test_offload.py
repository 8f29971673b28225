"""The fast path. offload.py on crafted bytes: every packet split() makes is checked field by
field, with checksums verified by tests/ipcraft.py's independent implementation; the Coalescer
and the DatagramBatch are checked against the rules, and split/coalesce round-trip. Then the
real kernel in throwaway namespaces (TUN offloads on and refused), and daemons with and without
offloads talking to each other in the lab, every packet on the plain side checked."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import select
import socket
import struct
import subprocess
import sys
from ipaddress import ip_address, ip_network

import pytest
from pyroute2 import IPRoute, netns

from tests.conftest import REPO, client_profile, in_ns, server_profile
from tests.fakesock import FakeSocket, queued_reads
from tests.ipcraft import checksum, icmp_echo, ipv4, ipv6
from tests.test_netconf import in_ns as in_netns
from tunvpnd import loop, tun
from tunvpnd.core import Core
from tunvpnd.offload import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    VNET_HDR,
    VNET_HDR_LEN,
    Coalescer,
    DatagramBatch,
    finish_checksum,
    ones_sum,
    split,
)
from tunvpnd.peers import Peer, PeerTable
from tunvpnd.transport import IP_PKTINFO, SOL_UDP, UDP_SEGMENT
from tunvpnd.tun import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, open_tun_offload
from tunvpnd.wire import PlainWire, WireGuardWire

FIN, SYN, PSH, ACK = 0x01, 0x02, 0x08, 0x10
TCP, UDP = 6, 17
V4 = ("192.168.53.99", "192.168.60.5")
V6 = ("fd53::99", "fd60::5")
HOSTV = "192.168.60.5"
TIMESTAMPS = bytes([1, 1, 8, 10]) + struct.pack("!II", 123456, 654321)


# -- crafting ---------------------------------------------------------------------------------

def pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = ip_address(src).packed, ip_address(dst).packed
    if len(s) == 4:
        return s + d + struct.pack("!BBH", 0, proto, length)
    return s + d + struct.pack("!IxxxB", length, proto)


def tcp_segment(src, dst, payload=b"", seq=1000, ack=5000, flags=ACK, options=b"",
                sport=40000, dport=5201, window=502) -> bytes:
    """A TCP header and payload with a correct checksum."""
    doff = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0)
    segment = header + options + payload
    csum = checksum(pseudo(src, dst, TCP, len(segment)) + segment)
    return segment[:16] + struct.pack("!H", csum) + segment[18:]


def udp_datagram(src, dst, payload=b"", sport=40000, dport=5201) -> bytes:
    datagram = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = checksum(pseudo(src, dst, UDP, len(datagram)) + datagram) or 0xFFFF
    return datagram[:6] + struct.pack("!H", csum) + datagram[8:]


def ip_packet(src, dst, l4: bytes, proto: int, ident: int = 7) -> bytes:
    if ":" in src:
        return ipv6(src, dst, l4, next_header=proto)
    packet = bytearray(ipv4(src, dst, l4, proto=proto))
    packet[4:6] = struct.pack("!H", ident)
    packet[6] = 0x40  # DF, as TCP sends
    packet[10:12] = b"\0\0"
    packet[10:12] = struct.pack("!H", checksum(bytes(packet[:20])))
    return bytes(packet)


def tcp_packet(addrs=V4, payload=b"", ident=7, **kw) -> bytes:
    return ip_packet(*addrs, tcp_segment(*addrs, payload, **kw), TCP, ident)


def udp_packet(addrs=V4, payload=b"", ident=7, **kw) -> bytes:
    return ip_packet(*addrs, udp_datagram(*addrs, payload, **kw), UDP, ident)


def partial(packet: bytes, proto: int) -> bytearray:
    """`packet` as the kernel hands it over with F_NEEDS_CSUM: pseudo-header sum only."""
    packet = bytearray(packet)
    ihl = 20 if packet[0] >> 4 == 4 else 40
    at = ihl + (16 if proto == TCP else 6)
    src, dst = ((packet[12:16], packet[16:20]) if ihl == 20 else (packet[8:24], packet[24:40]))
    s, d = str(ip_address(bytes(src))), str(ip_address(bytes(dst)))
    words = pseudo(s, d, proto, len(packet) - ihl)
    total = sum(struct.unpack(f"!{len(words) // 2}H", words))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    packet[at:at + 2] = struct.pack("!H", total)
    return packet


# -- checking ---------------------------------------------------------------------------------

def check_ip(packet: bytes) -> tuple[int, str, str, int]:
    """Assert `packet` is one well-formed IPv4/IPv6 packet with a valid header checksum;
    return (header length, source, destination, protocol)."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 15) * 4
        assert struct.unpack("!H", packet[2:4])[0] == len(packet)
        assert checksum(packet[:ihl]) == 0, "IPv4 header checksum"
        return ihl, str(ip_address(packet[12:16])), str(ip_address(packet[16:20])), packet[9]
    assert packet[0] >> 4 == 6
    assert struct.unpack("!H", packet[4:6])[0] == len(packet) - 40
    return 40, str(ip_address(packet[8:24])), str(ip_address(packet[24:40])), packet[6]


def check_l4(packet: bytes) -> bytes:
    """Assert the TCP/UDP checksum is valid; return the transport segment."""
    ihl, src, dst, proto = check_ip(packet)
    l4 = packet[ihl:]
    assert checksum(pseudo(src, dst, proto, len(l4)) + l4) == 0, f"{proto} checksum"
    if proto == UDP:
        assert struct.unpack("!H", l4[4:6])[0] == len(l4)
        assert l4[6:8] != b"\0\0"
    return l4


def tcp_fields(packet: bytes) -> tuple[int, int, bytes]:
    """(seq, flags, payload) of a TCP packet."""
    ihl = 20 if packet[0] >> 4 == 4 else 40
    seq = struct.unpack("!I", packet[ihl + 4:ihl + 8])[0]
    doff = (packet[ihl + 12] >> 4) * 4
    return seq, packet[ihl + 13], packet[ihl + doff:]


def super_packet(addrs, payload: bytes, proto=TCP, **kw) -> bytearray:
    """A TUN super-packet as the kernel writes it: one header, all the payload, IP length of
    the whole, checksum partial."""
    make = tcp_packet if proto == TCP else udp_packet
    return partial(make(addrs, payload, **kw), proto)


def run_split(packet: bytes | bytearray, gso_type: int, gso_size: int,
              csum_start: int | None = None) -> list[bytes]:
    out = bytearray(200_000)
    ihl = csum_start or (20 if packet[0] >> 4 == 4 else 40)
    end, size = split(memoryview(bytearray(packet)), gso_type, gso_size, ihl, out)
    assert end, "split refused"
    return [bytes(out[at:min(at + size, end)]) for at in range(0, end, size)]


# -- checksums --------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [0, 1, 2, 3, 20, 21, 256, 257, 1379, 1380, 2047, 2048, 2049,
                                    65535])
def test_ones_sum_agrees_with_an_independent_checksum(length):
    rng = random.Random(length)
    for data in (bytes(rng.getrandbits(8) for _ in range(length)), b"\xff" * length):
        assert (0xFFFF - ones_sum(data)) % 0xFFFF == checksum(data) % 0xFFFF


@pytest.mark.parametrize("addrs", [V4, V6])
@pytest.mark.parametrize("proto", [TCP, UDP])
def test_finish_checksum_completes_a_partial_one(addrs, proto):
    for size in (0, 1, 64, 1001):
        good = (tcp_packet if proto == TCP else udp_packet)(addrs, os.urandom(size))
        packet = partial(good, proto)
        ihl = 20 if addrs is V4 else 40
        assert finish_checksum(memoryview(packet), ihl, 16 if proto == TCP else 6)
        check_l4(bytes(packet))
    assert not finish_checksum(memoryview(bytearray(40)), 20, 19)


# -- split ------------------------------------------------------------------------------------

@pytest.mark.parametrize("addrs,gso_type", [(V4, GSO_TCPV4), (V6, GSO_TCPV6)])
@pytest.mark.parametrize("length", [1, 1368, 1369, 10_000, 65535 - 40 - 32])
@pytest.mark.parametrize("flags", [ACK, ACK | PSH, ACK | PSH | FIN])
def test_split_tcp_gives_valid_packets_in_sequence(addrs, gso_type, length, flags):
    ihl = 20 if addrs is V4 else 40
    length = min(length, 65535 - ihl - 32)
    payload = os.urandom(length)
    seq0 = 0xFFFFF000  # wraps around within the super-packet
    big = super_packet(addrs, payload, seq=seq0, flags=flags, options=TIMESTAMPS, ident=65530)
    packets = run_split(big, gso_type, 1368)
    assert len(packets) == -(-length // 1368)
    got = b""
    for i, packet in enumerate(packets):
        last = i == len(packets) - 1
        check_l4(packet)
        seq, seg_flags, data = tcp_fields(packet)
        assert seq == (seq0 + i * 1368) & 0xFFFFFFFF
        assert len(data) == (1368 if not last else length - i * 1368)
        assert seg_flags == (flags if last else flags & ~(FIN | PSH))
        assert len(packet) <= ihl + 32 + 1368
        if addrs is V4:
            assert struct.unpack("!H", packet[4:6])[0] == (65530 + i) & 0xFFFF
            assert packet[6] == 0x40 and packet[8] == 64
        assert packet[ihl + 20:ihl + 32] == TIMESTAMPS
        got += data
    assert got == payload


@pytest.mark.parametrize("addrs", [V4, V6])
@pytest.mark.parametrize("length", [1, 1000, 1392 * 3, 1392 * 3 + 7])
def test_split_udp_gives_valid_datagrams(addrs, length):
    payload = os.urandom(length)
    packets = run_split(super_packet(addrs, payload, proto=UDP), GSO_UDP_L4, 1392)
    assert b"".join(check_l4(p)[8:] for p in packets) == payload
    assert [len(check_l4(p)) - 8 for p in packets[:-1]] == [1392] * (len(packets) - 1)


def test_split_refuses_what_does_not_add_up():
    big = memoryview(super_packet(V4, os.urandom(5000)))
    out = bytearray(100_000)
    assert split(big, GSO_TCPV6, 1368, 20, out) == (0, 0)   # v4 packet, v6 type
    assert split(big, 3, 1368, 20, out) == (0, 0)           # UFO, never negotiated
    assert split(big, GSO_NONE, 1368, 20, out) == (0, 0)
    assert split(big, GSO_TCPV4, 0, 20, out) == (0, 0)
    assert split(big, GSO_TCPV4, 1, 20, out) == (0, 0)      # would not fit
    assert split(big, GSO_TCPV4, 1368, 20, bytearray(5000)) == (0, 0)
    assert split(big[:30], GSO_TCPV4, 1368, 20, out) == (0, 0)
    assert split(memoryview(bytearray(b"\x00" * 100)), GSO_TCPV4, 10, 20, out) == (0, 0)


# -- coalesce ---------------------------------------------------------------------------------

class Sink:
    def __init__(self) -> None:
        self.writes: list[tuple[tuple, bytes, int]] = []

    def __call__(self, data: memoryview, count: int) -> None:
        self.writes.append((VNET_HDR.unpack_from(data), bytes(data[VNET_HDR_LEN:]), count))

    def packets(self) -> list[bytes]:
        """What the kernel makes of the writes: GSO ones split like it would."""
        out = []
        for (flags, gso_type, _, gso_size, csum_start, _), packet, count in self.writes:
            if gso_type == GSO_NONE:
                assert flags == 0
                out.append(packet)
                continue
            assert flags == F_NEEDS_CSUM
            parts = run_split(packet, gso_type, gso_size, csum_start)
            assert len(parts) == count
            out += parts
        return out


def stream(addrs=V4, n=10, size=1368, seq=1000, last_flags=ACK | PSH, options=TIMESTAMPS):
    data = os.urandom(n * size)
    return [tcp_packet(addrs, data[i * size:(i + 1) * size], seq=seq + i * size,
                       flags=last_flags if i == n - 1 else ACK, options=options, ident=7 + i)
            for i in range(n)]


def coalesce(packets, udp=False, verify=True) -> Sink:
    sink = Sink()
    c = Coalescer(sink, udp=udp, verify=verify)
    for p in packets:
        c.add(memoryview(bytearray(p)))
    c.flush()
    return sink


@pytest.mark.parametrize("addrs,gso_type", [(V4, GSO_TCPV4), (V6, GSO_TCPV6)])
def test_coalesce_then_split_gives_back_the_same_packets(addrs, gso_type):
    packets = stream(addrs, n=20)
    sink = coalesce(packets)
    assert len(sink.writes) == 1
    (flags, kind, hdr_len, gso_size, csum_start, csum_offset), big, count = sink.writes[0]
    ihl = 20 if addrs is V4 else 40
    assert (flags, kind, hdr_len, gso_size, csum_start, csum_offset, count) == (
        F_NEEDS_CSUM, gso_type, ihl + 32, 1368, ihl, 16, 20)
    check_ip(big)
    assert tcp_fields(big)[1] == ACK | PSH
    assert sink.packets() == packets


def test_coalesce_stops_at_64k_and_goes_on():
    packets = stream(n=100)
    sink = coalesce(packets)
    assert all(len(big) <= 65535 for _, big, _ in sink.writes)
    assert [c for *_, c in sink.writes] == [47, 47, 6]
    assert sink.packets() == packets


def test_coalesce_keeps_flows_and_order():
    a = stream(n=3, seq=1)
    b = stream(n=3, seq=9, options=b"")
    b6 = stream(V6, n=2)
    ping = icmp_echo(*V4)
    syn = tcp_packet(flags=SYN, seq=0)
    frag = bytearray(udp_packet(payload=b"x" * 100))
    frag[6] = 0x20  # more fragments
    frag[10:12] = b"\0\0"
    frag[10:12] = struct.pack("!H", checksum(bytes(frag[:20])))
    order = [a[0], a[1], b[0], b[1], ping, b[2], a[2], b6[0], b6[1], syn, bytes(frag)]
    sink = coalesce(order)
    assert [c for *_, c in sink.writes] == [2, 2, 1, 1, 1, 2, 1, 1]
    assert sink.packets() == order


def test_coalesce_needs_the_next_sequence_number_and_same_ack_and_options():
    p = stream(n=4)
    gap = [p[0], p[2], p[3]]
    assert [c for *_, c in coalesce(gap).writes] == [1, 2]
    other_ack = tcp_packet(V4, tcp_fields(p[1])[2], seq=1000 + 1368,
                           ack=9999, options=TIMESTAMPS)
    assert [c for *_, c in coalesce([p[0], other_ack]).writes] == [1, 1]
    newer_ts = tcp_packet(V4, tcp_fields(p[1])[2], seq=1000 + 1368,
                          options=TIMESTAMPS[:4] + struct.pack("!II", 123457, 654321))
    assert [c for *_, c in coalesce([p[0], newer_ts]).writes] == [1, 1]


def test_coalesce_ends_after_psh_or_a_short_segment():
    p = stream(n=3, last_flags=ACK)
    push = tcp_packet(V4, tcp_fields(p[0])[2], seq=1000, flags=ACK | PSH, options=TIMESTAMPS)
    assert [c for *_, c in coalesce([push, p[1], p[2]]).writes] == [1, 2]
    short = tcp_packet(V4, b"x" * 100, seq=1000 + 1368, options=TIMESTAMPS, ident=8)
    after = tcp_packet(V4, b"y" * 100, seq=1000 + 1368 + 100, options=TIMESTAMPS)
    sink = coalesce([p[0], short, after])
    assert [c for *_, c in sink.writes] == [2, 1]
    assert sink.packets() == [p[0], short, after]
    bigger = tcp_packet(V4, b"z" * 2000, seq=1000 + 1368, options=TIMESTAMPS)
    assert [c for *_, c in coalesce([p[0], bigger]).writes] == [1, 1]


@pytest.mark.parametrize("bad", [0, 1, 3])
def test_coalesce_never_merges_a_bad_checksum(bad):
    packets = stream(n=4)
    broken = bytearray(packets[bad])
    broken[-1] ^= 0xFF
    packets[bad] = bytes(broken)
    sink = coalesce(packets)
    assert sink.packets() == packets
    alone = [w for w in sink.writes if w[1] == packets[bad]]
    assert len(alone) == 1 and alone[0][0] == VNET_HDR.unpack(bytes(VNET_HDR_LEN))
    assert sum(c for *_, c in sink.writes) == 4


def test_coalesce_trusts_what_the_wire_authenticated():
    """verify=False (the wireguard wire: each packet is what the peer sealed) merges without
    summing each segment; the kernel writes the super-packet's checksums anew."""
    assert WireGuardWire.authenticated and not PlainWire.authenticated
    packets = stream(n=4)
    broken = bytearray(packets[2])
    broken[-1] ^= 0xFF
    packets[2] = bytes(broken)
    sink = coalesce(packets, verify=False)
    assert [c for *_, c in sink.writes] == [4]
    assert [len(p) for p in sink.packets()] == [len(p) for p in packets]


@pytest.mark.parametrize("addrs", [V4, V6])
def test_coalesce_udp_only_when_asked(addrs):
    same = [udp_packet(addrs, os.urandom(64), ident=i) for i in range(10)]
    last = udp_packet(addrs, os.urandom(20), ident=10)
    assert [c for *_, c in coalesce(same + [last]).writes] == [1] * 11
    sink = coalesce(same + [last] + same[:2], udp=True)
    assert [c for *_, c in sink.writes] == [11, 2]
    assert sink.writes[0][0][1] == GSO_UDP_L4 and sink.writes[0][0][5] == 6
    assert sink.packets() == same + [last] + same[:2]


# -- batch ------------------------------------------------------------------------------------

def batches(items, **kw):
    sent = []
    batch = DatagramBatch(lambda data, size, count, endpoint:
                          sent.append((bytes(data), size, count, endpoint)), **kw)
    for payload, endpoint in items:
        batch.add(memoryview(payload), endpoint)
    batch.flush()
    return sent


def test_batch_groups_same_size_datagrams_per_endpoint():
    a, b = ("10.9.0.5", 1), ("10.9.0.6", 1)
    items = [(b"x" * 100, a)] * 3 + [(b"y" * 40, a), (b"z" * 100, a), (b"w" * 100, b)]
    sent = batches(items)
    assert [(size, count, endpoint) for _, size, count, endpoint in sent] == [
        (100, 4, a), (100, 1, a), (100, 1, b)]
    assert sent[0][0] == b"x" * 300 + b"y" * 40
    assert batches([(b"x" * 10, a), (b"y" * 20, a)])[0][2] == 1  # bigger: a new batch


def test_batch_respects_the_segment_and_byte_limits():
    a = ("10.9.0.5", 1)
    sent = batches([(b"x" * 1420, a)] * 100)
    assert [count for _, _, count, _ in sent] == [46, 46, 8]
    assert all(len(data) <= 65507 for data, *_ in sent)
    assert [count for _, _, count, _ in batches([(b"x" * 10, a)] * 100)] == [64, 36]


def test_coalesce_udp_stops_at_the_kernels_segment_limit():
    same = [udp_packet(V4, os.urandom(64), ident=i) for i in range(70)]
    sink = coalesce(same, udp=True)
    assert [c for *_, c in sink.writes] == [64, 6]
    assert sink.packets() == same


# -- the real kernel, in throwaway namespaces -------------------------------------------------

@pytest.fixture
def ns():
    """A fresh network namespace for one test, removed afterwards."""
    name = f"tvof-{os.getpid()}-{os.urandom(3).hex()}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


def tun_up(name: str, address: str) -> None:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        ipr.addr("add", index=index, address=address, prefixlen=24)
        ipr.link("set", index=index, state="up")


def to_9999(packet: bytes) -> bool:
    return packet[0] == 0x45 and packet[9] == UDP and packet[22:24] == b"\x27\x0f"


def read_packets(fd: int, flags: int, want: int) -> tuple[list[bytes], int]:
    """What the loop does with TUN reads: (the UDP packets to port 9999, how many reads were
    super-packets); anything else the kernel sends (IPv6 router solicitations...) is skipped."""
    packets: list[bytes] = []
    supers = 0
    buf = bytearray(VNET_HDR_LEN + 65536)
    out = bytearray(200_000)
    while len(packets) < want:
        assert select.select([fd], [], [], 5)[0], f"got {len(packets)} of {want} packets"
        n = os.readv(fd, [buf])
        if not flags:
            if to_9999(buf):
                packets.append(bytes(buf[:n]))
            continue
        vflags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf)
        packet = memoryview(buf)[VNET_HDR_LEN:n]
        if gso_type == GSO_NONE:
            if vflags & F_NEEDS_CSUM:
                assert finish_checksum(packet, csum_start, csum_offset)
            if to_9999(packet):
                packets.append(bytes(packet))
            continue
        supers += 1
        end, size = split(packet, gso_type, gso_size, csum_start, out)
        packets += [bytes(out[at:min(at + size, end)]) for at in range(0, end, size)]
    return packets, supers


def udp_gso_send(payload: bytes, size: int, to: tuple[str, int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendmsg([payload], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, to)


def test_tun_offload_reads_super_packets_that_split_into_valid_ones(ns):
    def body():
        fd, name, flags = open_tun_offload("tvo%d")
        assert flags & TUN_F_CSUM and flags & TUN_F_TSO4 and flags & TUN_F_TSO6
        tun_up(name, "10.9.0.1")
        payload = os.urandom(5 * 1000 + 17)
        udp_gso_send(payload, 1000, ("10.9.0.2", 9999))
        packets, supers = read_packets(fd, flags, 6)
        got = b""
        for packet in packets:
            assert packet[16:20] == socket.inet_aton("10.9.0.2")
            got += check_l4(packet)[8:]
        assert got == payload
        os.close(fd)
        return flags, supers

    flags, supers = in_netns(ns, body)
    assert supers == (1 if flags & TUN_F_USO4 else 0)


def test_coalesced_packets_are_taken_by_the_kernel(ns):
    def body():
        fd, name, flags = open_tun_offload("tvo%d")
        tun_up(name, "10.9.0.1")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("10.9.0.1", 5201))
            s.settimeout(5)
            sent = [os.urandom(100) for _ in range(70)]
            sink = Sink()

            def write(data, count):
                sink(data, count)
                os.write(fd, data)

            c = Coalescer(write, udp=bool(flags & TUN_F_USO4))
            for i, data in enumerate(sent):
                c.add(memoryview(bytearray(udp_packet(("10.9.0.2", "10.9.0.1"), data,
                                                      ident=i, dport=5201))))
            c.flush()
            got = [s.recv(2000) for _ in sent]
        os.close(fd)
        assert got == sent
        return [count for *_, count in sink.writes]

    counts = in_netns(ns, body)
    assert counts == [64, 6] or counts == [1] * 70


def test_offloads_refused_give_a_plain_tun(ns, monkeypatch):
    real_ioctl = fcntl.ioctl

    def ioctl(fd, request, *args):
        if request == tun.TUNSETOFFLOAD:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_ioctl(fd, request, *args)

    monkeypatch.setattr(tun.fcntl, "ioctl", ioctl)

    def body():
        fd, name, flags = open_tun_offload("tvo%d")
        assert flags == 0 and name.startswith("tvo")
        tun_up(name, "10.9.0.1")
        udp_gso_send(b"x" * 3000, 1000, ("10.9.0.2", 9999))
        packets, _ = read_packets(fd, 0, 3)  # no virtio header: IP from the first byte
        assert [len(check_l4(p)) for p in packets] == [1008] * 3
        os.close(fd)

    in_netns(ns, body)


def test_a_refused_super_packet_is_written_packet_by_packet(monkeypatch, caplog):
    """If the kernel says EINVAL to a GSO write, the loop writes the packets one by one and
    stops merging that kind."""
    written: list[bytes] = []

    def write(fd, data):
        if VNET_HDR.unpack_from(data)[1] != GSO_NONE:
            raise OSError(errno.EINVAL, "Invalid argument")
        written.append(bytes(data[VNET_HDR_LEN:]))

    def writev(fd, buffers):
        assert bytes(buffers[0]) == bytes(VNET_HDR_LEN)
        written.append(bytes(buffers[1]))

    monkeypatch.setattr(loop.os, "write", write)
    monkeypatch.setattr(loop.os, "writev", writev)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, open(os.devnull) as tun:
        core = Core(PeerTable(), PlainWire())
        forwarder = loop.Forwarder(tun.fileno(), sock, core, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        packets = stream(n=5)
        for packet in packets:
            forwarder._coalescer.add(memoryview(bytearray(packet)))
        forwarder._coalescer.flush()
        assert written == packets and not forwarder._coalescer.tcp
        assert core.counters.tun_failed == 0
    assert "the TUN refused a TCP super-packet" in caplog.text


class RefusingSocket(FakeSocket):
    """A connected UDP socket whose sendmsg() says EINVAL, as over a path MTU below the
    segment size."""

    def __init__(self, devnull) -> None:
        super().__init__(devnull)
        self.sent: list[bytes] = []

    def sendmsg(self, buffers, control, *args) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    def send(self, data) -> int:
        self.sent.append(bytes(data))
        return len(data)


def test_refused_gso_sends_one_by_one(caplog):
    with open(os.devnull) as devnull:
        sock = RefusingSocket(devnull)
        core = Core(PeerTable(), PlainWire())
        forwarder = loop.Forwarder(devnull.fileno(), sock, core, TUN_F_CSUM | TUN_F_TSO4)
        forwarder.peer_endpoint = ("10.9.0.11", 9090)
        assert forwarder.gso
        packets = stream(n=5)
        for packet in packets:
            forwarder._batch.add(memoryview(packet), forwarder.peer_endpoint)
        forwarder._batch.flush()
        assert sock.sent == packets and not forwarder.gso
        assert core.counters.send_failed == 0
    assert "UDP GSO refused (Invalid argument)" in caplog.text


class RecordingSocket(FakeSocket):
    """An unconnected server socket with pktinfo on: records what each send carried."""

    def __init__(self, devnull) -> None:
        super().__init__(devnull)
        self.sent: list[tuple[bytes, list, tuple]] = []  # (data, control, address)

    def sendmsg(self, buffers, control, flags, address) -> int:
        self.sent.append((b"".join(bytes(b) for b in buffers), list(control), address))
        return 0

    def sendto(self, data, address) -> int:
        self.sent.append((bytes(data), [], address))
        return len(data)


def test_pktinfo_batches_leave_from_each_peers_address(monkeypatch):
    """Packets for two peers whose datagrams arrived at two different server addresses, read
    from the TUN in one wake-up: every sendmsg (lone, batch of one, GSO batch) carries the
    IP_PKTINFO of its peer, and a batch never mixes two."""
    here = {name: [(socket.IPPROTO_IP, IP_PKTINFO, bytes(4) + socket.inet_aton(a) + bytes(4))]
            for name, a in (("a", "10.9.0.11"), ("b", "10.99.0.11"))}
    table = PeerTable()
    for name, inner, endpoint in (("a", "192.168.53.99", ("10.9.0.5", 4000)),
                                  ("b", "192.168.53.98", ("10.9.0.6", 4000))):
        peer = Peer(name, [ip_network(f"{inner}/32")], endpoint=endpoint)
        peer.local = here[name]
        table.add(peer)
    order = "aabbbab"
    reads = [bytes(VNET_HDR_LEN) + icmp_echo("192.168.60.5", "192.168.53.99" if c == "a"
                                             else "192.168.53.98", seq=i)
             for i, c in enumerate(order)]

    monkeypatch.setattr(loop.os, "readv", queued_reads(reads))
    with open(os.devnull) as devnull:
        sock = RecordingSocket(devnull)
        core = Core(table, PlainWire())
        forwarder = loop.Forwarder(devnull.fileno(), sock, core, TUN_F_CSUM | TUN_F_TSO4,
                                   pktinfo=True)
        forwarder.gso = True
        forwarder.pump_tun_offload()
    endpoints = {("10.9.0.5", 4000): "a", ("10.9.0.6", 4000): "b"}
    sent = 0
    for data, control, address in sock.sent:
        name = endpoints[address]
        assert here[name][0] in control, (name, control)
        sent += len(data) // len(icmp_echo("192.168.60.5", "192.168.53.99"))
    assert sent == len(order) and core.counters.send_failed == 0


# -- end to end: offload and plain daemons in the lab -----------------------------------------

ECHO_SERVER = """\
import socket
srv = socket.create_server(("::", 9000), family=socket.AF_INET6, dualstack_ipv6=True)
print("listening", flush=True)
conn, _ = srv.accept()
while data := conn.recv(65536):
    conn.sendall(data)
"""

CAPTURE = """\
import sys
from tests.test_offload import capture
capture(sys.argv[1])
"""


def capture(ifname: str) -> None:
    """Run in a lab namespace: check every packet a daemon writes into its TUN `ifname` (one
    per datagram received, when the daemon runs without offloads) until stdin closes; print
    'checked N bad M'."""
    # protocol 0 until bound: a socket made with ETH_P_ALL sees every link until bind()
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
    s.bind((ifname, 3))
    print("ready", flush=True)
    checked, bad = 0, []
    while True:
        ready = select.select([s, sys.stdin], [], [], 60)[0]
        if not ready or sys.stdin in ready:
            break
        data, address = s.recvfrom(70000)
        if address[2] == socket.PACKET_OUTGOING:
            continue
        checked += 1
        try:
            _, _, _, proto = check_ip(data)
            if proto in (TCP, UDP):
                check_l4(data)
        except AssertionError as error:
            bad.append(f"{error}: {data[:60].hex()}")
    print(f"checked {checked} bad {len(bad)} {bad[:3]}", flush=True)


def lab_ipv6(lab) -> None:
    in_ns(lab, "hostv", ["ip", "addr", "add", "fd60::5/64", "dev", "eth0", "nodad"])
    in_ns(lab, "hostv", ["ip", "-6", "route", "add", "fd53::/64", "via", "fd60::11"])
    in_ns(lab, "server", ["ip", "addr", "add", "fd60::11/64", "dev", "eth1", "nodad"])
    in_ns(lab, "server", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])


@pytest.mark.parametrize("family", ["4", "6"])
@pytest.mark.parametrize("plain", ["server", "hostu"])
def test_offload_and_plain_daemons_interoperate(lab, daemons, plain, family):
    """One side with offloads, the other without: a 2 MB TCP echo through the tunnel comes back
    identical, and every packet the plain side receives is one valid IP packet with correct
    checksums (it writes each datagram to its TUN as is: captured and checked there)."""
    off = {"TUNVPN_OFFLOAD": "0"}
    v6 = family == "6"
    server = daemons(lab, "server", server_profile(
        address="[192.168.53.1/24, 'fd53::1/64']" if v6 else "192.168.53.1/24"),
        env=off if plain == "server" else None)
    client = daemons(lab, "hostu", client_profile(
        address="[192.168.53.99/24, 'fd53::99/64']" if v6 else "192.168.53.99/24",
        routes="192.168.60.0/24, 'fd60::/64'" if v6 else "192.168.60.0/24"),
        env=off if plain == "hostu" else None)
    fast, slow = (client, server) if plain == "server" else (server, client)
    if "offloads: off" in fast.log():
        pytest.skip("this kernel refuses TUN offloads")
    assert "offloads: TUN checksum, TSO" in fast.log() and "GSO on, GRO on" in fast.log()
    assert "offloads: off" in slow.log()
    if v6:
        lab_ipv6(lab)
    echo = lab.spawn("hostv", [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE,
                     text=True)
    checker = lab.spawn(plain, [sys.executable, "-c", CAPTURE, "tun0"], cwd=str(REPO),
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in echo.stdout.readline()
        assert checker.stdout.readline().strip() == "ready"
        nbytes = 2 * 1024 * 1024
        result = in_ns(lab, "hostu", [sys.executable, "-m", "tunvpnd.lab", "echo-client",
                                      "fd60::5" if v6 else HOSTV, "9000", str(nbytes)])
        assert f"{nbytes} bytes echoed back identical" in result.stdout
        checker.stdin.close()
        report = checker.stdout.readline().split()
        assert report[:1] == ["checked"] and report[2:4] == ["bad", "0"], report
        assert int(report[1]) > 1000
    finally:
        for proc in (echo, checker):
            proc.kill()
            proc.wait()
            proc.stdout.close()
    for daemon in (slow, fast):
        status = daemon.wait_status(lambda s: int(s.split(" rx ")[1].split()[0]) > 1000)
        # (no_peer drops are the kernel's own IPv6 chatter on the TUN, nothing of ours)
        for reason in ("malformed", "tun_failed", "send_failed", "unknown_source"):
            assert reason not in status, status


def test_offloads_over_an_ipv6_underlay(lab, daemons):
    """UDP GSO and GRO on an IPv6 socket: a 2 MB echo, and nothing fell back to one by one."""
    for role, address in (("server", "fd09::11/64"), ("hostu", "fd09::5/64")):
        in_ns(lab, role, ["ip", "addr", "add", address, "dev", "eth0", "nodad"])
    server = daemons(lab, "server", server_profile().replace("0.0.0.0:9090", "'[::]:9090'"))
    client = daemons(lab, "hostu", client_profile().replace("10.9.0.11:9090",
                                                            "'[fd09::11]:9090'"))
    echo = lab.spawn("hostv", [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE,
                     text=True)
    try:
        assert "listening" in echo.stdout.readline()
        nbytes = 2 * 1024 * 1024
        result = in_ns(lab, "hostu", [sys.executable, "-m", "tunvpnd.lab", "echo-client", HOSTV,
                                      "9000", str(nbytes)])
        assert f"{nbytes} bytes echoed back identical" in result.stdout
    finally:
        echo.kill()
        echo.wait()
        echo.stdout.close()
    for daemon in (server, client):
        if "offloads: off" not in daemon.log():
            assert "GSO on, GRO on" in daemon.log()
        assert "refused" not in daemon.log()
        status = daemon.wait_status(lambda s: int(s.split(" rx ")[1].split()[0]) > 1000)
        for reason in ("malformed", "tun_failed", "send_failed", "unknown_source"):
            assert reason not in status, status
