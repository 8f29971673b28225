"""What crosses the wire: count the UDP frames of one port on a lab interface, by kind, and
how many of them carry a byte pattern in clear. The demo runs it on the VPN server's eth0
while it pings with that pattern, to show what an observer on the path sees:

    python -m tunvpnd.lab sniff IFNAME PORT HEXPATTERN    (until SIGTERM/SIGINT, at most 120 s)

It prints "capturing on IFNAME" once it listens, and one JSON line with the counts when it
stops. Only frames are counted, nothing is kept; a frame may be a UDP GSO/GRO batch of several
datagrams (then its first one gives the kind).
"""

from __future__ import annotations

import json
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
MAX_SECONDS = 120.0   # bounded even if nobody stops it
# WireGuard message types (the first byte, then three zero bytes)
WG_KINDS = {1: "initiation", 2: "response", 3: "cookie", 4: "transport"}


def classify(payload: bytes) -> str:
    """The kind of a UDP payload: a WireGuard message type, an IPv4/IPv6 packet, or other."""
    if len(payload) >= 4 and payload[1:4] == b"\0\0\0" and payload[0] in WG_KINDS:
        return WG_KINDS[payload[0]]
    if payload and payload[0] >> 4 == 4:
        return "ipv4"
    if payload and payload[0] >> 4 == 6:
        return "ipv6"
    return "other"


def udp_payload(frame: bytes, port: int) -> bytes | None:
    """The UDP payload of an Ethernet/IPv4 frame to or from `port`; None for anything else."""
    if len(frame) < 14 + 20 + 8 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[14 + 9] != socket.IPPROTO_UDP or len(frame) < 14 + ihl + 8:
        return None
    sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
    if port not in (sport, dport):
        return None
    return frame[14 + ihl + 8:]


def sniff(ifname: str, port: int, pattern: bytes) -> dict[str, int]:
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _frame: stop.append(number))
    counts = {"frames": 0, "with_pattern": 0}
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((ifname, ETH_P_ALL))  # bound with its protocol: nothing from other links
        print(f"capturing on {ifname}", flush=True)
        deadline = time.monotonic() + MAX_SECONDS
        while not stop and time.monotonic() < deadline:
            try:
                ready, _, _ = select.select([sock], [], [], 0.2)
            except InterruptedError:
                continue
            if not ready:
                continue
            payload = udp_payload(sock.recv(65536 + 14), port)
            if payload is None:
                continue
            counts["frames"] += 1
            kind = classify(payload)
            counts[kind] = counts.get(kind, 0) + 1
            if pattern in payload:
                counts["with_pattern"] += 1
    return counts


def main(argv: Sequence[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m tunvpnd.lab sniff IFNAME PORT HEXPATTERN", file=sys.stderr)
        return 64
    try:
        counts = sniff(argv[0], int(argv[1]), bytes.fromhex(argv[2]))
    except (OSError, ValueError) as e:
        print(f"sniff: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(counts), flush=True)
    return 0
