"""Where a ping's round trip goes: the time each tunnel end takes per direction.

    sudo /opt/tunvpnd/bin/python bench/hops.py [--pings 300] [--rounds 2]
                                               [--only tunvpnd,tunvpnd-wireguard,wireguard-go]

In a fresh lab per configuration, two captures (AF_PACKET, kernel timestamps) watch the
tunnel interface and eth0 of HostU and of the VPN server while HostU pings HostV 10 ms apart,
as bench/run.py's ping does. Each hop is the median time from a packet on one interface to
the packet it became on the other:

    HostU  TUN -> wire   the client reads the echo request, seals it, sends it
    server wire -> TUN   the server takes the datagram in and writes the request
    server TUN -> wire   ... the reply, back out
    HostU  wire -> TUN   ... and into HostU

The first two find their daemon asleep (10 ms since the last packet); the last two find it
just awake. What is left of the round trip is the kernel: routing, veths, HostV. The captures
are processes that wake for every packet too, which changes the machine's idle states: compare
hops across configurations of one run, not this ping with bench/run.py's.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import time

from configs import Tunvpnd, TunvpndWireGuard, WireGuardGo, running
from measure import ping_rtts

CONFIGS = {"tunvpnd": Tunvpnd, "tunvpnd-wireguard": TunvpndWireGuard,
           "wireguard-go": WireGuardGo}
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4
ETH_P_ALL = 3  # a socket bound to one protocol sees only what arrives, not what is sent
MATCH_WITHIN = 0.005  # a packet 5 ms after another is not what that one became


def capture(tunnel_if: str, wire_if: str, seconds: float) -> int:
    """In a namespace: capture both interfaces for `seconds`, then print one line per packet:
    `time interface direction` (ICMP on the tunnel, UDP on the wire)."""
    socks = {}
    for name in (tunnel_if, wire_if):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.bind((name, ETH_P_ALL))
        s.setblocking(False)
        socks[s.fileno()] = (name, s)
    print("ready", flush=True)
    want = {tunnel_if: socket.IPPROTO_ICMP, wire_if: socket.IPPROTO_UDP}
    seen = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for fd in select.select(list(socks), [], [], 0.2)[0]:
            name, s = socks[fd]
            while True:
                try:
                    data, ancillary, _, address = s.recvmsg(128, 64)
                except BlockingIOError:
                    break
                if len(data) < 20 or data[9] != want[name]:
                    continue
                for level, kind, value in ancillary:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", value[:16])
                        seen.append(f"{sec + nsec * 1e-9:.9f} {name} "
                                    f"{'out' if address[2] == PACKET_OUTGOING else 'in'}")
    print("\n".join(seen), flush=True)
    return 0


def hops(lines: list[str], tunnel_if: str, wire_if: str) -> tuple[list[float], list[float]]:
    """(TUN -> wire delays, wire -> TUN delays) in seconds, from capture()'s lines."""
    events = sorted((float(t), name, way) for t, name, way in (line.split() for line in lines))
    to_wire, to_tun = [], []
    for i, (t, name, way) in enumerate(events):
        if (name, way) == (tunnel_if, "out"):       # the kernel gave the daemon a packet
            target, into = (wire_if, "out"), to_wire
        elif (name, way) == (wire_if, "in"):        # a datagram arrived for the daemon
            target, into = (tunnel_if, "in"), to_tun
        else:
            continue
        for later, other, other_way in events[i + 1:]:
            if later - t > MATCH_WITHIN:
                break
            if (other, other_way) == target:
                into.append(later - t)
                break
    return to_wire, to_tun


def measure(name: str, pings: int) -> dict[str, float]:
    tunnel = CONFIGS[name]()
    with running(tunnel, f"tvh{os.getpid()}") as lab:
        ping_rtts(lab, 20)                                  # every code path used once
        ifnames = getattr(tunnel, "ifnames", {"hostu": "tun0", "server": "tun0"})
        seconds = pings * 0.012 + 3
        captures: list[subprocess.Popen] = []
        try:
            for role in ("hostu", "server"):
                captures.append(lab.spawn(role, [sys.executable, __file__, "--capture",
                                                 ifnames[role], "eth0", str(seconds)],
                                          stdout=subprocess.PIPE, text=True))
            for c in captures:
                if c.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"{name}: a capture did not start")
            rtts = ping_rtts(lab, pings)
            result = {"ping": statistics.median(rtts) * 1e3}      # ms -> us
            for role, c in zip(("hostu", "server"), captures, strict=True):
                out, _ = c.communicate(timeout=seconds + 10)
                to_wire, to_tun = hops(out.splitlines()[1:], ifnames[role], "eth0")
                for label, delays in (("TUN -> wire", to_wire), ("wire -> TUN", to_tun)):
                    if len(delays) < pings // 2:
                        raise RuntimeError(f"{name} {role} {label}: {len(delays)} of {pings} "
                                           "seen")
                    result[f"{role} {label}"] = statistics.median(delays) * 1e6
            return result
        finally:
            for c in captures:
                if c.poll() is None:
                    c.kill()
                c.wait(timeout=5)


ROWS = ("hostu TUN -> wire", "server wire -> TUN", "server TUN -> wire", "hostu wire -> TUN")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pings", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", default=",".join(CONFIGS))
    p.add_argument("--capture", nargs=3, metavar=("TUNNEL_IF", "WIRE_IF", "SECONDS"),
                   help=argparse.SUPPRESS)                 # the part that runs in a namespace
    args = p.parse_args(argv)
    if args.capture:
        return capture(args.capture[0], args.capture[1], float(args.capture[2]))
    if os.geteuid() != 0:
        print("bench/hops.py: needs root (it creates network namespaces)")
        return 2
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s): {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
            runs[name].append(measure(name, args.pings))
    width = max(map(len, names)) + 2
    print(f"\nmedian of {args.rounds} round(s), {args.pings} pings 10 ms apart")
    print(f"{'us per hop':22}" + "".join(f"{n:>{width}}" for n in names))
    for row in ROWS:
        print(f"{row:22}" + "".join(
            f"{statistics.median(x[row] for x in runs[n]):>{width}.0f}" for n in names))
    print(f"{'sum of the four':22}" + "".join(
        f"{statistics.median(sum(x[r] for r in ROWS) for x in runs[n]):>{width}.0f}"
        for n in names))
    print(f"{'ping median (us)':22}" + "".join(
        f"{statistics.median(x['ping'] for x in runs[n]):>{width}.0f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
