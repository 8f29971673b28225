"""Server scale: one tunvpnd server, first with its 1 real client, then with N known peers.

The server runs a /16 tunnel (192.168.0.1/16) so that N distinct inner addresses fit; N - 1 fake
peers in HostU2 (bench/fakepeers.py) make it learn them. In the same server process: TCP and UDP
from the real client and VmRSS with 1 peer, then the fake peers, then the same with N peers.
memory per peer = (VmRSS with N - VmRSS with 1) / (N - 1).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from configs import EXAMPLES, Tunvpnd
from measure import MeasureError, Options, status_kib, tcp_mbps, udp_small, wait_reachable

from tunvpnd.lab import Lab, wait_until

FAKEPEERS = Path(__file__).resolve().parent / "fakepeers.py"
SERVER_TUN = "192.168.0.1"
PEERS_RE = re.compile(r"^(\d+) peers;")
STATUS_WAIT = 15.0           # the server sends STATUS= every 5 s

SERVER_PROFILE = f"""\
# tunvpnd bench: the lab server with a /16 tunnel, so thousands of peer addresses fit.
mode: server
listen: 0.0.0.0:9090
interface:
  name: tun0
  address: {SERVER_TUN}/16
forward: true
peer_timeout: 3600          # learned peers must outlive the measurement
max_learned_peers: 65536    # room for --peers beyond the default 1024 (the /16 holds them)
log:
  level: info
"""

METRICS: dict[str, str] = {
    "tcp_mbps": "TCP Mbit/s",
    "udp_kpps": "UDP 64B kpps rx",
    "rss_mib": "server VmRSS MiB",
}


def peers_known(tunnel: Tunvpnd) -> int:
    match = PEERS_RE.match(tunnel.notify["server"].status())
    return int(match.group(1)) if match else -1


def traffic(lab: Lab, tunnel: Tunvpnd, opts: Options) -> dict[str, float]:
    tcp = tcp_mbps(lab, opts.seconds)
    kpps, _ = udp_small(lab, opts.seconds)
    return {"tcp_mbps": tcp, "udp_kpps": kpps,
            "rss_mib": status_kib(tunnel.server_pid, "VmRSS") / 1024,
            "hwm_mib": status_kib(tunnel.server_pid, "VmHWM") / 1024,
            "peers": peers_known(tunnel)}


def measure_scale(lab: Lab, workdir: Path, peers: int, opts: Options) -> dict:
    """Needs a lab with one extra client (HostU2). Returns {"1": {...}, "N": {...}, ...}."""
    profile = workdir / "server-scale.yaml"
    profile.write_text(SERVER_PROFILE)
    tunnel = Tunvpnd(server_profile=profile, client_profile=EXAMPLES / "client.yaml")
    try:
        tunnel.start(lab, workdir)
        wait_reachable(lab)
        wait_until(lambda: peers_known(tunnel) == 1, STATUS_WAIT, 0.2, "STATUS '1 peers'")
        one = traffic(lab, tunnel, opts)
        result = lab.run("hostu2", [sys.executable, str(FAKEPEERS), lab.addresses["server"],
                                    "9090", SERVER_TUN, str(peers - 1)], timeout=120)
        if result.returncode != 0:
            raise MeasureError(f"fakepeers: {result.stdout.strip()} {result.stderr.strip()}")
        wait_until(lambda: peers_known(tunnel) == peers, STATUS_WAIT, 0.2,
                   f"STATUS '{peers} peers' (last: {tunnel.notify['server'].status()!r})")
        learned_rss = status_kib(tunnel.server_pid, "VmRSS") / 1024
        many = traffic(lab, tunnel, opts)
        tunnel.check_alive()
    finally:
        tunnel.stop()
    return {
        "1": one,
        "N": many,
        "rss_after_learning_mib": learned_rss,
        "kib_per_peer": (many["rss_mib"] - one["rss_mib"]) * 1024 / (peers - 1),
    }
