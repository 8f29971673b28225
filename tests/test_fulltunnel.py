"""Full-tunnel clients (routes 0.0.0.0/0 and ::/0) in the lab's "internet" world
(Lab(internet=True)): HostU behind a router, an internet host beyond the VPN server.

HostU reaches the internet host only through the tunnel (a capture on HostU's link sees the
outer UDP and no inner packet), the tunnel keeps working (no routing loop), and stop, kill -9 +
next start, kill -9 + `tunvpnd cleanup` leave HostU's rules, tables and routes exactly as
before. Both wires, IPv4 and IPv6. Plus the profile checks (table:, fwmark:, covering routes).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

from tests.conftest import fresh_lab, in_ns, ping
from tests.test_reload import reload
from tests.test_wgtunnel import Keys
from tunvpnd.lab import Lab
from tunvpnd.profile import ProfileError, load_profile
from tunvpnd.wireguard import keys as wgkeys

INET4, INET6 = "203.0.113.80", "fd13::80"
WIRES = ["plain", "wireguard"]

# Counts, on one interface until SIGTERM (at most 120 s), the frames of UDP port PORT (the
# tunnel's outer datagrams) and the frames to or from address ADDR (an inner packet in clear).
CAPTURE = textwrap.dedent("""
    import ipaddress, json, select, signal, socket, struct, sys, time
    ifname, port, addr = sys.argv[1], int(sys.argv[2]), ipaddress.ip_address(sys.argv[3])
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    counts = {"outer": 0, "inner": 0}
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.bind((ifname, 3))
    print("capturing", flush=True)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        try:   # once stopped: what is queued still counts (the last reply of a ping)
            if not select.select([s], [], [], 0 if stop else 0.2)[0]:
                if stop:
                    break
                continue
        except InterruptedError:
            continue
        f = s.recv(70000)
        kind = struct.unpack_from("!H", f, 12)[0]
        if kind == 0x0800:
            ihl, proto = (f[14] & 15) * 4, f[23]
            src, dst, l4 = f[26:30], f[30:34], 14 + (f[14] & 15) * 4
        elif kind == 0x86DD:
            proto, src, dst, l4 = f[20], f[22:38], f[38:54], 54
        else:
            continue
        ips = {ipaddress.ip_address(src), ipaddress.ip_address(dst)}
        if addr in ips:
            counts["inner"] += 1
        elif proto == 17 and port in struct.unpack_from("!HH", f, l4):
            counts["outer"] += 1
    print(json.dumps(counts), flush=True)
