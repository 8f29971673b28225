"""The lab topology in real network namespaces (needs root; each test has its own prefix)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from tunvpnd import lab as labmod
from tunvpnd.lab import Lab, commands, leftover_namespaces, topology, wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/net/tun").exists(),
    reason="needs root and network namespaces",
)

_counter = itertools.count()


def unique_prefix() -> str:
    return f"tvt{os.getpid()}x{next(_counter)}"


def root_links() -> set[tuple[int, str]]:
    with IPRoute() as ipr:
        return {(link["index"], link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}


def alive(pid: int) -> bool:
    """Running (not a zombie) -- processes re-parented to init may linger briefly as zombies."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def ping(lab: Lab, role: str, address: str) -> subprocess.CompletedProcess:
    return lab.run(role, ["ping", "-c", "1", "-W", "1", address], timeout=10)


@pytest.fixture
def lab():
    prefix = unique_prefix()
    before = root_links()
    the_lab = Lab(prefix, extra_clients=1)
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()
    assert leftover_namespaces(prefix) == []
    assert not the_lab.run_dir.exists()
    assert root_links() == before


def test_up_builds_every_host(lab: Lab) -> None:
    assert set(lab.hosts) == {"hostu", "hostu2", "server", "hostv"}
    assert lab.addresses == {"hostu": "10.9.0.5", "hostu2": "10.9.0.6",
                             "server": "10.9.0.11", "hostv": "192.168.60.5"}
    assert sorted(leftover_namespaces(lab.prefix)) == sorted(lab.namespaces)
    expected = {
        "hostu": {"10.9.0.5/24"},
        "hostu2": {"10.9.0.6/24"},
        "server": {"10.9.0.11/24", "192.168.60.11/24"},
        "hostv": {"192.168.60.5/24"},
    }
    for role, name in lab.hosts.items():
        with topology._netns_handle(name) as ipr:
            addrs = {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                     for a in ipr.get_addr(family=2)}
            assert addrs == expected[role] | {"127.0.0.1/8"}, role
            links = {link.get_attr("IFLA_IFNAME"): link for link in ipr.get_links()}
            assert all(link["flags"] & 1 for link in links.values()), f"{role}: a link is down"
            routes = [(r.get_attr("RTA_DST"), r["dst_len"], r.get_attr("RTA_GATEWAY"))
                      for r in ipr.get_routes(family=2, table=254)]
            assert all(dst_len > 0 for _, dst_len, _ in routes), f"{role}: default route"
            gateways = {(dst, n, gw) for dst, n, gw in routes if gw}
            if role == "hostv":
                assert gateways == {("192.168.53.0", 24, "192.168.60.11")}
            else:
                assert gateways == set(), role
    with topology._netns_handle(lab.switch) as ipr:
        kinds = {}
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            kinds[link.get_attr("IFLA_IFNAME")] = info.get_attr("IFLA_INFO_KIND") if info else None
        assert kinds["br-net"] == kinds["br-lan"] == "bridge"
        assert {"hostu-net", "hostu2-net", "server-net", "server-lan", "hostv-lan"} <= set(kinds)
        assert not [a for a in ipr.get_addr(family=2) if a.get_attr("IFA_ADDRESS") != "127.0.0.1"]


def test_reachability_without_tunnel(lab: Lab) -> None:
    assert ping(lab, "hostu", "10.9.0.11").returncode == 0
    assert ping(lab, "hostu2", "10.9.0.11").returncode == 0
    assert ping(lab, "hostu2", "10.9.0.5").returncode == 0
    assert ping(lab, "server", "192.168.60.5").returncode == 0
    assert ping(lab, "hostv", "192.168.60.11").returncode == 0
    # no tunnel yet: HostU has no route to the private network, HostV none back to the clients
    assert ping(lab, "hostu", "192.168.60.5").returncode != 0
    assert ping(lab, "hostv", "10.9.0.5").returncode != 0


