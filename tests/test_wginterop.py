"""Interop: tunvpnd.wireguard's handshake and transport against the real wireguard-go.

wireguard-go (Debian's 0.0.20220316) runs in the lab's server namespace with a TUN of a unique
name; tests/wgpeer.py, which uses only noise.py and keypair.py over a plain UDP socket, runs in
hostu. Both directions: our initiator pings wireguard-go's tunnel address; wireguard-go
initiates towards our responder when its host pings ours. With and without a preshared key.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, in_ns, unique
from tunvpnd.lab import wait_until
from tunvpnd.wireguard import keys

pytestmark = pytest.mark.skipif(not (shutil.which("wireguard-go") and shutil.which("wg")),
                                reason="wireguard-go and wg are needed")

UAPI_DIR = Path("/run/wireguard")
DEBIAN_PYTHON = "/usr/bin/python3"      # with Debian 12's python3-cryptography 38: no *_into


def _debian_python_ok() -> bool:
    try:
        return subprocess.run([DEBIAN_PYTHON, "-c", "import cryptography"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


PYTHONS = [pytest.param(sys.executable, id="venv"),
           pytest.param(DEBIAN_PYTHON, id="debian", marks=pytest.mark.skipif(
               not _debian_python_ok(), reason="no Debian python3-cryptography"))]
WG_PORT = 51820
OUR_PORT = 51821
WG_TUNNEL = "192.168.53.1"          # wireguard-go's tunnel address (server)
OUR_TUNNEL = "192.168.53.99"        # ours (hostu)


class WireguardGo:
    """wireguard-go in `role`, configured through `wg set`; stopped by PID, socket removed."""

    def __init__(self, lab, role: str, workdir: Path) -> None:
        self.lab, self.role = lab, role
        self.ifname = unique("wgt")[:15]
        self.sock = UAPI_DIR / f"{self.ifname}.sock"
        self.private = os.urandom(32)
        self.public = keys.public_key(self.private)
        self.keyfile = workdir / "wg.key"
        self.keyfile.write_text(keys.encode_key(self.private) + "\n")
        self.keyfile.chmod(0o600)
        self.workdir = workdir
        self.log = workdir / "wireguard-go.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = self.lab.spawn(self.role, ["wireguard-go", "-f", self.ifname],
                                       stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT)
        wait_until(lambda: self.sock.exists() or self.proc.poll() is not None, 10,
                   what="wireguard-go's UAPI socket")
        assert self.proc.poll() is None, self.log.read_text()

    def configure(self, peer_public: bytes, psk: bytes | None, endpoint: str | None) -> None:
        argv = ["wg", "set", self.ifname, "private-key", str(self.keyfile),
                "listen-port", str(WG_PORT), "peer", keys.encode_key(peer_public),
                "allowed-ips", f"{OUR_TUNNEL}/32"]
        if psk is not None:
            pskfile = self.workdir / "wg.psk"
            pskfile.write_text(keys.encode_key(psk) + "\n")
            pskfile.chmod(0o600)
            argv += ["preshared-key", str(pskfile)]
        if endpoint:
            argv += ["endpoint", endpoint]
        in_ns(self.lab, self.role, argv)
        in_ns(self.lab, self.role, ["ip", "addr", "add", f"{WG_TUNNEL}/24", "dev", self.ifname])
        in_ns(self.lab, self.role, ["ip", "link", "set", self.ifname, "up"])

    def peer_dump(self) -> dict:
        """Our peer's line of `wg show IFNAME dump`."""
        lines = in_ns(self.lab, self.role, ["wg", "show", self.ifname, "dump"]).stdout
        fields = lines.splitlines()[1].split("\t")
        return {"public_key": fields[0], "preshared_key": fields[1], "endpoint": fields[2],
                "latest_handshake": int(fields[4]), "rx": int(fields[5]), "tx": int(fields[6])}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()


@pytest.fixture
def wggo(lab, tmp_path):
    instance = WireguardGo(lab, "server", tmp_path)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        if instance.log.exists():
            print(instance.log.read_text(errors="replace"))


