"""WireGuard profiles (issue 9, "Profile"): wire: wireguard, the key files and keys, every
problem as FILE:LINE: key.path: what, and never a secret key in any output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, client_profile, ping, server_profile
from tests.test_reload import reload
from tunvpnd.profile import PeerConfig, ProfileError, load_profile
from tunvpnd.wireguard.keys import (
    encode_key,
    generate_private,
    generate_psk,
    public_key,
    write_key_file,
)

EX_CONFIG = 78

CLIENT = """\
mode: client
server: 10.9.0.11:9090
wire: wireguard
private_key_file: client.key
server_public_key: {server_pub}
preshared_key_file: client.psk
interface: {{name: tun0, address: 192.168.53.99/24}}
routes: [192.168.60.0/24]
keepalive: 25
"""

SERVER = """\
mode: server
listen: 0.0.0.0:9090
wire: wireguard
private_key_file: server.key
interface: {{name: tun0, address: 192.168.53.1/24}}
forward: true
peers:
  - name: hostu
    public_key: {client_pub}
    allowed_ips: [192.168.53.99/32]
    preshared_key_file: hostu.psk
    endpoint: 10.9.0.5:9090
  - name: hostw
    public_key: {other_pub}
    allowed_ips: [192.168.53.98/32, fd00:53::98/128]
"""

PLAIN_CLIENT = """\
mode: client
server: 10.9.0.11:9090
interface:
  address: 192.168.53.99/24
"""


class Keys:
    """A fresh set of keys, written beside the profiles as `wg genkey > NAME` would."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.client, self.server, self.other = (generate_private() for _ in range(3))
        self.psk, self.hostu_psk = generate_psk(), generate_psk()
        for name, key in (("client.key", self.client), ("server.key", self.server),
                          ("client.psk", self.psk), ("hostu.psk", self.hostu_psk)):
            write_key_file(directory / name, key)
        self.client_pub, self.server_pub, self.other_pub = (
            public_key(k) for k in (self.client, self.server, self.other))

    def secrets(self) -> list[str]:
        """Every secret, in each form it could leak in."""
        found = []
        for key in (self.client, self.server, self.other, self.psk, self.hostu_psk):
            found += [encode_key(key), repr(key), key.hex()]
        return found

    def client_text(self) -> str:
        return CLIENT.format(server_pub=encode_key(self.server_pub))

    def server_text(self) -> str:
        return SERVER.format(client_pub=encode_key(self.client_pub),
                             other_pub=encode_key(self.other_pub))


@pytest.fixture
def keys(tmp_path, monkeypatch) -> Keys:
    monkeypatch.chdir(tmp_path)  # FILE in messages is the name we pass
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return Keys(tmp_path)


def load(text: str, name: str = "x.yaml"):
    Path(name).write_text(textwrap.dedent(text))
    return load_profile(name)


def problems(text: str, name: str = "x.yaml") -> list[str]:
    with pytest.raises(ProfileError) as info:
        load(text, name)
    return info.value.problems


def no_secrets(text: str, keys: Keys) -> None:
    for secret in keys.secrets():
        assert secret not in text


# --- valid profiles -------------------------------------------------------------------------


def test_client_loads_with_its_keys(keys):
    p = load(keys.client_text())
    assert (p.wire, p.mode, p.server, p.keepalive) == ("wireguard", "client", ("10.9.0.11", 9090),
                                                       25)
    assert p.private_key == keys.client
    assert p.public_key == keys.client_pub
    assert p.server_public_key == keys.server_pub
    assert p.preshared_key == keys.psk


def test_server_loads_with_its_peers_keys(keys):
    p = load(keys.server_text())
    assert (p.wire, p.private_key, p.public_key) == ("wireguard", keys.server, keys.server_pub)
    hostu, hostw = p.peers
    assert (hostu.name, hostu.public_key, hostu.preshared_key) == (
        "hostu", keys.client_pub, keys.hostu_psk)
    assert hostu.endpoint == ("10.9.0.5", 9090)
    assert (hostw.name, hostw.public_key, hostw.preshared_key, hostw.endpoint) == (
        "hostw", keys.other_pub, None, None)
    assert p.server_public_key is None and p.preshared_key is None


