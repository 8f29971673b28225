"""MSS clamping (mss_clamp): the option parser and checksum update on crafted bytes, the core
in both directions and both wires, the offload paths, the profile key; then end to end in the
lab, a LAN host behind HostU talking TCP to HostV with ICMP "fragmentation needed" dropped."""

from __future__ import annotations

import errno
import os
import random
import re
import struct
import subprocess
import sys
from ipaddress import ip_address, ip_network

import pytest

from tests.conftest import client_profile, in_ns, server_profile
from tests.fakesock import FakeSocket, queued_reads
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
from tests.test_reload import reload
from tests.test_wgtunnel import Keys
from tests.test_wgtunnel import client_text as wg_client_text
from tests.test_wgtunnel import server_text as wg_server_text
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

    monkeypatch.setattr(loop.os, "readv", queued_reads(reads))
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


# -- end to end: a LAN behind HostU, ICMP "fragmentation needed" dropped ----------------------
#
#   lanu 192.168.70.5 ── eth1 HostU (client, forward) ══ tunnel, MTU 1420 ══ server ── HostV
#   (MTU 1500 links)     192.168.70.1                                          192.168.60.5
#
# Without clamping, lanu and HostV agree on MSS 1460: their 1500-byte segments do not fit the
# tunnel, HostU and the server answer with ICMP "fragmentation needed", which lanu and HostV
# drop (nft), and the transfer stalls after the handshake; with it, they send 1420-byte ones.

LAN_PREFIX = "192.168.70"
ECHO_BYTES = 1024 * 1024
TUNNEL_MTU = 1420
DROP_PMTU_ICMP = """\
table inet mss_test {
  chain input {
    type filter hook input priority 0; policy accept;
    icmp type destination-unreachable icmp code frag-needed counter drop
    icmpv6 type packet-too-big counter drop
  }
}
"""

# In HostV: the first SYN to port 9000 that arrives on eth0 (IPv4 or IPv6), and its MSS.
SYN_CAPTURE = r"""
import socket, struct
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
s.bind(("eth0", 3))
s.settimeout(60)
print("ready", flush=True)
while True:
    p = s.recv(65536)
    v4 = p[0] >> 4 == 4
    ihl, proto = ((p[0] & 15) * 4, p[9]) if v4 else (40, p[6])
    if proto != 6 or struct.unpack_from("!H", p, ihl + 2)[0] != 9000 or p[ihl + 13] & 0x12 != 2:
        continue
    end, at, mss = ihl + (p[ihl + 12] >> 4) * 4, ihl + 20, None
    while at < end and p[at]:
        if p[at] == 1:
            at += 1
            continue
        if p[at] == 2:
            mss = struct.unpack_from("!H", p, at + 2)[0]
            break
        at += p[at + 1]
    print("mss", mss, flush=True)
    break
"""

# echo server HOST | echo client HOST NBYTES DEADLINE: how much came back before the deadline
ECHO = r"""
import random, socket, sys, threading, time
if sys.argv[1] == "server":
    family = socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET
    srv = socket.create_server((sys.argv[2], 9000), family=family)
    print("listening", flush=True)
    conn, _ = srv.accept()
    while data := conn.recv(65536):
        conn.sendall(data)
    sys.exit()
host, n, deadline = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
payload = random.randbytes(n)
sock = socket.create_connection((host, 9000), timeout=10)
sock.settimeout(None)
def send():
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=send, daemon=True).start()
got, end = bytearray(), time.monotonic() + deadline
import select
while len(got) < n and time.monotonic() < end:
    if not select.select([sock], [], [], end - time.monotonic())[0]:
        break
    data = sock.recv(65536)
    if not data:
        break
    got += data
print("echoed", len(got), "identical" if bytes(got) == payload else "different", flush=True)
"""


