"""In-process micro-benchmarks of the per-packet path: no namespaces, no daemons, one core.

    /opt/tunvpnd/bin/python bench/micro.py [--packets 20000] [--repeat 5]

Two packet cores (tunvpnd.core.Core) with their peer tables, plain and wireguard, the
datagrams handed over by hand, as the loop would after one readv/recvmsg:
  outbound  core.outbound(view): peer lookup, counters, wire.seal
  inbound   core.inbound(view, source): wire.open, checks, counters
for a 92-byte packet (what iperf3 -l 64 sends) and a 1420-byte one (a full TCP segment),
and the server's cost of one handshake (Device.receive of an initiation from one of many
peers: mac1, two DH, the response). Prints the best of --repeat runs in microseconds per
packet (per handshake). Compare two checkouts by running each one's copy of this script.

--cold: the same calls, one at a time after 10 ms asleep (as each packet of a ping finds the
daemon): the median of --packets of them (default here 150). Warm and cold differ by
one to two orders of magnitude on a shared VM; a ping's round trip is four cold calls.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from ipaddress import ip_network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.ipcraft import ipv4  # noqa: E402
from tunvpnd.core import Core  # noqa: E402
from tunvpnd.peers import Peer, PeerTable  # noqa: E402
from tunvpnd.wire import PlainWire, WireGuardWire  # noqa: E402

CLIENT_EP, SERVER_EP = ("10.9.0.5", 40000), ("10.9.0.11", 9090)
CLIENT_IP, HOSTV = "192.168.53.99", "192.168.60.5"
SIZES = (92, 1420)


def packet(size: int, src: str = CLIENT_IP, dst: str = HOSTV) -> memoryview:
    return memoryview(bytearray(ipv4(src, dst, bytes(size - 20))))


def best(run, repeat: int) -> float:
    """The fastest of `repeat` runs of `run()` (which returns how many items it did), in
    microseconds per item."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        count = run()
        times.append((time.perf_counter() - started) / count * 1e6)
    return min(times)


def plain_pair() -> tuple[Core, Core]:
    client = Core(PeerTable(), PlainWire())
    server_peer = Peer("server", [ip_network("0.0.0.0/0")], endpoint=SERVER_EP)
    client.peers.add(server_peer)
    server = Core(PeerTable(), PlainWire(), learn_within=[ip_network("192.168.53.0/24")])
    return client, server


def wireguard_pair() -> tuple[Core, Core]:
    from tunvpnd.wireguard.device import Device

    devices = [Device(os.urandom(32), wall_offset=0.0, rng=random.Random(n)) for n in (1, 2)]
    cores = [Core(PeerTable(), WireGuardWire(d)) for d in devices]
    for core, device, other, name, allowed, endpoint in (
            (cores[0], devices[0], devices[1], "server", "0.0.0.0/0", SERVER_EP),
            (cores[1], devices[1], devices[0], "hostu", f"{CLIENT_IP}/32", None)):
        peer = Peer(name, [ip_network(allowed)])
        session = device.add_peer(other.public_key, None, endpoint, 0)
        session.user, peer.session, peer.endpoint = peer, session, endpoint
        core.peers.add(peer)
    now = 100.0
    for core in cores:
        core.now = core.wire.now = now
    # the handshake: the client's first packet is staged, messages go back and forth
    assert cores[0].outbound(packet(92)) is None
    for _ in range(10):
        moved = False
        for core, other, source in ((cores[0], cores[1], CLIENT_EP),
                                    (cores[1], cores[0], SERVER_EP)):
            out = list(core.wire.outbox)
            core.wire.outbox.clear()
            for item in out:
                moved = True
                other.inbound(memoryview(bytearray(item[0])), source)
        if not moved:
            break
    assert next(iter(cores[1].peers.peers)).session.current is not None, "no handshake"
    return cores[0], cores[1]


