"""Hand-made IP packets for tests: exact bytes, no scapy."""

import socket
import struct
from ipaddress import IPv4Address, IPv6Address


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, payload: bytes = b"", proto: int = 17, ttl: int = 64,
         ident: int = 1) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, ttl, proto, 0,
                         IPv4Address(src).packed, IPv4Address(dst).packed)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def ipv6(src: str, dst: str, payload: bytes = b"", next_header: int = 17) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
                         IPv6Address(src).packed, IPv6Address(dst).packed)
    return header + payload


def icmp_echo(src: str, dst: str, ident: int = 1, seq: int = 1, data: bytes = b"x" * 32) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ipv4(src, dst, body, proto=socket.IPPROTO_ICMP)


def announce(address: str) -> bytes:
    """tunvpnd's plain-wire ANNOUNCE: a bare header from `address` to the unspecified address."""
    if ":" in address:
        return ipv6(address, "::", next_header=59)
    return ipv4(address, "0.0.0.0", proto=253, ident=0)


def challenge(address: str) -> bytes:
    """tunvpnd's plain-wire CHALLENGE: a bare header from the unspecified address to `address`."""
    if ":" in address:
        return ipv6("::", address, next_header=59)
    return ipv4("0.0.0.0", address, proto=253, ident=0)