@pytest.fixture
def lanu(lab):
    """Host `lanu` on a LAN behind HostU, routed through the tunnel; HostV routes it back.
    Its namespace has the lab's prefix, so lab.down() removes it (and kills what runs there)
    even if this test fails half-way."""
    name = f"{lab.prefix}-lanu"
    subprocess.run(["ip", "netns", "add", name], check=True)
    lab.hosts["lanu"] = name
    hostu = lab.hosts["hostu"]
    for argv in (["-n", hostu, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0",
                  "netns", name],
                 ["-n", hostu, "addr", "add", f"{LAN_PREFIX}.1/24", "dev", "eth1"],
                 ["-n", hostu, "link", "set", "eth1", "up"],
                 ["-n", name, "link", "set", "lo", "up"],
                 ["-n", name, "addr", "add", f"{LAN_PREFIX}.5/24", "dev", "eth0"],
                 ["-n", name, "link", "set", "eth0", "up"],
                 ["-n", name, "route", "add", "default", "via", f"{LAN_PREFIX}.1"],
                 ["-n", lab.hosts["hostv"], "route", "add", f"{LAN_PREFIX}.0/24", "via",
                  "192.168.60.11"]):
        subprocess.run(["ip", *argv], check=True, capture_output=True)
    for role in ("lanu", "hostv"):  # every link stays at MTU 1500; no PMTU discovery
        result = lab.run(role, ["nft", "-f", "-"], input=DROP_PMTU_ICMP)
        assert result.returncode == 0, result.stderr
    return name


def echo_from_lanu(lab, deadline: float, hostv: str = "192.168.60.5"
                   ) -> tuple[str, int | None]:
    """A 1 MB TCP echo lanu -> HostV -> lanu: (the client's verdict, MSS of the SYN at HostV)."""
    capture = lab.spawn("hostv", [sys.executable, "-c", SYN_CAPTURE], stdout=subprocess.PIPE,
                        text=True)
    server = lab.spawn("hostv", [sys.executable, "-c", ECHO, "server",
                                 "::" if ":" in hostv else "0.0.0.0"],
                       stdout=subprocess.PIPE, text=True)
    try:
        assert capture.stdout.readline().strip() == "ready"
        assert server.stdout.readline().strip() == "listening"
        result = in_ns(lab, "lanu", [sys.executable, "-c", ECHO, "client", hostv,
                                     str(ECHO_BYTES), str(deadline)], timeout=deadline + 30)
        seen = capture.stdout.readline().split()
        return result.stdout.strip(), int(seen[1]) if seen and seen[1] != "None" else None
    finally:
        for proc in (capture, server):
            proc.kill()
            proc.wait()
            proc.stdout.close()


def plain_profiles(clamp: str) -> tuple[str, str]:
    """Client and server profiles (plain wire); `clamp`: which of them has mss_clamp on."""
    client = (client_profile() + "forward: true\n"
              + f"mss_clamp: {str(clamp in ('both', 'client')).lower()}\n")
    server = server_profile(extra=f"routes: [{LAN_PREFIX}.0/24]\n"
                            f"mss_clamp: {str(clamp in ('both', 'server')).lower()}")
    return client, server


def counted(daemon) -> int:
    found = re.search(r"mss_clamped (\d+)", daemon.status())
    return int(found.group(1)) if found else 0


@pytest.mark.parametrize("clamp", ["both", "client", "server"])
def test_plain_a_lan_behind_the_client_gets_through_with_clamping(lab, lanu, daemons, clamp):
    """Either daemon alone clamps both directions (the SYN one way, the SYN-ACK the other)."""
    client_text, server_text = plain_profiles(clamp)
    server = daemons(lab, "server", server_text)
    client = daemons(lab, "hostu", client_text, name="client")
    verdict, syn_mss = echo_from_lanu(lab, deadline=60)
    assert verdict == f"echoed {ECHO_BYTES} identical", verdict
    assert syn_mss == TUNNEL_MTU - 40
    # SYNs clamped by each (at least: a SYN may be sent again, and is clamped again)
    want = {"both": (1, 1), "client": (2, 0), "server": (0, 2)}[clamp]
    for daemon, least in zip((client, server), want, strict=True):
        daemon.wait_status(lambda s, d=daemon, n=least: counted(d) >= n, timeout=30)
        assert bool(counted(daemon)) == bool(least), daemon.status()


def test_plain_without_clamping_the_same_transfer_stalls(lab, lanu, daemons):
    """What proves the test: the ICMP that path MTU discovery needs is dropped, so without
    mss_clamp the 1 MB does not get through before the deadline."""
    client_text, server_text = plain_profiles("none")
    daemons(lab, "server", server_text)
    daemons(lab, "hostu", client_text, name="client")
    verdict, syn_mss = echo_from_lanu(lab, deadline=10)
    assert syn_mss == 1460
    echoed = int(verdict.split()[1])
    print(f"without mss_clamp: {verdict} in 10 s")
    assert echoed < ECHO_BYTES, verdict


