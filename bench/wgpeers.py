"""Fake WireGuard peers for the server-scale bench: run inside a lab host namespace.

    python wgpeers.py < CONFIG.json

CONFIG (test keys only): {"mode": "connect" | "flood", "server": [ip, port],
"server_public": hex, "private_keys": FILE (one hex private key a line), "target": the
server's tunnel address, "inner": [inner address of each key, ...], ...}. Built on
tunvpnd.wireguard's noise.py, keypair.py and cookie.py, as tests/wgpeer.py is.

connect: every key does a real handshake with the server (initiation, response), then sends
  one ICMP echo request from its inner address to `target` through its new keypair (which
  confirms the keypair on the server), waits for the echo reply through the tunnel, and
  answers it with a keepalive (what a WireGuard peer does after data, so the server's timers
  stay quiet). At most `rate` initiations a second (below the server's "under load"
  threshold, so no cookies are needed) and `window` handshakes in flight; a handshake that
  got no answer in 2 s is retried, at most 3 times. Prints {"connected": N, ...}; exit 0 when
  every key is connected.

flood: handshakes as fast as the server completes them, for `seconds` (and at most `max`
  initiations): initiations are made beforehand (round robin over the keys, TAI64N
  increasing), sent from one UDP socket per address in `sources` (the harness adds those
  addresses to the namespace), each socket paced at `per_source` a second (the server's
  per-source rate limit under load is 20/s). An initiation answered by a cookie reply is sent
  again at once with mac2 from that cookie. After the time is up, every response is checked
  with consume_response (mac1, the handshake's AEAD fields): only authentic ones count.
  Prints {"completed": N, "per_second": ..., "cookie_replies": ..., ...}.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.ipcraft import icmp_echo  # noqa: E402
from tunvpnd.wireguard import noise  # noqa: E402
from tunvpnd.wireguard.cookie import (  # noqa: E402
    CookieGenerator,
    _xaead_open,
    cookie_key,
    mac1_key,
    write_macs,
)

TYPE_RESPONSE, TYPE_COOKIE, TYPE_TRANSPORT = 2, 3, 4
KEY_REUSE = 0.05             # flood: a key's initiations at least this far apart (the
                             # server refuses a second one within 20 ms of the last)
TAI64N_STEP = 0.02           # and their timestamps this far apart (TAI64N is whitened to
                             # ~16.8 ms: closer ones would be replays)
RETRY_AFTER = 2.0
RETRIES = 3
ICMP_REPLY = 0


def load_keys(cfg: dict) -> list[noise.StaticIdentity]:
    lines = Path(cfg["private_keys"]).read_text().split()
    return [noise.StaticIdentity(bytes.fromhex(line)) for line in lines]


def receiver_of(data: bytes) -> int:
    """Our index a message from the server is for: a response has its own sender index
    first; cookie replies and transport messages start with the receiver's."""
    at = 8 if data[0] == TYPE_RESPONSE else 4
    return int.from_bytes(data[at:at + 4], "little")


class Handshake:
    """One key's state in `connect`."""

    def __init__(self, n: int, identity: noise.StaticIdentity, server: noise.Peer,
                 inner: str) -> None:
        self.n, self.identity, self.server, self.inner = n, identity, server, inner
        self.cookies = CookieGenerator(server.public_key)
        self.initiation: noise.Initiation | None = None
        self.keypair = None
        self.sent_at = 0.0
        self.tries = 0
        self.done = False

    def initiate(self, index: int) -> bytes:
        self.keypair = None
        self.initiation = noise.Initiation.create(self.identity, self.server, index,
                                                  time.time())
        message = bytearray(self.initiation.message)
        self.cookies.write_macs(message, time.monotonic())   # mac2 once we have a cookie
        self.tries += 1
        self.sent_at = time.monotonic()
        return bytes(message)


