"""MSS clamping (mss_clamp): the option parser and checksum update on crafted bytes, the core
in both directions and both wires, the offload paths, the profile key; then end to end in the
lab, a LAN host behind HostU talking TCP to HostV with ICMP "fragmentation needed" dropped."""

from __future__ import annotations

import errno
import os
import random
import struct
from ipaddress import ip_address, ip_network

import pytest

from tests.fakesock import FakeSocket
from tests.ipcraft import checksum, ipv6
from tests.test_offload import (
    ACK,
    SYN,
    TCP,
    V4,
    V6,
    check_l4,
    ip_packet,
    partial,
    pseudo,
    tcp_packet,
)
from tunvpnd import loop, mss
from tunvpnd.core import Core
from tunvpnd.offload import F_NEEDS_CSUM, VNET_HDR, VNET_HDR_LEN
from tunvpnd.peers import Peer, PeerTable
from tunvpnd.profile import ProfileError, load_profile
from tunvpnd.tun import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6
from tunvpnd.wire import PlainWire

NOP, WSCALE = b"\x01", b"\x03\x03\x07"
SACK_OK = b"\x04\x02"
TIMESTAMPS = b"\x08\x0a" + struct.pack("!II", 123456, 0)


def mss_option(value: int) -> bytes:
    return struct.pack("!BBH", 2, 4, value)


LINUX = mss_option(1460) + SACK_OK + TIMESTAMPS + NOP + WSCALE  # what Linux sends in a SYN


def syn(addrs=V4, options=LINUX, flags=SYN, payload=b"") -> bytes:
    options += b"\0" * (-len(options) % 4)  # end-of-list padding
    return tcp_packet(addrs, payload, flags=flags, options=options, seq=7, ack=0)


def mss_of(packet) -> int | None:
    """The MSS option's value, by an independent walk of the options (None if absent)."""
    packet = bytes(packet)
    ihl = (packet[0] & 15) * 4 if packet[0] >> 4 == 4 else 40
    end = ihl + (packet[ihl + 12] >> 4) * 4
    at = ihl + 20
    while at < end and packet[at] != 0:
        if packet[at] == 1:
            at += 1
            continue
        if packet[at] == 2:
            return struct.unpack("!H", packet[at + 2:at + 4])[0]
        at += packet[at + 1]
    return None


def full_recompute_ok(packet) -> bool:
    """The TCP checksum verified by summing the whole segment afresh."""
    packet = bytes(packet)
    if packet[0] >> 4 == 4:
        ihl, src, dst = (packet[0] & 15) * 4, packet[12:16], packet[16:20]
    else:
        ihl, src, dst = 40, packet[8:24], packet[24:40]
    segment = packet[ihl:]
    return checksum(pseudo(str(ip_address(src)), str(ip_address(dst)), TCP, len(segment))
                    + segment) == 0


# -- the parser and the checksum ----------------------------------------------------------------

@pytest.mark.parametrize("addrs, mtu, want", [(V4, 1420, 1380), (V6, 1420, 1360),
                                              (V4, 576, 536), (V6, 1280, 1220)])
@pytest.mark.parametrize("flags", [SYN, SYN | ACK])
def test_a_syn_and_a_syn_ack_get_the_tunnels_mss_and_a_right_checksum(addrs, mtu, want, flags):
    packet = bytearray(syn(addrs, flags=flags))
    limit = mss.limits(mtu)[4 if addrs is V4 else 6]
    assert limit == want
    out = mss.clamp(packet, 4 if addrs is V4 else 6, limit)
    assert out is packet  # writable: changed in place
    assert mss_of(out) == want and full_recompute_ok(out)
    assert out[:-len(LINUX)] != syn(addrs, flags=flags)[:-len(LINUX)]  # the checksum moved
    check_l4(bytes(out))


@pytest.mark.parametrize("options", [
    NOP + mss_option(1460) + NOP + NOP + NOP,          # at an odd offset: straddles two words
    NOP + NOP + TIMESTAMPS + mss_option(1460),          # last, after others
    NOP + NOP + NOP + mss_option(1460) + SACK_OK + NOP + NOP + NOP + TIMESTAMPS,
    mss_option(65535),
    mss_option(1381),
])
@pytest.mark.parametrize("addrs", [V4, V6])
def test_mss_anywhere_among_the_options(options, addrs):
    version = 4 if addrs is V4 else 6
    for seed in range(20):  # checksums of all kinds, by varying the ports
        rng = random.Random(seed)
        packet = tcp_packet(addrs, flags=SYN, options=options, sport=rng.randrange(65536),
                            dport=rng.randrange(65536), seq=rng.randrange(1 << 32), ack=0)
        out = mss.clamp(bytearray(packet), version, 1380)
        assert out is not None and mss_of(out) == 1380 and full_recompute_ok(out), seed


