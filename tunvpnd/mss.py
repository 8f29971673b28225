"""TCP MSS clamping, as OpenVPN's mssfix: no I/O, plain bytes in and out.

A TCP connection through the tunnel agrees on its segment size in the SYN and SYN-ACK (the MSS
option), from the MTU of each end's own link, typically 1500. Full-size segments then do not
fit the TUN, and if the ICMP "fragmentation needed" / "packet too big" that should tell the
sender never arrives (filtered somewhere), the connection hangs after the handshake: ping works,
TLS and SSH do not. Lowering the MSS of every SYN crossing the tunnel to what fits its MTU
(MTU - 40 for IPv4, MTU - 60 for IPv6: the IP and TCP headers without options) makes both ends
send segments that fit, whatever ICMP does.

The core tests one byte per packet (where a SYN has its flags, `SYN_AT`; see core.py) and calls
`clamp` only for candidates. `clamp` parses what it needs and never trusts a length: a
malformed option list, a truncated header or a fragment means "leave the packet alone".
Not clamped: IPv4 fragments, IPv6 packets with extension headers (TCP must be the first next
header, as OpenVPN does), and IPv4 packets with IP options (the core's one-byte test looks at
the flags of a 20-byte header; SYNs with IP options are not seen in practice).

The TCP checksum is updated incrementally (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')), so it
stays right only if it was complete: packets from the TUN are clamped after offload.py's
finish_checksum has completed a partial (F_NEEDS_CSUM) one, and every packet written to the
TUN carries a full checksum (SYNs are never merged into super-packets).
"""

from __future__ import annotations

TCP = 6
SYN = 0x02
OVERHEAD = {4: 40, 6: 60}  # IP + TCP headers, without options
# By IP version: where the protocol / next header is, and where a SYN's TCP flags are (after a
# 20-byte IPv4 header or the 40-byte IPv6 one)
PROTO_AT = (0, 0, 0, 0, 9, 0, 6)
SYN_AT = (0, 0, 0, 0, 33, 0, 53)

_END, _NOP, _MSS = 0, 1, 2  # TCP option kinds


def limits(mtu: int) -> tuple[int, ...]:
    """The largest MSS by IP version for a tunnel of this MTU: index 4 and 6."""
    return (0, 0, 0, 0, mtu - OVERHEAD[4], 0, mtu - OVERHEAD[6])


def find(packet: memoryview | bytes | bytearray, version: int, limit: int) -> int:
    """The offset of the 2-byte MSS value of a TCP SYN (or SYN-ACK) that is above `limit`,
    else 0: not TCP, not a SYN, a fragment, no MSS option, already small enough, malformed."""
    n = len(packet)
    if version == 4:
        if n < 20 or packet[9] != TCP or packet[6] & 0x3F or packet[7]:  # MF or an offset
            return 0
        start = (packet[0] & 0x0F) * 4
        if start < 20:
            return 0
    elif version == 6:
        if n < 40 or packet[6] != TCP:  # extension headers: left alone
            return 0
        start = 40
    else:
        return 0
    if n < start + 20 or not packet[start + 13] & SYN:
        return 0
    end = start + (packet[start + 12] >> 4) * 4
    if end > n:
        return 0
    at = start + 20
    # every step advances by at least one byte: no loop, whatever the lengths say
    while at < end:
        kind = packet[at]
        if kind == _END:
            return 0
        if kind == _NOP:
            at += 1
            continue
        if at + 1 >= end:
            return 0
        length = packet[at + 1]
        if length < 2 or at + length > end:
            return 0
        if kind == _MSS:
            if length != 4:
                return 0
            return at + 2 if (packet[at + 2] << 8 | packet[at + 3]) > limit else 0
        at += length
    return 0


def clamp(packet: memoryview | bytes | bytearray, version: int, limit: int
          ) -> memoryview | bytearray | None:
    """`packet` with its MSS lowered to `limit` and its TCP checksum updated, or None if it
    needs no change. A writable packet is changed in place (and returned); a read-only one
    (WireGuard's decrypted bytes) is copied first: the only copy, once per clamped SYN."""
    at = find(packet, version, limit)
    if not at:
        return None
    if not isinstance(packet, bytearray) and (not isinstance(packet, memoryview)
                                              or packet.readonly):
        packet = bytearray(packet)
    start = (packet[0] & 0x0F) * 4 if version == 4 else 40
    old = packet[at] << 8 | packet[at + 1]
    packet[at] = limit >> 8
    packet[at + 1] = limit & 0xFF
    if (at - start) & 1:  # the value straddles two 16-bit words: it counts byte-swapped
        old = (old >> 8) | (old & 0xFF) << 8
        limit = (limit >> 8) | (limit & 0xFF) << 8
    csum_at = start + 16
    total = (~(packet[csum_at] << 8 | packet[csum_at + 1]) & 0xFFFF) + (~old & 0xFFFF) + limit
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    total = ~total & 0xFFFF
    packet[csum_at] = total >> 8
    packet[csum_at + 1] = total & 0xFF
    return packet
