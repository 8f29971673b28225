"""Server masquerade (issue 11): source NAT for the tunnel networks, as the daemon's own
nftables table `inet tunvpnd_NAME`, made through netlink.

End to end in the lab: HostV loses its route back to 192.168.53.0/24, so it can answer HostU
only when the server masquerades (HostV then sees the server's 192.168.60.11 as the source).
The ruleset is read through netlink inside the namespace (tests/nftread.py), never with nft.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from ipaddress import ip_interface, ip_network

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from tests.conftest import client_profile, in_ns, ping, server_profile
from tests.test_cli import cleanup_in
from tests.test_reload import reload
from tests.test_wgtunnel import Keys, client_text, server_text
from tunvpnd import nat
from tunvpnd.lab import wait_until
from tunvpnd.profile import ProfileError, load_profile

HOSTV, SERVER_LAN = "192.168.60.5", "192.168.60.11"
TABLE = "tunvpnd_server"
ETH1 = b"eth1".ljust(16, b"\0").hex()  # the server's LAN side, as the rule compares it
TUN0 = b"tun0".ljust(16, b"\0").hex()
TUNNEL_NET = "c0a83500"  # 192.168.53.0


def ruleset(lab, role: str = "server") -> dict:
    return json.loads(in_ns(lab, role, [sys.executable, "-m", "tests.nftread", "dump"]).stdout)


def our_rules(lab) -> list[str]:
    return [text for _, table, _, text in ruleset(lab)["rules"] if table == TABLE]


def no_route_back(lab) -> None:
    """HostV forgets how to reach the tunnel: only NAT on the server can make it answer."""
    in_ns(lab, "hostv", ["ip", "route", "del", "192.168.53.0/24"])


def echo_source(lab) -> str:
    """A TCP echo HostU -> HostV; the source address HostV saw."""
    echo = lab.spawn("hostv", [sys.executable, "-m", "tunvpnd.lab", "echo-server", "9000"],
                     stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in echo.stdout.readline()
        result = in_ns(lab, "hostu", [sys.executable, "-m", "tunvpnd.lab", "echo-client", HOSTV,
                                      "9000", "20000"])
        assert "20000 bytes echoed back identical" in result.stdout
        line = echo.stdout.readline()
        assert line.startswith("echoed 20000 bytes to "), line
        return line.split()[-1].rsplit(":", 1)[0]
    finally:
        echo.kill()
        echo.wait()
        echo.stdout.close()


def profiles(wire: str, masquerade: str, workdir) -> tuple[str, str]:
    """(server, client) profile texts for `wire`, the server with `masquerade: ...`."""
    line = f"masquerade: {masquerade}"
    if wire == "plain":
        return server_profile(extra=line), client_profile()
    keys = Keys(workdir)  # key files beside the profiles, where the daemons read them
    return server_text(keys).replace("forward: true", f"forward: true\n{line}"), \
        client_text(keys)


@pytest.mark.parametrize("wire", ["plain", "wireguard"])
def test_masquerade_lets_hostv_answer_without_a_route_back(lab, daemons, sockdir, wire):
    no_route_back(lab)
    before = ruleset(lab)
    assert not any(table.startswith("tunvpnd_") for _, table in before["tables"])
    server_text_, client_text_ = profiles(wire, "[eth1]", sockdir)
    server = daemons(lab, "server", server_text_)
    daemons(lab, "hostu", client_text_)
    assert echo_source(lab) == SERVER_LAN
    assert our_rules(lab) == [f"meta nfproto cmp eq 02 payload bitwise cmp eq {TUNNEL_NET} "
                              f"meta oifname cmp eq {ETH1} masq"]
    assert [1, TABLE, "postrouting", 4, "nat"] in ruleset(lab)["chains"]

    # reload: every interface but the TUN, in one batch (the rule is replaced, not added)
    server.profile.write_text(server.profile.read_text().replace("[eth1]", "true"))
    reload(server)
    assert our_rules(lab) == [f"meta nfproto cmp eq 02 payload bitwise cmp eq {TUNNEL_NET} "
                              f"meta oifname cmp neq {TUN0} masq"]
    assert echo_source(lab) == SERVER_LAN

    # reload without masquerade: the table goes, and HostV's answers with it
    server.profile.write_text(server.profile.read_text().replace("masquerade: true", ""))
    reload(server)
    assert ruleset(lab) == before
    assert "masquerade off" in server.log()
    assert ping(lab, "hostu", HOSTV, count=2, check=False).returncode != 0
    assert server.stop() == 0
    assert ruleset(lab) == before


def test_flushed_ruleset_is_made_again_within_10_s(lab, daemons):
    no_route_back(lab)
    server = daemons(lab, "server", server_profile(extra="masquerade: true"))
    daemons(lab, "hostu", client_profile())
    ping(lab, "hostu", HOSTV)
    in_ns(lab, "server", [sys.executable, "-m", "tests.nftread", "flush"])  # = nft flush ruleset
    flushed = time.monotonic()
    assert ruleset(lab)["tables"] == []
    wait_until(lambda: [1, TABLE] in ruleset(lab)["tables"], 15, what="table made again")
    took = time.monotonic() - flushed
    assert took <= 10 + 1, f"made again after {took:.1f} s"  # one tick of slack on a busy host
    assert "is gone or changed (ruleset flushed?): making it again" in server.log()
    assert len(our_rules(lab)) == 1
    ping(lab, "hostu", HOSTV)
    assert server.stop() == 0
    assert ruleset(lab) == {"tables": [], "chains": [], "rules": []}


def test_stop_kill9_and_cleanup_leave_other_tables_exactly_as_before(lab, daemons):
    in_ns(lab, "server", [sys.executable, "-m", "tests.nftread", "add-foreign"])
    before = ruleset(lab)
    assert before["tables"] == [[1, "tvtest"]]
    server = daemons(lab, "server", server_profile(extra="masquerade: true"))
    assert [1, TABLE] in ruleset(lab)["tables"]
    assert server.stop() == 0
    assert ruleset(lab) == before

    server.restart()  # READY=1 of this run, not the first one
    server.proc.kill()  # kill -9: the table outlives the process
    server.proc.wait(10)
    assert [1, TABLE] in ruleset(lab)["tables"]
    server.restart()  # the next start undoes it (and makes its own)
    assert "undid what an earlier run left behind: removed nftables table inet " \
           f"{TABLE}" in server.log()
    assert len(our_rules(lab)) == 1
    server.proc.kill()
    server.proc.wait(10)
    result = cleanup_in(lab, "server", "server", server.run_dir)
    assert result.returncode == 0, result.stderr
    assert f"removed nftables table inet {TABLE}" in result.stdout + result.stderr
    assert ruleset(lab) == before
    assert not any(server.run_dir.glob("*.state"))


BAD_BATCH = """
import sys
from ipaddress import ip_network
from tunvpnd import nat
m = nat.Masquerade("server", lambda name: None)
m.apply([ip_network("192.168.53.0/24")], ["eth1"], "tun0")
batch = nat.replace_batch(m.table, [nat.rule_expressions(ip_network("10.0.0.0/8"), "eth0",
                                                          False)])