@pytest.mark.parametrize("addrs", [V4, V6])
def test_what_is_left_alone(addrs):
    version = 4 if addrs is V4 else 6
    untouched = [
        syn(addrs, options=mss_option(1380)),               # already the limit
        syn(addrs, options=mss_option(536)),                # below it
        syn(addrs, options=SACK_OK + TIMESTAMPS + NOP + NOP),  # no MSS option
        syn(addrs, options=b""),                             # no options at all
        syn(addrs, flags=ACK),                              # not a SYN (an MSS on an ACK)
        syn(addrs, options=b"\0" + b"\0" * 3 + mss_option(1460)),  # after the end-of-list
        ip_packet(*addrs, b"x" * 40, 17),                   # UDP
    ]
    for packet in untouched:
        assert mss.find(packet, version, 1380) == 0
        assert mss.clamp(bytearray(packet), version, 1380) is None


def test_ipv4_fragments_are_skipped():
    for frag in (0x20, 0x00):  # MF set; or a later fragment (offset 8)
        packet = bytearray(syn())
        packet[6] = frag
        packet[7] = 0 if frag else 1
        assert mss.clamp(packet, 4, 1380) is None


def test_ipv4_header_with_options_is_parsed_right():
    """IP options move the TCP header: find() follows the IHL (the core's fast test does not
    look there, see mss.py)."""
    plain = syn()
    with_options = bytearray(b"\x46" + plain[1:20] + b"\x01\x01\x01\x00" + plain[20:])
    with_options[2:4] = struct.pack("!H", len(with_options))
    out = mss.clamp(with_options, 4, 1380)
    assert out is not None and mss_of(out) == 1380 and full_recompute_ok(out)


def test_ipv6_extension_headers_are_skipped():
    """Only TCP right after the IPv6 header is clamped (as OpenVPN): a hop-by-hop header in
    front of the SYN leaves it alone."""
    segment = syn(V6)[40:]
    hop_by_hop = bytes([TCP, 0, 1, 4, 0, 0, 0, 0])  # next header TCP, PadN
    packet = ipv6(*V6, hop_by_hop + segment, next_header=0)
    assert mss.clamp(bytearray(packet), 6, 1360) is None


@pytest.mark.parametrize("options", [
    b"\x02\x00\x05\xb4",              # MSS with length 0
    b"\x02\x01\x05\xb4",              # length 1
    b"\x02\x03\x05\xb4",              # length 3
    b"\x02\x05\x05\xb4",              # length 5, beyond the header
    b"\x08\x00" + b"\x01" * 6,        # a zero-length option before it
    b"\x08\x01" + b"\x02\x04\x05\xb4" + b"\x01\x01",  # a length-1 option: would loop
    b"\x01\x01\x01\x08",              # a kind with no room for its length
    b"\x08\xff" + bytes(6),           # a length far beyond the header
])
def test_malformed_options_never_crash_or_loop(options):
    assert mss.clamp(bytearray(syn(options=options)), 4, 1380) is None


def test_malformed_headers_never_crash():
    good = syn()
    cases = [good[:20 + 13], good[:20 + 19], good[:39]]
    bad_offset = bytearray(good)
    bad_offset[32] = 0xF0  # data offset 60 bytes, beyond the packet
    cases.append(bytes(bad_offset))
    short_offset = bytearray(good)
    short_offset[32] = 0x20  # data offset 8 < 20
    cases.append(bytes(short_offset))
    bad_ihl = bytearray(good)
    bad_ihl[0] = 0x4F  # IHL 60
    cases.append(bytes(bad_ihl))
    bad_ihl[0] = 0x41  # IHL 4
    cases.append(bytes(bad_ihl))
    for packet in cases:
        for version in (4, 6, 0):
            assert mss.clamp(bytearray(packet), version, 1380) is None


def test_random_options_never_crash_and_any_change_keeps_the_checksum():
    rng = random.Random(11)
    changed = 0
    for _ in range(3000):
        options = bytes(rng.choice((0, 1, 2, 2, 4, 8, 255, rng.randrange(256)))
                        if rng.random() < 0.3 else rng.randrange(256) for _ in range(40))
        addrs = rng.choice((V4, V6))
        packet = bytearray(syn(addrs, options=options))
        out = mss.clamp(packet, 4 if addrs is V4 else 6, 1000)
        if out is not None:
            changed += 1
            assert full_recompute_ok(out) and mss_of(out) == 1000
    assert changed  # the fuzz reached the rewrite too


