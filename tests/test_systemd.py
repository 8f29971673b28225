"""tunvpnd@.service under a real systemd (PID 1 of a throw-away box, tests/sdbox.py).

Inside each box: the lab topology in network namespaces, the shipped unit with a test-only
drop-in `NetworkNamespacePath=` per instance (the client in HostU, client2 in HostU2, the server
in the VPN server host), profiles in /etc/tunvpn, and the daemon as installed on the host
(/usr/local/bin/tunvpnd, the venv under /opt/tunvpnd). Everything the unit's hardening forbids
would fail here. Secure mode: wireguard profiles whose keys are root-only files in /etc/tunvpn,
read by the DynamicUser through the unit's LoadCredential= lines only. Issue 11: a full-tunnel
client in the road warrior's world (Lab(internet=True), fixture `ibox`) and a masquerading
server, both under the unchanged hardening.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import REPO, client_profile, server_profile
from tests.sdbox import SystemdBox, assert_host_same, host_snapshot
from tests.test_fulltunnel import assert_same_policy, policy, rules_of_ours
from tests.test_wgtunnel import Keys, client_text, server_text
from tunvpnd.lab import wait_until
from tunvpnd.wireguard import keys as wgkeys

UNIT = REPO / "systemd" / "tunvpnd@.service"
# The checkout, bound read-only into the box for the test helpers run there (tests.nftread):
# the box has a /tmp of its own, and CI may clone the repo anywhere, /tmp included.
BOX_REPO = "/srv/tunvpnd-checkout"
TARGET = REPO / "systemd" / "tunvpnd.target"
PYTHON = "/opt/tunvpnd/bin/python"
HOSTV = "192.168.60.5"
NETNS = {"client": "lab-hostu", "client2": "lab-hostu2", "server": "lab-server"}
CAP_NET_ADMIN = 1 << 12


def booted_box(internet: bool = False) -> Iterator[SystemdBox]:
    """A booted box with the units and the lab in it (install()); stopped afterwards, and the
    host found as it was before."""
    before = host_snapshot()
    sdbox = SystemdBox("tvsd", binds={str(REPO): BOX_REPO})
    try:
        sdbox.start()
        install(sdbox, internet=internet)
        yield sdbox
    finally:
        sdbox.stop()
    assert_host_same(before, host_snapshot(), sdbox.name)


@pytest.fixture
def box():
    yield from booted_box()


def install(box: SystemdBox, internet: bool = False) -> None:
    """The units as shipped, the lab topology, and a drop-in per instance for its namespace.
    `internet`: the road warrior's world instead (Lab(internet=True): HostU behind a router,
    an "internet" host beyond the server; no HostU2)."""
    box.write_file("/etc/systemd/system/tunvpnd@.service", UNIT.read_text())
    box.write_file("/etc/systemd/system/tunvpnd.target", TARGET.read_text())
    for instance, netns in NETNS.items():
        box.write_file(f"/etc/systemd/system/tunvpnd@{instance}.service.d/test-netns.conf",
                       f"[Service]\nNetworkNamespacePath=/run/netns/{netns}\n")
    lab = "internet=True" if internet else "extra_clients=1"
    box.run([PYTHON, "-c", f"from tunvpnd.lab import Lab; Lab('lab', {lab}).up()"])
    box.write_file("/etc/tunvpn/server.yaml", server_profile())
    box.write_file("/etc/tunvpn/client.yaml", client_profile())
    box.systemctl("daemon-reload")


def in_netns(box: SystemdBox, instance: str, *argv: str, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess:
    return box.run(["ip", "netns", "exec", NETNS.get(instance, instance), *argv], check=check,
                   timeout=timeout)


def show(box: SystemdBox, unit: str, prop: str) -> str:
    return box.systemctl("show", "-p", prop, "--value", unit).stdout.strip()


def routes(box: SystemdBox, instance: str) -> list[str]:
    out = in_netns(box, instance, "ip", "-j", "route", "show", "proto", "86").stdout
    return sorted(r["dst"] for r in json.loads(out or "[]"))


def tun_ifindexes(box: SystemdBox, instance: str) -> list[int]:
    out = in_netns(box, instance, "ip", "-j", "-d", "link", "show").stdout
    return [link["ifindex"] for link in json.loads(out)
            if link.get("linkinfo", {}).get("info_kind") == "tun"]


def forwarding(box: SystemdBox, instance: str) -> dict[str, str]:
    """The IPv4 forwarding flag of each ethN link in the instance's namespace."""
    out = in_netns(box, instance, "sh", "-c",
                   "grep . /proc/sys/net/ipv4/conf/eth*/forwarding").stdout
    return {line.split("/")[-2]: line.rsplit(":", 1)[1] for line in out.splitlines()}


def ping(box: SystemdBox, count: int = 3, interval: str = "0.2") -> subprocess.CompletedProcess:
    return in_netns(box, "client", "ping", "-c", str(count), "-i", interval, "-W", "2", HOSTV)


