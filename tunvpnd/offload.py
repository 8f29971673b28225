"""TUN and UDP offloads, with no I/O: the virtio_net_hdr, splitting, batching, coalescing.

With IFF_VNET_HDR and TUNSETOFFLOAD the kernel hands the TUN reader one TCP (or UDP) "super-packet"
of up to 64 KiB, described by a 10-byte virtio_net_hdr in front of it, instead of ~45 packets of
MTU size, and accepts the same from a writer. On the wire every datagram must still carry exactly
one complete IP packet with correct checksums (the lab's tunclient.py/tunserver.py, and tunvpnd
with TUNVPN_OFFLOAD=0, write what they receive to a plain TUN). So:

    TUN read --split()--> packets --core.outbound()--> DatagramBatch --> one sendmsg, UDP_SEGMENT
    one recvmsg, UDP_GRO --> datagrams --core.inbound()--> Coalescer --> one TUN write

`split` does what the kernel's GSO would have done (IP length, IPv4 id and header checksum, TCP
sequence number, FIN/PSH on the last segment only, TCP/UDP checksum), `DatagramBatch` puts
datagrams for one endpoint back to back so the kernel cuts them apart again, and `Coalescer`
merges consecutive in-order segments of one flow into a super-packet with a GSO header, as
wireguard-go's tun/offload_linux.go does.

Checksums: the Internet checksum is the ones' complement sum of 16-bit words, and since
2**16 == 1 (mod 0xFFFF), int.from_bytes(data, "big") % 0xFFFF is that sum modulo 0xFFFF, computed
in C. A sum that is 0 modulo 0xFFFF stands for 0xFFFF, the ones' complement "negative zero", so
0xFFFF - s % 0xFFFF is a valid checksum (never 0, as UDP requires).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size         # 10: linux/virtio_net.h, struct virtio_net_hdr
NO_VNET_HDR = bytes(VNET_HDR_LEN)    # a plain packet: no GSO, checksum already complete
F_NEEDS_CSUM = 1                     # partial checksum: sum from csum_start, store at +csum_offset
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 4, 5

TCP, UDP = 6, 17
FIN, PSH, ACK = 0x01, 0x08, 0x10
MAX_IP = 65535                       # IPv4 total length / IPv6 payload length are 16 bits
MAX_DATAGRAM = 65507                 # largest UDP payload over IPv4
MAX_SEGMENTS = 64                    # UDP_MAX_SEGMENTS of older kernels (6.x allows 128)

_MASK_8192, _MASK_4096, _MASK_2048, _MASK_1024 = ((1 << k) - 1 for k in (8192, 4096, 2048, 1024))
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U16U16 = struct.Struct("!HH")
# What must be equal for two segments to be one flow, header fields that may differ left out:
# IPv4: TOS, flags/fragment/TTL/protocol, addresses+ports, [TCP: ack, data offset]
# IPv6: version/class/flow label, next header/hop limit, addresses+ports, [TCP: ack, data offset]
_TCP4_KEY = struct.Struct("!xB4x4s2x12s4x4sB")
_TCP6_KEY = struct.Struct("!4s2x2s36s4x4sB")
_UDP4_KEY = struct.Struct("!xB4x4s2x12s")
_UDP6_KEY = struct.Struct("!4s2x2s36s")


def ones_sum(data: memoryview | bytes) -> int:
    """The ones' complement sum of `data` as big-endian 16-bit words (an odd length is padded
    with a zero byte), modulo 0xFFFF."""
    total = int.from_bytes(data, "big")
    n = len(data)
    if n & 1:
        total <<= 8
    if 256 < n <= 2048:
        # CPython divides a big int digit by digit; halving it first with shifts and adds,
        # which keep it the same modulo 2**k - 1 and so modulo 0xFFFF (16 divides k), is
        # faster for packet-sized data (1400 bytes: 1.9 -> 1.4 us).
        total = (total >> 8192) + (total & _MASK_8192)
        total = (total >> 4096) + (total & _MASK_4096)
        total = (total >> 2048) + (total & _MASK_2048)
        total = (total >> 1024) + (total & _MASK_1024)
    return total % 0xFFFF


def pseudo_sum(packet: memoryview | bytes, proto: int) -> int:
    """Addresses and protocol of the TCP/UDP pseudo-header, summed (the length is added later)."""
    if packet[0] >> 4 == 4:
        return int.from_bytes(packet[12:20], "big") + proto
    return int.from_bytes(packet[8:40], "big") + proto


def finish_checksum(packet: memoryview | bytearray, start: int, offset: int) -> bool:
    """Complete a partial checksum (virtio F_NEEDS_CSUM): the field at start+offset holds the
    pseudo-header sum; sum from `start` to the end and store the complement. False if the
    header points outside the packet."""
    at = start + offset
    if start < 0 or at + 2 > len(packet):
        return False
    _U16.pack_into(packet, at, 0xFFFF - ones_sum(packet[start:]))
    return True


def split(packet: memoryview | bytes, gso_type: int, gso_size: int, csum_start: int,
          out: memoryview | bytearray) -> tuple[int, int]:
    """Cut a TUN super-packet into the IP packets it stands for, written back to back into `out`.

    Returns (bytes written, length of every packet but the last, which may be shorter); (0, 0)
    if the virtio header does not describe `packet` or `out` is too small. The header length
    is taken from the TCP header, not from the virtio header (the kernel's can be the whole
    first packet on the forwarding path).
    """
    n = len(packet)
    ihl = csum_start
    version = packet[0] >> 4 if n else 0
    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        if n < ihl + 20:
            return 0, 0
        tcp = True
        hl = ihl + ((packet[ihl + 12] >> 4) << 2)
        csum_at = ihl + 16
        if hl < ihl + 20:
            return 0, 0
    elif gso_type == GSO_UDP_L4:
        tcp = False
        hl = ihl + 8
        csum_at = ihl + 6
    else:
        return 0, 0
    if version == 4:
        v4 = True
        if ihl < 20 or gso_type == GSO_TCPV6:
            return 0, 0
    elif version == 6:
        v4 = False
        if ihl < 40 or gso_type == GSO_TCPV4:
            return 0, 0
    else:
        return 0, 0
    if gso_size <= 0 or n <= hl:
        return 0, 0
    count = -(-(n - hl) // gso_size)
    if n + (count - 1) * hl > len(out):
        return 0, 0

    # Header templates with the fields that differ per segment zeroed, and their sums: all
    # segments but the last are `full` bytes long, which goes into the template too.
    full = hl + gso_size
    pseudo = pseudo_sum(packet, TCP if tcp else UDP)
    last = bytearray(packet[:hl])
    last[csum_at:csum_at + 2] = b"\0\0"
    if v4:
        ip_id = packet[4] << 8 | packet[5]
        last[2:6] = b"\0\0\0\0"             # total length, id
        last[10:12] = b"\0\0"                # header checksum
    if tcp:
        seq0 = _U32.unpack_from(packet, ihl + 4)[0]
        last[ihl + 4:ihl + 8] = b"\0\0\0\0"
    else:
        last[ihl + 4:ihl + 6] = b"\0\0"      # UDP length
    middle = bytearray(last)
    if tcp:
        middle[ihl + 13] &= ~(FIN | PSH) & 0xFF   # FIN and PSH belong to the last segment only
    else:
        _U16.pack_into(middle, ihl + 4, full - ihl)
    if v4:
        _U16.pack_into(middle, 2, full)
        ip_sum = ones_sum(middle[:ihl])       # + id
    else:
        _U16.pack_into(middle, 4, full - 40)
    l4_middle = ones_sum(middle[ihl:]) + pseudo + full - ihl   # + seq + payload

    at = 0
    start = hl
    for i in range(count - 1):
        stop = start + gso_size
        payload = packet[start:stop]
        out[at:at + hl] = middle
        out[at + hl:at + full] = payload
        total = ones_sum(payload) + l4_middle
        if v4:
            ident = (ip_id + i) & 0xFFFF
            _U16.pack_into(out, at + 4, ident)
            _U16.pack_into(out, at + 10, 0xFFFF - (ip_sum + ident) % 0xFFFF)
        if tcp:
            seq = (seq0 + start - hl) & 0xFFFFFFFF
            _U32.pack_into(out, at + ihl + 4, seq)
            total += (seq >> 16) + (seq & 0xFFFF)
        _U16.pack_into(out, at + csum_at, 0xFFFF - total % 0xFFFF)
        at += full
        start = stop

    # the last one: its own length, and the flags of the super-packet
    payload = packet[start:]
    size = hl + n - start
    l4_len = size - ihl
    out[at:at + hl] = last
    out[at + hl:at + size] = payload
    if v4:
        ident = (ip_id + count - 1) & 0xFFFF
        _U16U16.pack_into(out, at + 2, size, ident)
        _U16.pack_into(out, at + 10, 0xFFFF - (ones_sum(last[:ihl]) + size + ident) % 0xFFFF)
    else:
        _U16.pack_into(out, at + 4, size - 40)
    total = ones_sum(payload) + ones_sum(last[ihl:]) + pseudo + l4_len
    if tcp:
        seq = (seq0 + start - hl) & 0xFFFFFFFF
        _U32.pack_into(out, at + ihl + 4, seq)
        total += (seq >> 16) + (seq & 0xFFFF)
    else:
        _U16.pack_into(out, at + ihl + 4, l4_len)
        total += l4_len
    _U16.pack_into(out, at + csum_at, 0xFFFF - total % 0xFFFF)
    at += size
    return at, full


class DatagramBatch:
    """Datagrams for one endpoint, back to back in one buffer, for one sendmsg() with
    UDP_SEGMENT: all of them `size` bytes long except the last, which may be shorter.

    `send(data, size, count, endpoint)` is called with each full batch, and by `flush()`.
    """

    def __init__(self, send: Callable[[memoryview, int, int, tuple | None], None],
                 max_segments: int = MAX_SEGMENTS, max_bytes: int = MAX_DATAGRAM) -> None:
        self.send = send
        self.max_segments = max_segments
        self.max_bytes = max_bytes
        self.buf = bytearray(max(max_bytes, MAX_IP))
        self.view = memoryview(self.buf)
        self.endpoint: tuple | None = None
        self.size = 0     # length of each datagram but the last
        self.count = 0
        self.length = 0

    def add(self, payload: memoryview | bytes, endpoint: tuple | None) -> None:
        n = len(payload)
        if self.count and (n > self.size or self.length != self.count * self.size
                           or self.count >= self.max_segments
                           or self.length + n > self.max_bytes
                           or (endpoint is not self.endpoint and endpoint != self.endpoint)):
            self.flush()
        if not self.count:
            self.endpoint, self.size = endpoint, n
        end = self.length + n
        self.buf[self.length:end] = payload
        self.length = end
        self.count += 1

    def flush(self) -> None:
        if self.count:
            count, self.count = self.count, 0
            length, self.length = self.length, 0
            self.send(self.view[:length], self.size, count, self.endpoint)


class Coalescer:
    """Merges consecutive in-order TCP segments of one flow (and, with `udp`, same-size UDP
    datagrams of one flow, at most MAX_SEGMENTS: the kernel refuses more) into one super-packet
    with a GSO virtio header, for one TUN write.

    Packets come in already validated as whole IP packets (core.inbound). `write(data, count)`
    gets the virtio header plus packet, and how many packets that write carries. A segment is
    merged only when its TCP/UDP checksum verifies (the kernel recomputes the checksum of the
    super-packet, so it must not paper over a bad one); anything else is written alone with an
    empty header and the kernel checks it as usual.

    `verify=False` skips that check, for packets a wire has authenticated (WireGuard): they are
    byte for byte what the peer sent, so there is nothing in transit for a checksum to catch.
    Linux's WireGuard does the same (receive.c marks decrypted packets CHECKSUM_UNNECESSARY),
    and on a 1,420-byte segment the check is a third of the receiver's Python time.
    """

    def __init__(self, write: Callable[[memoryview, int], None], tcp: bool = True,
                 udp: bool = False, verify: bool = True) -> None:
        self.write = write
        self.tcp, self.udp = tcp, udp  # what to merge
        self.verify = verify
        self.buf = bytearray(VNET_HDR_LEN + MAX_IP)
        self.view = memoryview(self.buf)
        self.count = 0        # packets in the buffer
        self.length = 0       # IP packet bytes in the buffer (after the virtio header)
        self.open = False     # may another segment be appended?
        self.key: tuple = ()
        self.is_tcp = True
        self.ihl = self.hl = 0
        self.gso_size = 0
        self.next_seq = 0
        self.pseudo = 0
        self.verified = False

    def add(self, packet: memoryview) -> None:
        n = len(packet)
        b0 = packet[0]
        if b0 == 0x45:
            if packet[6] & 0x3F or packet[7]:      # a fragment
                return self._alone(packet)
            proto, ihl, v4 = packet[9], 20, True
        elif b0 >> 4 == 6:
            proto, ihl, v4 = packet[6], 40, False
        else:
            return self._alone(packet)
        if proto == TCP and self.tcp:
            if n < ihl + 20:
                return self._alone(packet)
            hl = ihl + ((packet[ihl + 12] >> 4) << 2)
            flags = packet[ihl + 13]
            if hl < ihl + 20 or n <= hl or (flags | PSH) != (ACK | PSH):
                return self._alone(packet)       # no payload, or SYN/FIN/RST/URG/ECE/CWR
            key = (_TCP4_KEY if v4 else _TCP6_KEY).unpack_from(packet)
            if hl > ihl + 20:
                key += (bytes(packet[ihl + 20:hl]),)
            seq = _U32.unpack_from(packet, ihl + 4)[0]
            size = n - hl
            if (self.open and self.is_tcp and seq == self.next_seq and size <= self.gso_size
                    and self.length + size <= MAX_IP and key == self.key):
                if self.verify and not self._verify(packet):
                    return
                start = VNET_HDR_LEN + self.length
                self.buf[start:start + size] = packet[hl:]
                self.length += size
                self.count += 1
                self.next_seq = (seq + size) & 0xFFFFFFFF
                if flags & PSH:
                    self.buf[VNET_HDR_LEN + ihl + 13] |= PSH
                    self.open = False
                elif size < self.gso_size:
                    self.open = False
                return None
            self.flush()
            self._start(packet, key, True, ihl, hl, size)
            self.next_seq = (seq + size) & 0xFFFFFFFF
            self.open = not flags & PSH
            return None
        if proto == UDP and self.udp and n > ihl + 8:
            key = (_UDP4_KEY if v4 else _UDP6_KEY).unpack_from(packet)
            size = n - ihl - 8
            if (self.open and not self.is_tcp and size <= self.gso_size
                    and self.count < MAX_SEGMENTS and self.length + size <= MAX_IP
                    and key == self.key):
                if self.verify and not self._verify(packet):
                    return
                start = VNET_HDR_LEN + self.length
                self.buf[start:start + size] = packet[ihl + 8:]
                self.length += size
                self.count += 1
                if size < self.gso_size:
                    self.open = False
                return None
            self.flush()
            self._start(packet, key, False, ihl, ihl + 8, size)
            self.open = True
            return None
        return self._alone(packet)

    def _start(self, packet: memoryview, key: tuple, tcp: bool, ihl: int, hl: int,
               size: int) -> None:
        n = len(packet)
        self.buf[VNET_HDR_LEN:VNET_HDR_LEN + n] = packet
        self.count, self.length = 1, n
        self.key, self.is_tcp, self.ihl, self.hl, self.gso_size = key, tcp, ihl, hl, size
        self.pseudo = pseudo_sum(packet, TCP if tcp else UDP)
        self.verified = False

    def _verify(self, packet: memoryview) -> bool:
        """Before appending `packet`: both it and (once) the first packet must have a valid
        checksum. If not, write out what we have and `packet` alone; False."""
        ihl, pseudo = self.ihl, self.pseudo
        if not self.verified:
            first = self.view[VNET_HDR_LEN:VNET_HDR_LEN + self.length]
            if (ones_sum(first[ihl:]) + pseudo + self.length - ihl) % 0xFFFF:
                self.flush()
                self._alone(packet)
                return False
            self.verified = True
        if (ones_sum(packet[ihl:]) + pseudo + len(packet) - ihl) % 0xFFFF:
            self.flush()
            self._alone(packet)
            return False
        return True

    def _alone(self, packet: memoryview) -> None:
        self.flush()
        n = len(packet)
        self.buf[:VNET_HDR_LEN] = NO_VNET_HDR
        self.buf[VNET_HDR_LEN:VNET_HDR_LEN + n] = packet
        self.write(self.view[:VNET_HDR_LEN + n], 1)

    def flush(self) -> None:
        """Write out the packet being built, if any."""
        count = self.count
        if not count:
            return
        self.count = 0
        self.open = False
        length, buf = self.length, self.buf
        if count == 1:
            buf[:VNET_HDR_LEN] = NO_VNET_HDR
            self.write(self.view[:VNET_HDR_LEN + length], 1)
            return
        ihl, ip = self.ihl, VNET_HDR_LEN
        if buf[ip] >> 4 == 4:
            buf[ip + 10:ip + 12] = b"\0\0"
            _U16.pack_into(buf, ip + 2, length)
            _U16.pack_into(buf, ip + 10, 0xFFFF - ones_sum(self.view[ip:ip + ihl]))
            gso_type = GSO_TCPV4 if self.is_tcp else GSO_UDP_L4
        else:
            _U16.pack_into(buf, ip + 4, length - 40)
            gso_type = GSO_TCPV6 if self.is_tcp else GSO_UDP_L4
        l4_len = length - ihl
        if self.is_tcp:
            csum_offset = 16
        else:
            csum_offset = 6
            _U16.pack_into(buf, ip + ihl + 4, l4_len)
        # checksum partial: the pseudo-header sum, for the kernel to finish per segment
        _U16.pack_into(buf, ip + ihl + csum_offset, (self.pseudo + l4_len) % 0xFFFF)
        VNET_HDR.pack_into(buf, 0, F_NEEDS_CSUM, gso_type, self.hl, self.gso_size, ihl,
                           csum_offset)
        self.write(self.view[:VNET_HDR_LEN + length], count)
