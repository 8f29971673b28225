"""The SEED VPN lab in network namespaces, for `tunvpnd lab`, the tests and the benchmark.

    topology.py   the hosts and LANs as data; Lab builds them, runs processes in them, tears down
    commands.py   `tunvpnd lab up|demo|down [--wire wireguard]`: the lab with the VPN server
                  and client running
    echo.py       the TCP echo server and client the demo and tests send through the tunnel
    sniff.py      counts what crosses a lab interface on the VPN port (what the path can see)
"""

from .commands import lab_demo, lab_down, lab_up
from .topology import DEFAULT_PREFIX, Lab, leftover_namespaces, tun_route_present, wait_until

__all__ = ["DEFAULT_PREFIX", "Lab", "lab_demo", "lab_down", "lab_up", "leftover_namespaces",
           "tun_route_present", "wait_until"]