def test_read_only_packets_are_copied_only_when_clamped():
    original = syn()
    out = mss.clamp(original, 4, 1380)
    assert isinstance(out, bytearray) and mss_of(out) == 1380 and mss_of(original) == 1460
    view = memoryview(original)
    out = mss.clamp(view, 4, 1380)
    assert isinstance(out, bytearray) and full_recompute_ok(out)
    small = syn(options=mss_option(1000))
    assert mss.clamp(small, 4, 1380) is None


# -- the core ---------------------------------------------------------------------------------

HOSTU = ("10.9.0.5", 40000)


def plain_server(mtu: int | None = 1420) -> Core:
    table = PeerTable()
    table.add(Peer("u", [ip_network("192.168.53.0/24"), ip_network("fd53::/64")],
                   endpoint=HOSTU))
    core = Core(table, PlainWire())
    core.set_mss_clamp(mtu)
    return core


def reverse(packet: bytes) -> bytes:
    """The same TCP packet the other way (addresses swapped, checksums still right)."""
    p = bytearray(packet)
    if p[0] >> 4 == 4:
        p[12:16], p[16:20] = packet[16:20], packet[12:16]
    else:
        p[8:24], p[24:40] = packet[24:40], packet[8:24]
    return bytes(p)


V4IN = ("192.168.53.99", "192.168.60.5")
V6IN = ("fd53::99", "fd60::5")


@pytest.mark.parametrize("addrs", [V4IN, V6IN])
def test_core_clamps_both_directions_and_counts(addrs):
    core = plain_server()
    want = 1380 if addrs is V4IN else 1360
    packet = core.inbound(memoryview(bytearray(syn(addrs))), HOSTU)
    assert mss_of(packet) == want and full_recompute_ok(packet)
    sealed = core.outbound(memoryview(bytearray(reverse(syn(addrs, flags=SYN | ACK)))))
    assert sealed is not None and sealed[1] == HOSTU
    assert mss_of(sealed[0]) == want and full_recompute_ok(sealed[0])
    assert core.counters.mss_clamped == 2
    # data and small SYNs pass untouched and are not counted
    data = tcp_packet(addrs, b"x" * 1000, flags=ACK)
    assert bytes(core.inbound(memoryview(bytearray(data)), HOSTU)) == data
    small = syn(addrs, options=mss_option(500))
    assert bytes(core.inbound(memoryview(bytearray(small)), HOSTU)) == small
    assert core.counters.mss_clamped == 2 and core.counters.dropped == 0


def test_core_without_clamping_passes_syns_as_they_are():
    core = plain_server(None)
    packet = syn(V4IN)
    assert bytes(core.inbound(memoryview(bytearray(packet)), HOSTU)) == packet
    assert bytes(core.outbound(memoryview(bytearray(reverse(packet))))[0]) == reverse(packet)
    assert core.counters.mss_clamped == 0
    core.set_mss_clamp(1420)  # a reload turning it on
    assert mss_of(core.inbound(memoryview(bytearray(packet)), HOSTU)) == 1380


def test_core_survives_tcp_packets_too_short_for_their_flags():
    core = plain_server()
    for addrs, size in ((V4IN, 13), (V6IN, 13), (V4IN, 0)):
        packet = ip_packet(*addrs, b"\x02" * size, TCP)
        assert core.inbound(memoryview(bytearray(packet)), HOSTU) is not None
        assert core.outbound(memoryview(bytearray(reverse(packet)))) is not None
    assert core.counters.mss_clamped == 0