def test_echo_helpers_over_the_lab(lab: Lab) -> None:
    server = lab.spawn("hostv", [sys.executable, "-m", "tunvpnd.lab", "echo-server", "9000"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert "listening" in commands._read_line(server.stdout, 10)
    client = lab.run("server", [sys.executable, "-m", "tunvpnd.lab", "echo-client",
                                "192.168.60.5", "9000", "100000"], timeout=20)
    assert client.returncode == 0, client.stdout + client.stderr
    assert "100000 bytes echoed back identical" in client.stdout
    assert server.wait(timeout=10) == 0
    assert "echoed 100000 bytes to 192.168.60.11" in server.stdout.read()
    server.stdout.close()


def test_down_kills_spawned_processes() -> None:
    prefix = unique_prefix()
    lab = Lab(prefix)
    try:
        lab.up()
        procs = [lab.spawn(role, ["sleep", "300"]) for role in ("hostu", "server", "hostv")]
        ignorer = lab.spawn("hostu", [sys.executable, "-c",
                                      "import signal, time\n"
                                      "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                      "print('ok', flush=True)\ntime.sleep(300)"],
                            stdout=subprocess.PIPE, text=True)
        assert ignorer.stdout.readline().strip() == "ok"
        ignorer.stdout.close()
        assert all(p.poll() is None for p in procs)
    finally:
        lab.down()
    assert all(p.poll() is not None for p in [*procs, ignorer])
    assert ignorer.returncode == -9
    assert leftover_namespaces(prefix) == []


def test_down_from_another_process_stops_recorded_processes() -> None:
    """Like `tunvpnd lab up` then `tunvpnd lab down`: the starter has exited meanwhile."""
    prefix = unique_prefix()
    starter = (
        "import subprocess\n"
        "from tunvpnd.lab import Lab\n"
        f"lab = Lab({prefix!r})\n"
        "lab.up()\n"
        "p = lab.spawn('server', ['sleep', '300'], stdout=subprocess.DEVNULL,"
        "              stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
    )
    try:
        # DEVNULL: the sleeper must not hold our pipes open (run() would wait for EOF)
        out = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        pid = int(out.strip())
        assert alive(pid)
        assert leftover_namespaces(prefix)
    finally:
        Lab(prefix).down()
    wait_until(lambda: not alive(pid), 5, what=f"pid {pid} to go")
    assert leftover_namespaces(prefix) == []


def test_stale_lab_is_replaced_by_up() -> None:
    prefix = unique_prefix()
    before = root_links()
    old, new = Lab(prefix), Lab(prefix, extra_clients=1)
    try:
        old.up()
        stale = old.spawn("hostu", ["sleep", "300"])
        # an fd holds the old namespace alive, so the kernel cannot give its inode number to
        # the new one (seen once in CI: "assert 4026532400 != 4026532400")
        held = os.open(f"/var/run/netns/{prefix}-hostu", os.O_RDONLY)
        try:
            old_inode = os.fstat(held).st_ino
            new.up()                                  # without old.down()
            assert stale.wait(timeout=5) is not None
            assert os.stat(f"/var/run/netns/{prefix}-hostu").st_ino != old_inode
        finally:
            os.close(held)
        assert ping(new, "hostu2", "10.9.0.11").returncode == 0
        assert ping(new, "server", "192.168.60.5").returncode == 0
    finally:
        new.down()
        old.down()
    assert leftover_namespaces(prefix) == []
    assert root_links() == before


def test_prefix_matching_is_exact() -> None:
    prefix = unique_prefix()
    longer = Lab(f"{prefix}-more")                # its namespaces start with f"{prefix}-" too
    try:
        longer.up()
        assert leftover_namespaces(prefix) == []
        Lab(prefix).down()                        # must not touch the other lab
        assert sorted(leftover_namespaces(longer.prefix)) == sorted(longer.namespaces)
    finally:
        longer.down()
    assert leftover_namespaces(longer.prefix) == []


def test_lab_up_failure_cleans_up(capsys) -> None:
    """The `up` plumbing with a stand-in daemon that dies at once: 1, and nothing left."""
    prefix = unique_prefix()
    before = root_links()
    rc = labmod.lab_up(prefix, daemon_argv=[sys.executable, "-c",
                                            "import sys; print('stand-in died'); sys.exit(3)"],
                       ready_timeout=10)
    assert rc == 1
    out = capsys.readouterr().out
    assert "exited with status 3" in out and "stand-in died" in out
    assert leftover_namespaces(prefix) == []
    assert root_links() == before
    assert labmod.lab_down(prefix) == 0
    labmod.Lab(prefix).down()                     # the kept logs, too


def test_extra_clients_are_data() -> None:
    lab = Lab("tvtdata", extra_clients=8)
    assert [lab.addresses[f"hostu{n}"] for n in range(2, 10)] == [
        "10.9.0.6", "10.9.0.7", "10.9.0.8", "10.9.0.9", "10.9.0.10", "10.9.0.12",
        "10.9.0.13", "10.9.0.14"]                # 10.9.0.11 is the server's
    assert lab.hosts["hostu9"] == "tvtdata-hostu9"
    assert Lab().prefix == "tvlab"
    with pytest.raises(ValueError):
        Lab("bad prefix")


def test_wait_until() -> None:
    t0 = time.monotonic()
    wait_until(lambda: time.monotonic() - t0 > 0.1, 2)
    with pytest.raises(TimeoutError, match="the moon"):
        wait_until(lambda: False, 0.1, what="the moon")