def journal(box: SystemdBox, unit: str, *args: str) -> list[dict]:
    out = box.journalctl("-u", unit, "-o", "json", "--no-pager", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def messages(box: SystemdBox, unit: str, *args: str) -> list[str]:
    return [entry["MESSAGE"] for entry in journal(box, unit, *args)
            if isinstance(entry.get("MESSAGE"), str)]


def start_tunnel(box: SystemdBox) -> None:
    box.systemctl("start", "tunvpnd@server", "tunvpnd@client")


# -- the unit file itself -------------------------------------------------------------------

def test_unit_verifies_and_exposure_is_at_most_2(tmp_path):
    unit = tmp_path / "tunvpnd@client.service"
    unit.write_text(UNIT.read_text())
    (tmp_path / "tunvpnd.target").write_text(TARGET.read_text())
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for .*: (\d+\.\d+)", security.stdout)
    assert score, security.stdout + security.stderr
    print(f"systemd-analyze security exposure: {score.group(1)}")
    assert float(score.group(1)) <= 2.0


# -- under systemd ----------------------------------------------------------------------------

def test_start_ready_only_with_tunnel_up_and_working(box):
    start_tunnel(box)  # returns once READY=1 arrived, or fails
    # so the TUN and its routes exist the moment the unit is active
    assert routes(box, "client") == ["192.168.60.0/24"]
    assert len(tun_ifindexes(box, "server")) == 1
    for unit in ("tunvpnd@server", "tunvpnd@client"):
        assert show(box, unit, "ActiveState") == "active"
        assert show(box, unit, "SubState") == "running"
    ping(box)
    in_netns(box, "lab-hostv", PYTHON, "-c", "import sys")  # the namespace exists
    echo = box.run(["sh", "-c",
                    f"ip netns exec lab-hostv {PYTHON} -m tunvpnd.lab echo-server 9000 & "
                    f"sleep 0.5; ip netns exec lab-hostu {PYTHON} -m tunvpnd.lab echo-client "
                    f"{HOSTV} 9000 153600; wait"], timeout=60)
    assert "153600 bytes echoed back identical" in echo.stdout
    status = box.systemctl("status", "--no-pager", "tunvpnd@client", check=False).stdout
    assert re.search(r"Status: \"server 10\.9\.0\.11:9090; rx \d+ pkts", status), status


def test_hardening_is_in_force(box):
    start_tunnel(box)
    pid = show(box, "tunvpnd@client", "MainPID")
    proc = box.read_file(f"/proc/{pid}/status")
    uid = int(re.search(r"^Uid:\s+(\d+)", proc, re.M).group(1))
    effective = int(re.search(r"^CapEff:\s+([0-9a-f]+)", proc, re.M).group(1), 16)
    bounding = int(re.search(r"^CapBnd:\s+([0-9a-f]+)", proc, re.M).group(1), 16)
    assert uid != 0  # DynamicUser
    assert effective == CAP_NET_ADMIN and bounding == CAP_NET_ADMIN
    assert re.search(r"^NoNewPrivs:\s+1", proc, re.M)
    assert re.search(r"^Seccomp:\s+2", proc, re.M)  # SystemCallFilter
    ping(box)


def test_journal_priorities_and_no_double_timestamps(box):
    start_tunnel(box)
    ping(box)
    # a warning: a key that needs a restart; then an error: a broken profile
    box.write_file("/etc/tunvpn/client.yaml", client_profile().replace("tun0", "tun7"))
    box.systemctl("reload", "tunvpnd@client")
    box.write_file("/etc/tunvpn/client.yaml", client_profile() + "bogus: 1\n")
    box.systemctl("reload", "tunvpnd@client")
    entries = [e for e in journal(box, "tunvpnd@client") if e.get("SYSLOG_IDENTIFIER") ==
               "tunvpnd"]
    assert any("client tun0 up" in e["MESSAGE"] and e["PRIORITY"] == "6" for e in entries)
    assert any("restart the service" in e["MESSAGE"] and e["PRIORITY"] == "4" for e in entries)
    assert any("bogus: unknown key" in e["MESSAGE"] and e["PRIORITY"] == "3" for e in entries)
    for entry in entries:
        assert not re.match(r"\d{4}-\d\d-\d\d", entry["MESSAGE"]), entry["MESSAGE"]
        assert not entry["MESSAGE"].startswith("<")
    warnings = journal(box, "tunvpnd@client", "-p", "warning")
    assert warnings and all(int(e["PRIORITY"]) <= 4 for e in warnings)


def test_reload_adds_route_live_and_survives_a_broken_profile(box):
    start_tunnel(box)
    pid = show(box, "tunvpnd@client", "MainPID")
    index = tun_ifindexes(box, "client")
    pinger = box.popen(["ip", "netns", "exec", NETNS["client"], "ping", "-c", "40", "-i", "0.1",
                        "-W", "1", HOSTV], stdout=subprocess.PIPE, text=True)
    try:
        box.write_file("/etc/tunvpn/client.yaml",
                       client_profile(routes="192.168.60.0/24, 192.168.70.0/24"))
        box.systemctl("reload", "tunvpnd@client")
        assert routes(box, "client") == ["192.168.60.0/24", "192.168.70.0/24"]
        assert show(box, "tunvpnd@client", "MainPID") == pid
        assert tun_ifindexes(box, "client") == index
        out, _ = pinger.communicate(timeout=30)
    finally:
        if pinger.poll() is None:
            pinger.kill()
    assert "40 packets transmitted, 40 received" in out  # the tunnel never dropped

    box.write_file("/etc/tunvpn/client.yaml", client_profile() + "\nmtu: [\n")
    box.systemctl("reload", "tunvpnd@client")
    assert show(box, "tunvpnd@client", "ActiveState") == "active"
    assert show(box, "tunvpnd@client", "MainPID") == pid
    assert any("/etc/tunvpn/client.yaml:" in m and "YAML" in m
               for m in messages(box, "tunvpnd@client"))
    ping(box)


def test_reload_of_the_target_reaches_every_instance(box):
    box.systemctl("start", "tunvpnd.target", "tunvpnd@server", "tunvpnd@client")
    box.write_file("/etc/tunvpn/client.yaml",
                   client_profile(routes="192.168.60.0/24, 192.168.71.0/24"))
    box.systemctl("reload", "tunvpnd.target")
    wait_until(lambda: routes(box, "client") == ["192.168.60.0/24", "192.168.71.0/24"], 10,
               what="the client's new route after reloading the target")
    assert any("reloaded" in m for m in messages(box, "tunvpnd@server"))


def test_bad_profile_fails_with_78_and_is_not_restarted(box):
    box.write_file("/etc/tunvpn/client.yaml", client_profile().replace("mode: client",
                                                                       "mode: clint"))
    result = box.systemctl("start", "tunvpnd@client", check=False)
    assert result.returncode != 0
    assert show(box, "tunvpnd@client", "ExecMainStatus") == "78"
    assert show(box, "tunvpnd@client", "ActiveState") == "failed"
    started = time.monotonic()
    # RestartSec is 2 s: wait past it and see that no restart happened
    wait_until(lambda: time.monotonic() - started > 3, 5)
    assert show(box, "tunvpnd@client", "NRestarts") == "0"
    lines = messages(box, "tunvpnd@client", "-p", "err")
    assert any(m.startswith("/etc/tunvpn/client.yaml:1: mode: must be one of client, server")
               for m in lines), lines
    assert tun_ifindexes(box, "client") == []


def test_kill9_is_restarted_cleanly(box):
    start_tunnel(box)
    ping(box)
    before = forwarding(box, "server")  # as the running server set them
    pid = show(box, "tunvpnd@server", "MainPID")
    killed = time.monotonic()
    box.run(["kill", "-9", pid])
    wait_until(lambda: show(box, "tunvpnd@server", "NRestarts") == "1" and
               show(box, "tunvpnd@server", "ActiveState") == "active", 20,
               what="systemd to restart the server")
    assert show(box, "tunvpnd@server", "MainPID") != pid

    def tunnel_works() -> bool:
        return in_netns(box, "client", "ping", "-c", "1", "-W", "1", HOSTV,
                        check=False).returncode == 0

    wait_until(tunnel_works, 20, interval=0.1, what="the tunnel to work again")
    print(f"kill -9 to a working tunnel again: {time.monotonic() - killed:.2f} s")
    assert len(tun_ifindexes(box, "server")) == 1
    # ExecStopPost put back the dead run's forwarding flags before systemd restarted it
    assert any("undid what a crashed run left behind" in m
               for m in messages(box, "tunvpnd@server"))
    assert forwarding(box, "server") == before


def test_watchdog_restarts_a_stopped_daemon(box):
    box.write_file("/etc/systemd/system/tunvpnd@client.service.d/test-watchdog.conf",
                   "[Service]\nWatchdogSec=2s\n")
    box.systemctl("daemon-reload")
    start_tunnel(box)
    pid = show(box, "tunvpnd@client", "MainPID")
    box.run(["kill", "-STOP", pid])
    wait_until(lambda: show(box, "tunvpnd@client", "NRestarts") == "1" and
               show(box, "tunvpnd@client", "ActiveState") == "active", 30,
               what="the watchdog to restart the client")
    assert show(box, "tunvpnd@client", "MainPID") != pid
    assert any("atchdog timeout" in m for m in box.journalctl("--no-pager").stdout.splitlines())
    wait_until(lambda: in_netns(box, "client", "ping", "-c", "1", "-W", "1", HOSTV,
                                check=False).returncode == 0, 20, what="the tunnel again")


def test_stop_puts_everything_back(box):
    before = forwarding(box, "server")
    assert before == {"eth0": "0", "eth1": "0"}
    start_tunnel(box)
    assert forwarding(box, "server") == {"eth0": "1", "eth1": "1"}
    box.systemctl("stop", "tunvpnd@client", "tunvpnd@server")
    for instance in ("client", "server"):
        assert tun_ifindexes(box, instance) == []
        assert routes(box, instance) == []
        assert show(box, f"tunvpnd@{instance}", "ExecMainStatus") == "0"
    assert forwarding(box, "server") == before


def test_crash_without_restart_is_cleaned_up_by_exec_stop_post(box):
    box.write_file("/etc/systemd/system/tunvpnd@server.service.d/test-norestart.conf",
                   "[Service]\nRestart=no\n")
    box.systemctl("daemon-reload")
    before = forwarding(box, "server")
    start_tunnel(box)
    assert forwarding(box, "server") != before
    box.run(["kill", "-9", show(box, "tunvpnd@server", "MainPID")])
    wait_until(lambda: show(box, "tunvpnd@server", "ActiveState") == "failed", 20,
               what="the server unit to fail")
    assert forwarding(box, "server") == before
    assert any("undid what a crashed run left behind" in m
               for m in messages(box, "tunvpnd@server"))


# -- secure mode: keys through LoadCredential=, reload with two peers --------------------------

HOSTU2_ADDRESS = "192.168.53.98"


def status_text(box: SystemdBox, unit: str) -> str:
    return show(box, unit, "StatusText")


def wait_status(box: SystemdBox, unit: str, predicate, timeout: float = 30) -> str:
    found = []

    def check() -> bool:
        found[:] = [status_text(box, unit)]
        return predicate(found[0])

    wait_until(check, timeout, interval=0.2, what=f"{unit}'s STATUS (last: {found})")
    return found[0]


def handshake_age(status: str, peer: str) -> int:
    found = re.search(rf"\b{peer} up, handshake (\d+)s ago", status)
    return int(found.group(1)) if found else -1


def start_wireguard(box: SystemdBox, *clients: str) -> None:
    """The server first, so that the clients' first handshake initiation finds it listening
    (a lost one is only retried after REKEY_TIMEOUT, 5 s); then a ping through each client."""
    box.systemctl("start", "tunvpnd@server")
    for client in clients:
        box.systemctl("start", f"tunvpnd@{client}")
        wait_until(lambda client=client: in_netns(box, client, "ping", "-c", "1", "-W", "1",
                                                  HOSTV, check=False).returncode == 0,
                   30, what=f"a ping through tunvpnd@{client}")


def write_key(box: SystemdBox, path: str, key: bytes) -> None:
    """A key file as an operator makes one: root's, mode 0600 (`umask 077; tunvpnd genkey`)."""
    box.write_file(path, wgkeys.encode_key(key) + "\n", mode=0o600)


def second_client(tmp_path) -> Keys:
    """client2's own keys (only .client and .client_pub are used)."""
    directory = tmp_path / "client2"
    directory.mkdir()
    return Keys(directory)


def client2_text(keys: Keys) -> str:
    """HostU2's profile: the same server, its own key file and tunnel address."""
    return (client_text(keys).replace("client.key", "client2.key")
            .replace("192.168.53.99/24", f"{HOSTU2_ADDRESS}/24"))


def client2_peer(other: Keys) -> str:
    return f"""\
  - name: hostu2
    public_key: {wgkeys.encode_key(other.client_pub)}
    allowed_ips: [{HOSTU2_ADDRESS}/32]
"""


def install_wireguard(box: SystemdBox, keys: Keys, psk: bool = False) -> None:
    """wireguard profiles for tunvpnd@server and tunvpnd@client, their keys root-only in
    /etc/tunvpn: NAME.key and the client's NAME.psk through the shipped unit's LoadCredential=,
    the server's per-peer preshared key through a drop-in (as the unit's comment says)."""
    write_key(box, "/etc/tunvpn/server.key", keys.server)
    write_key(box, "/etc/tunvpn/client.key", keys.client)
    box.write_file("/etc/tunvpn/server.yaml", server_text(keys, psk))
    box.write_file("/etc/tunvpn/client.yaml",
                   client_text(keys, psk).replace("shared.psk", "client.psk"))
    if psk:
        write_key(box, "/etc/tunvpn/client.psk", keys.psk)
        write_key(box, "/etc/tunvpn/shared.psk", keys.psk)
        box.write_file("/etc/systemd/system/tunvpnd@server.service.d/psk.conf",
                       "[Service]\nLoadCredential=shared.psk:/etc/tunvpn/shared.psk\n")
        box.systemctl("daemon-reload")


@pytest.mark.parametrize("default", ["\n", "\0", ""])
def test_the_units_blank_credential_default_means_not_given(tmp_path, monkeypatch, default):
    """What the unit's `SetCredential=%i.key:\\n` leaves when /etc/tunvpn/NAME.key is missing
    is no key: the daemon looks beside the profile; a real credential still wins."""
    credentials, profiles = tmp_path / "credentials", tmp_path / "etc"
    credentials.mkdir()
    profiles.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    (credentials / "client.key").write_text(default)
    assert wgkeys.find_key_file("client.key", profiles) == profiles / "client.key"
    (credentials / "client.key").write_text(wgkeys.encode_key(bytes(32)) + "\n")
    assert wgkeys.find_key_file("client.key", profiles) == credentials / "client.key"


def test_wireguard_keys_reach_the_dynamic_user_only_as_credentials(box, tmp_path):
    keys = Keys(tmp_path)
    install_wireguard(box, keys, psk=True)
    start_wireguard(box, "client")
    wait_status(box, "tunvpnd@server", lambda s: handshake_age(s, "hostu") >= 0)
    wait_status(box, "tunvpnd@client", lambda s: "server up, handshake" in s)
    for instance in ("client", "server"):
        unit = f"tunvpnd@{instance}.service"
        pid = show(box, unit, "MainPID")
        proc = box.read_file(f"/proc/{pid}/status")
        uid = re.search(r"^Uid:\s+(\d+)", proc, re.M).group(1)
        assert uid != "0"
        # the key file itself stays root's: the unit's user cannot open it ...
        for name in (f"{instance}.key", "client.psk" if instance == "client" else "shared.psk"):
            denied = box.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                              "cat", f"/etc/tunvpn/{name}"], check=False)
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, name
            assert box.run(["stat", "-c", "%U %a", f"/etc/tunvpn/{name}"]).stdout.split() == \
                ["root", "600"]
            # ... it reads systemd's copy, which only it (and root) can read
            copy = f"/run/credentials/{unit}/{name}"
            assert box.run(["stat", "-c", "%u %a", copy]).stdout.split() == [uid, "400"]
            assert box.read_file(copy).strip() == box.read_file(f"/etc/tunvpn/{name}").strip()
        environ = box.read_file(f"/proc/{pid}/environ").split("\0")
        assert f"CREDENTIALS_DIRECTORY=/run/credentials/{unit}" in environ
        log = box.journalctl("-u", unit, "-o", "cat").stdout
        for secret in keys.secrets():
            assert secret not in log
        assert "Traceback" not in log


