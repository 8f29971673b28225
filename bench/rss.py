"""VmRSS and VmHWM of idle tunvpnd daemons (server and client) in a fresh lab, plain and
wireguard: what the daemon itself costs in memory, without a benchmark's traffic.

    sudo /opt/tunvpnd/bin/python bench/rss.py [--pings 20] [--only tunvpnd,tunvpnd-wireguard]

Starts each configuration as bench/run.py does, pings HostV through it (so every code path of
a running tunnel has been used once), then prints each daemon's /proc/PID/status VmRSS and
VmHWM in MiB.

    /opt/tunvpnd/bin/python bench/rss.py --imports

What that memory is made of: a fresh interpreter imports what a wireguard daemon imports, one
library at a time, and prints VmRSS after each (no root, no lab).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from configs import Tunvpnd, TunvpndWireGuard, running
from measure import ping_rtts, status_kib

# In the daemon's order: the interpreter, its profile, netlink, the daemon's own modules (a
# plain daemon stops here), the secure wire's library, its first use, the WireGuard modules.
IMPORTS = """
import sys
def rss(label):
    kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
    print(f"{label:58} {kib / 1024:6.1f} MiB", flush=True)
rss("python3.%d, nothing imported" % sys.version_info[1])
import yaml; rss("+ yaml")
import pyroute2; rss("+ pyroute2 %s (its __init__ imports every part)" % pyroute2.__version__)
import tunvpnd.service; rss("+ tunvpnd (service, loop, core, netconf, sdnotify)")
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
rss("+ cryptography's AEAD (its Rust module with OpenSSL inside)")
ChaCha20Poly1305(bytes(32)).encrypt(bytes(12), b"", None); rss("+ its first encryption")
import tunvpnd.wireguard.device; rss("+ tunvpnd.wireguard (with hashlib, hmac)")
"""


def imports() -> int:
    return subprocess.run([sys.executable, "-c", IMPORTS]).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pings", type=int, default=20)
    p.add_argument("--only", default="tunvpnd,tunvpnd-wireguard")
    p.add_argument("--imports", action="store_true", help="what the memory is made of")
    args = p.parse_args(argv)
    if args.imports:
        return imports()
    if os.geteuid() != 0:
        print("bench/rss.py: needs root (it creates network namespaces)")
        return 2
    for name in args.only.split(","):
        tunnel = Tunvpnd() if name == "tunvpnd" else TunvpndWireGuard()
        with running(tunnel, f"tvr{os.getpid()}") as lab:
            ping_rtts(lab, args.pings)
            for role, pid in zip(("server", "client"), tunnel.pids(), strict=True):
                print(f"{name:18} {role:6} VmRSS {status_kib(pid, 'VmRSS') / 1024:6.1f} MiB  "
                      f"VmHWM {status_kib(pid, 'VmHWM') / 1024:6.1f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
