"""One measurement each: iperf3 TCP and UDP, ping RTTs, CPU seconds and peak RSS of processes.

Traffic always goes HostU -> HostV inside a `Lab`'s namespaces; every subprocess has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tunvpnd.lab import Lab, wait_until

IPERF_PORT = 5201
UDP_PAYLOAD = 64                     # bytes per UDP datagram (iperf3 -l)
CLK_TCK = os.sysconf("SC_CLK_TCK")
RTT_RE = re.compile(r"time=([\d.]+) ms")


class MeasureError(RuntimeError):
    pass


@dataclass(frozen=True)
class Options:
    seconds: int = 10                # iperf3 -t
    pings: int = 200                 # ping -c


# ---------------------------------------------------------------------------------------------
# iperf3


@contextlib.contextmanager
def iperf_server(lab: Lab) -> Iterator[None]:
    """A one-off iperf3 server in HostV for one test; killed if still there afterwards."""
    server = lab.spawn("hostv", ["iperf3", "-s", "-1", "-p", str(IPERF_PORT), "--forceflush"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    try:
        fd, seen = server.stdout.fileno(), b""
        deadline = time.monotonic() + 5
        while b"listening" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise MeasureError(f"iperf3 server did not start: {seen!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise MeasureError(f"iperf3 server exited: {seen!r}")
            seen += chunk
        yield
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=5)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=5)
        server.stdout.close()


def _iperf_client(lab: Lab, args: list[str], seconds: int) -> dict:
    hostv = lab.addresses["hostv"]
    with iperf_server(lab):
        result = lab.run("hostu", ["iperf3", "-c", hostv, "-p", str(IPERF_PORT), "-J",
                                   "--connect-timeout", "3000", "-t", str(seconds), *args],
                         timeout=seconds + 30)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        raise MeasureError(f"iperf3 {' '.join(args)}: exit {result.returncode}, "
                           f"no JSON: {result.stderr.strip()[:200]}") from None
    if "error" in report or result.returncode != 0:
        raise MeasureError(f"iperf3 {' '.join(args)}: {report.get('error', result.returncode)}")
    return report["end"]


def tcp_mbps(lab: Lab, seconds: int) -> float:
    """TCP goodput HostU -> HostV as the receiver counted it, Mbit/s."""
    end = _iperf_client(lab, [], seconds)
    return end["sum_received"]["bits_per_second"] / 1e6


def udp_small(lab: Lab, seconds: int) -> tuple[float, float]:
    """64-byte UDP datagrams sent as fast as iperf3 can: (received kpps, loss %) at HostV."""
    end = _iperf_client(lab, ["-u", "-l", str(UDP_PAYLOAD), "-b", "0"], seconds)
    received = end["sum_received"]
    got = received["packets"] - received["lost_packets"]
    return got / received["seconds"] / 1e3, received["lost_percent"]


# ---------------------------------------------------------------------------------------------
# ping


def ping_rtts(lab: Lab, count: int) -> list[float]:
    """Per-packet RTTs (ms) of `count` pings HostU -> HostV, 10 ms apart."""
    result = lab.run("hostu", ["ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1",
                               lab.addresses["hostv"]], timeout=count * 0.01 + 30)
    rtts = [float(m) for m in RTT_RE.findall(result.stdout)]
    if len(rtts) < count // 2:
        raise MeasureError(f"ping: only {len(rtts)} of {count} replies")
    return rtts


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def wait_reachable(lab: Lab, timeout: float = 20.0) -> None:
    """Until HostV answers a ping from HostU (also makes learning tunnels learn the client)."""
    def answered() -> bool:
        return lab.run("hostu", ["ping", "-n", "-c", "1", "-W", "1", lab.addresses["hostv"]],
                       timeout=5).returncode == 0
    wait_until(answered, timeout, 0.1, "HostV to answer pings from HostU")


# ---------------------------------------------------------------------------------------------
# /proc


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of `pids` (all their threads), in seconds."""
    total = 0
    for pid in pids:
        data = open(f"/proc/{pid}/stat").read()
        fields = data[data.rfind(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])           # stat fields 14 and 15
    return total / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A `kB` line of /proc/PID/status, e.g. VmHWM (peak RSS) or VmRSS."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise MeasureError(f"no {key} in /proc/{pid}/status")


# ---------------------------------------------------------------------------------------------
# Everything for one tunnel.

METRICS: dict[str, str] = {          # key -> label (with unit), in table order
    "tcp_mbps": "TCP Mbit/s",
    "udp_kpps": "UDP 64B kpps rx",
    "udp_loss_pct": "UDP loss %",
    "ping_median_ms": "ping median ms",
    "ping_p99_ms": "ping p99 ms",
    "cpu_s": "CPU s in TCP test",
    "rss_mib": "peak RSS MiB",
}


def measure(lab: Lab, pids: list[int], opts: Options) -> dict[str, float | None]:
    """All metrics for the tunnel whose processes are `pids` (none: plain routing).

    Ping first (an idle path), then TCP (CPU counted around it), then the UDP flood.
    """
    rtts = ping_rtts(lab, opts.pings)
    before = cpu_seconds(pids)
    tcp = tcp_mbps(lab, opts.seconds)
    cpu = cpu_seconds(pids) - before
    kpps, loss = udp_small(lab, opts.seconds)
    return {
        "tcp_mbps": tcp,
        "udp_kpps": kpps,
        "udp_loss_pct": loss,
        "ping_median_ms": statistics.median(rtts),
        "ping_p99_ms": percentile(rtts, 99),
        "cpu_s": cpu if pids else None,
        "rss_mib": max(status_kib(p, "VmHWM") for p in pids) / 1024 if pids else None,
    }