""")


def internet_lab():
    with fresh_lab("tvf", internet=True) as topology:
        yield topology


ilab = pytest.fixture(internet_lab)
ilab2 = pytest.fixture(internet_lab, name="ilab2")    # a second one, beside it


def policy(ip: Callable[..., str]) -> dict[str, list]:
    """Every rule and every route of every table, both families, as `ip -j` shows them on a
    host; `ip(*args)` is the output of `ip -j ARGS` there (lab_ip; test_systemd's box_ip)."""
    found = {}
    for family in ("-4", "-6"):
        for what in (["rule"], ["route", "show", "table", "all"]):
            found[f"{family} {what[0]}"] = json.loads(ip(family, *what) or "[]")
    return found


def assert_same_policy(before: dict[str, list], after: dict[str, list]) -> None:
    for key in before:
        added = [e for e in after[key] if e not in before[key]]
        gone = [e for e in before[key] if e not in after[key]]
        assert after[key] == before[key], f"{key}: added {added}, gone {gone}"


def rules_of_ours(ip: Callable[..., str]) -> list[dict]:
    """The policy rules tunvpnd made (protocol 86), both families."""
    return [rule for family in ("-4", "-6") for rule in json.loads(ip(family, "rule"))
            if rule.get("protocol") in ("86", 86)]


def lab_ip(lab: Lab, role: str = "hostu") -> Callable[..., str]:
    return lambda *args: in_ns(lab, role, ["ip", "-j", *args]).stdout


def snapshot(lab: Lab, role: str = "hostu") -> dict[str, list]:
    return policy(lab_ip(lab, role))


def assert_as_before(lab: Lab, before: dict[str, list], role: str = "hostu") -> None:
    assert_same_policy(before, snapshot(lab, role))


def ours(lab: Lab, role: str = "hostu") -> list[dict]:
    return rules_of_ours(lab_ip(lab, role))


class Capture:
    def __init__(self, lab: Lab, address: str, role: str = "hostu", ifname: str = "eth0"):
        self.proc = lab.spawn(role, [sys.executable, "-c", CAPTURE, ifname, "9090", address],
                              stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "capturing"

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        return json.loads(out.strip().splitlines()[-1])


def profiles(wire: str, keys: Keys | None, v6: bool = False, routes: str = "0.0.0.0/0",
             extra: str = "") -> tuple[str, str]:
    """(server, client) profile texts for the internet world."""
    server_addr = "[192.168.53.1/24, 'fd53::1/64']" if v6 else "192.168.53.1/24"
    client_addr = "[192.168.53.99/24, 'fd53::99/64']" if v6 else "192.168.53.99/24"
    endpoint = "'[fd09::11]:9090'" if v6 else "10.9.0.11:9090"
    listen = "'[::]:9090'" if v6 else "0.0.0.0:9090"
    server = f"mode: server\nlisten: {listen}\ninterface:\n  name: tun0\n  address: " \
             f"{server_addr}\nforward: true\nlog:\n  level: debug\n"
    client = f"mode: client\nserver: {endpoint}\ninterface:\n  name: tun0\n  address: " \
             f"{client_addr}\nroutes: [{routes}]\nkeepalive: 5\n{extra}log:\n  level: debug\n"
    if wire == "wireguard":
        allowed = "[192.168.53.99/32, 'fd53::99/128']" if v6 else "[192.168.53.99/32]"
        server += (f"wire: wireguard\nprivate_key_file: server.key\npeers:\n  - name: hostu\n"
                   f"    public_key: {wgkeys.encode_key(keys.client_pub)}\n"
                   f"    allowed_ips: {allowed}\n")
        client += (f"wire: wireguard\nprivate_key_file: client.key\n"
                   f"server_public_key: {wgkeys.encode_key(keys.server_pub)}\n")
    return server, client


def start(ilab, daemons, sockdir, wire: str, suffix: str = "", **kw):
    keys = Keys(sockdir) if wire == "wireguard" else None
    server_text, client_text = profiles(wire, keys, **kw)
    server = daemons(ilab, "server", server_text, name=f"server{suffix}")
    client = daemons(ilab, "hostu", client_text, name=f"client{suffix}")
    return server, client


def pings_only_through_the_tunnel(lab: Lab, address: str, family: str = "-4") -> None:
    capture = Capture(lab, address)
    try:
        ping(lab, "hostu", address, count=5, family=family)
    finally:
        counts = capture.stop()
    assert counts["inner"] == 0, counts
    assert counts["outer"] >= 10, counts  # 5 requests and 5 replies, in UDP


def test_the_capture_sees_a_direct_ping(ilab):
    """Without the tunnel HostU reaches the internet host directly: the capture that the other
    tests expect to stay at 0 inner packets does see them (so it can fail)."""
    capture = Capture(ilab, INET4)
    ping(ilab, "hostu", INET4, count=3)
    counts = capture.stop()
    assert counts["inner"] >= 6 and counts["outer"] == 0, counts


@pytest.mark.parametrize("wire", WIRES)
def test_full_tunnel_ipv4_and_stop_puts_everything_back(ilab, daemons, sockdir, wire):
    before = snapshot(ilab)
    server, client = start(ilab, daemons, sockdir, wire)
    rules = ours(ilab)
    assert sorted(r["priority"] for r in rules) == [32764, 32765], rules
    pings_only_through_the_tunnel(ilab, INET4)
    # HostU has global IPv6 (fd08::5) and only IPv4 goes into the tunnel: a leak, said so
    assert "full tunnel for IPv4 only, but this host has global IPv6 (fd08::5 on eth0)" \
        in client.log()
    assert "reverse-path" not in client.log()  # the lab's rp_filter is 0
    # IPv6 still leaves the normal way, as the warning says
    ping(ilab, "hostu", INET6, count=1, family="-6")
    assert client.stop() == 0
    assert_as_before(ilab, before)
    assert "Traceback" not in client.log() + server.log()


@pytest.mark.parametrize("wire", WIRES)
def test_full_tunnel_ipv6_underlay_and_both_families(ilab, daemons, sockdir, wire):
    before = snapshot(ilab)
    server, client = start(ilab, daemons, sockdir, wire, v6=True, routes="0.0.0.0/0, '::/0'")
    assert len(ours(ilab)) == 4
    pings_only_through_the_tunnel(ilab, INET6, family="-6")
    pings_only_through_the_tunnel(ilab, INET4)
    assert "global IPv6" not in client.log()
    assert client.stop() == 0
    assert_as_before(ilab, before)


def test_slow_full_tunnel_keeps_working_for_minutes_without_a_loop(ilab, ilab2, daemons,
                                                                   sockdir):
    """130 s of pings through a full tunnel on each wire at once, in two labs (past the
    WireGuard rekey at 120 s): none lost, and each client sent about what was asked (a routing
    loop would multiply its datagrams, or lose the server)."""
    count = 260                                      # at 0.5 s: 130 s
    runs = []
    for lab, wire in ((ilab, "plain"), (ilab2, "wireguard")):
        _server, client = start(lab, daemons, sockdir, wire, suffix=f"-{wire}")
        ping(lab, "hostu", INET4, count=2)
        pinger = lab.spawn("hostu", ["ping", "-c", str(count), "-i", "0.5", "-W", "2", INET4],
                           stdout=subprocess.PIPE, text=True)
        runs.append((wire, client, pinger))

    def tx(status: str) -> int:  # packets the client sent into the tunnel
        return int(status.split("tx ")[1].split(" pkts")[0])

    for wire, client, pinger in runs:
        out, _ = pinger.communicate(timeout=count * 0.5 + 60)
        assert " 0% packet loss" in out, (wire, out)
        status = client.wait_status(lambda s: tx(s) >= count + 2)
        assert tx(status) <= count + 2 + 20, (wire, status)  # the pings, and hardly more
        assert client.proc.poll() is None


def kill9(daemon) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)


@pytest.mark.parametrize("wire", WIRES)
def test_kill9_then_next_start_then_cleanup(ilab, daemons, sockdir, wire):
    before = snapshot(ilab)
    server, client = start(ilab, daemons, sockdir, wire, v6=True, routes="0.0.0.0/0, '::/0'")
    kill9(client)
    assert len(ours(ilab)) == 4  # what a crash leaves: the rules (the TUN took its routes)
    client.restart()  # the next start undoes what the dead run left, then sets up again
    assert "undid what an earlier run left behind: removed IPv4 rule 32764" in client.log()
    assert len(ours(ilab)) == 4
    pings_only_through_the_tunnel(ilab, INET4)
    kill9(client)
    env = {"TUNVPN_RUN_DIR": str(client.run_dir), "PATH": ""}
    result = ilab.run("hostu", [sys.executable, "-m", "tunvpnd", "cleanup",
                                str(client.profile)], env=env, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "removed IPv6 rule 32765" in result.stderr
    assert_as_before(ilab, before)
    ping(ilab, "hostu", INET4, count=1)  # the normal way again


def test_strict_rp_filter_is_warned_about(ilab, daemons, sockdir):
    """Measured: with rp_filter=1 the server's replies are dropped (their reverse route is the
    tunnel); the daemon cannot change that (all/ wins), so it says what to do."""
    for name in ("all", "eth0"):
        in_ns(ilab, "hostu", ["sysctl", "-qw", f"net.ipv4.conf.{name}.rp_filter=1"])
    server, client = start(ilab, daemons, sockdir, "plain")
    assert "strict reverse-path filtering (rp_filter=1) on eth0 drops the server's replies" \
        in client.log()
    assert ping(ilab, "hostu", INET4, count=2, check=False).returncode != 0
    in_ns(ilab, "hostu", ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2"])
    in_ns(ilab, "hostu", ["sysctl", "-qw", "net.ipv4.conf.eth0.rp_filter=2"])
    ping(ilab, "hostu", INET4, count=2)


def test_reload_keeps_the_full_tunnel_and_applies_other_routes(ilab, daemons, sockdir):
    server, client = start(ilab, daemons, sockdir, "plain")
    rules = ours(ilab)
    text = client.profile.read_text()
    client.profile.write_text(text.replace("routes: [0.0.0.0/0]", "routes: [10.77.0.0/16]"))
    reload(client)
    assert "the full tunnel (0.0.0.0/0, ::/0, table, fwmark) changed: restart" in client.log()
    assert ours(ilab) == rules
    main = json.loads(in_ns(ilab, "hostu", ["ip", "-j", "route", "show", "proto", "86"]).stdout)
    assert [r["dst"] for r in main] == ["10.77.0.0/16"]
    pings_only_through_the_tunnel(ilab, INET4)
    client.profile.write_text(text.replace("routes: [0.0.0.0/0]", "routes: [0.0.0.0/0, "
                                           "10.78.0.0/16]"))
    reload(client)
    assert client.log().count("the full tunnel (0.0.0.0/0") == 1  # unchanged now
    main = json.loads(in_ns(ilab, "hostu", ["ip", "-j", "route", "show", "proto", "86"]).stdout)
    assert [r["dst"] for r in main] == ["10.78.0.0/16"]
    pings_only_through_the_tunnel(ilab, INET4)


def test_start_refuses_a_table_in_use(ilab, daemons, sockdir):
    in_ns(ilab, "hostu", ["ip", "route", "add", "10.77.0.0/16", "dev", "eth0", "table", "1000"])
    before = snapshot(ilab)
    daemons(ilab, "server", profiles("plain", None)[0])
    client = daemons(ilab, "hostu", profiles("plain", None, extra="table: 1000\n")[1],
                     name="client", wait=False)
    assert client.proc.wait(30) == 1
    assert "IPv4 table 1000 already has 1 routes" in client.log()
    assert_as_before(ilab, before)


def test_explicit_table_and_fwmark_are_used(ilab, daemons, sockdir):
    start(ilab, daemons, sockdir, "plain", extra="table: 4242\nfwmark: 0x4243\n")
    rules = ours(ilab)
    assert {r.get("table") for r in rules} == {"main", "4242"}, rules
    assert {r.get("fwmark") for r in rules} == {"0x4243"}, rules
    pings_only_through_the_tunnel(ilab, INET4)


# --- profile checks ----------------------------------------------------------------------------


def write(tmp_path, name: str, text: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


CLIENT = "mode: client\nserver: 10.9.0.11:9090\ninterface:\n  address: 192.168.53.99/24\n"


def problems(path) -> list[str]:
    with pytest.raises(ProfileError) as error:
        load_profile(path)
    return error.value.problems


def test_check_accepts_a_default_route_covering_the_server(tmp_path):
    profile = load_profile(write(tmp_path, "c", CLIENT + "routes: [0.0.0.0/0, '::/0']\n"))
    assert profile.table is None and profile.fwmark is None


@pytest.mark.parametrize("route", ["0.0.0.0/1", "10.9.0.0/16", "10.9.0.11/32"])
def test_check_still_refuses_other_routes_covering_the_server(tmp_path, route):
    found = problems(write(tmp_path, "c", CLIENT + f"routes: [{route}]\n"))
    assert found == [f"{tmp_path}/c.yaml:5: routes[0]: {route} covers the server 10.9.0.11, so "
                     "the tunnel would carry its own datagrams into itself; only 0.0.0.0/0 and "
                     "::/0 (a full tunnel) are routed around that"], found


@pytest.mark.parametrize("extra, message", [
    ("table: 254\n", "table: 254 is one of the kernel's tables"),
    ("table: 0\n", "table: must be from 1 to 4294967295"),
    ("fwmark: 0\n", "fwmark: must be from 1 to 4294967295"),
    ("fwmark: true\n", "fwmark: must be an integer"),
])
def test_check_refuses_bad_table_and_fwmark(tmp_path, extra, message):
    found = problems(write(tmp_path, "c", CLIENT + "routes: [0.0.0.0/0]\n" + extra))
    assert any(message in p for p in found), found


def test_table_and_fwmark_need_a_full_tunnel(tmp_path):
    found = problems(write(tmp_path, "c", CLIENT + "routes: [10.1.0.0/16]\ntable: 100\n"))
    assert any("table: only used with a full tunnel" in p for p in found), found


def test_check_refuses_a_table_another_profile_has(tmp_path):
    write(tmp_path, "other", CLIENT + "routes: [0.0.0.0/0]\ntable: 100\nfwmark: 7\n")
    path = write(tmp_path, "c", CLIENT + "routes: [0.0.0.0/0]\ntable: 100\nfwmark: 8\n")
    found = problems(path)
    assert found == [f"{path}:6: table: 100 is also the table of other.yaml: two instances "
                     "would share it"], found
    path.write_text(CLIENT + "routes: [0.0.0.0/0]\ntable: 101\nfwmark: 8\n")
    assert load_profile(path).table == 101


def test_server_takes_no_table(tmp_path):
    text = "mode: server\ninterface:\n  address: 192.168.53.1/24\ntable: 5\n"
    assert any("table: only allowed in client mode" in p
               for p in problems(write(tmp_path, "s", text)))


@pytest.mark.parametrize("policy, problem", [
    ("{}", "policy: not a list"),
    ('[{"version": 5}]', "policy[0]: version: not 4 or 6"),
    ('[{"version": 4, "table": -1, "fwmark": 1, "ifindex": 3, "ifname": "tun0"}]',
     "policy[0]: table: missing or not a 32-bit integer"),
])
def test_a_damaged_policy_record_in_the_state_file_is_refused(tmp_path, policy, problem):
    """Nothing is touched on a record that is not ours (the file is read before any change)."""
    from tunvpnd.netconf import NetConfig, NetConfigError

    state = tmp_path / "c.state"
    state.write_text(f'{{"pid": null, "policy": {policy}}}')
    with NetConfig(state) as netconf, pytest.raises(NetConfigError) as error:
        netconf.recover()
    assert f"not a tunvpnd state file ({problem})" in str(error.value)
    assert "ip rule show proto 86" in str(error.value)
    assert state.exists()