def test_wireguard_profile_without_its_key_fails_clearly(box, tmp_path):
    """No /etc/tunvpn/client.key: the unit starts (the blank SetCredential= default stands in),
    the daemon refuses the profile with exit 78 naming the missing file, and is not restarted."""
    keys = Keys(tmp_path)
    box.write_file("/etc/tunvpn/client.yaml", client_text(keys))
    result = box.systemctl("start", "tunvpnd@client", check=False)
    assert result.returncode != 0
    assert show(box, "tunvpnd@client", "ExecMainStatus") == "78"
    lines = messages(box, "tunvpnd@client", "-p", "err")
    assert any("private_key_file: /etc/tunvpn/client.key" in m and "no such key file" in m
               for m in lines), lines
    assert show(box, "tunvpnd@client", "NRestarts") == "0"


def test_reload_adds_a_wireguard_peer_and_keeps_the_other_session(box, tmp_path):
    """Server with peer hostu (a running session), then `systemctl reload` with peer hostu2 too:
    hostu's pings never stop, its handshake is not redone, hostu2 comes up through the server."""
    keys = Keys(tmp_path)
    other = second_client(tmp_path)
    install_wireguard(box, keys)
    write_key(box, "/etc/tunvpn/client2.key", other.client)
    box.write_file("/etc/tunvpn/client2.yaml", client2_text(keys))
    start_wireguard(box, "client")
    pid = show(box, "tunvpnd@server", "MainPID")
    before = handshake_age(wait_status(box, "tunvpnd@server",
                                       lambda s: handshake_age(s, "hostu") >= 3), "hostu")
    pinger = box.popen(["ip", "netns", "exec", NETNS["client"], "ping", "-c", "50", "-i", "0.1",
                        "-W", "1", HOSTV], stdout=subprocess.PIPE, text=True)
    try:
        # a new key file is no credential until a restart: that reload is refused, nothing lost
        write_key(box, "/etc/tunvpn/hostu2.psk", keys.psk)
        box.write_file("/etc/tunvpn/server.yaml", server_text(
            keys, extra_peers=client2_peer(other) + "    preshared_key_file: hostu2.psk\n"))
        box.systemctl("reload", "tunvpnd@server")
        wait_until(lambda: any("hostu2.psk: cannot open the key file: Permission denied" in m
                               for m in messages(box, "tunvpnd@server", "-p", "err")), 10,
                   what="the refused reload in the journal")
        box.write_file("/etc/tunvpn/server.yaml",
                       server_text(keys, extra_peers=client2_peer(other)))
        box.systemctl("reload", "tunvpnd@server")
        wait_status(box, "tunvpnd@server", lambda s: "hostu2 down, no handshake yet" in s)
        start_wireguard(box, "client2")  # (the server is running: start is a no-op)
        out, _ = pinger.communicate(timeout=60)
    finally:
        if pinger.poll() is None:
            pinger.kill()
            pinger.communicate()
    assert "50 packets transmitted, 50 received" in out, out  # hostu's session never dropped
    status = wait_status(box, "tunvpnd@server", lambda s: handshake_age(s, "hostu2") >= 0)
    # the same handshake as before the reload, only older: not re-handshaked
    assert handshake_age(status, "hostu") >= before, status
    assert show(box, "tunvpnd@server", "MainPID") == pid
    assert "dropped 0" in status, status
    assert any("reloaded" in m for m in messages(box, "tunvpnd@server"))