def connect(cfg: dict, sock: socket.socket) -> dict:
    identities = load_keys(cfg)
    server_addr = tuple(cfg["server"])
    public = bytes.fromhex(cfg["server_public"])
    peers = [Handshake(n, identity, noise.Peer(public), cfg["inner"][n])
             for n, identity in enumerate(identities)]
    todo = deque(peers)
    flight: dict[int, Handshake] = {}     # our sender index -> handshake in flight
    interval = 1.0 / cfg.get("rate", 80)
    window = cfg.get("window", 16)
    deadline = time.monotonic() + cfg.get("timeout", 120)
    next_send = time.monotonic()
    failed, cookies, echoes = 0, 0, 0
    index = 1 << 20
    while (todo or flight) and time.monotonic() < deadline:
        now = time.monotonic()
        for key, hs in list(flight.items()):      # no answer: retry or give up
            if now - hs.sent_at > RETRY_AFTER:
                del flight[key]
                if hs.tries < RETRIES:
                    todo.appendleft(hs)
                else:
                    failed += 1
        if todo and len(flight) < window and now >= next_send:
            hs = todo.popleft()
            index += 1
            sock.sendto(hs.initiate(index), server_addr)
            flight[index] = hs
            next_send = max(now, next_send) + interval
            continue
        wait = max(0.0, min(next_send - now, 0.05)) if todo else 0.05
        if not select.select([sock], [], [], wait)[0]:
            continue
        data = sock.recv(65535)
        if len(data) < 32:
            continue
        hs = flight.get(receiver_of(data))
        if hs is None:
            continue
        if data[0] == TYPE_COOKIE:          # the server is under load: again, with mac2
            cookies += 1
            if hs.cookies.consume_reply(data, time.monotonic()):
                del flight[receiver_of(data)]
                todo.appendleft(hs)
        elif data[0] == TYPE_RESPONSE and hs.keypair is None:
            try:
                hs.keypair = hs.initiation.consume_response(data, time.monotonic())
            except noise.HandshakeError:
                continue
            request = icmp_echo(hs.inner, cfg["target"], ident=hs.n & 0xFFFF,
                                data=b"tunvpnd-bench")
            sock.sendto(hs.keypair.seal(request), server_addr)
            hs.sent_at = time.monotonic()
        elif data[0] == TYPE_TRANSPORT and hs.keypair is not None:
            opened = hs.keypair.open(data)
            if opened is None or not opened[1] or opened[1][20] != ICMP_REPLY:
                continue
            echoes += 1
            sock.sendto(hs.keypair.seal(b""), server_addr)       # the passive keepalive
            hs.done = True
            del flight[receiver_of(data)]
    connected = sum(hs.done for hs in peers)
    return {"connected": connected, "of": len(peers), "failed": failed,
            "cookie_replies": cookies, "echo_replies": echoes}


def flood(cfg: dict) -> dict:
    identities = load_keys(cfg)
    server_addr = tuple(cfg["server"])
    public = bytes.fromhex(cfg["server_public"])
    seconds, limit = cfg["seconds"], cfg["max"]
    socks = []
    for address in cfg["sources"]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, 0))
        sock.setblocking(False)
        socks.append(sock)
    per_source = cfg["per_source"]
    rate = min(len(socks) * per_source, len(identities) / KEY_REUSE, limit / seconds)
    count = min(limit, int(rate * seconds))
    # made beforehand: the client's DH work must not be what is measured
    servers = [noise.Peer(public) for _ in identities]
    base = time.time()
    made: list[noise.Initiation] = []
    for i in range(count):
        k, r = i % len(identities), i // len(identities)
        made.append(noise.Initiation.create(identities[k], servers[k], i, base + r * TAI64N_STEP))
    key1, key_cookie = mac1_key(public), cookie_key(public)
    cookie: list[bytes | None] = [None] * len(socks)   # per source: cookies are bound to it
    by_fd = {s.fileno(): n for n, s in enumerate(socks)}
    sent_by: dict[int, int] = {}        # initiation -> socket it went out of
    responses: dict[int, bytes] = {}
    cookie_replies = resent = 0

    def send(j: int, n: int) -> bool:
        message = bytearray(made[j].message)
        if cookie[n] is not None:
            write_macs(message, key1, cookie[n])
        try:
            socks[n].sendto(message, server_addr)
        except BlockingIOError:
            return False
        return True

    poller = select.epoll()
    for sock in socks:
        poller.register(sock, select.EPOLLIN)
    started = time.monotonic()
    gap = 1.0 / rate                    # round robin over the sockets
    next_send, i = started, 0
    end = started + seconds
    while time.monotonic() < end:
        now = time.monotonic()
        while i < count and now >= next_send:
            n = i % len(socks)
            send(i, n)
            sent_by[i] = n
            i += 1
            next_send += gap
        for fd, _ in poller.poll(max(0.0, min(next_send, end) - time.monotonic())):
            sock = socks[by_fd[fd]]
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                if len(data) < 32:
                    continue
                j = receiver_of(data)
                if j not in sent_by:
                    continue
                if data[0] == TYPE_RESPONSE:
                    responses.setdefault(j, data)
                elif data[0] == TYPE_COOKIE and len(data) == 64:
                    cookie_replies += 1
                    value = _xaead_open(key_cookie, data[8:32], data[32:64],
                                        made[j].message[-32:-16])   # bound to its mac1
                    if value is not None:
                        n = sent_by[j]
                        cookie[n] = value
                        resent += send(j, n)    # not accepted: its timestamp is still new
    elapsed = time.monotonic() - started
    completed = 0
    for j, data in responses.items():          # authentic responses only
        try:
            made[j].consume_response(data, time.monotonic())
            completed += 1
        except noise.HandshakeError:
            pass
    for sock in socks:
        sock.close()
    return {"completed": completed, "per_second": completed / elapsed, "sent": i,
            "offered_per_second": i / elapsed, "responses": len(responses),
            "cookie_replies": cookie_replies, "resent_with_mac2": resent,
            "seconds": elapsed, "sources": len(socks), "keys": len(identities)}


def main() -> int:
    cfg = json.loads(sys.stdin.read())
    if cfg["mode"] == "connect":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        result = connect(cfg, sock)
        ok = result["connected"] == result["of"]
    else:
        result = flood(cfg)
        ok = result["completed"] > 0
    print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
