"""VmRSS and VmHWM of idle tunvpnd daemons (server and client) in a fresh lab, plain and
wireguard: what the daemon itself costs in memory, without a benchmark's traffic.

    sudo /opt/tunvpnd/bin/python bench/rss.py [--pings 20] [--only tunvpnd,tunvpnd-wireguard]

Starts each configuration as bench/run.py does, pings HostV through it (so every code path of
a running tunnel has been used once), then prints each daemon's /proc/PID/status VmRSS and
VmHWM in MiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from configs import Tunvpnd, TunvpndWireGuard
from measure import ping_rtts, status_kib, wait_reachable

from tunvpnd.lab import Lab


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pings", type=int, default=20)
    p.add_argument("--only", default="tunvpnd,tunvpnd-wireguard")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/rss.py: needs root (it creates network namespaces)")
        return 2
    for name in args.only.split(","):
        tunnel = Tunvpnd() if name == "tunvpnd" else TunvpndWireGuard()
        lab = Lab(f"tvr{os.getpid()}")
        workdir = Path(tempfile.mkdtemp(prefix="tvr"))
        try:
            lab.up()
            tunnel.start(lab, workdir)
            wait_reachable(lab)
            ping_rtts(lab, args.pings)
            for role, pid in zip(("server", "client"), tunnel.pids(), strict=True):
                print(f"{name:18} {role:6} VmRSS {status_kib(pid, 'VmRSS') / 1024:6.1f} MiB  "
                      f"VmHWM {status_kib(pid, 'VmHWM') / 1024:6.1f} MiB", flush=True)
        finally:
            tunnel.stop()
            lab.down()
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