bogus = nat._chain(m.table)  # last in the batch: a second chain of a type that does not exist
bogus["attrs"] = [(key, {"NFTA_CHAIN_TYPE": "bogus", "NFTA_CHAIN_NAME": "other"}.get(key, value))
                  for key, value in bogus["attrs"]]
batch.insert(-1, bogus)
try:
    m._send(batch)
except nat.NatError as error:
    print("refused:", error)
"""


def test_a_refused_batch_changes_nothing(lab):
    """All or nothing: a batch whose last rule the kernel refuses leaves the old table."""
    result = in_ns(lab, "server", [sys.executable, "-c", BAD_BATCH])
    assert "refused: masquerade: nftables table inet tunvpnd_server:" in result.stdout
    assert our_rules(lab) == [f"meta nfproto cmp eq 02 payload bitwise cmp eq {TUNNEL_NET} "
                              f"meta oifname cmp eq {ETH1} masq"]


# -- without a kernel to hand: what is missing is named ---------------------------------------


class FakeKernel:
    """Refuses, like a kernel lacking it, any batch whose bytes hold `lacking` (a chain type or
    expression name with its NUL, or a table name prefix)."""

    def __init__(self, lacking: bytes, code: int = errno.ENOENT) -> None:
        self.lacking, self.code, self.batches = lacking, code, 0

    def nlm_request_batch(self, messages) -> list:
        self.batches += 1
        for msg in messages:
            msg.encode()
            if self.lacking in msg.data:
                raise NetlinkError(self.code)
        return []

    def close(self) -> None:
        pass


@pytest.mark.parametrize("lacking, named", [
    (b"nat\0", "the kernel has no nftables NAT chains (kernel: CONFIG_NFT_NAT, module "
            "nft_chain_nat): No such file or directory"),
    (b"masq\0", "the kernel has no nftables masquerade (kernel: CONFIG_NFT_MASQ, module nft_masq)"),
])
def test_a_kernel_without_nat_is_named(lacking, named):
    kernel = FakeKernel(lacking)
    m = nat.Masquerade("gw", lambda name: None, sock=kernel)
    with pytest.raises(nat.NatError) as caught:
        m.apply([ip_network("192.168.53.0/24")], None, "tun0")
    assert str(caught.value).startswith("masquerade: nftables table inet tunvpnd_gw: ")
    assert named in str(caught.value)


def test_no_permission_is_named():
    m = nat.Masquerade("gw", lambda name: None, sock=FakeKernel(b"tunvpnd_", errno.EPERM))
    with pytest.raises(nat.NatError, match=r"permission denied \(needs CAP_NET_ADMIN\)"):
        m.apply([ip_network("192.168.53.0/24")], None, "tun0")


def test_the_table_is_recorded_before_it_is_made():
    events: list[str] = []
    kernel = FakeKernel(b"never")
    kernel.nlm_request_batch = lambda messages: events.append("batch")
    m = nat.Masquerade("gw", lambda name: events.append(f"record {name}"), sock=kernel)
    m.apply([ip_network("192.168.53.0/24")], ["eth0"], "tun0")
    assert events == ["record tunvpnd_gw", "batch"]


def test_tunnel_networks_are_the_tun_the_routes_and_the_peers_collapsed():
    found = nat.tunnel_networks(
        [ip_interface("192.168.53.1/24"), ip_interface("fd00:53::1/64")],
        [ip_network("10.70.0.0/16")],
        [ip_network("192.168.53.9/32"), ip_network("172.16.4.0/24"), ip_network("10.70.3.0/24")])
    assert found == [ip_network("10.70.0.0/16"), ip_network("172.16.4.0/24"),
                     ip_network("192.168.53.0/24"), ip_network("fd00:53::/64")]


# -- the profile key --------------------------------------------------------------------------

SERVER_HEAD = "mode: server\ninterface:\n  name: tun0\n  address: 192.168.53.1/24\n"


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("false", False), ("[eth0]", ("eth0",)), ("[eth0, wan1]", ("eth0", "wan1")),
])
def test_profile_masquerade_values(tmp_path, value, expected):
    path = tmp_path / "gw.yaml"
    path.write_text(SERVER_HEAD + f"masquerade: {value}\n")
    assert load_profile(path).masquerade == expected
    path.write_text(SERVER_HEAD)
    assert load_profile(path).masquerade is False


@pytest.mark.parametrize("value, problem", [
    ("[]", "masquerade: must not be empty (false turns masquerade off)"),
    ("~", "masquerade: must be true, false or a list of interface names, got '~'"),
    ("yes please", "masquerade: must be true, false or a list of interface names"),
    ("{eth0: 1}", "masquerade: must be true, false or a list of interface names, got a mapping"),
    ("[tun0]", "masquerade[0]: 'tun0' is the tunnel's own interface"),
    ("[eth0, eth0]", "masquerade[1]: 'eth0' is listed twice"),
    ("[eth%d]", "masquerade[0]: 'eth%d': an interface name, not a pattern"),
    ("[a/b]", "masquerade[0]: 'a/b' must not contain '/'"),
    ("[averyveryverylongname]", "masquerade[0]: 'averyveryverylongname' must be 1 to 15"),
])
def test_profile_masquerade_errors(tmp_path, value, problem):
    path = tmp_path / "gw.yaml"
    path.write_text(SERVER_HEAD + f"masquerade: {value}\n")
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert caught.value.problems[0].startswith(f"{path}:5: {problem}")


def test_profile_masquerade_is_for_servers_and_check_exits_78(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mode: client\nserver: 10.9.0.11\ninterface:\n  address: 192.168.53.5/24\n"
                    "masquerade: true\n")
    result = subprocess.run([sys.executable, "-m", "tunvpnd", "check", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert f"{path}:5: masquerade: only allowed in server mode" in result.stderr
