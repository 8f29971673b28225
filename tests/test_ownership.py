"""What the daemon may touch, end to end in lab namespaces: only routes it created, only a TUN
it created, only while it holds its profile's lock, and nothing half done when a signal comes
in while it starts.

Every case is one the hostile tester of issue 8 saw go wrong; each test looks at the host the
way an operator would (`ip route`, `ip link`, the run directory) before, during and after.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.conftest import (
    Daemon,
    client_profile,
    forwarding,
    in_ns,
    ip_json,
    ping,
    server_profile,
    tun_links,
)
from tunvpnd.lab import wait_until
from tunvpnd.netconf import RTPROT_TUNVPND

HOSTV = "192.168.60.5"


def main_routes(lab, role: str, but_dev: str | None = None) -> list[dict]:
    """Every route of the main table (IPv4 and IPv6) as `ip -j route` shows it, except those
    on `but_dev`, in a stable order: the witness that a route was left alone."""
    routes = []
    for family in ("-4", "-6"):
        routes += [r for r in ip_json(lab, role, family, "route", "show", "table", "main")
                   if r.get("dev") != but_dev]
    return sorted(routes, key=lambda r: json.dumps(r, sort_keys=True))


def our_routes(lab, role: str) -> list[str]:
    return sorted(f"{r['dst']} dev {r['dev']}" for family in ("-4", "-6")
                  for r in ip_json(lab, role, family, "route", "show", "proto",
                                   str(RTPROT_TUNVPND)))


def ipv6_underlay(lab) -> None:
    """HostU reaches the server over IPv6 too. A client whose server is fd09::11 may send any
    IPv4 network into its tunnel, so what is tested here is the daemon's own check at start,
    not the profile's static one (a route covering the server's literal address)."""
    for role, address in (("server", "fd09::11/64"), ("hostu", "fd09::5/64")):
        in_ns(lab, role, ["ip", "addr", "add", address, "dev", "eth0", "nodad"])


def v6_client(routes: str) -> str:
    return client_profile(routes=routes).replace("10.9.0.11:9090", "'[fd09::11]:9090'")


def refused(daemon, timeout: float = 15.0) -> str:
    """Wait for a daemon that must not start: exit status 1, no READY; its log."""
    code = daemon.proc.wait(timeout)
    assert code == 1, daemon.log()
    assert "READY=1" not in daemon.fields()
    assert "Traceback" not in daemon.log()
    return daemon.log()


def leftovers(daemon) -> list[str]:
    return sorted(p.name for p in daemon.run_dir.glob("*") if not p.name.endswith(".lock"))


# -- item 1: routes it does not own ----------------------------------------------------------


def test_a_route_someone_else_made_is_neither_taken_nor_deleted(lab, daemons):
    """(A full tunnel's 0.0.0.0/0 lives in a table of its own and never meets the main
    table's default route: tests/test_fulltunnel.py.)"""
    ipv6_underlay(lab)
    in_ns(lab, "hostu", ["ip", "route", "add", "172.16.0.0/16", "via", "10.9.0.11"])
    before = main_routes(lab, "hostu")
    client = daemons(lab, "hostu", v6_client("172.16.0.0/16, 192.168.60.0/24"), wait=False)
    log = refused(client)
    assert ("route 172.16.0.0/16 dev tun0: 172.16.0.0/16 via 10.9.0.11 dev eth0 proto boot "
            "exists already (not ours)") in log
    assert main_routes(lab, "hostu") == before  # nothing added either (192.168.60.0/24)
    assert tun_links(lab, "hostu") == [] and leftovers(client) == []


def test_connected_subnet_of_the_underlay_is_neither_taken_nor_deleted(lab, daemons):
    ipv6_underlay(lab)
    before = main_routes(lab, "hostu")
    client = daemons(lab, "hostu", v6_client("10.9.0.0/24, 192.168.60.0/24"), wait=False)
    log = refused(client)
    assert "route 10.9.0.0/24 dev tun0: 10.9.0.0/24 dev eth0 proto kernel" in log
    assert main_routes(lab, "hostu") == before
    ping(lab, "hostu", "10.9.0.11")  # the underlay still works
    assert tun_links(lab, "hostu") == [] and leftovers(client) == []


def test_second_instance_does_not_take_the_first_ones_route(lab, daemons):
    daemons(lab, "server", server_profile())
    first = daemons(lab, "hostu", client_profile(), name="first")
    ping(lab, "hostu", HOSTV)
    ours = our_routes(lab, "hostu")
    assert ours == ["192.168.60.0/24 dev tun0"]
    state = (first.run_dir / "first.state").read_text()
    second = daemons(lab, "hostu", client_profile(address="192.168.53.98/24").replace(
        "name: tun0", "name: tun1"), name="second", wait=False)
    log = refused(second)
    assert ("start failed: route 192.168.60.0/24 dev tun1: 192.168.60.0/24 dev tun0 proto 86 "
            "exists already (not ours)") in log
    assert our_routes(lab, "hostu") == ours
    assert (first.run_dir / "first.state").read_text() == state
    ping(lab, "hostu", HOSTV)  # the first tunnel did not notice
    assert first.stop() == 0
    assert our_routes(lab, "hostu") == []


def test_reload_skips_routes_it_does_not_own_and_applies_the_rest(lab, daemons):
    ipv6_underlay(lab)
    in_ns(lab, "hostu", ["ip", "route", "add", "172.16.0.0/16", "via", "10.9.0.11"])
    before = main_routes(lab, "hostu")
    client = daemons(lab, "hostu", v6_client("192.168.60.0/24"))
    client.profile.write_text(v6_client("192.168.60.0/24, 10.9.0.0/24, 172.16.0.0/16, "
                                        "192.168.70.0/24"))
    mark = len(client.fields())
    client.signal(signal.SIGHUP)
    client.wait_for("READY=1", after=client.wait_for("RELOADING=1", after=mark))
    log = client.log()
    assert ("reload: skipped route 10.9.0.0/24 dev tun0: 10.9.0.0/24 dev eth0 proto kernel"
            in log), log
    assert ("reload: skipped route 172.16.0.0/16 dev tun0: 172.16.0.0/16 via 10.9.0.11 dev "
            "eth0 proto boot exists already (not ours)") in log
    assert our_routes(lab, "hostu") == ["192.168.60.0/24 dev tun0", "192.168.70.0/24 dev tun0"]
    assert main_routes(lab, "hostu", but_dev="tun0") == before  # during the run
    assert client.stop() == 0
    assert main_routes(lab, "hostu") == before  # and after it
    assert leftovers(client) == []


# -- item 9: one daemon per profile ----------------------------------------------------------


def test_second_start_of_a_running_profile_exits_and_touches_nothing(lab, daemons, sockdir):
    first = daemons(lab, "server", server_profile(extra="routes: [192.168.70.0/24]"),
                    name="srv")
    state = (first.run_dir / "srv.state").read_text()
    flags = forwarding(lab, "server")
    again = Daemon(lab, "server", "", sockdir, "srv2", env={"TUNVPN_RUN_DIR": str(first.run_dir)})
    again.profile = first.profile  # the same profile, the same run directory
    try:
        again.start(wait=False)
        log = refused(again)
    finally:
        again.close()
    assert (f"start failed: tunvpnd srv is already running (pid {first.pid}; lock "
            f"{first.run_dir / 'srv.lock'})") in log
    assert "undid" not in log
    assert (first.run_dir / "srv.state").read_text() == state
    assert our_routes(lab, "server") == ["192.168.70.0/24 dev tun0"]
    assert len(tun_links(lab, "server")) == 1 and forwarding(lab, "server") == flags
    assert first.proc.poll() is None
    assert first.stop() == 0 and our_routes(lab, "server") == []


def test_daemons_started_at_once_on_one_profile_only_one_runs(lab, sockdir):
    run = sockdir / "run"
    profile = sockdir / "at-once.yaml"
    profile.write_text(client_profile().replace("name: tun0", "name: tun%d"))
    racers = [Daemon(lab, "hostu", "", sockdir, f"r{i}", env={"TUNVPN_RUN_DIR": str(run)})
              for i in range(3)]
    try:
        for racer in racers:
            racer.profile = profile
        for racer in racers:
            racer.start(wait=False)

        def settled() -> bool:
            return sum(r.proc.poll() is None for r in racers) <= 1 and any(
                "READY=1" in r.fields() for r in racers)

        wait_until(settled, 20, what="all but one daemon gave up")
        (winner,) = [r for r in racers if r.proc.poll() is None]
        assert "READY=1" in winner.fields()
        for loser in racers:
            if loser is not winner:
                assert loser.proc.returncode == 1, loser.log()
                assert "start failed: tunvpnd at-once is already running (pid " in loser.log()
                assert f"(pid {winner.pid};" in loser.log() or "(pid unknown;" in loser.log()
        (tun,) = tun_links(lab, "hostu")
        assert our_routes(lab, "hostu") == [f"192.168.60.0/24 dev {tun['ifname']}"]
        assert json.loads((run / "at-once.state").read_text())["pid"] == winner.pid
        assert winner.stop() == 0
        assert our_routes(lab, "hostu") == [] and tun_links(lab, "hostu") == []
    finally:
        for racer in racers:
            racer.close()


# -- item 10: an existing interface is refused, never adopted --------------------------------


def interface_snapshot(lab, role: str, name: str) -> tuple:
    link = ip_json(lab, role, "-d", "link", "show", "dev", name)
    for entry in link:  # counters move with any traffic; everything else must not
        entry.pop("stats64", None)
        entry.pop("stats", None)
    return (link, ip_json(lab, role, "addr", "show", "dev", name),
            main_routes(lab, role))


def test_existing_persistent_tun_is_refused_and_left_as_it_was(lab, daemons):
    for argv in (["ip", "tuntap", "add", "dev", "tun0", "mode", "tun"],
                 ["ip", "link", "set", "tun0", "mtu", "1300"],
                 ["ip", "addr", "add", "10.77.0.1/24", "dev", "tun0"],
                 ["ip", "link", "set", "tun0", "up"]):
        in_ns(lab, "hostu", argv)
    before = interface_snapshot(lab, "hostu", "tun0")
    (info,) = [link["linkinfo"]["info_data"] for link in tun_links(lab, "hostu")]
    assert info["type"] == "tun" and not info["vnet_hdr"]  # adopting it would switch this on
    client = daemons(lab, "hostu", client_profile(), wait=False)
    log = refused(client)
    assert ("start failed: interface tun0 exists already (not created by this daemon); "
            "remove it or choose another interface.name") in log
    assert interface_snapshot(lab, "hostu", "tun0") == before
    assert leftovers(client) == []


def test_an_existing_interface_that_is_not_a_tun_is_refused(lab, daemons):
    before = interface_snapshot(lab, "hostu", "eth0")
    client = daemons(lab, "hostu", client_profile().replace("name: tun0", "name: eth0"),
                     wait=False)
    assert "start failed: interface eth0 exists already" in refused(client)
    assert interface_snapshot(lab, "hostu", "eth0") == before


# -- item 13: signals while starting ---------------------------------------------------------

# Moments to send the signal at, all once cli.main holds the signals (before that the
# interpreter is still starting, and a signal does what it does to any Python program: killed,
# a KeyboardInterrupt in its init, or, seen twice in loaded runs, lost): at once, once the lock
# is taken, once the state file exists (TUN up, routes being added), and fixed offsets that
# land in between on this machine.
MOMENTS = ("held", "state", 0.05, 0.1, 0.15, 0.25, "lock")
_HELD = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGHUP - 1))


