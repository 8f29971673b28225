"""Just enough IP header reading for a tunnel: is it a whole IP packet, and who is it from and to.

Addresses are returned as integers so the peer table can do longest-prefix matching with
shifts and dict look-ups, without building ipaddress objects per packet.
"""

from ipaddress import IPv4Address, IPv6Address

IPV4_HEADER = 20
IPV6_HEADER = 40
HEADER_ONLY = (0, 0, 0, 0, IPV4_HEADER, 0, IPV6_HEADER)  # by version: a packet with no payload

# Plain-wire control packets: a bare IP header, never legitimate traffic. The lab's
# tunclient.py/tunserver.py write them into their TUN like any packet, and the kernel drops them
# there: for IPv4 as martians (source or destination 0.0.0.0), for IPv6 as unroutable (:: is no
# destination, nor a source it forwards). Harmless to them; tunvpnd never writes them to a TUN.
ANNOUNCE = 1   # source A, destination unspecified: "A is here, at the endpoint this came from"
CHALLENGE = 2  # source unspecified, destination A: "are you still A?"
EXPERIMENTAL = 253  # IPv4 protocol (RFC 3692) of a control packet
NO_NEXT_HEADER = 59  # IPv6 next header of a control packet


def valid(packet: memoryview) -> int:
    """The IP version (4 or 6) if `packet` is exactly one well-formed IP packet, else 0.

    Exact means the header's length field accounts for every byte: a truncated packet, or
    trailing junk after one, is not a packet we will hand to the kernel.
    """
    n = len(packet)
    if n < IPV4_HEADER:
        return 0
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < IPV4_HEADER or ihl > n or (packet[2] << 8 | packet[3]) != n:
            return 0
        return 4
    if version == 6:
        if n < IPV6_HEADER or IPV6_HEADER + (packet[4] << 8 | packet[5]) != n:
            return 0
        return 6
    return 0


def source(packet: memoryview, version: int) -> int:
    if version == 4:
        return int.from_bytes(packet[12:16], "big")
    return int.from_bytes(packet[8:24], "big")


def destination(packet: memoryview, version: int) -> int:
    if version == 4:
        return int.from_bytes(packet[16:20], "big")
    return int.from_bytes(packet[24:40], "big")


def control(packet: memoryview, version: int) -> int:
    """ANNOUNCE or CHALLENGE for a valid header-only packet (len == HEADER_ONLY[version]) that
    is one, else 0 (an ordinary packet)."""
    if version == 4:
        if packet[0] != 0x45 or packet[9] != EXPERIMENTAL:
            return 0
    elif packet[6] != NO_NEXT_HEADER:
        return 0
    src, dst = source(packet, version), destination(packet, version)
    if src and not dst:
        return ANNOUNCE
    if dst and not src:
        return CHALLENGE
    return 0


def announce(version: int, address: int) -> bytes:
    """The ANNOUNCE packet for our tunnel address `address`."""
    return _header_only(version, address, 0)


def challenge(version: int, address: int) -> bytes:
    """The CHALLENGE packet asking whoever holds `address` to answer."""
    return _header_only(version, 0, address)


def _header_only(version: int, src: int, dst: int) -> bytes:
    if version == 6:
        return (bytes((0x60, 0, 0, 0, 0, 0, NO_NEXT_HEADER, 64))
                + src.to_bytes(16, "big") + dst.to_bytes(16, "big"))
    header = bytearray((0x45, 0, 0, IPV4_HEADER, 0, 0, 0, 0, 64, EXPERIMENTAL, 0, 0))
    header += src.to_bytes(4, "big") + dst.to_bytes(4, "big")
    total = sum(header[i] << 8 | header[i + 1] for i in range(0, IPV4_HEADER, 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    header[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(header)


def version_of(packet: memoryview) -> int:
    """The version of a packet the kernel gave us (trusted), or 0 if it is too short to route."""
    n = len(packet)
    if n >= IPV4_HEADER:
        version = packet[0] >> 4
        if version == 4 or (version == 6 and n >= IPV6_HEADER):
            return version
    return 0


def describe(packet: memoryview) -> str:
    """'src --> dst' for log lines (slow path only)."""
    version = version_of(packet)
    if not version:
        return f"<{len(packet)} bytes, not IP>"
    address = IPv4Address if version == 4 else IPv6Address
    return f"{address(source(packet, version))} --> {address(destination(packet, version))}"