# -- `tunvpnd show` and `wg` on running wireguard units -----------------------------------------

CLIENT_IF = "wgc0"  # /run/wireguard is one directory for every namespace: names must differ


def install_wireguard_pair(box: SystemdBox, keys: Keys) -> None:
    install_wireguard(box, keys)
    box.write_file("/etc/tunvpn/client.yaml", client_text(keys).replace(
        "shared.psk", "client.psk").replace("name: tun0", f"name: {CLIENT_IF}"))


def tunvpnd(box: SystemdBox, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """`tunvpnd ...` as root in the box, as an operator types it."""
    return box.run(["tunvpnd", *argv], check=check)


def wg(box: SystemdBox, *argv: str) -> str:
    return box.run(["wg", *argv]).stdout


def lstat(box: SystemdBox, path: str) -> list[str]:
    """File type, owner, mode, and where a symlink leads ('' for anything else)."""
    out = box.run(["stat", "-c", "%F|%U|%a|%N", path]).stdout.strip().split("|")
    target = out[3].split(" -> ")[1].strip("'") if " -> " in out[3] else ""
    return [out[0], out[1], out[2], target]


def test_tunvpnd_show_and_wg_show_answer_for_running_wireguard_units(box, tmp_path):
    """Two wireguard instances under the shipped unit (hardening unchanged): root's `tunvpnd
    show NAME` (--json, --check) and the unmodified `wg` see both; stopping removes it all."""
    keys = Keys(tmp_path)
    install_wireguard_pair(box, keys)
    start_wireguard(box, "client")
    wait_status(box, "tunvpnd@server", lambda s: handshake_age(s, "hostu") >= 0)

    text = tunvpnd(box, "show", "server").stdout
    assert "instance: server (tun0, wire wireguard, pid " in text, text
    assert f"public key: {wgkeys.encode_key(keys.server_pub)}" in text
    assert "peer: hostu" in text and "latest handshake: " in text
    doc = json.loads(tunvpnd(box, "show", "server", "--json").stdout)
    peer = doc["peers"][0]
    assert peer["public_key"] == wgkeys.encode_key(keys.client_pub)
    assert peer["latest_handshake"] and peer["rx_bytes"] > 0
    assert tunvpnd(box, "show", "server", "--check", check=False).returncode == 0
    assert tunvpnd(box, "show", "client", "--check", check=False).returncode == 0
    assert tunvpnd(box, "show", "nosuch", "--check", check=False).returncode == 3
    everything = tunvpnd(box, "show").stdout
    assert "instance: client (wgc0" in everything and "instance: server (tun0" in everything

    # the unmodified wg, as root: both instances, their keys (root sees the private key)
    assert sorted(wg(box, "show", "interfaces").split()) == sorted(["tun0", CLIENT_IF])
    assert "peer: " + wgkeys.encode_key(keys.client_pub) in wg(box, "show")
    dump = [line.split("\t") for line in wg(box, "show", "tun0", "dump").splitlines()]
    assert dump[0][:3] == [wgkeys.encode_key(keys.server), wgkeys.encode_key(keys.server_pub),
                           "9090"]
    public, psk, endpoint, allowed, handshake = dump[1][:5]
    assert (public, psk, endpoint, allowed) == (peer["public_key"], "(none)", peer["endpoint"],
                                                ",".join(peer["allowed_ips"]))
    assert int(handshake) == peer["latest_handshake"]
    client_dump = wg(box, "show", CLIENT_IF, "dump").splitlines()
    assert client_dump[1].startswith(wgkeys.encode_key(keys.server_pub) + "\t")

    # how: root's link in root's /run/wireguard to the socket in the RuntimeDirectory
    assert lstat(box, "/run/wireguard")[:3] == ["directory", "root", "755"]
    for ifname, name in (("tun0", "server"), (CLIENT_IF, "client")):
        assert lstat(box, f"/run/wireguard/{ifname}.sock") == \
            ["symbolic link", "root", "777", f"/run/tunvpnd/{name}.uapi"]
        for suffix in ("uapi", "sock"):
            assert lstat(box, f"/run/tunvpnd/{name}.{suffix}")[:3] == ["socket", "tunvpnd", "600"]
        assert not any("no WireGuard UAPI socket" in m or "no control socket" in m
                       for m in messages(box, f"tunvpnd@{name}"))

    box.systemctl("stop", "tunvpnd@client", "tunvpnd@server")
    assert box.run(["ls", "-A", "/run/wireguard"]).stdout == ""
    left = box.run(["ls", "-A", "/run/tunvpnd"]).stdout.split()
    assert not [name for name in left if name.endswith((".sock", ".uapi"))], left
    assert wg(box, "show", "interfaces").strip() == ""
    assert tunvpnd(box, "show", "server", "--check", check=False).returncode == 3


def test_a_crashed_wireguard_unit_is_relinked_and_wg_sees_the_new_run(box, tmp_path):
    keys = Keys(tmp_path)
    install_wireguard_pair(box, keys)
    start_wireguard(box, "client")
    pid = show(box, "tunvpnd@server", "MainPID")
    box.run(["kill", "-9", pid])
    wait_until(lambda: show(box, "tunvpnd@server", "NRestarts") == "1" and
               show(box, "tunvpnd@server", "ActiveState") == "active", 20,
               what="systemd to restart the server")
    assert f"pid {show(box, 'tunvpnd@server', 'MainPID')})" in tunvpnd(box, "show", "server").stdout
    assert "listening port: 9090" in wg(box, "show", "tun0")
    assert lstat(box, "/run/wireguard/tun0.sock")[3] == "/run/tunvpnd/server.uapi"


def test_wg_link_never_takes_a_name_another_program_answers_on(box, tmp_path):
    """root's wireguard-go already runs an interface named tun0 (in another namespace): the
    server unit's link step leaves wireguard-go's socket alone and says so; stopping the unit
    does not remove it."""
    keys = Keys(tmp_path)
    install_wireguard_pair(box, keys)
    in_netns(box, "lab-hostv", "wireguard-go", "tun0")
    try:
        box.systemctl("start", "tunvpnd@server")
        assert lstat(box, "/run/wireguard/tun0.sock")[:2] == ["socket", "root"]
        assert any("tun0.sock is in use by another process: left as is" in m
                   for m in messages(box, "tunvpnd@server")), messages(box, "tunvpnd@server")
        assert "listening port: 9090" not in wg(box, "show", "tun0")  # wireguard-go's
        assert show(box, "tunvpnd@server", "ActiveState") == "active"
        box.systemctl("stop", "tunvpnd@server")
        assert lstat(box, "/run/wireguard/tun0.sock")[:2] == ["socket", "root"]
    finally:
        in_netns(box, "lab-hostv", "ip", "link", "del", "tun0", check=False)


# -- issue 11: full tunnel and masquerade under the unit's hardening (CAP_NET_ADMIN only) ----

INET4, INET6 = "203.0.113.80", "fd13::80"  # the "internet" host (Lab(internet=True))


@pytest.fixture
def ibox():
    """A box with the road warrior's world (tests/test_fulltunnel.py's topology) in it."""
    yield from booted_box(internet=True)


def assert_net_admin_only(box: SystemdBox, unit: str) -> None:
    """The unit's process as the shipped hardening makes it: a dynamic user, CAP_NET_ADMIN only."""
    proc = box.read_file(f"/proc/{show(box, unit, 'MainPID')}/status")
    assert int(re.search(r"^Uid:\s+(\d+)", proc, re.M).group(1)) != 0
    for name in ("CapEff", "CapBnd"):
        found = int(re.search(rf"^{name}:\s+([0-9a-f]+)", proc, re.M).group(1), 16)
        assert found == CAP_NET_ADMIN, f"{unit} {name} {found:x}"


def box_ip(box: SystemdBox, instance: str = "client") -> Callable[..., str]:
    """`ip -j ARGS` in an instance's namespace of the box, for test_fulltunnel's policy()."""
    return lambda *args: in_netns(box, instance, "ip", "-j", *args).stdout


def capture_ping(box: SystemdBox, address: str) -> dict[str, int]:
    """5 pings HostU -> `address` while tests/test_fulltunnel.py's capture counts, on HostU's
    link, the tunnel's outer UDP datagrams and the inner packets seen in clear."""
    from tests.test_fulltunnel import CAPTURE

    # its box pid first; timeout(1) passes our SIGTERM on (and ends it after 60 s anyway)
    capture = box.popen(["sh", "-c", 'echo $$; exec timeout -s TERM 60 "$@"', "sh",
                         "ip", "netns", "exec", NETNS["client"], PYTHON, "-c", CAPTURE, "eth0",
                         "9090", address], stdout=subprocess.PIPE, text=True)
    try:
        pid = capture.stdout.readline().strip()
        assert capture.stdout.readline().strip() == "capturing"
        in_netns(box, "client", "ping", "-c", "5", "-i", "0.2", "-W", "2", address)
        box.run(["kill", "-TERM", pid])
        out, _ = capture.communicate(timeout=30)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.communicate()
    return json.loads(out.strip().splitlines()[-1])


def install_full_tunnel(box: SystemdBox, wire: str, tmp_path, v6: bool) -> None:
    """tests/test_fulltunnel.py's profiles; `v6`: an IPv6 underlay and 0.0.0.0/0 and ::/0."""
    from tests.test_fulltunnel import profiles

    keys = Keys(tmp_path) if wire == "wireguard" else None
    server, client = profiles(wire, keys, **({"v6": True, "routes": "0.0.0.0/0, '::/0'"}
                                             if v6 else {}))
    if keys is not None:
        write_key(box, "/etc/tunvpn/server.key", keys.server)
        write_key(box, "/etc/tunvpn/client.key", keys.client)
    box.write_file("/etc/tunvpn/server.yaml", server)
    box.write_file("/etc/tunvpn/client.yaml", client)


@pytest.mark.parametrize("wire, v6", [("plain", False), ("wireguard", False),
                                      ("wireguard", True)], ids=["plain", "wireguard", "wg-v6"])
def test_full_tunnel_under_the_unit_and_stop_puts_every_rule_back(ibox, tmp_path, wire, v6):
    """`routes: [0.0.0.0/0]` under the shipped unit: SO_MARK on the socket and the policy rules
    and table through netlink work with CAP_NET_ADMIN only; HostU reaches the internet host
    only through the tunnel; a kill -9 is cleaned (ExecStopPost) and restarted by systemd;
    `systemctl stop` leaves every rule and every table of HostU exactly as before."""
    box = ibox
    install_full_tunnel(box, wire, tmp_path, v6)
    targets = [INET4, INET6] if v6 else [INET4]
    priorities = [32764, 32764, 32765, 32765] if v6 else [32764, 32765]
    before = policy(box_ip(box))
    assert rules_of_ours(box_ip(box)) == []
    for target in targets:  # without the tunnel: in clear (so the capture can fail)
        direct = capture_ping(box, target)
        assert direct["inner"] >= 10 and direct["outer"] == 0, direct
    start_wireguard(box, "client") if wire == "wireguard" else start_tunnel(box)
    rules = rules_of_ours(box_ip(box))
    assert sorted(r["priority"] for r in rules) == priorities, rules
    fwmark = {r.get("fwmark") for r in rules} - {None}
    assert len(fwmark) == 1, rules
    assert_net_admin_only(box, "tunvpnd@client")
    for target in targets:
        tunneled = capture_ping(box, target)
        assert tunneled["inner"] == 0 and tunneled["outer"] >= 10, (target, tunneled)
    log = "\n".join(messages(box, "tunvpnd@client"))
    # HostU has global IPv6 (fd08::5): a leak when only IPv4 goes into the tunnel, said so
    assert ("full tunnel for IPv4 only, but this host has global IPv6" in log) is not v6
    assert "Traceback" not in log and "Operation not permitted" not in log

    # kill -9: ExecStopPost's cleanup (the unit's user, CAP_NET_ADMIN) removes the dead run's
    # rules, systemd restarts it, and the new run works
    box.run(["kill", "-9", show(box, "tunvpnd@client", "MainPID")])
    wait_until(lambda: show(box, "tunvpnd@client", "NRestarts") == "1" and
               show(box, "tunvpnd@client", "ActiveState") == "active", 30,
               what="systemd to restart the client")
    assert any("undid what a crashed run left behind" in m and "rule 32764" in m
               for m in messages(box, "tunvpnd@client")), messages(box, "tunvpnd@client")
    assert sorted(r["priority"] for r in rules_of_ours(box_ip(box))) == priorities
    wait_until(lambda: in_netns(box, "client", "ping", "-c", "1", "-W", "1", INET4,
                                check=False).returncode == 0, 30, what="the tunnel again")
    for target in targets:
        tunneled = capture_ping(box, target)
        assert tunneled["inner"] == 0 and tunneled["outer"] >= 10, (target, tunneled)

    box.systemctl("stop", "tunvpnd@client")
    assert show(box, "tunvpnd@client", "ExecMainStatus") == "0"
    assert_same_policy(before, policy(box_ip(box)))
    for target in targets:  # the normal way again
        in_netns(box, "client", "ping", "-c", "1", "-W", "2", target)


def nft_ruleset(box: SystemdBox, instance: str = "server") -> dict:
    """The namespace's whole nftables ruleset, read through netlink (tests/nftread.py)."""
    out = in_netns(box, instance, "env", f"PYTHONPATH={BOX_REPO}", PYTHON, "-m", "tests.nftread",
                   "dump").stdout
    return json.loads(out)


def echo_source(box: SystemdBox) -> str:
    """A TCP echo HostU -> HostV; the source address HostV saw."""
    echo = box.run(["sh", "-c",
                    f"ip netns exec lab-hostv {PYTHON} -m tunvpnd.lab echo-server 9000 & "
                    f"sleep 0.5; ip netns exec lab-hostu {PYTHON} -m tunvpnd.lab echo-client "
                    f"{HOSTV} 9000 20000; wait"], timeout=60)
    assert "20000 bytes echoed back identical" in echo.stdout, echo.stdout + echo.stderr
    line = next(x for x in echo.stdout.splitlines() if x.startswith("echoed 20000 bytes to "))
    return line.split()[-1].rsplit(":", 1)[0].removeprefix("::ffff:")  # (a dual-stack server)


@pytest.mark.parametrize("wire", ["plain", "wireguard"])
def test_masquerade_under_the_unit_and_stop_removes_its_table(box, tmp_path, wire):
    """`masquerade: true` under the shipped unit: the nftables table made through netlink
    (AF_NETLINK, CAP_NET_ADMIN); HostV, with no route back, answers HostU and sees the
    server's LAN address; a flushed ruleset is made again; a kill -9 is cleaned and restarted;
    stop removes the table."""
    in_netns(box, "lab-hostv", "ip", "route", "del", "192.168.53.0/24")
    if wire == "wireguard":
        keys = Keys(tmp_path)
        install_wireguard(box, keys)
        box.write_file("/etc/tunvpn/server.yaml", server_text(keys).replace(
            "forward: true", "forward: true\nmasquerade: true"))
    else:
        box.write_file("/etc/tunvpn/server.yaml", server_profile(extra="masquerade: true"))
    before = nft_ruleset(box)
    assert not any(table.startswith("tunvpnd_") for _, table in before["tables"]), before
    start_wireguard(box, "client") if wire == "wireguard" else start_tunnel(box)
    assert [1, "tunvpnd_server"] in nft_ruleset(box)["tables"]
    assert [1, "tunvpnd_server", "postrouting", 4, "nat"] in nft_ruleset(box)["chains"]
    assert_net_admin_only(box, "tunvpnd@server")
    assert echo_source(box) == "192.168.60.11"
    ping(box)
    log = "\n".join(messages(box, "tunvpnd@server"))
    assert "Traceback" not in log and "Operation not permitted" not in log

    # `nft flush ruleset` while it runs: the daemon's check (every 5 s) makes it again
    in_netns(box, "server", "env", f"PYTHONPATH={BOX_REPO}", PYTHON, "-m", "tests.nftread", "flush")
    flushed = time.monotonic()
    wait_until(lambda: [1, "tunvpnd_server"] in nft_ruleset(box)["tables"], 15,
               interval=0.2, what="the table made again")
    took = time.monotonic() - flushed
    print(f"masquerade table made again {took:.1f} s after a flush ({wire})")
    assert took <= 10 + 1, f"made again after {took:.1f} s"
    assert any("is gone or changed (ruleset flushed?): making it again" in m
               for m in messages(box, "tunvpnd@server"))
    assert echo_source(box) == "192.168.60.11"

    box.run(["kill", "-9", show(box, "tunvpnd@server", "MainPID")])
    wait_until(lambda: show(box, "tunvpnd@server", "NRestarts") == "1" and
               show(box, "tunvpnd@server", "ActiveState") == "active", 30,
               what="systemd to restart the server")
    assert any("undid what a crashed run left behind" in m and "tunvpnd_server" in m
               for m in messages(box, "tunvpnd@server")), messages(box, "tunvpnd@server")
    assert [1, "tunvpnd_server"] in nft_ruleset(box)["tables"]
    wait_until(lambda: in_netns(box, "client", "ping", "-c", "1", "-W", "1", HOSTV,
                                check=False).returncode == 0, 30, what="the tunnel again")
    assert echo_source(box) == "192.168.60.11"

    box.systemctl("stop", "tunvpnd@server", "tunvpnd@client")
    assert show(box, "tunvpnd@server", "ExecMainStatus") == "0"
    assert nft_ruleset(box) == before


# -- tunvpnd wg-link alone (what the unit runs as root), on a private /run/wireguard -----------

@pytest.fixture
def linkdirs(tmp_path, monkeypatch):
    """A run directory with instance `server`'s control socket (answering `ifname`) and UAPI
    socket, and an empty stand-in for /run/wireguard."""
    import socket
    import threading

    from tunvpnd import uapi

    run, wgdir = tmp_path / "run", tmp_path / "wireguard"
    run.mkdir()
    monkeypatch.setattr(uapi, "SOCKET_DIR", wgdir)
    answer = {"ifname": "tun0"}
    control = socket.socket(socket.AF_UNIX)
    control.bind(str(run / "server.sock"))
    control.listen()
    uapi_sock = socket.socket(socket.AF_UNIX)
    uapi_sock.bind(str(run / "server.uapi"))
    uapi_sock.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = control.accept()
            except OSError:
                return
            with conn:
                conn.recv(64)
                conn.sendall(json.dumps(answer).encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield run, wgdir, answer
    control.shutdown(socket.SHUT_RDWR)
    control.close()
    uapi_sock.close()
    thread.join(5)


def test_wg_link_links_once_and_removes_only_its_own(linkdirs):
    from tunvpnd import wglink

    run, wgdir, _ = linkdirs
    assert wglink.link(run, "server") == f"{wgdir}/tun0.sock -> {run}/server.uapi"
    assert (wgdir.stat().st_mode & 0o777) == 0o755
    assert wglink.link(run, "server").endswith("already")
    (wgdir / "other.sock").symlink_to(run / "client.uapi")  # another instance's
    assert wglink.unlink(run, "server") == [f"{wgdir}/tun0.sock"]
    assert sorted(p.name for p in wgdir.iterdir()) == ["other.sock"]
    assert wglink.unlink(run, "server") == []


def test_wg_link_replaces_a_dangling_link_but_never_a_live_socket(linkdirs):
    import socket

    from tunvpnd import wglink

    run, wgdir, _ = linkdirs
    wgdir.mkdir()
    (wgdir / "tun0.sock").symlink_to(run / "gone.uapi")
    assert wglink.link(run, "server").endswith(f"-> {run}/server.uapi")
    (wgdir / "tun0.sock").unlink()
    with socket.socket(socket.AF_UNIX) as live:  # wireguard-go's tun0, say
        live.bind(str(wgdir / "tun0.sock"))
        live.listen()
        with pytest.raises(OSError, match="in use by another process: left as is"):
            wglink.link(run, "server")
        assert (wgdir / "tun0.sock").is_socket() and not (wgdir / "tun0.sock").is_symlink()


@pytest.mark.parametrize("ifname", ["../etc/x", "a b", "x" * 16, "..", "", 7])
def test_wg_link_refuses_a_name_that_is_no_interface(linkdirs, ifname):
    from tunvpnd import wglink

    run, wgdir, answer = linkdirs
    answer["ifname"] = ifname
    with pytest.raises(OSError, match="not an interface name"):
        wglink.link(run, "server")
    assert not wgdir.exists() or list(wgdir.iterdir()) == []


def test_wg_link_refuses_a_directory_others_can_write(linkdirs):
    from tunvpnd import wglink

    run, wgdir, _ = linkdirs
    wgdir.mkdir()
    wgdir.chmod(0o777)
    with pytest.raises(OSError, match="not a directory that only root can write"):
        wglink.link(run, "server")
    assert list(wgdir.iterdir()) == []


def test_wg_link_without_a_uapi_socket_does_nothing(linkdirs):
    from tunvpnd import wglink

    run, wgdir, _ = linkdirs
    (run / "server.uapi").unlink()
    assert wglink.link(run, "server").startswith("no ")
    assert not wgdir.exists()