def signals_held(pid: int) -> bool:
    """Whether the process blocks SIGTERM, SIGINT and SIGHUP (as cli.main does for `run`)."""
    with open(f"/proc/{pid}/status") as f:
        blocked = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
    return blocked & _HELD == _HELD


def signal_while_starting(lab, daemons, name: str, number: int, moment) -> tuple[Daemon, bool]:
    """Start a forwarding server, send `number` at `moment`; return it and whether its
    handlers were certainly in place (it had taken its lock) when the signal was sent."""
    daemon = daemons(lab, "server", server_profile(extra="routes: [192.168.70.0/24]"),
                     name=name, wait=False)
    lock = daemon.run_dir / f"{name}.lock"
    # held by cli.main, or already unblocked by the daemon's handlers (which take the lock next)
    wait_until(lambda: lock.exists() or signals_held(daemon.pid), 15, 0.001,
               what="the signals held")
    if moment == "lock":
        wait_until(lambda: lock.exists() and lock.read_text().strip(), 15, 0.001,
                   what="the lock")
    elif moment == "state":
        wait_until(lambda: (daemon.run_dir / f"{name}.state").exists(), 15, 0.001,
                   what="the state file")
    elif moment != "held":
        time.sleep(moment)  # a deliberate offset, not a wait for something
    handled = lock.exists()
    daemon.signal(number)
    return daemon, handled


