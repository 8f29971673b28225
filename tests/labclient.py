"""A client in the style of the lab's tunclient.py: a bare UDP socket carrying IP packets.

    python -m tests.labclient ADDRESS... [--send N] [--every S] [--mute] [--limit S]

It has no TUN: it sends N ICMP echo requests from each ADDRESS to HostV (0 = until stopped),
one every S seconds, and answers every echo request for one of its addresses (unless --mute),
so HostV's `ping ADDRESS` succeeds exactly when the server delivers to this socket. Like the
lab's scripts it cannot answer tunvpnd's CHALLENGE. It prints "ready PORT" once bound; when its
stdin closes (or after --limit seconds) it prints what it received and exits.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import sys
import time
from ipaddress import IPv4Address

from tests.ipcraft import checksum, icmp_echo, ipv4

HOSTV = "192.168.60.5"


def echo_reply(request: bytes) -> bytes:
    """The ICMP echo reply to an IPv4 echo request (20-byte header)."""
    body = b"\0\0\0\0" + request[24:]
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ipv4(str(IPv4Address(request[16:20])), str(IPv4Address(request[12:16])), body,
                proto=socket.IPPROTO_ICMP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("addresses", nargs="+")
    parser.add_argument("--server", default="10.9.0.11")
    parser.add_argument("--send", type=int, default=0)
    parser.add_argument("--every", type=float, default=0.2)
    parser.add_argument("--mute", action="store_true")
    parser.add_argument("--limit", type=float, default=60.0)
    args = parser.parse_args(argv)
    ours = {IPv4Address(a).packed for a in args.addresses}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((args.server, 9090))
    print("ready", sock.getsockname()[1], flush=True)
    seen = {"datagrams": 0, "echo_requests": 0, "echo_replies": 0, "answered": 0}
    sent, next_send, seq = 0, time.monotonic(), 0
    end = time.monotonic() + args.limit
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_send and (args.send == 0 or sent < args.send):
            seq += 1
            for address in args.addresses:
                sock.send(icmp_echo(address, HOSTV, ident=4242, seq=seq))
            sent += 1
            next_send = now + args.every
        ready, _, _ = select.select([sock, sys.stdin], [], [], 0.05)
        if sys.stdin in ready and not sys.stdin.readline():
            break
        if sock not in ready:
            continue
        try:
            data = sock.recv(65535)
        except ConnectionRefusedError:
            continue
        seen["datagrams"] += 1
        if len(data) < 28 or data[0] != 0x45 or data[9] != socket.IPPROTO_ICMP \
                or data[16:20] not in ours:
            continue
        if data[20] == 0:
            seen["echo_replies"] += 1
        elif data[20] == 8:
            seen["echo_requests"] += 1
            if not args.mute:
                sock.send(echo_reply(data))
                seen["answered"] += 1
    print(json.dumps(seen), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
