"""A TCP echo server and client, run inside lab namespaces to prove TCP crosses the tunnel:

    python -m tunvpnd.lab echo-server PORT | echo-client HOST PORT NBYTES
"""

from __future__ import annotations

import errno
import random
import socket
import sys
import threading
import time
from collections.abc import Sequence


def echo_server(port: int, once: bool = True, timeout: float = 60.0) -> int:
    # IPv4 and IPv6 at once where the host has IPv6 (tests echo over both inside the tunnel)
    if socket.has_dualstack_ipv6():
        srv, where = socket.create_server(("::", port), family=socket.AF_INET6,
                                          dualstack_ipv6=True), f"[::]:{port}"
    else:
        srv, where = socket.create_server(("0.0.0.0", port)), f"0.0.0.0:{port}"
    with srv:
        srv.settimeout(timeout)
        print(f"listening on {where}", flush=True)
        while True:
            conn, peer = srv.accept()
            total = 0
            with conn:
                conn.settimeout(timeout)
                while data := conn.recv(65536):
                    conn.sendall(data)
                    total += len(data)
            host = peer[0].removeprefix("::ffff:")  # an IPv4 client of the dual-stack socket
            print(f"echoed {total} bytes to {host}:{peer[1]}", flush=True)
            if once:
                return 0


def echo_client(host: str, port: int, nbytes: int, timeout: float = 30.0) -> int:
    payload = random.randbytes(nbytes)
    received = bytearray()
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sender_error: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                sender_error.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while data := sock.recv(65536):
            received += data
        sender.join(timeout)
    elapsed = time.monotonic() - t0
    if sender_error:
        print(f"send failed: {sender_error[0]}", flush=True)
        return 1
    if bytes(received) != payload:
        print(f"MISMATCH: sent {nbytes} bytes, got back {len(received)} bytes"
              f"{' (same length, different content)' if len(received) == nbytes else ''}",
              flush=True)
        return 1
    print(f"sent {nbytes} bytes to {host}:{port}, {len(received)} bytes echoed back "
          f"identical in {elapsed:.2f}s", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) == 2 and args[0] == "echo-server":
            return echo_server(int(args[1]))
        if len(args) == 4 and args[0] == "echo-client":
            return echo_client(args[1], int(args[2]), int(args[3]))
    except OSError as e:
        print(f"{args[0]}: {e}", file=sys.stderr, flush=True)
        return 1 if e.errno != errno.ECONNREFUSED else 2
    print("usage: python -m tunvpnd.lab echo-server PORT | echo-client HOST PORT NBYTES",
          file=sys.stderr)
    return 64
