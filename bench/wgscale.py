"""Server scale on the secure wire: one tunvpnd wireguard server, first with its 1 real client,
then with N configured peers that have each completed a real handshake; then the handshakes
per second that server completes.

In one server process:
1. the server runs a /16 tunnel (192.168.0.1/16) with one peer, HostU's real client (the
   wg-client.yaml example, fresh keys): TCP and UDP 64 B from it, VmRSS;
2. SIGHUP with a profile of N peers (the real one and N - 1 fake ones, each allowed one
   address 192.168.100.1, .2, ...): VmRSS with N configured peers, no sessions;
3. bench/wgpeers.py `connect` in HostU2: each fake peer does a real handshake, sends an echo
   request through its keypair and gets the reply back through the tunnel (paced below the
   server's "under load" threshold); VmRSS; then TCP and UDP 64 B from the real client again;
4. bench/wgpeers.py `flood` in HostU2 from SOURCES extra addresses: initiations as fast as
   the server answers them (cookies and the per-source limit as under a real flood), for a
   few seconds; completed (authentic) responses per second, and the server's CPU per
   handshake; then a ping through the real client's tunnel (it must still work).
memory per peer = (VmRSS with N - VmRSS with 1) / (N - 1), both after traffic.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from configs import EXAMPLES, Tunvpnd, _edit
from measure import MeasureError, Options, cpu_seconds, status_kib, wait_reachable
from scale import STATUS_WAIT, peers_known, traffic

from tunvpnd.lab import Lab, wait_until

WGPEERS = Path(__file__).resolve().parent / "wgpeers.py"
SERVER_TUN = "192.168.0.1"
CLIENT_PLACEHOLDER = "ADQWW02LysytVpqcm1xrw7yzlUHZ74b+QSsFsam0hG4="
# flood sources: addresses added to HostU2's eth0 (the lab uses .5, .6, .11 of 10.9.0.0/24)
SOURCES = [f"10.9.0.{n}" for n in range(20, 250)]
PER_SOURCE = 18              # initiations/s per source: under the server's 20/s per-source limit
CONNECT_RATE = 80            # handshakes/s while connecting: under the 100/s "under load"
FLOOD_MAX = 15000            # initiations made beforehand for the flood, at most
DROP_RE = re.compile(r"(cookie_sent|rate_limited|flood|replay|bad_mac|bad_handshake) (\d+)")

SERVER_PROFILE = """\
# tunvpnd bench: the lab server on the secure wire with a /16 tunnel, so thousands of
# peers' addresses fit.
mode: server
listen: 0.0.0.0:9090
wire: wireguard
private_key_file: wg-server.key
interface:
  name: tun0
  address: {tun}/16
forward: true
peers:
{peers}log:
  level: info
