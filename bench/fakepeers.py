"""Make a learning tunvpnd server know COUNT more peers: run inside a lab host namespace.

    python fakepeers.py SERVER_IP PORT TARGET_IP COUNT

Each fake peer is one UDP socket (its own source port) that sends one ICMP echo request from its
own inner address (192.168.100.1, .2, ... .250, 192.168.101.1, ...: inside the server's /16) to
TARGET_IP, the server's tunnel address. The server learns the peer from that datagram, and the
echo reply its kernel sends back travels to the peer through the tunnel, which proves it was
learned. Prints "sent N replies M"; exits 0 when every peer got its reply.
"""

from __future__ import annotations

import select
import socket
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.ipcraft import icmp_echo  # noqa: E402  (the repo's one packet crafter)

BATCH = 100                  # sockets open at once
REPLY_WAIT = 3.0             # seconds to wait for a batch's replies


def inner_source(n: int) -> IPv4Address:
    return IPv4Address(f"192.168.{100 + n // 250}.{1 + n % 250}")


def main(server: str, port: int, target: str, count: int) -> int:
    replies = 0
    for first in range(0, count, BATCH):
        socks = {}
        try:
            for n in range(first, min(first + BATCH, count)):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.sendto(icmp_echo(str(inner_source(n)), target, ident=n & 0xFFFF,
                                      data=b"tunvpnd-bench"), (server, port))
                socks[sock.fileno()] = sock
            waiting = set(socks)
            deadline = time.monotonic() + REPLY_WAIT
            while waiting and (left := deadline - time.monotonic()) > 0:
                for fd in select.select(list(waiting), [], [], left)[0]:
                    data = socks[fd].recv(2048)
                    if len(data) >= 28 and data[20] == 0:         # ICMP echo reply
                        replies += 1
                        waiting.discard(fd)
        finally:
            for sock in socks.values():
                sock.close()
    print(f"sent {count} replies {replies}", flush=True)
    return 0 if replies == count else 1


if __name__ == "__main__":
    if len(sys.argv) != 5:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        sys.exit(64)
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
