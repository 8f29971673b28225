"""Hostile input against a working wire: wireguard tunnel, over real sockets in lab namespaces.

The tunvpnd server (10.9.0.11:9090) carries a tunnel HostU <-> HostV; an attacker on a lab host
sends it (1) random datagrams, every message type truncated and over-long, garbage under real
receiver indexes, and initiations with a valid mac1 (for the server's key) from an unknown key
or with garbage fields: each is dropped and counted by its reason in STATUS, and pings through
the tunnel keep working during and after. (3) A flood of initiations with a valid mac1 from
128 source addresses: the server goes under load and answers with cookie replies (the attacker
receives and authenticates them at every address), ping keeps working, and the daemon's CPU
per flood datagram stays well below one Diffie-Hellman's. (4) While the server is under that
load, wireguard-go's initiation gets a cookie reply, its retransmission carries mac2 and
completes the handshake. (Replay and not_allowed are in test_wgtunnel.py.)

The attacker, the sniffer and the flooder are this module run as a script in a namespace:
`python -m tests.test_wghostile MODE` with a JSON object on stdin (they print "ready", maybe
"loaded", then one JSON line; closing their stdin ends them early). Every loop is bounded.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, in_ns, ping
from tests.test_wgtunnel import (
    HOSTV,
    Keys,
    client_text,
    needs_wg,
    server_text,
)
from tunvpnd.lab import wait_until
from tunvpnd.wireguard import cookie, noise
from tunvpnd.wireguard import keys as wgkeys
from tunvpnd.wireguard.device import UNDER_LOAD_HANDSHAKES_PER_SECOND, Device

SERVER = ("10.9.0.11", 9090)
FLOOD_NET = "10.99.0"           # the flooder's source addresses, routed to hostu2
FLOOD_SOURCES = 128
T1, T2, T3, T4 = (bytes((t, 0, 0, 0)) for t in (1, 2, 3, 4))
MAX_UDP = 65507

# --- the scripts run in the namespaces ----------------------------------------------------------


def _lines_done(stdin_fd: int) -> bool:
    """Whether our stdin was closed (the test says stop)."""
    ready, _, _ = select.select([stdin_fd], [], [], 0)
    return bool(ready) and not os.read(stdin_fd, 4096)


def _capture_socket(ifname: str = "eth0") -> socket.socket:
    # ETH_P_ALL: only such sockets see outgoing packets too
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    raw.bind((ifname, 3))
    return raw


def _udp_payload(frame: bytes, port: int) -> tuple[bytes, int] | None:
    """(payload, the other side's port) of an IPv4 UDP packet to or from `port`, else None."""
    if len(frame) < 28 or frame[0] >> 4 != 4 or frame[9] != socket.IPPROTO_UDP:
        return None
    ihl = (frame[0] & 15) * 4
    sport, dport = struct.unpack_from("!HH", frame, ihl)
    if port not in (sport, dport):
        return None
    return frame[ihl + 8:], sport if dport == port else dport


def attack(cfg: dict) -> dict:
    """Send cfg["datagrams"] (hex) to the server from one socket, `gap` s apart. One with
    "index_at" gets the server's receiver index for the real client written there (read off
    one transport datagram the client sends: run in the client's host), and its mac1 made
    anew if "mac1"."""
    index = None
    mac1_key = cookie.mac1_key(bytes.fromhex(cfg["server_public"]))
    if any(d["index_at"] is not None for d in cfg["datagrams"]):
        raw = _capture_socket()
        raw.settimeout(20)
        print("ready", flush=True)
        while index is None:
            frame, (_, proto, kind, *_rest) = raw.recvfrom(65536)
            got = _udp_payload(frame, SERVER[1]) if kind == socket.PACKET_OUTGOING else None
            if got and got[0][:4] == T4:
                index = got[0][4:8]
        raw.close()
    else:
        print("ready", flush=True)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    for spec in cfg["datagrams"]:
        data = bytearray.fromhex(spec["hex"])
        at = spec["index_at"]
        if at is not None:
            data[at:at + 4] = index
            if spec["mac1"]:
                cookie.write_macs(data, mac1_key, None)
        udp.sendto(data, tuple(cfg["target"]))
        sent += 1
        time.sleep(cfg["gap"])
    return {"sent": sent, "index": index.hex() if index else None}


def flood(cfg: dict) -> dict:
    """Initiations with a valid mac1 for cfg["server_public"] (a wrong one unless "mac1") and
    garbage fields, round robin
    from one socket per source address, `rate` a second (0: as fast as it goes), at most
    `count` and `duration` s (with "period": in bursts of rate * period sent at full speed,
    every period s); every reply is read and cookie replies authenticated (XChaCha20-
    Poly1305 with the server's cookie key, the mac1 we sent as associated data)."""
    public = bytes.fromhex(cfg["server_public"])
    mac1_key, cookie_key = cookie.mac1_key(public), cookie.cookie_key(public)
    socks = []
    for address in cfg["sources"]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, 0))
        sock.connect(tuple(cfg["target"]))
        sock.setblocking(False)
        socks.append(sock)
    poller = select.epoll()
    for sock in socks:
        poller.register(sock.fileno(), select.EPOLLIN)
    by_fd = {sock.fileno(): i for i, sock in enumerate(socks)}
    stdin_fd = sys.stdin.fileno()
    template = bytearray(os.urandom(noise.INITIATION_SIZE))
    template[:4] = T1
    mac1s: dict[int, bytes] = {}            # sender index -> (source, mac1)
    count, rate, duration = cfg["count"], cfg["rate"], cfg["duration"]
    sent = send_errors = replies = valid = other = 0
    cookies_at = collections.Counter()
    first_cookie = None
    print("ready", flush=True)
    started = time.monotonic()
    last_sent = started
    stopped = False
    while True:
        now = time.monotonic()
        if not stopped:
            if rate == 0:
                due = count
            elif "period" in cfg:               # bursts of rate * period at full speed
                burst = int(rate * cfg["period"])
                due = min(count, (int((now - started) / cfg["period"]) + 1) * burst)
            else:
                due = min(count, int((now - started) * rate) + 1)
            burst = 0
            while sent < due and burst < 64:
                source = sent % len(socks)
                template[4:8] = struct.pack("<I", sent)
                if cfg["mac1"]:
                    cookie.write_macs(template, mac1_key, None)
                mac1s[sent] = (source, bytes(template[116:132]))
                try:
                    socks[source].send(template)
                except OSError:
                    send_errors += 1
                sent += 1
                burst += 1
            last_sent = now
            if sent >= count or now - started >= duration or _lines_done(stdin_fd):
                stopped = True
        elif now - last_sent > cfg.get("linger", 0.5) or _lines_done(stdin_fd):
            break
        for fd, _ in poller.poll(0 if not stopped and sent < count else 0.1):
            sock = socks[by_fd[fd]]
            for _ in range(64):
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                replies += 1
                if len(data) != cookie.COOKIE_REPLY_SIZE or data[:4] != T3:
                    other += 1
                    continue
                receiver = struct.unpack_from("<I", data, 4)[0]
                source, mac1 = mac1s.get(receiver, (None, b""))
                if source != by_fd[fd]:
                    other += 1
                    continue
                if cookie._xaead_open(cookie_key, data[8:32], data[32:64], mac1) is None:
                    other += 1
                    continue
                valid += 1
                cookies_at[source] += 1
                if first_cookie is None:
                    first_cookie = time.monotonic() - started
                    print("loaded", flush=True)
        if rate and not stopped and sent < count and (sent >= due or "period" not in cfg):
            time.sleep(min(0.005, max(0.0, started + sent / rate - time.monotonic())))
    return {"sent": sent, "send_errors": send_errors, "replies": replies, "cookies": valid,
            "other": other, "addresses_with_cookies": len(cookies_at),
            "first_cookie_after": first_cookie, "seconds": last_sent - started}