def path(name: str, client: Core, server: Core, n: int, repeat: int) -> dict[str, float]:
    results = {}
    for size in SIZES:
        view = packet(size)
        outbound = client.outbound

        def send(view=view, outbound=outbound) -> int:
            for _ in range(n):
                outbound(view)
            return n

        results[f"outbound {size} B"] = best(send, repeat)
        # datagrams to take in: fresh ones each run (the replay window wants new counters)
        inbound = server.inbound
        batches = [[bytearray(outbound(view)[0]) for _ in range(n)] for _ in range(repeat)]

        def receive(inbound=inbound, batches=batches) -> int:
            for datagram in batches.pop(0):
                if inbound(memoryview(datagram), CLIENT_EP) is None:
                    raise AssertionError(f"{name}: a datagram was dropped")
            return n

        results[f"inbound {size} B"] = best(receive, repeat)
    return results


def handshakes(count: int, repeat: int) -> float:
    """Server microseconds per handshake: initiations from `count` peers prepared beforehand."""
    from tunvpnd.wireguard import noise
    from tunvpnd.wireguard.device import Device

    server = Device(os.urandom(32), wall_offset=time.time() - time.monotonic())
    peers = [noise.StaticIdentity(os.urandom(32)) for _ in range(count)]
    for identity in peers:
        server.add_peer(identity.public)
    # one noise.Peer per identity: it caches the static-static DH
    server_peers = [noise.Peer(server.public_key, noise.ZERO_KEY) for _ in peers]
    wall = time.time()

    def initiations() -> list[bytes]:
        nonlocal wall
        out = []
        for n, identity in enumerate(peers):
            wall += 0.001
            out.append(noise.Initiation.create(identity, server_peers[n], n, wall).message)
        return out

    prepared = [initiations() for _ in range(repeat)]
    now = [time.monotonic()]

    def run() -> int:
        batch = prepared.pop(0)
        for message in batch:
            now[0] += 0.02                  # 50/s: never "under load", never a flood
            server.receive(message, ("10.9.0.6", 40000), now[0])
        sent = len(server.outbox)
        server.outbox.clear()
        if sent != len(batch):
            raise AssertionError(f"{sent} responses to {len(batch)} initiations: "
                                 f"{ {k: v for k, v in server.drops.items() if v} }")
        return len(batch)

    return best(run, repeat)


def cold(count: int) -> None:
    """Median microseconds of one call made right after 10 ms of sleep."""
    import statistics

    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    aead, nonce, data = ChaCha20Poly1305(os.urandom(32)), bytes(12), bytes(96)
    calls = {"ChaCha20Poly1305.encrypt 96 B": lambda: aead.encrypt(nonce, data, None)}
    for name, (client, server) in (("plain", plain_pair()), ("wireguard", wireguard_pair())):
        view = packet(92)
        datagrams = iter([bytearray(client.outbound(view)[0]) for _ in range(count)])
        calls[f"{name} outbound 92 B"] = lambda c=client, v=view: c.outbound(v)
        calls[f"{name} inbound 92 B"] = lambda s=server, d=datagrams: s.inbound(
            memoryview(next(d)), CLIENT_EP)
    for name, call in calls.items():
        took = []
        for _ in range(count):
            time.sleep(0.01)
            started = time.perf_counter_ns()
            call()
            took.append(time.perf_counter_ns() - started)
        print(f"cold {name:32} {statistics.median(took) / 1000:7.1f} us (median)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packets", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--handshakes", type=int, default=200)
    p.add_argument("--cold", action="store_true", help="one call after each 10 ms asleep")
    args = p.parse_args(argv)
    if args.cold:
        cold(150 if args.packets == 20000 else args.packets)
        return 0
    rows = {"plain": path("plain", *plain_pair(), args.packets, args.repeat),
            "wireguard": path("wireguard", *wireguard_pair(), args.packets, args.repeat)}
    print(f"{'us per packet':16}" + "".join(f"{k:>16}" for k in rows["plain"]))
    for name, row in rows.items():
        print(f"{name:16}" + "".join(f"{v:16.2f}" for v in row.values()))
    if args.handshakes:
        us = handshakes(args.handshakes, args.repeat)
        print(f"server handshake: {us:.0f} us each, {1e6 / us:.0f}/s on one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
