"""The least a Python tunnel can do: the benchmark's measure of what CPython itself costs.

A packet read from the TUN leaves as one UDP datagram; a datagram received is written to the
TUN. No checks, counters, timers, batching or offloads: not something to run, a floor. Where
tunvpnd and this floor differ, tunvpnd's own work is to blame; where this floor is behind a C
tunnel, the interpreter is (each wake-up from idle runs cold Python code).

    pyfloor.py IFNAME LOCAL_PORT                  # server: answers whoever wrote last
    pyfloor.py IFNAME 0 REMOTE_HOST REMOTE_PORT   # client

The harness sets the interface's address, MTU, link state and routes with `ip`.
"""

from __future__ import annotations

import os
import select
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tunvpnd.tun import open_tun  # noqa: E402

BUFFERS = 4 << 20  # as tunvpnd's socket, so both lose nothing to a small buffer


def main(argv: list[str]) -> None:
    tun, _ = open_tun(argv[0])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, BUFFERS)
    sock.bind(("", int(argv[1])))
    peer = (argv[2], int(argv[3])) if len(argv) > 2 else None
    if peer:
        sock.connect(peer)
    sock.setblocking(False)
    buf = bytearray(65536)
    view, bufs = memoryview(buf), [buf]
    poller = select.epoll()
    poller.register(tun, select.EPOLLIN)
    poller.register(sock, select.EPOLLIN)
    sock_fd, readv, write = sock.fileno(), os.readv, os.write
    print("ready", flush=True)
    while True:
        for fd, _ in poller.poll(-1, 2):
            try:
                if fd == sock_fd:
                    n, peer = sock.recvfrom_into(buf)
                    write(tun, view[:n])
                else:
                    n = readv(tun, bufs)
                    if peer is not None:  # else nobody to send to yet: dropped
                        sock.sendto(view[:n], peer)
            except OSError:  # EAGAIN, a full buffer, ICMP errors: this floor drops the packet
                pass


if __name__ == "__main__":
    main(sys.argv[1:])