def assert_nothing_left(lab, daemon, flags: dict) -> None:
    assert tun_links(lab, "server") == []
    assert our_routes(lab, "server") == []
    assert forwarding(lab, "server") == flags
    assert leftovers(daemon) == [], leftovers(daemon)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_signal_while_starting_exits_0_and_leaves_nothing(lab, daemons, number):
    flags = forwarding(lab, "server")
    for i, moment in enumerate(MOMENTS):
        daemon, handled = signal_while_starting(lab, daemons, f"s{i}", number, moment)
        try:
            code = daemon.proc.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{moment}: still running 15 s after the signal "
                                 f"(sent with the lock {'taken' if handled else 'not yet taken'})"
                                 f"\n{daemon.log()}") from None
        assert code == 0, f"{moment}: exit {code}\n{daemon.log()}"
        assert "Traceback" not in daemon.log()  # Python's own KeyboardInterrupt
        assert_nothing_left(lab, daemon, flags)


def test_sighup_while_starting_does_not_kill_it(lab, daemons):
    flags = forwarding(lab, "server")
    for i, moment in enumerate(MOMENTS):
        daemon, _ = signal_while_starting(lab, daemons, f"h{i}", signal.SIGHUP, moment)
        daemon.wait_for("READY=1")
        assert daemon.proc.poll() is None
        assert our_routes(lab, "server") == ["192.168.70.0/24 dev tun0"]
        assert daemon.stop() == 0, daemon.log()
        assert_nothing_left(lab, daemon, flags)
