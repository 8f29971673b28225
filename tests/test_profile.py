"""Unit tests for tunvpnd.profile: the example profiles, defaults, and every error message."""

import dataclasses
import os
import random
import textwrap
import threading
import time
from ipaddress import ip_interface, ip_network
from pathlib import Path

import pytest

from tunvpnd import profile as profile_module
from tunvpnd.profile import (
    DEFAULT_CONFIG_DIR,
    DEFAULT_MTU,
    DEFAULT_PORT,
    MAX_DEPTH,
    MAX_PROBLEMS,
    MAX_PROFILE_BYTES,
    PeerConfig,
    Profile,
    ProfileError,
    covering_route,
    load_profile,
    resolve_profile,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = ("client.yaml", "server.yaml")

CLIENT = """\
mode: client
server: 10.9.0.11:9090
interface:
  address: 192.168.53.99/24
"""

SERVER = """\
mode: server
interface:
  address: 192.168.53.1/24
"""


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Work in tmp_path so that FILE in messages is just the name we pass."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNVPN_CONFIG_DIR", raising=False)


def load(text: str, name: str = "x.yaml") -> Profile:
    Path(name).write_text(textwrap.dedent(text))
    return load_profile(name)


def problems(text: str, name: str = "x.yaml") -> list[str]:
    with pytest.raises(ProfileError) as info:
        load(text, name)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def problem(text: str) -> str:
    """The single problem a profile has."""
    (only,) = problems(text)
    return only


# --- the shipped examples ---------------------------------------------------------------


def test_client_example():
    p = load_profile(REPO / "etc/tunvpn/client.yaml")
    assert p.path == REPO / "etc/tunvpn/client.yaml"
    assert p.name == "client"
    assert p.mode == "client"
    assert p.server == ("10.9.0.11", 9090)
    assert p.ifname == "tun0"
    assert p.addresses == (ip_interface("192.168.53.99/24"),)
    assert p.mtu == DEFAULT_MTU == 1420
    assert p.routes == (ip_network("192.168.60.0/24"),)
    assert p.keepalive == 25
    assert (p.log_level, p.log_packets) == ("info", False)
    assert p.forward is False
    assert p.peers == ()


def test_server_example():
    p = load_profile(REPO / "etc/tunvpn/server.yaml")
    assert p.name == "server"
    assert p.mode == "server"
    assert p.server is None
    assert p.listen == ("0.0.0.0", 9090)
    assert p.ifname == "tun0"
    assert p.addresses == (ip_interface("192.168.53.1/24"),)
    assert p.forward is True
    assert p.routes == ()
    assert p.peers == ()
    assert p.keepalive == 0
    assert p.peer_timeout == 180
    assert (p.log_level, p.log_packets) == ("info", False)