class ReadOnlyWire(PlainWire):
    """As the WireGuard wire: open() proves the peer and hands back immutable bytes."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def open(self, datagram, source, local):
        return self.peer, bytes(datagram)


def test_core_copies_an_immutable_packet_only_to_clamp_it():
    table = PeerTable()
    peer = Peer("u", [ip_network("192.168.53.0/24")], endpoint=HOSTU)
    table.add(peer)
    core = Core(table, ReadOnlyWire(peer))
    core.set_mss_clamp(1420)
    out = core.inbound(memoryview(syn(V4IN)), HOSTU)
    assert isinstance(out, bytearray) and mss_of(out) == 1380 and full_recompute_ok(out)
    data = tcp_packet(V4IN, b"x" * 100, flags=ACK)
    assert type(core.inbound(memoryview(data), HOSTU)) is bytes  # no copy
    assert core.counters.mss_clamped == 1


# -- the offload paths ------------------------------------------------------------------------

class Sent(FakeSocket):
    def __init__(self, devnull) -> None:
        super().__init__(devnull)
        self.sent: list[bytes] = []

    def sendto(self, data, address) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def sendmsg(self, buffers, *args) -> int:
        raise OSError(errno.EINVAL, "no GSO here")


@pytest.mark.parametrize("addrs", [V4IN, V6IN])
def test_tun_offload_syn_with_a_partial_checksum_leaves_complete_and_clamped(monkeypatch,
                                                                             addrs):
    """A SYN the host itself sends (F_NEEDS_CSUM: only the pseudo-header sum in its checksum
    field): the loop completes the checksum before the core clamps, so the datagram carries a
    valid one. Another one that arrives already complete (forwarded) is clamped the same."""
    reply = reverse(syn(addrs, flags=SYN | ACK))
    reads = [VNET_HDR.pack(F_NEEDS_CSUM, 0, 0, 0, 20 if addrs is V4IN else 40, 16)
             + bytes(partial(reply, TCP)), bytes(VNET_HDR_LEN) + reply]

    def readv(fd, buffers):
        if not reads:
            raise BlockingIOError
        data = reads.pop(0)
        buffers[0][:len(data)] = data
        return len(data)

    monkeypatch.setattr(loop.os, "readv", readv)
    with open(os.devnull) as devnull:
        sock = Sent(devnull)
        core = plain_server()
        forwarder = loop.Forwarder(devnull.fileno(), sock, core, TUN_F_CSUM | TUN_F_TSO4)
        forwarder.gso = False
        forwarder.pump_tun_offload()
    want = 1380 if addrs is V4IN else 1360
    assert len(sock.sent) == 2
    for datagram in sock.sent:
        assert mss_of(datagram) == want and full_recompute_ok(datagram)
    assert core.counters.mss_clamped == 2


@pytest.mark.parametrize("alone", [True, False])
def test_socket_offload_writes_a_clamped_syn_with_a_complete_checksum(monkeypatch, alone):
    """From the socket a SYN is never merged into a super-packet: alone or among data, it is
    written with an empty virtio header, so its checksum must be complete."""
    written: list[tuple[bytes, bytes]] = []  # (virtio header, packet)

    def writev(fd, buffers):
        written.append((bytes(buffers[0]), bytes(buffers[1])))

    def write(fd, data):
        written.append((bytes(data[:VNET_HDR_LEN]), bytes(data[VNET_HDR_LEN:])))

    datagrams = [syn(V4IN)] if alone else [tcp_packet(V4IN, b"a" * 100, flags=ACK, seq=1),
                                           syn(V4IN), tcp_packet(V4IN, b"b" * 100, seq=1)]

    class Receiving(FakeSocket):
        def recvmsg_into(self, buffers, space):
            if not datagrams:
                raise BlockingIOError
            data = datagrams.pop(0)
            buffers[0][:len(data)] = data
            return len(data), [], 0, HOSTU

    monkeypatch.setattr(loop.os, "writev", writev)
    monkeypatch.setattr(loop.os, "write", write)
    monkeypatch.setattr(loop, "_readable", lambda fd: lambda timeout: [1])
    with open(os.devnull) as devnull:
        core = plain_server()
        forwarder = loop.Forwarder(devnull.fileno(), Receiving(devnull), core,
                                   TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        forwarder.pump_socket_offload()
    syns = [(header, p) for header, p in written if p[33] & SYN]
    assert len(syns) == 1 and len(written) == (1 if alone else 3)
    header, packet = syns[0]
    assert header == bytes(VNET_HDR_LEN)
    assert mss_of(packet) == 1380 and full_recompute_ok(packet)


# -- the profile ------------------------------------------------------------------------------

PROFILE = """\
mode: server
interface:
  address: 192.168.53.1/24
"""


def test_profile_mss_clamp_defaults_to_true(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(PROFILE)
    assert load_profile(path).mss_clamp is True
    path.write_text(PROFILE + "mss_clamp: false\n")
    assert load_profile(path).mss_clamp is False


def test_profile_mss_clamp_must_be_a_boolean(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(PROFILE + "mss_clamp: 1400\n")
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    assert f"{path}:4: mss_clamp:" in str(error.value)