@pytest.mark.parametrize("clamp", [True, False], ids=["clamp", "no-clamp"])
def test_wireguard_clamps_likewise(lab, lanu, daemons, sockdir, clamp):
    """Over wire: wireguard the client's inbound packets are the decrypted (immutable) bytes:
    the SYN-ACK is copied to be clamped. Clamping on the client only: it does both ways."""
    keys = Keys(sockdir)
    server = wg_server_text(keys).replace(
        "allowed_ips: [192.168.53.99/32]", f"allowed_ips: [192.168.53.99/32, {LAN_PREFIX}.0/24]")
    daemons(lab, "server", server + f"routes: [{LAN_PREFIX}.0/24]\nmss_clamp: false\n")
    client = daemons(lab, "hostu", wg_client_text(keys) + "forward: true\n"
                     f"mss_clamp: {str(clamp).lower()}\n", name="client")
    verdict, syn_mss = echo_from_lanu(lab, deadline=60 if clamp else 10)
    if clamp:
        assert verdict == f"echoed {ECHO_BYTES} identical", verdict
        assert syn_mss == TUNNEL_MTU - 40
        client.wait_status(lambda s: counted(client) >= 2, timeout=30)
    else:
        assert syn_mss == 1460 and int(verdict.split()[1]) < ECHO_BYTES, verdict


def add_ipv6(lab) -> None:
    """IPv6 beside IPv4 on every link of the path: lanu fd70::5, HostU, server, HostV fd60::5."""
    for role, argv in (
            ("hostu", ["ip", "addr", "add", "fd70::1/64", "dev", "eth1", "nodad"]),
            ("hostu", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]),
            ("lanu", ["ip", "addr", "add", "fd70::5/64", "dev", "eth0", "nodad"]),
            ("lanu", ["ip", "-6", "route", "add", "default", "via", "fd70::1"]),
            ("server", ["ip", "addr", "add", "fd60::11/64", "dev", "eth1", "nodad"]),
            ("server", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]),
            ("hostv", ["ip", "addr", "add", "fd60::5/64", "dev", "eth0", "nodad"]),
            ("hostv", ["ip", "-6", "route", "add", "fd70::/64", "via", "fd60::11"])):
        in_ns(lab, role, argv)


@pytest.mark.parametrize("clamp", [True, False], ids=["clamp", "no-clamp"])
def test_plain_ipv6_is_clamped_to_mtu_minus_60(lab, lanu, daemons, clamp):
    add_ipv6(lab)
    on = str(clamp).lower()
    daemons(lab, "server", server_profile(
        address="['192.168.53.1/24', 'fd53::1/64']",
        extra=f"routes: [{LAN_PREFIX}.0/24, 'fd70::/64']\nmss_clamp: {on}"))
    client = daemons(lab, "hostu", client_profile(
        address="['192.168.53.99/24', 'fd53::99/64']", routes="192.168.60.0/24, 'fd60::/64'")
        + f"forward: true\nmss_clamp: {on}\n", name="client")
    verdict, syn_mss = echo_from_lanu(lab, deadline=60 if clamp else 10, hostv="fd60::5")
    if clamp:
        assert verdict == f"echoed {ECHO_BYTES} identical", verdict
        assert syn_mss == TUNNEL_MTU - 60
        client.wait_status(lambda s: counted(client) >= 1, timeout=30)
    else:
        assert syn_mss == 1440 and int(verdict.split()[1]) < ECHO_BYTES, verdict


def test_reload_turns_clamping_on_and_off(lab, lanu, daemons):
    """mss_clamp (and the MTU it uses) follows the profile on reload: off, then on (the
    transfer gets through), then off again (it stalls again)."""
    client_text, server_text = plain_profiles("none")
    daemons(lab, "server", server_text)
    client = daemons(lab, "hostu", client_text, name="client")
    client.profile.write_text(client_text.replace("mss_clamp: false", "mss_clamp: true"))
    reload(client)
    verdict, syn_mss = echo_from_lanu(lab, deadline=60)
    assert verdict == f"echoed {ECHO_BYTES} identical" and syn_mss == TUNNEL_MTU - 40, verdict
    client.profile.write_text(client_text)
    reload(client)
    verdict, syn_mss = echo_from_lanu(lab, deadline=8)
    assert syn_mss == 1460 and int(verdict.split()[1]) < ECHO_BYTES, verdict