def sniff(cfg: dict) -> dict:
    """Every UDP datagram to or from cfg["port"] on eth0 until stdin closes (or `duration`):
    [seconds, "in"/"out", message type, length, mac2 non-zero (initiations)]."""
    raw = _capture_socket()
    raw.settimeout(0.1)
    stdin_fd = sys.stdin.fileno()
    seen = []
    print("ready", flush=True)
    started = time.monotonic()
    while time.monotonic() - started < cfg["duration"] and not _lines_done(stdin_fd):
        try:
            frame, (_, _proto, kind, *_rest) = raw.recvfrom(65536)
        except TimeoutError:
            continue
        got = _udp_payload(frame, cfg["port"])
        if got is None or kind not in (socket.PACKET_HOST, socket.PACKET_OUTGOING):
            continue
        payload = got[0]
        seen.append([round(time.monotonic() - started, 3),
                     "out" if kind == socket.PACKET_OUTGOING else "in", payload[0],
                     len(payload), payload[0] == 1 and payload[-16:] != bytes(16)])
    return {"seen": seen}


MODES = {"attack": attack, "flood": flood, "sniff": sniff}

# --- helpers for the tests --------------------------------------------------------------------


class Script:
    """One of the MODES running in a lab host: started, read, ended by its PID."""

    def __init__(self, lab, role: str, mode: str, cfg: dict) -> None:
        self.proc = lab.spawn(role, [sys.executable, "-m", "tests.test_wghostile", mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=str(REPO))
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        self.expect("ready")

    def expect(self, line: str) -> None:
        got = self.proc.stdout.readline().strip()
        if got != line:
            self.proc.kill()
            raise AssertionError(f"wanted {line!r}, got {got!r}: {self.proc.stderr.read()}")

    def result(self, timeout: float = 30) -> dict:
        """Close its stdin (stop), and its JSON line."""
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.stdin = None          # communicate() must not touch it again
        out, err = self.proc.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert self.proc.returncode == 0 and lines, err
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@contextlib.contextmanager
def script(lab, role: str, mode: str, cfg: dict):
    running = Script(lab, role, mode, cfg)
    try:
        yield running
    finally:
        running.kill()


def drops(status: str) -> collections.Counter:
    """The drop reasons in a STATUS line: 'dropped 5 (bad_size 3, replay 2)'."""
    found = re.search(r"dropped \d+ \(([^)]*)\)", status)
    counts = collections.Counter()
    for item in found.group(1).split(", ") if found else ():
        reason, count = item.rsplit(" ", 1)
        counts[reason] = int(count)
    return counts


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def ping_stats(result: subprocess.CompletedProcess) -> tuple[int, int, float, float]:
    """(sent, received, avg ms, max ms) from ping's summary."""
    counts = re.search(r"(\d+) packets transmitted, (\d+) received", result.stdout)
    times = re.search(r"= [\d.]+/([\d.]+)/([\d.]+)/", result.stdout)
    avg, most = (float(times.group(1)), float(times.group(2))) if times else (0.0, 0.0)
    return int(counts.group(1)), int(counts.group(2)), avg, most


def working_tunnel(lab, daemons, sockdir, keys: Keys | None = None):
    keys = keys or Keys(sockdir)
    server = daemons(lab, "server", server_text(keys))
    client = daemons(lab, "hostu", client_text(keys), name="client")
    ping(lab, "hostu", HOSTV, count=2)
    server.wait_status(lambda s: "hostu up, handshake" in s)
    return keys, server, client


def still_fine(lab, daemon) -> None:
    assert daemon.proc.poll() is None, daemon.log()
    assert "Traceback" not in daemon.log()
    ping(lab, "hostu", HOSTV, count=3)


# --- (1) garbage of every kind ----------------------------------------------------------------


def hostile_datagrams(rng: random.Random, server_public: bytes
                      ) -> list[tuple[bytes, int | None, str]]:
    """(datagram, where to put the real client's receiver index (None: nowhere), the drop
    reason the server must count)."""
    mac1_key = cookie.mac1_key(server_public)

    def msg(kind: bytes, size: int) -> bytes:
        return (kind + rng.randbytes(max(0, size - 4)))[:size]

    def with_mac1(kind: bytes, size: int) -> bytes:
        data = bytearray(msg(kind, size))
        cookie.write_macs(data, mac1_key, None)
        return bytes(data)

    out = [(b"", None, "bad_size")]
    for kind in (T1, T2, T3, T4):
        out += [(msg(kind, n), None, "bad_size") for n in (1, 3, 4, 8, 31)]
    wrong_sizes = {T1: (147, 149, 296, 1500, MAX_UDP),     # initiation: 148
                   T2: (91, 93, 184, 1500),                # response: 92
                   T3: (63, 65, 128, 1500)}                # cookie reply: 64
    for kind, wrong in wrong_sizes.items():
        out += [(msg(kind, n), None, "bad_size") for n in wrong]      # truncated, over-long
        out += [(with_mac1(kind, n), None, "bad_size") for n in wrong[:2]]
    out += [(msg(T1, 148), None, "bad_mac"), (msg(T2, 92), None, "bad_mac"),
            (msg(T3, 64), None, "no_session"),         # a receiver index nobody has
            (msg(T3, 64), 4, "bad_mac"),             # the client's: no cookie we asked for
            (msg(T4, 32), None, "no_session"), (msg(T4, 1500), None, "no_session"),
            (msg(b"\x01\x01\0\0", 148), None, "bad_size"),   # reserved bytes set
            (msg(b"\x04\0\0\x01", 100), None, "bad_size"),
            (msg(b"\x05\0\0\0", 148), None, "bad_size")]
    # garbage under the real client's receiver index: fails to open, any length
    out += [(msg(T4, n), 4, "bad_mac") for n in (32, 33, 100, 1500, MAX_UDP)]
    # valid mac1: garbage fields, then a real initiation from a key the server does not know,
    # then responses to no initiation of the server's (one under the client's index)
    out += [(with_mac1(T1, 148), None, "bad_handshake") for _ in range(3)]
    for _ in range(3):
        stranger = noise.StaticIdentity(os.urandom(32))
        init = noise.Initiation.create(stranger, noise.Peer(server_public),
                                       rng.getrandbits(32), time.time())
        out.append((init.message, None, "unknown_peer"))
    out += [(with_mac1(T2, 92), None, "no_session"), (with_mac1(T2, 92), 8, "no_session")]
    # random ones: random type bytes and sizes; what each must count as, from its bytes
    for _ in range(200):
        kind = bytes((rng.choice((0, 1, 2, 3, 4, 5, 255, rng.getrandbits(8))),))
        kind += bytes(3) if rng.random() < 0.8 else rng.randbytes(3)
        size = rng.choice((rng.randint(0, 200), rng.choice((148, 92, 64, 32)),
                           rng.randint(200, 2000)))
        data = msg(kind, size)
        out.append((data, None, expected_reason(data)))
    return out


def expected_reason(data: bytes) -> str:
    """What the server counts a datagram of random content as (no valid MAC, no known index)."""
    exact = {T1: noise.INITIATION_SIZE, T2: noise.RESPONSE_SIZE, T3: cookie.COOKIE_REPLY_SIZE}
    kind = data[:4]
    if kind == T4 and len(data) >= 32:
        return "no_session"
    if kind in exact and len(data) == exact[kind]:
        return "no_session" if kind == T3 else "bad_mac"
    return "bad_size"


def test_garbage_of_every_kind_is_dropped_and_counted(lab, daemons, sockdir):
    keys, server, _client = working_tunnel(lab, daemons, sockdir)
    seed = random.randrange(1 << 32)
    datagrams = hostile_datagrams(random.Random(seed), keys.server_pub)
    wanted = collections.Counter(reason for _, _, reason in datagrams)
    before = drops(server.status())
    cfg = {"target": SERVER, "gap": 0.004, "server_public": keys.server_pub.hex(),
           "datagrams": [{"hex": d.hex(), "index_at": at, "mac1": d[:4] in (T1, T2)}
                         for d, at, _ in datagrams]}
    with script(lab, "hostu", "attack", cfg) as attacker:
        ping(lab, "hostu", HOSTV, count=1)      # a transport datagram: its receiver index
        pinger = lab.spawn("hostu", ["ping", "-c", "10", "-i", "0.15", "-W", "2", HOSTV],
                           stdout=subprocess.PIPE, text=True)
        result = attacker.result()
        out, _ = pinger.communicate(timeout=30)
    assert result["sent"] == len(datagrams)
    sent, received, avg, _ = ping_stats(subprocess.CompletedProcess([], 0, out))
    print(f"seed {seed}: {len(datagrams)} hostile datagrams {dict(wanted)}; ping during: "
          f"{received}/{sent}, avg {avg} ms")
    assert received == sent, out

    def counted(status: str) -> bool:
        got = drops(status)
        return all(got[r] - before[r] == n for r, n in wanted.items())

    status = server.wait_status(counted, timeout=20)
    got = drops(status)
    assert sum(got.values()) - sum(before.values()) == len(datagrams), (seed, status)
    assert "cookie_sent" not in got, status     # too few with a valid mac1 to be load
    still_fine(lab, server)
    assert "hostu up, handshake" in server.status()


# --- (3) a flood of initiations from many addresses -------------------------------------------


def flood_sources(lab, role: str = "hostu2", count: int = FLOOD_SOURCES) -> list[str]:
    """`count` addresses on `role`'s eth0, routed to it from the server (torn down with the
    lab's namespaces)."""
    addresses = [f"{FLOOD_NET}.{n}" for n in range(1, count + 1)]
    batch = "".join(f"address add {a}/32 dev eth0\n" for a in addresses)
    result = lab.run(role, ["ip", "-batch", "-"], input=batch)
    assert result.returncode == 0, result.stderr
    in_ns(lab, "server", ["ip", "route", "add", f"{FLOOD_NET}.0/24", "via",
                          lab.addresses[role]])
    return addresses


def dh_costs(samples: int = 200) -> tuple[float, float]:
    """CPU seconds, in this process, of (one X25519 exchange, one initiation through a Device
    that is not under load: mac1 and a DH, what every flood datagram would cost without
    cookies)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    ours = X25519PrivateKey.generate()
    theirs = wgkeys.public_key(os.urandom(32))
    started = time.process_time()
    for _ in range(samples):
        ours.exchange(X25519PublicKey.from_public_bytes(theirs))
    exchange = (time.process_time() - started) / samples
    device = Device(os.urandom(32), wall_offset=time.time())
    mac1_key = cookie.mac1_key(device.public_key)
    messages = []
    for _ in range(min(samples, UNDER_LOAD_HANDSHAKES_PER_SECOND)):
        message = bytearray(os.urandom(noise.INITIATION_SIZE))
        message[:4] = T1
        cookie.write_macs(message, mac1_key, None)
        messages.append(bytes(message))
    started = time.process_time()
    for i, message in enumerate(messages):
        device.receive(message, (f"{FLOOD_NET}.{i % 100 + 1}", 5000), 100.0)
    handshake = (time.process_time() - started) / len(messages)
    assert device.drops["bad_handshake"] == len(messages)      # each one got its DH
    return exchange, handshake


def flood_cpu(lab, server, cfg: dict) -> tuple[dict, float, float, float]:
    """Run one flood from hostu2 while hostu pings HostV through the tunnel: (the flooder's
    result, the daemon's user and system CPU seconds for it, ping's (sent, received, avg,
    max)). The last ping reply comes through the server's socket after every flood datagram,
    so the daemon has handled them all when it is read."""
    before = cpu_seconds(server.pid)
    with script(lab, "hostu2", "flood", cfg) as flooder:
        pinger = lab.spawn("hostu", ["ping", "-c", str(int(cfg["duration"] * 10)), "-i", "0.1",
                                     "-W", "1", HOSTV], stdout=subprocess.PIPE, text=True)
        out, _ = pinger.communicate(timeout=30)
        result = flooder.result()
    ping(lab, "hostu", HOSTV, count=1)
    (user, system), (user0, system0) = cpu_seconds(server.pid), before
    user, system = user - user0, system - system0
    return result, user, system, ping_stats(subprocess.CompletedProcess([], 0, out))


@pytest.mark.parametrize("lab", [1], indirect=True)
def test_initiation_flood_gets_cookie_replies_and_the_tunnel_keeps_working(lab, daemons,
                                                                           sockdir):
    """128 sources, 3,000 initiations a second with a valid mac1: the server is under load
    after the first 100 and answers every later one with a cookie reply, no DH. The CPU that
    costs is measured against a flood of the same size and rate with a wrong mac1 (dropped
    at once): the difference is the cookie work per datagram, well below the Device's DH
    path (mac1 + X25519 + AEAD) measured here."""
    keys, server, _client = working_tunnel(lab, daemons, sockdir)
    sources = flood_sources(lab)
    before = drops(server.status())
    rate, seconds = 3000, 2.0
    cfg = {"target": SERVER, "sources": sources, "server_public": keys.server_pub.hex(),
           "count": int(rate * seconds), "rate": rate, "duration": seconds, "mac1": False}
    plain, plain_user, plain_system, plain_ping = flood_cpu(lab, server, cfg)
    result, user, system, pinged = flood_cpu(lab, server, {**cfg, "mac1": True})

    def settled(status: str) -> bool:
        got = drops(status)
        return (got["bad_mac"] - before["bad_mac"] >= plain["sent"] and
                got["cookie_sent"] - before["cookie_sent"]
                + got["bad_handshake"] - before["bad_handshake"] >= result["sent"])

    status = server.wait_status(settled, timeout=20)
    got = drops(status)
    cookies_sent = got["cookie_sent"] - before["cookie_sent"]
    handshakes = got["bad_handshake"] - before["bad_handshake"]
    exchange, handshake = dh_costs()
    per_plain = (plain_user + plain_system) / plain["sent"]
    per_datagram = (user + system) / result["sent"]
    cookie_work = per_datagram - per_plain
    print(f"\nwrong mac1: {plain['sent']} datagrams, server CPU user {plain_user:.2f} s "
          f"system {plain_system:.2f} s = {per_plain * 1e6:.1f} us each; ping "
          f"{plain_ping[1]}/{plain_ping[0]} avg {plain_ping[2]} ms\n"
          f"valid mac1: {result}; server counted cookie_sent {cookies_sent}, bad_handshake "
          f"(a DH each) {handshakes}; server CPU user {user:.2f} s system {system:.2f} s = "
          f"{per_datagram * 1e6:.1f} us each, {cookie_work * 1e6:.1f} us more; ping "
          f"{pinged[1]}/{pinged[0]} avg {pinged[2]} ms max {pinged[3]} ms\n"
          f"in this process: X25519 {exchange * 1e6:.1f} us, an initiation through a Device "
          f"not under load (mac1 + DH) {handshake * 1e6:.1f} us")
    # cookie replies went out, to every address, and they authenticate
    assert result["send_errors"] == 0 and result["other"] == 0, result
    assert plain["replies"] == 0, plain
    assert cookies_sent >= result["sent"] * 0.95, status
    assert cookies_sent >= result["cookies"] >= cookies_sent * 0.9, (result, status)
    assert result["addresses_with_cookies"] == len(sources), result
    assert handshakes <= 2 * UNDER_LOAD_HANDSHAKES_PER_SECOND, status   # no DH per datagram
    # the tunnel kept working. The CPU is bounded by the DH count asserted above (at most
    # 2 x 100 for the whole flood); the CPU figures printed are for the record only, never
    # asserted: on a shared machine they are noise (one CI run had cookie work = the DH path).
    assert pinged[1] >= pinged[0] * 0.8 and pinged[2] < 200, pinged
    still_fine(lab, server)


# --- (4) cookie interop under load -------------------------------------------------------------


def handshake_story(seen: list) -> list[str]:
    """The handshake messages in a sniffer's record, in order: 'out 1', 'out 1+mac2', 'in 3',
    'in 2', ... (transport messages left out)."""
    story = []
    for _t, direction, kind, _size, mac2 in seen:
        if kind in (1, 2, 3):
            story.append(f"{direction} {kind}{'+mac2' if mac2 else ''}")
    return story


def cookie_then_handshake(story: list[str]) -> bool:
    """An initiation without mac2, a cookie reply, then one with mac2 that got a response."""
    try:
        first = story.index("out 1")
        cookie_at = story.index("in 3", first)
        retry = story.index("out 1+mac2", cookie_at)
        story.index("in 2", retry)
    except ValueError:
        return False
    return True


@needs_wg
@pytest.mark.parametrize("lab", [1], indirect=True)
def test_wireguard_go_gets_a_cookie_under_load_and_completes_with_mac2(lab, daemons, sockdir,
                                                                      wggo_factory):
    """The server is under load (a flood from hostu2): wireguard-go's first initiation gets a
    cookie reply instead of a DH; its retransmission 5 s later carries mac2 and completes the
    handshake; ping works through the tunnel while the flood goes on."""
    keys = Keys(sockdir)
    wg = wggo_factory("hostu")
    keys.client, keys.client_pub = wg.private, wg.public
    server = daemons(lab, "server", server_text(keys))
    sources = flood_sources(lab)
    rate, seconds = 400, 25
    cfg = {"target": SERVER, "sources": sources, "server_public": keys.server_pub.hex(),
           "count": rate * seconds, "rate": rate, "duration": seconds, "mac1": True}
    with script(lab, "hostu", "sniff", {"port": SERVER[1], "duration": 40}) as sniffer, \
            script(lab, "hostu2", "flood", cfg) as flooder:
        flooder.expect("loaded")                # the server answers with cookies now
        in_ns(lab, "hostu", ["wg", "set", wg.ifname, "private-key", str(wg.keyfile), "peer",
                             wgkeys.encode_key(keys.server_pub), "allowed-ips",
                             "192.168.53.0/24,192.168.60.0/24", "endpoint", "10.9.0.11:9090"])
        in_ns(lab, "hostu", ["ip", "addr", "add", "192.168.53.99/24", "dev", wg.ifname])
        in_ns(lab, "hostu", ["ip", "link", "set", wg.ifname, "up"])
        in_ns(lab, "hostu", ["ip", "route", "add", "192.168.60.0/24", "dev", wg.ifname])
        started = time.monotonic()
        wait_until(lambda: ping(lab, "hostu", HOSTV, count=1, check=False).returncode == 0,
                   25, what="ping through wireguard-go under load")
        took = time.monotonic() - started
        ping(lab, "hostu", HOSTV, count=3)      # and it keeps working, flood still on
        flooded = flooder.result()
        seen = sniffer.result()["seen"]
    story = handshake_story(seen)
    status = server.wait_status(lambda s: "hostu up, handshake" in s)
    print(f"\nwireguard-go under load: {story}; first ping after {took:.1f} s; flood "
          f"{flooded['sent']} sent, {flooded['cookies']} cookies back; STATUS {status}")
    assert cookie_then_handshake(story), story
    assert drops(status)["cookie_sent"] > flooded["cookies"] * 0.9, status
    assert flooded["seconds"] > took, flooded            # the flood lasted the whole time
    still_fine(lab, server)


@needs_wg
@pytest.mark.parametrize("lab", [1], indirect=True)
def test_our_initiator_honours_a_cookie_from_wireguard_go_under_load(lab, daemons, sockdir,
                                                                     wggo_factory):
    """wireguard-go as the server, under load: its handshake queue holds >= 128 of 1024 while
    bursts of initiations (valid mac1) arrive faster than its workers take them, and for 1 s
    after. Our client's initiation gets a cookie reply; its next one carries mac2, which
    wireguard-go accepts, and the tunnel works."""
    keys = Keys(sockdir)
    wg = wggo_factory("server")
    keys.server, keys.server_pub = wg.private, wg.public
    in_ns(lab, "server", ["wg", "set", wg.ifname, "private-key", str(wg.keyfile), "listen-port",
                          "9090", "peer", wgkeys.encode_key(keys.client_pub), "allowed-ips",
                          "192.168.53.99/32"])
    in_ns(lab, "server", ["ip", "addr", "add", "192.168.53.1/24", "dev", wg.ifname])
    in_ns(lab, "server", ["ip", "link", "set", wg.ifname, "up"])
    in_ns(lab, "server", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    sources = flood_sources(lab)
    rate, period, seconds = 6000, 0.5, 25    # 3,000 at full speed every 0.5 s
    cfg = {"target": SERVER, "sources": sources, "server_public": wg.public.hex(),
           "count": rate * seconds, "rate": rate, "period": period, "duration": seconds,
           "mac1": True}
    with script(lab, "hostu", "sniff", {"port": SERVER[1], "duration": 40}) as sniffer, \
            script(lab, "hostu2", "flood", cfg) as flooder:
        flooder.expect("loaded")                # wireguard-go answers with cookies now
        started = time.monotonic()
        client = daemons(lab, "hostu", client_text(keys), name="client")
        wait_until(lambda: ping(lab, "hostu", HOSTV, count=1, check=False).returncode == 0,
                   25, what="ping to wireguard-go under load")
        took = time.monotonic() - started
        flooded = flooder.result()
        seen = sniffer.result()["seen"]
    story = handshake_story(seen)
    print(f"\nour initiator, wireguard-go under load: {story}; first ping after {took:.1f} s; "
          f"flood {flooded['sent']} sent, {flooded['cookies']} cookies back")
    assert cookie_then_handshake(story), story
    assert flooded["cookies"] > 0 and flooded["seconds"] > took, flooded
    client.wait_status(lambda s: "server up, handshake" in s)
    assert "Traceback" not in client.log()
    ping(lab, "hostu", HOSTV, count=2)


def main() -> None:
    cfg = json.loads(sys.stdin.readline())
    print(json.dumps(MODES[sys.argv[1]](cfg)), flush=True)


if __name__ == "__main__":
    main()
