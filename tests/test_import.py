"""`tunvpnd import`: real wg-quick files -> profiles that `tunvpnd check` accepts, and that run
as real daemons in lab namespaces against wireguard-go configured from the other side's own
wg-quick file (through the real `wg-quick strip` and `wg setconf`)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import in_ns, ping, unique
from tests.test_wginterop import WireguardGo
from tests.test_wgtunnel import HOSTV, needs_wg, tcp_echo
from tunvpnd import cli
from tunvpnd.profile import load_profile
from tunvpnd.wireguard import keys

HAVE_WG_QUICK = bool(shutil.which("wg-quick"))


class Side:
    """One host's keys, as `wg genkey` / `wg pubkey` make them."""

    def __init__(self) -> None:
        self.private = keys.generate_private()
        self.public = keys.public_key(self.private)

    @property
    def priv(self) -> str:
        return keys.encode_key(self.private)

    @property
    def pub(self) -> str:
        return keys.encode_key(self.public)


@pytest.fixture
def sides():
    return Side(), Side(), Side()  # client (HostU), server, a third host


PSK = keys.generate_psk()


def client_conf(client: Side, server: Side, endpoint: str = "10.9.0.11:51820") -> str:
    """HostU's wg-quick file, written the way people write them: odd spacing and case,
    comments after values, repeated AllowedIPs, wg-quick-only keys."""
    return f"""\
# HostU's tunnel to the VPN server
[Interface]
PrivateKey = {client.priv}
Address = 192.168.53.99/24,fd53::99/64   # both families
  listenport=51821
DNS = 1.1.1.1, 2606:4700:4700::1111
PostUp = logger up %i
[Peer]
PublicKey={server.pub}
PresharedKey = {keys.encode_key(PSK)}
AllowedIPs = 192.168.53.0/24 ,  fd53::/64
allowedips=192.168.60.0/24
Endpoint = {endpoint}
PersistentKeepalive = 25
"""


def server_conf(client: Side, server: Side, third: Side, port: bool = True) -> str:
    """The VPN server's wg-quick file: three peers, names in comments (one above, one inside
    its [Peer], one without), a preshared key for HostU, IPv6 allowed IPs."""
    return f"""\
[Interface]
Address = 192.168.53.1/24
Address = fd53::1/64
{"ListenPort = 51820" if port else ""}
PrivateKey = {server.priv}
SaveConfig = false
PostUp = iptables -A FORWARD -i %i -j ACCEPT; iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE
PostDown = iptables -D FORWARD -i %i -j ACCEPT

# Name = hostu
[Peer]
PublicKey = {client.pub}
PresharedKey = {keys.encode_key(PSK)}
AllowedIPs = 192.168.53.99/32, fd53::99/128

[Peer]
# name = lab-box 2
PublicKey = {third.pub}
AllowedIPs = 192.168.53.77/32, 10.77.0.0/16
Endpoint = 10.9.0.77:51820
PersistentKeepalive = 25

[Peer]
PublicKey = {keys.encode_key(keys.public_key(keys.generate_private()))}
AllowedIPs = fd53::42/128
"""


def secrets(*sides: Side) -> list[str]:
    return [keys.encode_key(PSK), PSK.hex()] + [form for side in sides
                                                for form in (side.priv, side.private.hex())]