def test_server_example_commented_peers_are_valid():
    text = (REPO / "etc/tunvpn/server.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("# peers:")
    for i in range(start, start + 4):
        lines[i] = lines[i][2:]
    p = load("\n".join(lines) + "\n")
    assert p.peers == (PeerConfig("hostu", (ip_network("192.168.53.99/32"),), ("10.9.0.5", None)),)


@pytest.mark.parametrize("name", EXAMPLES)
def test_packaged_examples_are_identical_copies(name):
    packaged = (REPO / "tunvpnd/examples" / name).read_bytes()
    assert packaged == (REPO / "etc/tunvpn" / name).read_bytes()


# --- values and defaults ----------------------------------------------------------------


def test_client_defaults():
    p = load(CLIENT, "hostu.yaml")
    assert p == Profile(
        path=Path("hostu.yaml"), mode="client", server=("10.9.0.11", 9090),
        listen=("0.0.0.0", DEFAULT_PORT), ifname="tun%d",
        addresses=(ip_interface("192.168.53.99/24"),), mtu=1420, routes=(), forward=False,
        peers=(), keepalive=25, peer_timeout=180, log_level="info", log_packets=False,
    )
    assert p.name == "hostu"


def test_server_defaults():
    p = load(SERVER)
    assert (p.mode, p.server, p.listen, p.ifname) == ("server", None, ("0.0.0.0", 9090), "tun%d")
    assert (p.mtu, p.keepalive, p.peer_timeout, p.forward) == (1420, 0, 180, False)
    assert (p.routes, p.peers, p.log_level, p.log_packets) == ((), (), "info", False)


def test_profile_is_frozen():
    p = load(CLIENT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.mtu = 1500


def test_full_server():
    p = load("""\
        mode: server
        listen: "[::]:51820"
        interface:
          name: vpn-srv.0
          address: [192.168.53.1/24, "fd53::1/64"]
          mtu: 1280
        forward: yes
        routes: [10.10.0.0/16, "fd60::/64"]
        keepalive: 0
        peer_timeout: 600
        peers:
          - name: hostu
            allowed_ips: [192.168.53.99, "fd53::99"]
            endpoint: 10.9.0.5
          - name: 1234
            allowed_ips: [192.168.53.100/32, 10.10.0.0/16]
            endpoint: 10.9.0.6:4000
          - name: v6.peer_1
            allowed_ips: ["fd53::100/128"]
            endpoint: "[2001:db8::1]:4000"
          - name: anywhere
            allowed_ips: [192.168.53.101/32]
        log:
          level: debug
          packets: on
        """)
    assert p.listen == ("::", 51820)
    assert p.ifname == "vpn-srv.0"
    assert p.addresses == (ip_interface("192.168.53.1/24"), ip_interface("fd53::1/64"))
    assert p.mtu == 1280
    assert p.forward is True
    assert p.routes == (ip_network("10.10.0.0/16"), ip_network("fd60::/64"))
    assert p.peer_timeout == 600
    assert p.peers == (
        PeerConfig("hostu", (ip_network("192.168.53.99/32"), ip_network("fd53::99/128")),
                   ("10.9.0.5", None)),
        PeerConfig("1234", (ip_network("192.168.53.100/32"), ip_network("10.10.0.0/16")),
                   ("10.9.0.6", 4000)),
        PeerConfig("v6.peer_1", (ip_network("fd53::100/128"),), ("2001:db8::1", 4000)),
        PeerConfig("anywhere", (ip_network("192.168.53.101/32"),), None),
    )
    assert (p.log_level, p.log_packets) == ("debug", True)


def test_client_settings():
    p = load(CLIENT.replace("interface:", "interface:\n  name: tun7\n  mtu: 1500")
             + "keepalive: 0\nforward: true\nroutes:\nlog:\n  packets: yes\n")
    assert (p.ifname, p.mtu, p.keepalive, p.forward) == ("tun7", 1500, 0, True)
    assert p.routes == ()  # an empty 'routes:' is no routes
    assert p.log_packets is True


@pytest.mark.parametrize("server, expected", [
    ("10.9.0.11:9090", ("10.9.0.11", 9090)),
    ("10.9.0.11", ("10.9.0.11", 9090)),
    ("vpn.example.com:443", ("vpn.example.com", 443)),
    ("vpn.example.com.", ("vpn.example.com.", 9090)),
    ("localhost:1", ("localhost", 1)),
    ("'[fd00::1]:65535'", ("fd00::1", 65535)),
    ("'[FD00:0::1]'", ("fd00::1", 9090)),
    ("'fd00::1'", ("fd00::1", 9090)),
])
def test_server_forms(server, expected):
    assert load(CLIENT.replace("10.9.0.11:9090", server)).server == expected


# --- errors: exact messages and lines ---------------------------------------------------


def test_routes_example_message():
    text = """\
        # HostU
        mode: client
        server: 10.9.0.11:9090
        interface:
          address: 192.168.53.99/24
        routes:
          - 192.168.60.0/24
          - 192.168.600.0/24
        """
    assert problems(text, "client.yaml") == [
        "client.yaml:8: routes[1]: '192.168.600.0/24' is not an IP network"]


def test_mtu_not_an_integer():
    assert problem("""\
        mode: server
        interface:
          mtu: big
          address: 192.168.53.1/24
        """) == "x.yaml:3: interface.mtu: must be an integer, got 'big'"


def test_client_without_server():
    assert problem("mode: client\ninterface: {address: 192.168.53.99/24}\n") == (
        "x.yaml:1: server: required in client mode")


def test_unknown_keys_with_and_without_suggestion():
    assert problems(CLIENT + "  adress: 10.0.0.1/8\nlogging: {}\nzzz: 1\nlog: {levle: info}\n") == [
        "x.yaml:5: interface.adress: unknown key (did you mean 'address'?)",
        "x.yaml:6: logging: unknown key (did you mean 'log'?)",
        "x.yaml:7: zzz: unknown key",
        "x.yaml:8: log.levle: unknown key (did you mean 'level'?)",
    ]


def test_several_errors_reported_together_in_line_order():
    assert problems("""\
        mode: client
        interface:
          name: this-name-is-too-long
          address: 192.168.53.99
          mtu: 100
        routes: [192.168.60.1/24]
        keepalive: -1
        log:
          level: INFO
          packets: 3
        """) == [
        "x.yaml:1: server: required in client mode",
        "x.yaml:3: interface.name: 'this-name-is-too-long' must be 1 to 15 characters long",
        "x.yaml:4: interface.address: '192.168.53.99' needs a prefix length, like 192.168.53.99/24",
        "x.yaml:5: interface.mtu: must be from 576 to 65535, got 100",
        "x.yaml:6: routes[0]: '192.168.60.1/24' has host bits set (did you mean 192.168.60.0/24?)",
        "x.yaml:7: keepalive: must be from 0 to 3600, got -1",
        "x.yaml:9: log.level: must be one of debug, info, warning, error, got 'INFO'",
        "x.yaml:10: log.packets: must be true or false, got '3'",
    ]


@pytest.mark.parametrize("extra, message", [
    ("keepalive: true", "keepalive: must be an integer, got 'true'"),
    ("keepalive: 2.5", "keepalive: must be an integer, got '2.5'"),
    ("keepalive: '25'", "keepalive: must be an integer, got '25'"),
    ("keepalive:", "keepalive: must be an integer, got nothing"),
    ("forward: 1", "forward: must be true or false, got '1'"),
    ("forward: 'yes'", "forward: must be true or false, got 'yes'"),
    ("log: {packets: [true]}", "log.packets: must be true or false, got a list"),
    ("log: {level: 3}", "log.level: must be one of debug, info, warning, error, got '3'"),
    ("log: {level: true}", "log.level: must be a string, got 'true'"),
    ("log: verbose", "log: must be a mapping, got 'verbose'"),
    ("routes: 10.0.0.0/8", "routes: must be a list, got '10.0.0.0/8'"),
    ("routes: [[10.0.0.0/8]]", "routes[0]: must be a string, got a list"),
    ("routes: [172.16.0.0/12, 172.16.0.0/12]",
     "routes[1]: '172.16.0.0/12' is already listed as routes[0]"),
    ("routes: [\"fd00::1/64\"]",
     "routes[0]: 'fd00::1/64' has host bits set (did you mean fd00::/64?)"),
    ("mode: client", "mode: duplicate key (first at line 1)"),
    ("listen: 0.0.0.0:9090", "listen: only allowed in server mode"),
    ("peers: []", "peers: only allowed in server mode"),
    ("peer_timeout: 60", "peer_timeout: only allowed in server mode"),
])
def test_client_errors(extra, message):
    assert problems(CLIENT + extra + "\n") == [f"x.yaml:5: {message}"]


@pytest.mark.parametrize("value, message", [
    ("10.9.0.11:0", "'10.9.0.11:0': port must be a number from 1 to 65535"),
    ("10.9.0.11:65536", "'10.9.0.11:65536': port must be a number from 1 to 65535"),
    ("10.9.0.11:http", "'10.9.0.11:http': port must be a number from 1 to 65535"),
    ("'10.9.0.11:'", "'10.9.0.11:': port must be a number from 1 to 65535"),
    ("192.168.600.1:9090",
     "'192.168.600.1:9090': '192.168.600.1' is not an IP address or host name"),
    ("-vpn.example.com",
     "'-vpn.example.com': '-vpn.example.com' is not an IP address or host name"),
    ("a..b:1", "'a..b:1': 'a..b' is not an IP address or host name"),
    ("x" * 64 + ".com", f"'{'x' * 64}.com': '{'x' * 64}.com' is not an IP address or host name"),
    ("under_score.com", "'under_score.com': 'under_score.com' is not an IP address or host name"),
    ("'[10.9.0.11]:9090'", "'[10.9.0.11]:9090': only IPv6 addresses go in brackets"),
    ("'[fd00::1]:99999'", "'[fd00::1]:99999': port must be a number from 1 to 65535"),
    ("'fd00::1::2'", "'fd00::1::2': 'fd00::1::2' is not an IP address or host name"),
    ("9090", "'9090': '9090' is not an IP address or host name"),
    ("yes", "must be a string, got 'yes'"),
])
def test_bad_server(value, message):
    assert problem(CLIENT.replace("10.9.0.11:9090", value)) == f"x.yaml:2: server: {message}"


def test_host_name_labels_of_63_are_fine():
    name = "x" * 63 + ".example"
    assert load(CLIENT.replace("10.9.0.11:9090", name)).server == (name, 9090)


@pytest.mark.parametrize("value, message", [
    ("vpn.example.com:9090", "'vpn.example.com:9090': 'vpn.example.com' is not an IP address"),
    ("0.0.0.0:0", "'0.0.0.0:0': port must be a number from 1 to 65535"),
    ("[\"::\"]", "must be a string, got a list"),
])
def test_bad_listen(value, message):
    assert problem(SERVER + f"listen: {value}\n") == f"x.yaml:4: listen: {message}"


@pytest.mark.parametrize("name, message", [
    ("abcdefghijklmnop", "'abcdefghijklmnop' must be 1 to 15 characters long"),
    ("''", "'' must be 1 to 15 characters long"),
    ("'..'", "'..' must be 1 to 15 characters long"),
    ("tun/0", "'tun/0' must not contain '/', ':' or whitespace"),
    ("'tun 0'", "'tun 0' must not contain '/', ':' or whitespace"),
    ("tun:0", "'tun:0' must not contain '/', ':' or whitespace"),
    ("tun%s", "'tun%s': a pattern has one '%d', like 'tun%d'"),
    ("t%d%d", "'t%d%d': a pattern has one '%d', like 'tun%d'"),
])
def test_bad_interface_name(name, message):
    assert problem(f"mode: server\ninterface:\n  address: 10.0.0.1/8\n  name: {name}\n") == (
        f"x.yaml:4: interface.name: {message}")


def test_interface_name_pattern_and_15_chars_are_fine():
    assert load(SERVER.replace("interface:", "interface:\n  name: vpn%d")).ifname == "vpn%d"
    assert load(SERVER.replace("interface:", "interface:\n  name: abcdefghijklmno")).ifname == (
        "abcdefghijklmno")


@pytest.mark.parametrize("interface, message", [
    ("{address: bogus}", "interface.address: 'bogus' is not an IP address with a prefix length"),
    ("{address: []}", "interface.address: must not be empty"),
    ("{address: [10.0.0.1/8, 10.0.0.1/8]}", "interface.address[1]: '10.0.0.1/8' is listed twice"),
    ("{address: 10.0.0.1/33}",
     "interface.address: '10.0.0.1/33' is not an IP address with a prefix length"),
    ("{address: [10.0.0.1/8, 'fd00::1/64'], mtu: 1279}",
     "interface.mtu: must be at least 1280 with an IPv6 address, got 1279"),
    ("{address: 10.0.0.1/8, mtu: 575}", "interface.mtu: must be from 576 to 65535, got 575"),
    ("{address: 10.0.0.1/8, mtu: 65536}", "interface.mtu: must be from 576 to 65535, got 65536"),
    ("{mtu: 1400}", "interface.address: required"),
    ("[tun0]", "interface: must be a mapping, got a list"),
])
def test_bad_interface(interface, message):
    assert problem(f"mode: server\ninterface: {interface}\n") == f"x.yaml:2: {message}"


def test_missing_and_empty_sections():
    assert problems("mode: server\n") == [
        "x.yaml:1: interface: required (at least interface.address)"]
    assert problems("mode: server\ninterface:\nlog:\n") == ["x.yaml:2: interface.address: required"]
    assert problems("interface: {address: 10.0.0.1/8}\n") == [
        "x.yaml:1: mode: required (client or server)"]
    assert problems("mode: both\ninterface: {address: 10.0.0.1/8}\nserver: x\npeers: []\n") == [
        "x.yaml:1: mode: must be one of client, server, got 'both'"]


def test_server_mode_errors():
    assert problems(SERVER + "server: 10.9.0.11\nkeepalive: 3601\npeer_timeout: 9\n") == [
        "x.yaml:4: server: only allowed in client mode",
        "x.yaml:5: keepalive: must be from 0 to 3600, got 3601",
        "x.yaml:6: peer_timeout: must be from 10 to 86400, got 9",
    ]
    assert load(SERVER + "keepalive: 3600\npeer_timeout: 86400\n").peer_timeout == 86400


def test_peer_errors():
    assert problems(SERVER + textwrap.dedent("""\
        peers:
          - name: hostu
            allowed_ips: [192.168.53.99/32]
          - name: hostu
            allowed_ips: [192.168.53.100/32]
          - allowed_ips: [192.168.53.101/32]
          - name: "has space"
          - name: hostw
            allowed_ips: []
            endpoint: vpn.example.com
          - name: hostx
            allowed_ips: [192.168.53.1/24, 192.168.53.200]
            endpoint: "[fd00::1]:0"
            key: abc
          - name: averyveryveryveryverylongpeername
            allowed_ips:
          - name: true
            allowed_ips: 192.168.53.102/32
          - hosty
        """)) == [
        "x.yaml:7: peers[1].name: 'hostu' is already used (line 5)",
        "x.yaml:9: peers[2].name: required",
        "x.yaml:10: peers[3].name: 'has space' must be 1 to 32 of A-Za-z0-9_.-",
        "x.yaml:10: peers[3].allowed_ips: required",
        "x.yaml:12: peers[4].allowed_ips: must not be empty",
        "x.yaml:13: peers[4].endpoint: 'vpn.example.com': 'vpn.example.com' is not an IP address",
        "x.yaml:15: peers[5].allowed_ips[0]: '192.168.53.1/24' has host bits set"
        " (did you mean 192.168.53.0/24?)",
        "x.yaml:16: peers[5].endpoint: '[fd00::1]:0': port must be a number from 1 to 65535",
        "x.yaml:17: peers[5].key: unknown key",
        "x.yaml:18: peers[6].name: 'averyveryveryveryverylongpeername' must be 1 to 32"
        " of A-Za-z0-9_.-",
        "x.yaml:19: peers[6].allowed_ips: must not be empty",
        "x.yaml:20: peers[7].name: must be a string, got 'true'",
        "x.yaml:21: peers[7].allowed_ips: must be a list, got '192.168.53.102/32'",
        "x.yaml:22: peers[8]: must be a mapping, got 'hosty'",
    ]


def test_overlapping_allowed_ips_name_both_peers():
    assert problems(SERVER + textwrap.dedent("""\
        peers:
          - name: hostu
            allowed_ips: [192.168.53.99/32, "fd53::/64"]
          - name: hostv
            allowed_ips:
              - 192.168.53.0/24
              - "fd53::5"
              - 192.168.54.0/24
              - 192.168.54.7
        """)) == [
        "x.yaml:9: peers[1].allowed_ips[0]: 192.168.53.0/24 of peer 'hostv' overlaps"
        " 192.168.53.99/32 of peer 'hostu'",
        "x.yaml:10: peers[1].allowed_ips[1]: fd53::5/128 of peer 'hostv' overlaps"
        " fd53::/64 of peer 'hostu'",
        "x.yaml:12: peers[1].allowed_ips[3]: 192.168.54.7/32 of peer 'hostv' overlaps"
        " 192.168.54.0/24 of peer 'hostv'",
    ]


def test_overlap_names_an_unnamed_peer_by_position():
    assert problems(SERVER + "peers:\n  - {name: a, allowed_ips: [10.0.0.0/8]}\n"
                    "  - {name: a, allowed_ips: [10.1.0.0/16]}\n") == [
        "x.yaml:6: peers[1].name: 'a' is already used (line 5)",
        "x.yaml:6: peers[1].allowed_ips[0]: 10.1.0.0/16 of peers[1] overlaps"
        " 10.0.0.0/8 of peer 'a'",
    ]


# --- errors: the file as a whole --------------------------------------------------------


def test_missing_file():
    with pytest.raises(ProfileError) as info:
        load_profile("nope.yaml")
    assert info.value.problems == ["nope.yaml:1: (file): no such file"]


def test_directory(tmp_path):
    with pytest.raises(ProfileError) as info:
        load_profile(tmp_path)
    assert info.value.problems == [f"{tmp_path}:1: (file): is a directory, not a profile"]


def test_not_utf8():
    Path("x.yaml").write_bytes(b"mode: \xff\n")
    with pytest.raises(ProfileError) as info:
        load_profile("x.yaml")
    assert info.value.problems == ["x.yaml:1: (file): not UTF-8 text"]


@pytest.mark.parametrize("text, message", [
    ("mode: client\nroutes: [10.0.0.0/8\n", "3: (file): not valid YAML: while parsing a flow"
     " sequence, expected ',' or ']', but got '<stream end>'"),
    ("mode: client\n  server: x\n",
     "2: (file): not valid YAML: mapping values are not allowed here"),
    ("a: 1\n---\nb: 2\n", "2: (file): not valid YAML: expected a single document in the stream,"
     " but found another document"),
    ("mode: \x07\n", "1: (file): not valid YAML: special characters are not allowed (#x0007)"),
    ("", "1: (file): empty profile (expected settings such as 'mode: client')"),
    ("# just a comment\n", "1: (file): empty profile (expected settings such as 'mode: client')"),
    ("\n\n- mode: client\n", "3: (file): must be a mapping of settings (key: value), got a list"),
    ("client\n", "1: (file): must be a mapping of settings (key: value), got 'client'"),
])
def test_broken_files(text, message):
    assert problems(text) == [f"x.yaml:{message}"]


def test_keys_must_be_names():
    assert problems(SERVER + "? [a]\n: b\n") == [
        "x.yaml:4: (top level): keys must be names, got a list"]
    assert problems(SERVER + "log:\n  ? {a: 1}\n  : b\n") == [
        "x.yaml:5: log: keys must be names, got a mapping"]


def test_custom_tags_are_wrong_types():
    assert problem(CLIENT + "keepalive: !!python/int 3\n") == (
        "x.yaml:5: keepalive: must be an integer, got '3'")


# --- resolve_profile --------------------------------------------------------------------


@pytest.mark.parametrize("arg", ["./client", "/etc/x/client", "client.yaml", "a/b.yml", "x.yml"])
def test_resolve_paths_as_given(arg, monkeypatch):
    monkeypatch.setenv("TUNVPN_CONFIG_DIR", "/somewhere")
    assert resolve_profile(arg) == Path(arg)
    assert resolve_profile(arg, "/elsewhere") == Path(arg)


def test_resolve_names(monkeypatch):
    assert resolve_profile("client") == Path(DEFAULT_CONFIG_DIR) / "client.yaml"
    assert DEFAULT_CONFIG_DIR == "/etc/tunvpn"
    assert resolve_profile("hostu@lab-1.b_2", "/cfg") == Path("/cfg/hostu@lab-1.b_2.yaml")
    monkeypatch.setenv("TUNVPN_CONFIG_DIR", "/from/env")
    assert resolve_profile("server") == Path("/from/env/server.yaml")
    assert resolve_profile("server", "/arg") == Path("/arg/server.yaml")
    monkeypatch.setenv("TUNVPN_CONFIG_DIR", "")
    assert resolve_profile("server") == Path("/etc/tunvpn/server.yaml")


@pytest.mark.parametrize("arg", ["", "a b", "x$", "caf\u00e9", "a:b"])
def test_resolve_bad_names(arg):
    with pytest.raises(ProfileError) as info:
        resolve_profile(arg)
    assert info.value.problems == [
        f"{arg!r}: not a profile name (letters, digits and '_.@-' only) nor a path to a .yaml file"]


def test_resolved_name_loads(tmp_path):
    (tmp_path / "lab.yaml").write_text(CLIENT)
    p = load_profile(resolve_profile("lab", str(tmp_path)))
    assert (p.name, p.path) == ("lab", tmp_path / "lab.yaml")


# --- hostile profiles: nothing but ProfileError, bounded work, short messages -------------


@pytest.mark.parametrize("value, shown", [
    ("0x" + "f" * 4000, "'0xffffffff"),  # str() of the int would pass Python's digit limit
    ("0b" + "1" * 20000, "'0b11111111"),
    ("1:" + ":".join(["59"] * 3000), "'1:59:59:59"),  # YAML 1.1 base 60
    ("9" * 5000, "'9999999999"),  # int() itself refuses it
    ("-" + "9" * 5000, "'-999999999"),
])
def test_huge_integers_are_out_of_range(value, shown):
    (only,) = problems(CLIENT + f"keepalive: {value}\n")
    assert only.startswith(f"x.yaml:5: keepalive: must be from 0 to 3600, got {shown}")
    assert only.endswith(f"... ({len(value)} characters)") and len(only) < 200


def test_huge_mtu_is_out_of_range_not_a_non_integer():
    (only,) = problems(SERVER.replace("interface:", "interface:\n  mtu: " + "9" * 5000))
    assert only.startswith("x.yaml:3: interface.mtu: must be from 576 to 65535, got '999")


def test_long_integers_within_limits_still_convert():
    assert load(CLIENT + "keepalive: 0x" + "0" * 200 + "1_0\n").keepalive == 16
    assert load(CLIENT + "keepalive: 1:00:00\n").keepalive == 3600


@pytest.mark.parametrize("nesting, line", [
    ("routes: " + "[" * 5000 + "]" * 5000, 5),
    ("routes:\n  " + "- " * 5000 + "x", 6),  # block sequences, all on one line
    ("log: " + "{a: " * 5000 + "b" + "}" * 5000, 5),
    ("routes: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), 5),
])
def test_deep_nesting_is_an_error_not_a_recursion_error(nesting, line):
    assert problems(CLIENT + nesting + "\n") == [
        f"x.yaml:{line}: (file): nested more than {MAX_DEPTH} levels deep"]


def test_nesting_up_to_the_limit_is_checked_as_usual():
    deep = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    assert problems(CLIENT + f"routes: {deep}\n") == [
        "x.yaml:5: routes[0]: must be a string, got a list"]


def test_the_pure_python_parser_gives_the_same_answers(monkeypatch):
    """Without libyaml (python3-yaml built without it) messages and limits are the same."""
    monkeypatch.delattr(profile_module.yaml, "CSafeLoader")
    assert problems(CLIENT + "routes: " + "[" * 5000 + "]" * 5000 + "\n") == [
        f"x.yaml:5: (file): nested more than {MAX_DEPTH} levels deep"]
    assert problems("mode: client\nroutes: [10.0.0.0/8\n")[0].startswith(
        "x.yaml:3: (file): not valid YAML: while parsing a flow sequence")
    assert load(CLIENT).server == ("10.9.0.11", 9090)


def test_anything_unexpected_is_still_a_profile_error(monkeypatch):
    def broken(text):
        raise RuntimeError("x" * 10000)

    monkeypatch.setattr(profile_module, "_parse", broken)
    with pytest.raises(ProfileError) as info:
        load(CLIENT)
    (only,) = info.value.problems
    assert only.startswith("x.yaml:1: (file): cannot be checked: RuntimeError: 'xxx")
    assert len(only) < 200


def test_fifo_is_refused_without_blocking():
    os.mkfifo("x.yaml")
    result: list = []

    def load_it():
        try:
            load_profile("x.yaml")
        except ProfileError as error:
            result.append(error.problems)

    reader = threading.Thread(target=load_it, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # blocked in open(): let it go, then fail
        os.close(os.open("x.yaml", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail("load_profile() blocked on a FIFO")
    assert result == [["x.yaml:1: (file): is a FIFO, not a profile (only regular files are read)"]]


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_devices_are_refused_without_reading(device):
    with pytest.raises(ProfileError) as info:
        load_profile(device)
    assert info.value.problems == [
        f"{device}:1: (file): is a character device, not a profile (only regular files are read)"]


def test_size_limit():
    assert MAX_PROFILE_BYTES == 1024 * 1024
    padding = "#" * 99 + "\n"
    body = CLIENT + padding * ((MAX_PROFILE_BYTES - len(CLIENT)) // len(padding))
    body += "#" * (MAX_PROFILE_BYTES - len(body) - 1) + "\n"
    assert len(body) == MAX_PROFILE_BYTES
    assert load(body).server == ("10.9.0.11", 9090)  # exactly the limit is fine
    assert problems(body + "\n") == [
        f"x.yaml:1: (file): is {MAX_PROFILE_BYTES + 1} bytes, larger than the limit of "
        f"{MAX_PROFILE_BYTES} for a profile"]


@pytest.mark.parametrize("text, start", [
    (CLIENT.replace("10.9.0.11:9090", "a" * 900_000),
     "x.yaml:2: server: 'aaaaaaaa"),
    (CLIENT + "log: {level: " + "x" * 900_000 + "}",
     "x.yaml:5: log.level: must be one of debug, info, warning, error, got 'xxxx"),
    (CLIENT + "routes: ['" + "1" * 900_000 + "']",
     "x.yaml:5: routes[0]: '1111111"),
    (CLIENT.replace("interface:", "interface:\n  name: " + "t" * 900_000),
     "x.yaml:4: interface.name: 'tttttt"),
    (CLIENT + "peers: '" + "p" * 900_000 + "'",
     "x.yaml:5: peers: only allowed in server mode"),
])
def test_long_values_are_quoted_as_a_short_excerpt(text, start):
    found = problems(text)
    assert found[0].startswith(start)
    assert all(len(line) < 300 for line in found)


def test_long_and_unprintable_keys_are_shown_safely():
    found = problems(CLIENT + "log:\n  " + "k" * 1000 + ": 1\n  \"\\e[31mred\": 2\n")
    assert found == [
        f"x.yaml:6: log.{'k' * 92!r}... (1000 characters): unknown key",
        "x.yaml:7: log.'\\x1b[31mred': unknown key"]


def test_problems_are_capped():
    assert MAX_PROBLEMS == 20
    found = problems(CLIENT + "".join(f"bad{i}: 1\n" for i in range(100)))
    assert len(found) == MAX_PROBLEMS + 1
    assert found[0] == "x.yaml:5: bad0: unknown key"
    assert found[MAX_PROBLEMS - 1] == "x.yaml:24: bad19: unknown key"
    assert found[-1] == "... and 80 more problems"
    with pytest.raises(ProfileError) as info:
        load(CLIENT + "".join(f"bad{i}: 1\n" for i in range(100)))
    assert info.value.count == 100


def test_the_first_problems_by_line_are_kept_whatever_the_order_found():
    # overlaps are found after every peer was read, here after 300 bad names further down
    text = SERVER + "peers:\n  - {name: a, allowed_ips: [10.0.0.0/8]}\n" + \
        "  - {name: b, allowed_ips: [10.1.0.0/16]}\n" + \
        "".join(f"  - {{name: 'bad {i}', allowed_ips: [172.16.{i >> 8}.{i & 255}/32]}}\n"
                for i in range(300))
    found = problems(text)
    assert found[0] == "x.yaml:6: peers[1].allowed_ips[0]: 10.1.0.0/16 of peer 'b' overlaps" \
        " 10.0.0.0/8 of peer 'a'"
    assert found[1] == "x.yaml:7: peers[2].name: 'bad 0' must be 1 to 32 of A-Za-z0-9_.-"
    assert found[-1] == f"... and {300 + 1 - MAX_PROBLEMS} more problems"


def peers_profile(count: int, allowed=lambda i: f"[10.{i >> 8 & 255}.{i & 255}.1/32]") -> str:
    return SERVER + "peers:\n" + "".join(
        f"  - name: p{i}\n    allowed_ips: {allowed(i)}\n" for i in range(count))


def test_ten_thousand_peers_are_checked_quickly():
    started = time.monotonic()
    p = load(peers_profile(10_000))
    assert len(p.peers) == 10_000
    assert time.monotonic() - started < 10  # about 1 s on a busy machine; was 72 s


def test_peers_sharing_one_long_list_give_a_bounded_report_quickly():
    addresses = "[" + ", ".join(f"1.1.{i >> 8}.{i & 255}" for i in range(300)) + "]"
    started = time.monotonic()
    found = problems(peers_profile(300, lambda i: addresses))
    assert time.monotonic() - started < 10  # was 12 s and 89,700 lines
    assert found[0] == ("x.yaml:8: peers[1].allowed_ips[0]: 1.1.0.0/32 of peer 'p1' overlaps"
                        " 1.1.0.0/32 of peer 'p0'")
    assert found[-1] == f"... and {299 * 300 - MAX_PROBLEMS} more problems"


def test_an_aliased_list_is_one_problem_per_peer():
    addresses = "[" + ", ".join(f"1.1.{i >> 8}.{i & 255}" for i in range(1000)) + "]"
    text = peers_profile(1000, lambda i: f"&list {addresses}" if i == 0 else "*list")
    started = time.monotonic()
    found = problems(text)
    assert time.monotonic() - started < 10  # 1,000 x 1,000 never finished
    assert found[0] == ("x.yaml:8: peers[1].allowed_ips: the same list as peers[0].allowed_ips"
                        " (a YAML alias), so each of its networks would belong to two peers")
    assert found[-1] == f"... and {999 - MAX_PROBLEMS} more problems"


def test_overlap_sweep_agrees_with_comparing_every_pair():
    rng = random.Random(8)
    for _ in range(100):
        nets = []
        for _ in range(rng.randrange(1, 60)):
            if rng.random() < 0.8:  # inside 10.0.0.0/12, /20 to /32: many overlaps
                address, prefix = 0x0A000000 | rng.randrange(1 << 12) << 8, rng.randrange(20, 33)
            else:  # a few IPv6 ones in fd00::/125, which must never clash with IPv4
                address, prefix = 0xFD00 << 112 | rng.randrange(8), rng.randrange(125, 129)
            nets.append(ip_network((address, prefix), strict=False))
        expected = []
        for i, net in enumerate(nets):
            earlier = [j for j in range(i) if nets[j].version == net.version
                       and nets[j].overlaps(net)]
            if earlier:
                expected.append((i, min(earlier)))
        assert profile_module._overlaps(nets) == expected, nets


@pytest.mark.parametrize("name, message", [
    ('"tun\\0"', "'tun\\x00' must not contain control characters"),
    ('"tun\\x1b"', "'tun\\x1b' must not contain control characters"),
    ('"tun\\u200b"', "'tun\\u200b' must not contain control characters"),
    ('"tun\\t0"', "'tun\\t0' must not contain '/', ':' or whitespace"),
    ('"%d"', "'%d' alone would name the interface '0': put a name before it, like 'tun%d'"),
])
def test_interface_names_that_run_would_fail_on(name, message):
    assert problem(f"mode: server\ninterface:\n  address: 10.0.0.1/8\n  name: {name}\n") == (
        f"x.yaml:4: interface.name: {message}")


@pytest.mark.parametrize("value, message", [
    ("255.255.255.255", "'255.255.255.255': 255.255.255.255 is the broadcast address"),
    ("'::ffff:255.255.255.255'",
     "'::ffff:255.255.255.255': 255.255.255.255 is the broadcast address"),
    ("0.0.0.0:9090", "'0.0.0.0:9090': 0.0.0.0 is the unspecified address, not one that can be"
     " reached"),
    ("'[::]:9090'", "'[::]:9090': :: is the unspecified address, not one that can be reached"),
    ("224.0.0.1", "'224.0.0.1': 224.0.0.1 is a multicast address"),
    ("'[ff02::1]:9090'", "'[ff02::1]:9090': ff02::1 is a multicast address"),
    ("'fe80::1'", "'fe80::1': fe80::1 is link-local: add the interface as a zone, like"
     " fe80::1%eth0"),
    ("'fd00::1%eth0'", "'fd00::1%eth0': fd00::1%eth0: only a link-local address takes a %zone"),
])
def test_server_addresses_a_socket_cannot_use(value, message):
    assert problem(CLIENT.replace("10.9.0.11:9090", value)) == f"x.yaml:2: server: {message}"


@pytest.mark.parametrize("value", ["'[fe80::1%eth0]:9090'", "'fe80::1%2'", "169.254.1.1"])
def test_link_local_servers_with_a_zone_are_fine(value):
    host = load(CLIENT.replace("10.9.0.11:9090", value)).server[0]
    assert host == value.strip("'").removeprefix("[").split("]")[0]


@pytest.mark.parametrize("value, message", [
    ("255.255.255.255:9090", "255.255.255.255 is the broadcast address"),
    ("224.0.0.1:9090", "224.0.0.1 is a multicast address"),
    ("'[fe80::1]:9090'", "fe80::1 is link-local: add the interface as a zone, like"
     " fe80::1%eth0"),
])
def test_listen_addresses_a_socket_cannot_use(value, message):
    assert problem(SERVER + f"listen: {value}\n") == (
        f"x.yaml:4: listen: {value.strip(chr(39))!r}: {message}")


@pytest.mark.parametrize("value", ["0.0.0.0:9090", "'[::]:9090'", "'[fe80::1%eth0]:9090'"])
def test_listen_wildcards_are_fine(value):
    assert load(SERVER + f"listen: {value}\n").listen[1] == 9090


@pytest.mark.parametrize("value, message", [
    ("0.0.0.0", "0.0.0.0 is the unspecified address, not one that can be reached"),
    ("255.255.255.255:5", "255.255.255.255 is the broadcast address"),
    ("224.0.0.1", "224.0.0.1 is a multicast address"),
    ("'fe80::5'", "fe80::5 is link-local: add the interface as a zone, like fe80::5%eth0"),
])
def test_endpoints_a_datagram_cannot_come_from(value, message):
    assert problem(SERVER + f"peers:\n  - {{name: a, allowed_ips: [10.0.0.2/32], endpoint: "
                   f"{value}}}\n") == (
        f"x.yaml:5: peers[0].endpoint: {value.strip(chr(39))!r}: {message}")


@pytest.mark.parametrize("routes, index, route", [
    ("[0.0.0.0/1]", 0, "0.0.0.0/1"),
    ("[192.168.60.0/24, 10.9.0.0/24]", 1, "10.9.0.0/24"),
    ("[10.9.0.11]", 0, "10.9.0.11/32"),
])
def test_a_route_covering_the_server_is_refused(routes, index, route):
    assert problem(CLIENT + f"routes: {routes}\n") == (
        f"x.yaml:5: routes[{index}]: {route} covers the server 10.9.0.11, so the tunnel would"
        " carry its own datagrams into itself; only 0.0.0.0/0 and ::/0 (a full tunnel) are"
        " routed around that")


def test_a_route_covering_an_ipv6_or_mapped_server_is_refused():
    text = CLIENT.replace("10.9.0.11:9090", "'[fd09::11]:9090'") + "routes: ['fc00::/7']\n"
    assert problem(text).startswith("x.yaml:5: routes[0]: fc00::/7 covers the server fd09::11,")
    text = CLIENT.replace("10.9.0.11:9090", "'::ffff:10.9.0.11'") + "routes: [10.0.0.0/8]\n"
    assert problem(text).startswith("x.yaml:5: routes[0]: 10.0.0.0/8 covers the server "
                                    "::ffff:a09:b,")


def test_a_tunnel_network_holding_the_server_is_refused():
    assert problem(CLIENT.replace("192.168.53.99/24", "10.9.0.99/16")) == (
        "x.yaml:4: interface.address: 10.9.0.99/16 puts the server 10.9.0.11 inside the tunnel"
        " network, so the tunnel would carry its own datagrams into itself")


def test_routes_not_covering_the_server_and_server_names_are_fine():
    assert load(CLIENT + "routes: [10.9.1.0/24, 0.0.0.0/5, '::/0']\n").routes[1] == (
        ip_network("0.0.0.0/5"))
    named = CLIENT.replace("10.9.0.11:9090", "vpn.example.com") + "routes: [0.0.0.0/0]\n"
    assert load(named).routes == (ip_network("0.0.0.0/0"),)  # the daemon checks at run time


def test_a_server_route_covering_a_pinned_endpoint_is_refused():
    assert problem(SERVER + "routes: [10.9.0.0/24]\npeers:\n"
                   "  - {name: a, allowed_ips: [10.9.9.2/32], endpoint: 10.9.0.5:4000}\n") == (
        "x.yaml:4: routes[0]: 10.9.0.0/24 covers the endpoint of peer 'a' 10.9.0.5, so the "
        "tunnel would carry its own datagrams into itself")


@pytest.mark.parametrize("routes, address, expected", [
    ([], "10.9.0.11", None),
    (["192.168.60.0/24", "0.0.0.0/1"], "10.9.0.11", "0.0.0.0/1"),
    (["10.9.0.0/24", "0.0.0.0/0"], "10.9.0.11", "10.9.0.0/24"),  # the first that covers it
    (["10.9.0.0/24"], "10.9.1.11", None),
    (["::/0"], "10.9.0.11", None),
    (["0.0.0.0/0"], "fd00::1", None),
    (["10.9.0.0/24"], "::ffff:10.9.0.11", "10.9.0.0/24"),  # what a dual-stack socket reports
    (["fe80::/64"], "fe80::1%eth0", "fe80::/64"),
])
def test_covering_route(routes, address, expected):
    found = covering_route([ip_network(r) for r in routes], address)
    assert found == (ip_network(expected) if expected else None)


def test_a_long_explicit_int_that_is_not_a_number_is_not_an_integer():
    assert problem(CLIENT + "keepalive: !!int " + "z" * 200 + "\n").startswith(
        "x.yaml:5: keepalive: must be an integer, got 'zzz")