def test_psk_is_optional_and_plain_profiles_have_no_keys(keys):
    p = load(keys.client_text().replace("preshared_key_file: client.psk\n", ""))
    assert p.preshared_key is None and p.private_key == keys.client
    plain = load(PLAIN_CLIENT)
    assert plain.wire == "plain"
    assert (plain.private_key, plain.public_key, plain.server_public_key) == (None, None, None)
    assert load(PLAIN_CLIENT + "wire: plain\n") == plain  # written out, it is the default


def test_repr_and_str_of_a_loaded_profile_hold_no_secret(keys):
    for p in (load(keys.client_text()), load(keys.server_text())):
        for text in (repr(p), str(p), *(repr(peer) for peer in p.peers)):
            no_secrets(text, keys)
        assert "public_key=" in repr(p)  # public keys may be shown; secrets are left out
    assert "preshared_key" not in repr(PeerConfig("a", (), None, b"p" * 32, b"s" * 32))


@pytest.mark.parametrize("name", ["wg-client.yaml", "wg-server.yaml"])
def test_example_profiles_check_with_fresh_keys(keys, tmp_path, name):
    text = (REPO / "etc/tunvpn" / name).read_text()
    write_key_file(tmp_path / name.replace(".yaml", ".key"), generate_private())
    p = load(text, name)
    assert p.wire == "wireguard" and p.private_key is not None
    assert (p.server_public_key if p.mode == "client" else p.peers[0].public_key) is not None


def test_wireguard_examples_in_the_man_page_check_with_fresh_keys(keys, tmp_path):
    roff = (REPO / "docs" / "tunvpnd.yaml.5").read_text()
    blocks = [b for b in re.findall(r"^\.EX\n(.*?)^\.EE", roff, re.M | re.S)
              if b.startswith("# wg-")]
    assert len(blocks) == 2
    for name in ("wg-client.key", "wg-server.key", "wg-client.psk"):
        write_key_file(tmp_path / name, generate_private())
    for block in blocks:
        p = load(block.replace("\\-", "-"), block.split(",")[0][2:])
        assert p.wire == "wireguard"


# --- where key files are found ----------------------------------------------------------------


def test_credentials_directory_first_then_beside_the_profile(keys, tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    other = generate_private()
    write_key_file(creds / "client.key", other)
    text = keys.client_text()
    assert load(text).private_key == keys.client  # no $CREDENTIALS_DIRECTORY: beside
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    p = load(text)
    assert p.private_key == other and p.public_key == public_key(other)  # the credential wins
    assert p.preshared_key == keys.psk  # not among the credentials: beside the profile
    # the profile elsewhere: relative names are beside it, not in the working directory
    sub = tmp_path / "etc"
    sub.mkdir()
    (sub / "c.yaml").write_text(text)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ProfileError) as info:
        load_profile(sub / "c.yaml")
    assert info.value.problems == [
        f"{sub / 'c.yaml'}:4: private_key_file: {sub / 'client.key'}: no such key file",
        f"{sub / 'c.yaml'}:6: preshared_key_file: {sub / 'client.psk'}: no such key file"]