def run_import(capsys, conf: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["import", str(conf), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check(path: Path) -> subprocess.CompletedProcess:
    """The real `tunvpnd check`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "tunvpnd", "check", str(path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CREDENTIALS_DIRECTORY": ""})


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.conf"
    path.write_text(text)
    path.chmod(0o600)
    return path


# --- what the import makes --------------------------------------------------------------------


def test_a_client_config_becomes_a_client_profile_that_check_accepts(tmp_path, capsys, sides):
    client, server, _ = sides
    conf = write(tmp_path, "wg0", client_conf(client, server))
    out = tmp_path / "etc"
    code, stdout, stderr = run_import(capsys, conf, out)
    assert code == 0, stderr
    profile = load_profile(out / "wg0.yaml")
    assert (profile.mode, profile.wire, profile.ifname) == ("client", "wireguard", "wg0")
    assert profile.server == ("10.9.0.11", 51820)
    assert profile.server_public_key == server.public
    assert profile.private_key == client.private and profile.preshared_key == PSK
    assert [str(a) for a in profile.addresses] == ["192.168.53.99/24", "fd53::99/64"]
    # the tunnel's own networks are routed by its addresses; the rest become routes
    assert [str(r) for r in profile.routes] == ["192.168.60.0/24"]
    assert profile.keepalive == 25 and profile.mtu == 1420
    text = (out / "wg0.yaml").read_text()
    assert "private_key_file: wg0.key" in text and "preshared_key_file: wg0.psk" in text
    for key_file in ("wg0.key", "wg0.psk"):
        assert stat.S_IMODE((out / key_file).stat().st_mode) == 0o600
    assert sorted(os.listdir(out)) == ["wg0.key", "wg0.psk", "wg0.yaml"]  # no staging left
    lines = stderr.splitlines()
    assert f"{conf}:5: not imported: ListenPort = 51821: a tunvpnd client sends from a port " \
           "the kernel picks" in lines
    assert any(line.startswith(f"{conf}:6: not imported: DNS = 1.1.1.1, 2606") for line in lines)
    assert f"{conf}:7: not imported: PostUp: tunvpnd runs no commands" in lines
    assert len(lines) == 3, stderr
    checked = check(out / "wg0.yaml")
    assert checked.returncode == 0, checked.stderr
    assert "OK: client wg0 192.168.53.99/24 fd53::99/64 mtu 1420, server 10.9.0.11:51820" \
        in checked.stdout
    for secret in secrets(client, server):
        assert secret not in stdout + stderr + text + checked.stdout


def test_a_server_config_with_several_peers_becomes_a_server_profile(tmp_path, capsys, sides):
    client, server, third = sides
    conf = write(tmp_path, "wgsrv", server_conf(client, server, third))
    code, _, stderr = run_import(capsys, conf, tmp_path, "--name", "vpn")
    assert code == 0, stderr
    profile = load_profile(tmp_path / "vpn.yaml")
    assert (profile.mode, profile.ifname, profile.listen) == ("server", "wgsrv", ("::", 51820))
    assert [p.name for p in profile.peers] == ["hostu", "lab-box-2", "peer3"]
    hostu, box, third_peer = profile.peers
    assert hostu.public_key == client.public and hostu.preshared_key == PSK
    assert [str(n) for n in hostu.allowed_ips] == ["192.168.53.99/32", "fd53::99/128"]
    assert hostu.endpoint is None and box.endpoint == ("10.9.0.77", 51820)
    assert box.public_key == third.public and box.preshared_key is None
    assert [str(n) for n in third_peer.allowed_ips] == ["fd53::42/128"]
    # wg-quick routes a peer's AllowedIPs outside the tunnel networks: so does the profile
    assert [str(r) for r in profile.routes] == ["10.77.0.0/16"]
    assert profile.keepalive == 25 and profile.forward is False
    assert stat.S_IMODE((tmp_path / "vpn-hostu.psk").stat().st_mode) == 0o600
    lines = stderr.splitlines()
    assert f"{conf}:6: not imported: SaveConfig = false: tunvpnd never writes its profile" in lines
    assert f"{conf}:7: not imported: PostUp: tunvpnd runs no commands" in lines
    assert f"{conf}:8: not imported: PostDown: tunvpnd runs no commands" in lines
    assert f"{conf}:17: note: peer name 'lab-box 2' written as 'lab-box-2' (1 to 32 of " \
           "A-Za-z0-9_.-)" in lines
    assert any(line.startswith(f"{conf}:11: note: PersistentKeepalive differs") and
               "(hostu off, lab-box-2 25, peer3 off)" in line for line in lines), stderr
    assert "iptables" not in stderr  # commands are named, not repeated
    checked = check(tmp_path / "vpn.yaml")
    assert checked.returncode == 0, checked.stderr
    assert "listen [::]:51820, 3 peers, 1 route, wireguard" in checked.stdout
    for secret in secrets(client, server, third):
        assert secret not in stderr + (tmp_path / "vpn.yaml").read_text()


def test_a_server_without_listen_port_listens_on_51820_and_says_so(tmp_path, capsys, sides):
    conf = write(tmp_path, "wg1", server_conf(*sides, port=False))
    code, _, stderr = run_import(capsys, conf, tmp_path)
    assert code == 0, stderr
    assert load_profile(tmp_path / "wg1.yaml").listen == ("::", 51820)
    assert f"{conf}:1: note: no ListenPort (wg-quick picks a random port): the profile " \
           "listens on 51820" in stderr


def test_one_peer_without_endpoint_is_a_server(tmp_path, capsys, sides):
    client, server, _ = sides
    text = client_conf(client, server).replace("Endpoint = 10.9.0.11:51820\n", "")
    code, _, stderr = run_import(capsys, write(tmp_path, "wg2", text), tmp_path)
    assert code == 0, stderr
    profile = load_profile(tmp_path / "wg2.yaml")
    assert profile.mode == "server" and profile.listen == ("::", 51821)
    assert profile.peers[0].name == "peer1"
    assert [str(n) for n in profile.peers[0].allowed_ips] == [
        "192.168.53.0/24", "fd53::/64", "192.168.60.0/24"]


def test_what_a_client_cannot_carry_is_said_and_the_rest_imported(tmp_path, capsys, sides):
    """A full tunnel (AllowedIPs 0.0.0.0/0, ::/0) with wg-quick's Table and FwMark, a route
    holding the endpoint; a host name endpoint (the client resolves it); host bits masked as
    WireGuard masks them; MTU; off."""
    client, server, _ = sides
    text = f"""\
[Interface]
PrivateKey = {client.priv}
Address = 10.64.0.2/32, fc00:bbbb::2/128
MTU = 1380
Table = 51820
FwMark = 0x1234
PreUp = true
PreDown = true
[Peer]
PublicKey = {server.pub}
AllowedIPs = 0.0.0.0/0, ::/0, 203.0.113.0/24, 10.20.30.40/16
Endpoint = vpn.example.net:51820
PersistentKeepalive = off
"""
    conf = write(tmp_path, "mullvad-se4", text)
    code, _, stderr = run_import(capsys, conf, tmp_path)
    assert code == 0, stderr
    profile = load_profile(tmp_path / "mullvad-se4.yaml")
    assert profile.server == ("vpn.example.net", 51820) and profile.mtu == 1380
    assert [str(r) for r in profile.routes] == ["0.0.0.0/0", "::/0", "203.0.113.0/24",
                                                "10.20.0.0/16"]
    assert (profile.table, profile.fwmark) == (51820, 0x1234)   # the full tunnel's own
    assert profile.keepalive == 0  # off, as in the file (a client profile's default is 25)
    lines = stderr.splitlines()
    for line, what in ((7, "PreUp: tunvpnd runs no commands"),
                       (8, "PreDown: tunvpnd runs no commands")):
        assert f"{conf}:{line}: not imported: {what}" in lines
    assert f"{conf}:11: note: AllowedIPs 10.20.30.40/16 has host bits set: imported as " \
           "10.20.0.0/16, as WireGuard masks it" in lines
    assert not [line for line in lines if "Table" in line or "FwMark" in line]
    assert check(tmp_path / "mullvad-se4.yaml").returncode == 0

    text = text.replace("vpn.example.net", "203.0.113.9")  # now the route would hold it
    # (another directory: two profiles side by side may not share a table and mark)
    code, _, stderr = run_import(capsys, write(tmp_path, "wg3", text), tmp_path / "other")
    assert code == 0, stderr
    assert [str(r) for r in load_profile(tmp_path / "other" / "wg3.yaml").routes] == [
        "0.0.0.0/0", "::/0", "10.20.0.0/16"]
    assert "AllowedIPs 203.0.113.0/24: it holds the endpoint 203.0.113.9" in stderr


@pytest.mark.parametrize("endpoint", ["[fd09::11]:51820", "fd09::11:51820", " [FD09::11] : 51820"])
def test_an_ipv6_endpoint_becomes_the_server(tmp_path, capsys, sides, endpoint):
    """wg takes [v6]:port, and a bare v6:port split at its last colon."""
    client, server, _ = sides
    conf = write(tmp_path, "wg6", client_conf(client, server, endpoint=endpoint))
    code, _, stderr = run_import(capsys, conf, tmp_path)
    assert code == 0, stderr
    assert load_profile(tmp_path / "wg6.yaml").server == ("fd09::11", 51820)
    assert 'server: "[fd09::11]:51820"' in (tmp_path / "wg6.yaml").read_text()
    assert check(tmp_path / "wg6.yaml").returncode == 0


def test_table_off_adds_no_routes(tmp_path, capsys, sides):
    client, server, _ = sides
    text = client_conf(client, server).replace("[Peer]", "Table = off\n[Peer]")
    code, _, stderr = run_import(capsys, write(tmp_path, "wg4", text), tmp_path)
    assert code == 0, stderr
    assert load_profile(tmp_path / "wg4.yaml").routes == ()
    assert "note: Table = off: no routes for the AllowedIPs, as wg-quick would add none" in stderr


def test_a_server_peer_with_a_host_name_endpoint_keeps_no_endpoint(tmp_path, capsys, sides):
    client, server, third = sides
    text = server_conf(client, server, third).replace("10.9.0.77:51820", "box.example:51820")
    conf = write(tmp_path, "wg5", text)
    code, _, stderr = run_import(capsys, conf, tmp_path)
    assert code == 0, stderr
    assert load_profile(tmp_path / "wg5.yaml").peers[1].endpoint is None
    assert f"{conf}:20: not imported: Endpoint = box.example:51820 of lab-box-2: a tunvpnd " \
           "server takes an IP address only" in stderr


# --- where it writes --------------------------------------------------------------------------


def test_an_existing_profile_is_replaced_only_with_force(tmp_path, capsys, sides):
    client, server, _ = sides
    conf = write(tmp_path, "wg0", client_conf(client, server))
    out = tmp_path / "out"
    out.mkdir()  # DIR may exist
    (out / "other.yaml").write_text("mode: client\n")
    assert run_import(capsys, conf, out)[0] == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    newer = Side()
    write(tmp_path, "wg0", client_conf(newer, server))
    code, _, stderr = run_import(capsys, conf, out)
    assert code == 1
    assert f"{out}/wg0.yaml, {out}/wg0.key, {out}/wg0.psk: exists already, not overwritten " \
           "(--force replaces" in stderr
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    code, _, stderr = run_import(capsys, conf, out, "--force")
    assert code == 0, stderr
    assert load_profile(out / "wg0.yaml").private_key == newer.private
    assert stat.S_IMODE((out / "wg0.key").stat().st_mode) == 0o600
    assert sorted(os.listdir(out)) == ["other.yaml", "wg0.key", "wg0.psk", "wg0.yaml"]


def test_without_out_it_writes_to_the_config_dir(tmp_path, capsys, sides, monkeypatch):
    monkeypatch.setenv("TUNVPN_CONFIG_DIR", str(tmp_path / "tunvpn"))
    conf = write(tmp_path, "wg0", client_conf(*sides[:2]))
    assert cli.main(["import", str(conf)]) == 0, capsys.readouterr().err
    assert load_profile(tmp_path / "tunvpn" / "wg0.yaml").mode == "client"


def test_a_key_file_of_the_same_name_is_not_overwritten_either(tmp_path, capsys, sides):
    conf = write(tmp_path, "wg0", client_conf(*sides[:2]))
    (tmp_path / "wg0.key").write_text("someone else's\n")
    code, _, stderr = run_import(capsys, conf, tmp_path)
    assert code == 1 and f"{tmp_path}/wg0.key: exists already" in stderr
    assert not (tmp_path / "wg0.yaml").exists()
    assert (tmp_path / "wg0.key").read_text() == "someone else's\n"


def test_bad_names_are_usage_errors(tmp_path, capsys, sides):
    conf = write(tmp_path, "wg0", client_conf(*sides[:2]))
    code, _, stderr = run_import(capsys, conf, tmp_path, "--name", "../etc")
    assert code == 2 and "is not a profile name" in stderr
    long = write(tmp_path, "a-much-too-long-name", client_conf(*sides[:2]))
    code, _, stderr = run_import(capsys, long, tmp_path)
    assert code == 78 and f"{long}:1: 'a-much-too-long-name' is not an interface name" in stderr
    assert list(tmp_path.glob("*.yaml")) == []


# --- unparseable input: FILE:LINE: what, exit 78, nothing written -------------------------------


def bad_inputs(client: Side, server: Side) -> list[tuple[str, int, str]]:
    head = f"[Interface]\nPrivateKey = {client.priv}\nAddress = 10.0.0.2/24\n"
    peer = f"[Peer]\nPublicKey = {server.pub}\nAllowedIPs = 10.0.0.0/24\n"
    return [
        (f"Address = 10.0.0.2/24\n{head}{peer}", 1, "Address before any [Interface] or [Peer] "
         "section"),
        (f"{head}Address 10.0.0.3/24\n{peer}", 4, "not a `Key = value` line"),
        (f"{head}Adress = 10.0.0.3/24\n{peer}", 4, "Adress: not a key of [Interface]"),
        (f"{head}[Peers]\nPublicKey = {server.pub}\n", 4, "unknown section '[Peers]'"),
        (f"{head}{peer}DNS = 1.1.1.1\n", 7, "DNS: not a key of [Peer]"),
        (f"{head}MTU = 9x\n{peer}", 4, "MTU: '9x' is not an MTU tunvpnd can use"),
        (f"{head}ListenPort = 70000\n{peer}", 4, "ListenPort: '70000' is not a port"),
        (head.replace("10.0.0.2/24", "10.0.0.2/24, 10.0.0.300/24") + peer, 3,
         "Address: '10.0.0.300/24' is not an IP address"),
        (f"{head}{peer}AllowedIPs = 10.1.0.0/33\n", 7, "AllowedIPs: '10.1.0.0/33' is not an "
         "IP network"),
        (f"{head}{peer}Endpoint = 10.9.0.11\n", 7, "Endpoint: '10.9.0.11' is not host:port"),
        (f"{head}{peer}Endpoint = [fd00::1]:0\n", 7, "Endpoint: '[fd00::1]:0' is not host:port"),
        (f"{head}{peer}PersistentKeepalive = soon\n", 7, "PersistentKeepalive: 'soon' is "
         "neither off nor 0 to 65535"),
        (f"{head}{peer}PresharedKey = {client.priv[:-2]}=\n", 7, "PresharedKey: a key is 44 "
         "characters of base64"),
        (f"{head}[Peer]\nAllowedIPs = 10.0.0.0/24\n", 4, "this [Peer] has no PublicKey"),
        (head.replace(f"PrivateKey = {client.priv}\n", "") + peer, 1, "[Interface] has no "
         "PrivateKey"),
        (head.replace("Address = 10.0.0.2/24\n", "") + peer, 1, "[Interface] has no Address"),
        (head, 1, "no [Peer]: a tunvpnd WireGuard server needs its peers"),
        (f"{peer}", 1, "no [Interface] section"),
        (f"{head}MTU = 1000\nAddress = fd00::2/64\n{peer}", 4, "MTU 1000 is too small for an "
         "IPv6 Address"),
        (f"{head}{peer}[Peer]\nPublicKey = {server.pub}\nAllowedIPs = 10.0.1.0/24\n", 7,
         "this [Peer] has the same PublicKey as the [Peer] at line 4"),
        (f"{head}{peer}[Peer]\nPublicKey = {Side().pub}\nAllowedIPs = 10.0.0.5/32\n", 9,
         "AllowedIPs 10.0.0.5/32 of peer2 overlaps 10.0.0.0/24 of peer1: tunvpnd gives each "
         "network to one peer only"),
        (f"{head}{peer}[Peer]\nPublicKey = {client.pub}\nAllowedIPs = 10.0.1.0/24\n", 7,
         "this [Peer]'s PublicKey is our own"),
    ]


@pytest.mark.parametrize("case", range(22))
def test_unparseable_input_is_file_line_what_and_exit_78(tmp_path, capsys, sides, case):
    client, server, _ = sides
    cases = bad_inputs(client, server)
    assert len(cases) == 22
    text, line, what = cases[case]
    conf = write(tmp_path, "wg0", text)
    code, stdout, stderr = run_import(capsys, conf, tmp_path / "out")
    assert code == 78, stderr
    assert f"{conf}:{line}: {what}" in stderr, stderr
    assert not (tmp_path / "out").exists()  # nothing written
    for secret in secrets(client, server):
        assert secret not in stdout + stderr


def test_a_broken_line_holding_a_key_is_never_echoed(tmp_path, capsys, sides):
    client, server, _ = sides
    text = client_conf(client, server).replace(f"PrivateKey = {client.priv}",
                                               f"PrivateKey {client.priv}")
    conf = write(tmp_path, "wg0", text)
    code, _, stderr = run_import(capsys, conf, tmp_path)
    # the '=' of the base64 is taken as the separator: the line is an unknown key, not shown
    assert code == 78 and f"{conf}:3: (key not shown): not a key of [Interface]" in stderr, stderr
    text = client_conf(client, server).replace("Address = 192.168.53.99/24",
                                               f"Address = {client.priv}")
    code, _, stderr = run_import(capsys, write(tmp_path, "wg0", text), tmp_path)
    assert code == 78 and "(a value not shown: it holds what looks like a key)" in stderr
    for secret in secrets(client, server):
        assert secret not in stderr


def test_a_missing_file(tmp_path, capsys):
    code, _, stderr = run_import(capsys, tmp_path / "wg9.conf", tmp_path)
    assert code == 78 and f"{tmp_path}/wg9.conf:1: cannot read: No such file" in stderr


# --- end to end: the imported profile against wireguard-go set up from the other file --------


needs_wg_quick = pytest.mark.skipif(not HAVE_WG_QUICK, reason="wg-quick is needed")


def setconf(lab, wg: WireguardGo, conf: Path, addresses: list[str], routes: list[str]) -> None:
    """What wg-quick up does for wireguard-go, by hand: `wg setconf` with `wg-quick strip`'s
    output of the original file, then the addresses and routes with `ip`."""
    stripped = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True,
                              timeout=30, check=True).stdout
    assert "Address" not in stripped and "PrivateKey" in stripped
    setconf_file = wg.workdir / "setconf.conf"
    setconf_file.write_text(stripped)
    setconf_file.chmod(0o600)
    in_ns(lab, wg.role, ["wg", "setconf", wg.ifname, str(setconf_file)])
    for address in addresses:
        in_ns(lab, wg.role, ["ip", "addr", "add", address, "dev", wg.ifname]
              + (["nodad"] if ":" in address else []))
    in_ns(lab, wg.role, ["ip", "link", "set", wg.ifname, "up"])
    for route in routes:
        in_ns(lab, wg.role, ["ip", "route", "add", route, "dev", wg.ifname])


def peer_dump(lab, wg: WireguardGo, public_key: str) -> dict:
    """The line of `wg show IFNAME dump` for the peer with this public key."""
    lines = in_ns(lab, wg.role, ["wg", "show", wg.ifname, "dump"]).stdout.splitlines()[1:]
    fields = next(line.split("\t") for line in lines if line.startswith(public_key + "\t"))
    return {"preshared_key": fields[1], "endpoint": fields[2],
            "latest_handshake": int(fields[4])}


def imported(sockdir: Path, conf_text: str, name: str) -> str:
    """Import a wg-quick file named after a unique interface into the daemons' workdir."""
    conf = write(sockdir, unique("wgi")[:15], conf_text)
    assert cli.main(["import", str(conf), "--out", str(sockdir), "--name", name]) == 0
    return (sockdir / f"{name}.yaml").read_text()


@needs_wg
@needs_wg_quick
def test_an_imported_client_runs_against_wireguard_go_set_up_from_the_servers_file(
        lab, daemons, sockdir, wggo_factory, sides):
    client, server, third = sides
    profile = imported(sockdir, client_conf(client, server), "client")
    wg = wggo_factory("server")
    server_file = write(wg.workdir, "wgsrv", server_conf(client, server, third))
    setconf(lab, wg, server_file, ["192.168.53.1/24", "fd53::1/64"], [])
    in_ns(lab, "server", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    daemon = daemons(lab, "hostu", profile, name="client")
    ping(lab, "hostu", HOSTV, count=3)
    ping(lab, "hostu", "fd53::1", count=2, family="-6")  # IPv6 inside the tunnel
    tcp_echo(lab)
    dump = peer_dump(lab, wg, client.pub)
    assert dump["latest_handshake"] > 0
    assert dump["preshared_key"] == keys.encode_key(PSK)
    assert dump["endpoint"].startswith("10.9.0.5:")
    daemon.wait_status(lambda s: "server up, handshake" in s and "dropped 0" in s)
    for secret in secrets(client, server, third):
        assert secret not in daemon.log()


@needs_wg
@needs_wg_quick
def test_an_imported_server_runs_against_wireguard_go_set_up_from_the_clients_file(
        lab, daemons, sockdir, wggo_factory, sides):
    client, server, third = sides
    profile = imported(sockdir, server_conf(client, server, third), "server")
    in_ns(lab, "server", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])  # as wg-quick: forward off
    daemon = daemons(lab, "server", profile)
    wg = wggo_factory("hostu")
    client_file = write(wg.workdir, "wg0", client_conf(client, server))
    setconf(lab, wg, client_file, ["192.168.53.99/24", "fd53::99/64"], ["192.168.60.0/24"])
    ping(lab, "hostu", HOSTV, count=3)
    ping(lab, "hostu", "fd53::1", count=2, family="-6")
    tcp_echo(lab)
    dump = peer_dump(lab, wg, server.pub)
    assert dump["latest_handshake"] > 0
    assert dump["endpoint"] == "10.9.0.11:51820"
    status = daemon.wait_status(lambda s: "hostu up, handshake" in s)
    assert "dropped 0" in status and "lab-box-2 down" in status, status
    for secret in secrets(client, server, third):
        assert secret not in daemon.log()


def test_table_and_fwmark_without_a_full_tunnel_are_said_not_imported(tmp_path, capsys, sides):
    client, server, _ = sides
    text = client_conf(client, server).replace("[Peer]", "Table = 1234\nFwMark = 0x99\n[Peer]")
    conf = write(tmp_path, "wg7", text)
    code, _, stderr = run_import(capsys, conf, tmp_path)
    assert code == 0, stderr
    profile = load_profile(tmp_path / "wg7.yaml")
    assert (profile.table, profile.fwmark) == (None, None)
    assert "not imported: Table = 1234: tunvpnd uses its own table and mark only for a full " \
           "tunnel" in stderr
    assert "not imported: FwMark = 153: tunvpnd uses" in stderr