def run_peer(lab, python: str, cfg: dict, timeout: float = 30) -> dict:
    result = lab.run("hostu", [python, "-m", "tests.wgpeer"], input=json.dumps(cfg) + "\n",
                     timeout=timeout, cwd=str(REPO))
    lines = result.stdout.splitlines()
    assert lines[:1] == ["ready"], result.stdout + result.stderr
    return json.loads(lines[1]) if len(lines) > 1 else {"error": result.stderr}


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("with_psk", [False, True], ids=["no-psk", "psk"])
def test_our_initiator_pings_wireguard_go(lab, wggo, with_psk, python):
    private = os.urandom(32)
    psk = os.urandom(32) if with_psk else None
    wggo.configure(keys.public_key(private), psk, endpoint=None)
    count = 3
    result = run_peer(lab, python, {
        "mode": "initiate", "private": private.hex(), "peer_public": wggo.public.hex(),
        "psk": psk.hex() if psk else None, "bind": ["10.9.0.5", OUR_PORT],
        "endpoint": ["10.9.0.11", WG_PORT], "tunnel_src": OUR_TUNNEL, "tunnel_dst": WG_TUNNEL,
        "count": count, "timeout": 15})
    assert "error" not in result, result
    assert [(r["src"], r["dst"], r["type"], r["seq"], r["same_data"])
            for r in result["replies"]] == [(WG_TUNNEL, OUR_TUNNEL, 0, seq, True)
                                            for seq in range(1, count + 1)]
    assert [r["counter"] for r in result["replies"]] == list(range(count))
    dump = wggo.peer_dump()
    assert dump["public_key"] == keys.encode_key(keys.public_key(private))
    assert dump["preshared_key"] == (keys.encode_key(psk) if psk else "(none)")
    assert dump["endpoint"] == f"10.9.0.5:{OUR_PORT}"
    assert dump["latest_handshake"] > 0
    # rx: our 148-byte initiation + three 96-byte transport messages (60-byte echo requests
    # padded to 64, 16-byte header, 16-byte tag); tx: the 92-byte response + three replies of
    # the same size (keepalives, if any, add 32 each).
    assert dump["rx"] == 148 + count * 96
    assert dump["tx"] >= 92 + count * 96 and (dump["tx"] - 92 - count * 96) % 32 == 0


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("with_psk", [False, True], ids=["no-psk", "psk"])
def test_wireguard_go_initiates_to_our_responder(lab, wggo, with_psk, python):
    private = os.urandom(32)
    psk = os.urandom(32) if with_psk else None
    wggo.configure(keys.public_key(private), psk, endpoint=f"10.9.0.5:{OUR_PORT}")
    count = 3
    cfg = {"mode": "respond", "private": private.hex(), "peer_public": wggo.public.hex(),
           "psk": psk.hex() if psk else None, "bind": ["10.9.0.5", OUR_PORT],
           "tunnel_src": OUR_TUNNEL, "count": count, "timeout": 20}
    peer = lab.spawn("hostu", [python, "-m", "tests.wgpeer"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        peer.stdin.write(json.dumps(cfg) + "\n")
        peer.stdin.close()
        peer.stdin = None               # communicate() must not touch it again
        assert peer.stdout.readline().strip() == "ready"
        pinged = in_ns(lab, "server", ["ping", "-4", "-c", str(count), "-i", "0.2", "-W", "5",
                                       OUR_TUNNEL], timeout=30)
        assert f"{count} received" in pinged.stdout
        out, err = peer.communicate(timeout=20)
        result = json.loads(out.splitlines()[0])
        assert "error" not in result, (result, err)
        assert result["confirmed"]
        assert [a["seq"] for a in result["answered"]] == list(range(1, count + 1))
        assert {a["src"] for a in result["answered"]} == {WG_TUNNEL}
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.communicate()
    dump = wggo.peer_dump()
    assert dump["latest_handshake"] > 0
    # wireguard-go sent the initiation and the echo requests, we the response and the replies.
    assert dump["tx"] >= 148 + count * 96 and dump["rx"] >= 92 + count * 96


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("with_psk", [False, True], ids=["no-psk", "psk"])
def test_device_initiator_exchanges_1000_echoes_with_wireguard_go(lab, wggo, with_psk, python):
    """The sans-I/O Device (staging, timers, rotation) as our side: the first echo waits for
    the handshake, then 1,000 echo requests one at a time, every reply back in order."""
    private = os.urandom(32)
    psk = os.urandom(32) if with_psk else None
    wggo.configure(keys.public_key(private), psk, endpoint=None)
    count = 1000
    result = run_peer(lab, python, {
        "mode": "device-initiate", "private": private.hex(), "peer_public": wggo.public.hex(),
        "psk": psk.hex() if psk else None, "bind": ["10.9.0.5", OUR_PORT],
        "endpoint": ["10.9.0.11", WG_PORT], "tunnel_src": OUR_TUNNEL, "tunnel_dst": WG_TUNNEL,
        "count": count, "timeout": 40}, timeout=60)
    assert "error" not in result, result
    assert result["seqs"] == list(range(1, count + 1)) and result["same_data"]
    assert result["drops"] == {} and result["initiator"] is True
    dump = wggo.peer_dump()
    assert dump["endpoint"] == f"10.9.0.5:{OUR_PORT}" and dump["latest_handshake"] > 0
    assert dump["rx"] >= 148 + count * 96


@pytest.mark.parametrize("with_psk", [False, True], ids=["no-psk", "psk"])
def test_wireguard_go_initiates_to_our_device(lab, wggo, with_psk):
    """wireguard-go initiates; our Device responds, waits for confirmation, answers pings."""
    private = os.urandom(32)
    psk = os.urandom(32) if with_psk else None
    wggo.configure(keys.public_key(private), psk, endpoint=f"10.9.0.5:{OUR_PORT}")
    count = 10
    cfg = {"mode": "device-respond", "private": private.hex(), "peer_public": wggo.public.hex(),
           "psk": psk.hex() if psk else None, "bind": ["10.9.0.5", OUR_PORT],
           "tunnel_src": OUR_TUNNEL, "count": count, "timeout": 20}
    peer = lab.spawn("hostu", [sys.executable, "-m", "tests.wgpeer"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        peer.stdin.write(json.dumps(cfg) + "\n")
        peer.stdin.close()
        peer.stdin = None
        assert peer.stdout.readline().strip() == "ready"
        pinged = in_ns(lab, "server", ["ping", "-4", "-c", str(count), "-i", "0.2", "-W", "5",
                                       OUR_TUNNEL], timeout=30)
        assert f"{count} received" in pinged.stdout
        out, err = peer.communicate(timeout=20)
        result = json.loads(out.splitlines()[0])
        assert "error" not in result, (result, err)
        assert result["answered"] == list(range(1, count + 1))
        assert result["initiator"] is False and result["drops"] == {}
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.communicate()
