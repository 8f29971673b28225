"""Just enough IP header reading for a tunnel: is it a whole IP packet, and who is it from and to.

Addresses are returned as integers so the peer table can do longest-prefix matching with
shifts and dict look-ups, without building ipaddress objects per packet.
"""

from ipaddress import IPv4Address, IPv6Address

IPV4_HEADER = 20
IPV6_HEADER = 40


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