"""


def inner_address(n: int) -> str:
    return f"192.168.{100 + n // 250}.{1 + n % 250}"


def peer_entry(name: str, public: str, address: str) -> str:
    return f"  - name: {name}\n    public_key: {public}\n    allowed_ips: [{address}/32]\n"


def server_drops(tunnel: Tunvpnd) -> dict[str, int]:
    return {k: int(v) for k, v in DROP_RE.findall(tunnel.notify["server"].status())}


def run_peers(lab: Lab, cfg: dict, timeout: float) -> dict:
    result = lab.run("hostu2", [sys.executable, str(WGPEERS)], input=json.dumps(cfg),
                     timeout=timeout)
    try:
        found = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise MeasureError(f"wgpeers {cfg['mode']}: exit {result.returncode}: "
                           f"{result.stderr.strip()[-300:]}") from None
    if result.returncode != 0:
        raise MeasureError(f"wgpeers {cfg['mode']}: {found}")
    return found


def measure_scale_wireguard(lab: Lab, workdir: Path, peers: int, opts: Options) -> dict:
    """Needs a lab with one extra client (HostU2). Returns {"1": {...}, "N": {...}, ...}."""
    from tunvpnd.wireguard.keys import encode_key, generate_private, public_key, write_key_file

    server_key, client_key = generate_private(), generate_private()
    write_key_file(workdir / "wg-server.key", server_key)
    write_key_file(workdir / "wg-client.key", client_key)
    fakes = [generate_private() for _ in range(peers - 1)]
    keyfile = workdir / "wg-fake.keys"            # test keys, for wgpeers.py only
    keyfile.touch(mode=0o600)
    keyfile.write_text("".join(f"{key.hex()}\n" for key in fakes))
    client = workdir / "wg-client.yaml"
    client.write_text(_edit(EXAMPLES / "wg-client.yaml",
                            {CLIENT_PLACEHOLDER: encode_key(public_key(server_key))}))
    real = peer_entry("hostu", encode_key(public_key(client_key)), "192.168.53.99")
    server = workdir / "wg-server.yaml"
    server.write_text(SERVER_PROFILE.format(tun=SERVER_TUN, peers=real))
    tunnel = Tunvpnd(server_profile=server, client_profile=client, name="scale-wireguard")
    common = {"server": [lab.addresses["server"], 9090],
              "server_public": public_key(server_key).hex(), "private_keys": str(keyfile)}
    try:
        tunnel.start(lab, workdir)
        wait_reachable(lab)
        one = traffic(lab, tunnel, opts)
        # N configured peers, by a reload (the real client's session stays)
        server.write_text(SERVER_PROFILE.format(tun=SERVER_TUN, peers=real + "".join(
            peer_entry(f"fake{n}", encode_key(public_key(key)), inner_address(n))
            for n, key in enumerate(fakes))))
        tunnel.procs[0].send_signal(1)            # SIGHUP
        wait_until(lambda: peers_known(tunnel) == peers, STATUS_WAIT + 30, 0.2,
                   f"STATUS '{peers} peers' (last: {tunnel.notify['server'].status()!r})")
        configured_rss = status_kib(tunnel.server_pid, "VmRSS") / 1024
        # every fake peer does its handshake
        cpu = cpu_seconds([tunnel.server_pid])
        connect = run_peers(lab, {**common, "mode": "connect", "target": SERVER_TUN,
                                  "inner": [inner_address(n) for n in range(peers - 1)],
                                  "rate": CONNECT_RATE},
                            timeout=peers / CONNECT_RATE * 3 + 60)
        connect["server_cpu_ms_per_handshake"] = \
            (cpu_seconds([tunnel.server_pid]) - cpu) * 1000 / max(1, connect["connected"])
        handshaked_rss = status_kib(tunnel.server_pid, "VmRSS") / 1024
        many = traffic(lab, tunnel, opts)
        # handshakes per second, as fast as the server completes them
        batch = "".join(f"addr add {a}/24 dev eth0\n" for a in SOURCES)
        added = lab.run("hostu2", ["ip", "-batch", "-"], input=batch, timeout=30)
        if added.returncode != 0:
            raise MeasureError(f"ip -batch in hostu2: {added.stderr.strip()[:200]}")
        before_drops = server_drops(tunnel)
        cpu = cpu_seconds([tunnel.server_pid])
        seconds = min(3, opts.seconds)
        flood = run_peers(lab, {**common, "mode": "flood", "sources": SOURCES,
                                "per_source": PER_SOURCE, "seconds": seconds,
                                "max": FLOOD_MAX}, timeout=seconds + 120)
        flood["server_cpu_s"] = cpu_seconds([tunnel.server_pid]) - cpu
        flood["server_cpu_ms_per_handshake"] = \
            flood["server_cpu_s"] * 1000 / max(1, flood["completed"])
        wait_reachable(lab, timeout=10)           # the real client's tunnel still works
        try:      # the drops of the flood, in the next STATUS= (every 5 s)
            wait_until(lambda: server_drops(tunnel) != before_drops, STATUS_WAIT, 0.2,
                       "STATUS after the flood")
        except Exception:       # noqa: BLE001 (none to show: the counts stay as they were)
            pass
        after = server_drops(tunnel)
        flood["server_drops"] = {k: v - before_drops.get(k, 0) for k, v in after.items()
                                 if v != before_drops.get(k, 0)}
        tunnel.check_alive()
    except Exception as e:
        raise RuntimeError(f"{e}; logs: {tunnel.log_tail()}") from e
    finally:
        tunnel.stop()
    return {
        "1": one,
        "N": many,
        "rss_configured_mib": configured_rss,
        "rss_handshaked_mib": handshaked_rss,
        "kib_per_peer": (many["rss_mib"] - one["rss_mib"]) * 1024 / (peers - 1),
        "kib_per_configured_peer": (configured_rss - one["rss_mib"]) * 1024 / (peers - 1),
        "udp_ratio": many["udp_kpps"] / one["udp_kpps"] if one["udp_kpps"] else None,
        "tcp_ratio": many["tcp_mbps"] / one["tcp_mbps"] if one["tcp_mbps"] else None,
        "connect": connect,
        "handshakes": flood,
    }
