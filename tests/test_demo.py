"""`tunvpnd lab up|demo --wire wireguard`: the secure demo, end to end, as the README gives it.

Real namespaces, daemons, TUN devices, ping and TCP. What a user sees: the demo's verdict, the
tunnel's traffic, what crossed the wire, and never a private or preshared key in the output.
"""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, unique
from tunvpnd.lab import leftover_namespaces
from tunvpnd.lab.topology import LAB_RUN_ROOT
from tunvpnd.wireguard import keys as wgkeys

SCRIPT = Path(sys.executable).parent / "tunvpnd"
# a key as `wg` prints it: 43 base64 characters, the last one carrying 4 bits, and '='
KEY_RE = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")
HEX_KEY_RE = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")
PUBLIC_RE = re.compile(r"public keys: server (\S+), hostu (\S+);")


def lab_command(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), "lab", *args], capture_output=True, text=True,
                          timeout=timeout)


def public_keys(output: str) -> tuple[str, str]:
    found = PUBLIC_RE.search(output)
    assert found, output
    return found.group(1), found.group(2)


def assert_secure_demo_ok(result: subprocess.CompletedProcess) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "3 packets transmitted, 3 received" in result.stdout
    assert "102400 bytes echoed back identical" in result.stdout
    assert "the ping's payload 'tunvpnd-demo' readable in 0 of them" in result.stdout
    assert re.search(r"\d+ UDP frames on port 9090 at the server's eth0 \(a frame may be a "
                     r"GSO batch\): (\d+ (initiation|response|cookie|transport)(, )?)+\n",
                     result.stdout), result.stdout
    assert "hostu up, handshake" in result.stdout and "server up, handshake" in result.stdout
    assert "DEMO OK: ping and TCP echo through the tunnel work over wire: wireguard" in out
    assert "Traceback" not in out


def test_secure_demo_end_to_end_prints_only_public_keys():
    prefix = unique("tvw")
    result = lab_command("demo", "--wire", "wireguard", "--prefix", prefix)
    assert_secure_demo_ok(result)
    out = result.stdout + result.stderr
    server_pub, hostu_pub = public_keys(out)
    # the only key-shaped strings are the two public keys it announced (each a real key)
    assert set(KEY_RE.findall(out)) == {server_pub, hostu_pub}, out
    assert server_pub != hostu_pub and all(wgkeys.decode_key(k) for k in (server_pub, hostu_pub))
    assert HEX_KEY_RE.findall(out) == []
    keydir = re.search(r"fresh WireGuard keys in (\S+) \(mode 0700", out).group(1)
    assert f"keys removed ({keydir})" in out
    assert not Path(keydir).exists() and not (LAB_RUN_ROOT / prefix).exists()
    assert leftover_namespaces(prefix) == []


def test_secure_lab_up_keys_are_private_fresh_and_never_printed_then_removed():
    prefix = unique("tvw")
    try:
        up = lab_command("up", "--wire", "wireguard", "--prefix", prefix, timeout=60)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"lab {prefix}: up (wire: wireguard)" in up.stdout
        keydir = Path(re.search(r"fresh WireGuard keys in (\S+) \(mode 0700", up.stdout)[1])
        assert keydir.parent == LAB_RUN_ROOT / prefix
        assert stat.S_IMODE(keydir.stat().st_mode) == 0o700
        secret_files = sorted(p.name for p in keydir.iterdir() if p.suffix in (".key", ".psk"))
        assert secret_files == ["hostu.psk", "wg-client.key", "wg-client.psk", "wg-server.key"]
        for name in secret_files:
            assert stat.S_IMODE((keydir / name).stat().st_mode) == 0o600, name
        key = {name: wgkeys.read_key_file(name, keydir, private=True) for name in secret_files}
        assert key["hostu.psk"] == key["wg-client.psk"]
        assert key["wg-server.key"] != key["wg-client.key"]
        server_pub, hostu_pub = public_keys(up.stdout)
        assert server_pub == wgkeys.encode_key(wgkeys.public_key(key["wg-server.key"]))
        assert hostu_pub == wgkeys.encode_key(wgkeys.public_key(key["wg-client.key"]))
        secrets = [form for k in key.values() for form in (wgkeys.encode_key(k), k.hex())]

        demo = lab_command("demo", "--wire", "wireguard", "--prefix", prefix)
        assert "already up (wire: wireguard), reusing it" in demo.stdout
        assert_secure_demo_ok(demo)
        for text in (up.stdout + up.stderr, demo.stdout + demo.stderr):
            for secret in secrets:
                assert secret not in text
        assert f"keys removed ({keydir})" in demo.stdout
        assert not keydir.exists()
        assert leftover_namespaces(prefix) == []
    finally:
        lab_command("down", "--prefix", prefix, timeout=60)
    assert leftover_namespaces(prefix) == [] and not (LAB_RUN_ROOT / prefix).exists()


def test_secure_example_profiles_are_shipped_identically():
    """The demo runs the wg-*.yaml examples the package ships: the same as etc/tunvpn's."""
    for name in ("wg-client.yaml", "wg-server.yaml"):
        assert (REPO / "etc" / "tunvpn" / name).read_bytes() == \
            (REPO / "tunvpnd" / "examples" / name).read_bytes()