def test_an_absolute_key_path_is_used_as_it_is(keys, tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    write_key_file(creds / "client.key", generate_private())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    text = keys.client_text().replace("client.key", str(tmp_path / "client.key"))
    assert load(text).private_key == keys.client


def test_missing_key_file_with_credentials_says_both_places(keys, tmp_path, monkeypatch):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    (tmp_path / "client.key").unlink()
    assert problems(keys.client_text()) == [
        "x.yaml:4: private_key_file: client.key (nor in $CREDENTIALS_DIRECTORY): "
        "no such key file"]


# --- every problem, with its line ---------------------------------------------------------------


@pytest.mark.parametrize("name, mode", [("client.key", 0o644), ("client.key", 0o604),
                                        ("client.psk", 0o606), ("client.psk", 0o640 | 0o001)])
def test_a_secret_key_file_other_users_can_access_is_refused(keys, name, mode):
    os.chmod(name, mode)
    line, key = (4, "private_key_file") if name.endswith(".key") else (6, "preshared_key_file")
    assert problems(keys.client_text()) == [
        f"x.yaml:{line}: {key}: {name}: a secret key file must not be accessible by other "
        f"users (mode {mode:04o}): chmod 600 it"]


def test_group_readable_key_file_is_fine(keys):
    os.chmod("client.key", 0o640)  # root:tunvpn 0640 is a common layout; "other" is what counts
    assert load(keys.client_text()).private_key == keys.client


def test_a_peer_psk_readable_by_other_is_refused_with_its_path(keys):
    os.chmod("hostu.psk", 0o644)
    assert problems(keys.server_text()) == [
        "x.yaml:11: peers[0].preshared_key_file: hostu.psk: a secret key file must not be "
        "accessible by other users (mode 0644): chmod 600 it"]


@pytest.mark.parametrize("value, message", [
    ("abc", "a key is 44 characters of base64 (32 bytes, as `wg genkey` writes it), not 3 "
            "characters"),
    ("A" * 43 + "!", "a key is 32 bytes of base64 (as `wg genkey` writes it): this is not valid "
                     "base64"),
    ("A" * 42 + "==", "a key is 32 bytes of base64 (as `wg genkey` writes it), this one decodes "
                      "to 31 bytes"),
    ("42", "a key is 44 characters of base64 (32 bytes, as `wg genkey` writes it), not 2 "
           "characters"),
    ("[a, b]", "must be a string, got a list"),
])
def test_public_keys_that_are_not_32_bytes_of_base64(keys, value, message):
    client = keys.client_text().replace(encode_key(keys.server_pub), value)
    assert problems(client) == [f"x.yaml:5: server_public_key: {message}"]
    server = keys.server_text().replace(encode_key(keys.other_pub), value)
    assert problems(server) == [f"x.yaml:14: peers[1].public_key: {message}"]


@pytest.mark.parametrize("content, message", [
    ("", "a key is 44 characters of base64 (32 bytes, as `wg genkey` writes it), not 0 "
         "characters"),
    ("not a key\n", "a key is 44 characters of base64 (32 bytes, as `wg genkey` writes it), "
                    "not 10 characters"),
    ("{key}\nmore\n", "not a key file: characters after the key (one base64 key, as `wg "
                      "genkey` writes it)"),
])
def test_key_files_that_do_not_hold_a_key(keys, content, message):
    Path("client.key").unlink()
    fd = os.open("client.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content.format(key=encode_key(keys.client)).encode())
    os.close(fd)
    assert problems(keys.client_text()) == [f"x.yaml:4: private_key_file: client.key: {message}"]


def test_client_without_server_public_key_or_private_key_file(keys):
    text = keys.client_text()
    text = text.replace(f"server_public_key: {encode_key(keys.server_pub)}\n", "")
    assert problems(text) == [
        "x.yaml:1: server_public_key: required with wire: wireguard in client mode (the "
        "server's public key, as `wg pubkey` prints it)"]
    assert problems(text.replace("private_key_file: client.key\n", "")) == [
        "x.yaml:1: private_key_file: required with wire: wireguard (a file holding our private "
        "key, as `tunvpnd genkey` or `wg genkey` writes it)",
        "x.yaml:1: server_public_key: required with wire: wireguard in client mode (the "
        "server's public key, as `wg pubkey` prints it)"]


@pytest.mark.parametrize("peers, line", [("", 1), ("peers: []\n", 7), ("peers:\n", 7)])
def test_wireguard_server_without_peers(keys, peers, line):
    head = keys.server_text().split("peers:\n")[0]
    assert problems(head + peers) == [
        f"x.yaml:{line}: peers: required with wire: wireguard (each peer with its public_key "
        "and allowed_ips): a wireguard server learns no peers"]


def test_two_peers_with_one_public_key(keys):
    text = keys.server_text().replace(encode_key(keys.other_pub), encode_key(keys.client_pub))
    assert problems(text) == [
        "x.yaml:14: peers[1].public_key: the same public key as peer 'hostu' (line 9): each "
        "peer has a key of its own"]


def test_a_peer_key_equal_to_our_own(keys):
    text = keys.server_text().replace(encode_key(keys.other_pub), encode_key(keys.server_pub))
    assert problems(text) == [
        "x.yaml:14: peers[1].public_key: is our own public key (that of private_key_file): a "
        "peer is another host, with a key of its own"]
    text = keys.client_text().replace(encode_key(keys.server_pub), encode_key(keys.client_pub))
    assert problems(text) == [
        "x.yaml:5: server_public_key: is our own public key (that of private_key_file): the "
        "server has a key of its own"]


def test_a_peer_without_public_key_and_an_endpoint_without_port(keys):
    text = keys.server_text().replace(f"    public_key: {encode_key(keys.other_pub)}\n", "")
    text = text.replace("10.9.0.5:9090", "10.9.0.5")
    text += "  - name: hostx\n    public_key: " + encode_key(public_key(generate_private()))
    text += "\n    allowed_ips: [192.168.53.97/32]\n    endpoint: '[fd00::5]'\n"
    assert problems(text) == [
        "x.yaml:12: peers[0].endpoint: needs a port with wire: wireguard (where the first "
        "handshake is sent), like 10.9.0.5:9090",
        "x.yaml:13: peers[1].public_key: required with wire: wireguard (the peer's public key, "
        "as `wg pubkey` prints it)",
        "x.yaml:18: peers[2].endpoint: needs a port with wire: wireguard (where the first "
        "handshake is sent), like [fd00::5]:9090"]


def test_wireguard_keys_with_wire_plain_say_which(keys):
    text = keys.client_text().replace("wire: wireguard\n", "")
    assert problems(text) == [
        "x.yaml:3: private_key_file: only used with wire: wireguard (this profile is wire: "
        "plain, the default)",
        "x.yaml:4: server_public_key: only used with wire: wireguard (this profile is wire: "
        "plain, the default)",
        "x.yaml:5: preshared_key_file: only used with wire: wireguard (this profile is wire: "
        "plain, the default)"]
    text = keys.server_text().replace("wire: wireguard", "wire: plain")
    text = text.replace("private_key_file: server.key\n", "")
    assert problems(text) == [
        "x.yaml:8: peers[0].public_key: only used with wire: wireguard (this profile is wire: "
        "plain)",
        "x.yaml:10: peers[0].preshared_key_file: only used with wire: wireguard (this profile "
        "is wire: plain)",
        "x.yaml:13: peers[1].public_key: only used with wire: wireguard (this profile is wire: "
        "plain)"]


def test_wire_value_and_keys_in_the_wrong_mode(keys):
    assert problems(PLAIN_CLIENT + "wire: secure\n") == [
        "x.yaml:5: wire: must be one of plain, wireguard, got 'secure'"]
    text = keys.server_text().replace("forward: true\n", "forward: true\nserver_public_key: "
                                      f"{encode_key(keys.client_pub)}\npreshared_key_file: x\n")
    assert problems(text) == [
        "x.yaml:7: server_public_key: only allowed in client mode",
        "x.yaml:8: preshared_key_file: only allowed in client mode"]


def test_plain_peers_are_unchanged(keys):
    text = "mode: server\ninterface: {address: 192.168.53.1/24}\npeers:\n" \
           "  - {name: hostu, allowed_ips: [192.168.53.99/32], endpoint: 10.9.0.5}\n"
    (peer,) = load(text).peers
    assert peer == PeerConfig("hostu", (peer.allowed_ips[0],), ("10.9.0.5", None))
    assert peer.public_key is None and peer.preshared_key is None


def test_no_problem_message_holds_key_material(keys):
    """A secret where a public key belongs, a key file with more after the key, the key itself
    where its file's name belongs: whatever goes wrong, the messages never repeat a secret."""
    text = keys.client_text().replace(encode_key(keys.server_pub), encode_key(keys.client) + "x")
    text = text.replace("client.key", encode_key(keys.server))
    Path("client.psk").write_text(encode_key(keys.psk) + encode_key(keys.psk) + "\n")
    found = problems(text)
    assert found == [
        "x.yaml:4: private_key_file: is a key, not the name of a file: put the key in a file "
        "(`tunvpnd genkey > NAME.key`, mode 0600) and name that file here",
        "x.yaml:5: server_public_key: a key is 44 characters of base64 (32 bytes, as `wg "
        "genkey` writes it), not 45 characters",
        "x.yaml:6: preshared_key_file: client.psk: not a key file: characters after the key "
        "(one base64 key, as `wg genkey` writes it)"]
    no_secrets("\n".join(found), keys)


# --- the command line ------------------------------------------------------------------------


def tunvpnd(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "tunvpnd", *args], capture_output=True,
                          text=True, timeout=30, cwd=cwd, env={**environment, **(env or {})})


def test_check_prints_ok_and_our_public_key_never_a_secret(keys, tmp_path):
    Path("c.yaml").write_text(keys.client_text())
    Path("s.yaml").write_text(keys.server_text())
    result = tunvpnd("check", "c.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("c.yaml: OK: client tun0 192.168.53.99/24 mtu 1420, server "
                             "10.9.0.11:9090, 1 route, wireguard, public key "
                             f"{encode_key(keys.client_pub)}\n")
    no_secrets(result.stdout + result.stderr, keys)
    result = tunvpnd("check", "s.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(", 2 peers, 0 routes, forwarding, wireguard, public key "
                                  f"{encode_key(keys.server_pub)}\n")
    no_secrets(result.stdout + result.stderr, keys)


def test_check_reads_the_key_files_as_run_does(keys, tmp_path):
    os.chmod("client.key", 0o644)
    Path("c.yaml").write_text(keys.client_text())
    result = tunvpnd("check", "c.yaml", cwd=tmp_path)
    assert result.returncode == EX_CONFIG
    assert result.stderr == ("c.yaml:4: private_key_file: client.key: a secret key file must "
                             "not be accessible by other users (mode 0644): chmod 600 it\n")
    os.chmod("client.key", 0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    write_key_file(creds / "client.key", keys.other)
    result = tunvpnd("check", "c.yaml", cwd=tmp_path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(f"public key {encode_key(keys.other_pub)}\n")
    no_secrets(result.stdout + result.stderr, keys)


def test_plain_check_summary_is_unchanged(tmp_path):
    result = tunvpnd("check", str(REPO / "etc/tunvpn/client.yaml"), cwd=tmp_path)
    assert result.returncode == 0
    assert "wireguard" not in result.stdout and "public key" not in result.stdout


def test_reload_to_wire_wireguard_keeps_the_plain_tunnel_running(lab, daemons):
    """A running plain daemon whose profile turns into a wireguard one on SIGHUP: the wire
    needs a restart, so the tunnel keeps working on plain, and the log says why."""
    daemons(lab, "server", server_profile())
    client = daemons(lab, "hostu", client_profile())
    keys = Keys(client.profile.parent)
    text = client.profile.read_text()
    client.profile.write_text(text.replace("mode: client\n", "mode: client\nwire: wireguard\n"
                                           "private_key_file: client.key\nserver_public_key: "
                                           f"{encode_key(keys.server_pub)}\n"))
    reload(client)
    assert "wire changed: restart the service to apply it" in client.log()
    ping(lab, "hostu", "192.168.60.5")
    assert client.proc.poll() is None
    no_secrets(client.log(), keys)


def test_a_plain_profile_does_not_load_cryptography():
    """A plain daemon stays as small as before: the WireGuard keys' libraries (about 10 MB of
    memory) are only imported for a wireguard profile."""
    code = ("import sys; from tunvpnd.profile import load_profile; "
            f"load_profile({str(REPO / 'etc/tunvpn/server.yaml')!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cryptography', 'nacl')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"
