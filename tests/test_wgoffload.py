"""The secure wire's fast path and footprint.

End to end: tunvpnd <-> tunvpnd on wire: wireguard with offloads on, a TCP echo through the
tunnel, and what the kernel sees, captured with packet sockets that ask for the virtio header
(PACKET_VNET_HDR): the datagrams each daemon sends leave as UDP GSO super-packets of several
WireGuard transport messages (one sendmsg, UDP_SEGMENT), and what each daemon writes into its
TUN after decrypting what arrived (the other's GSO batches, read as GRO batches) is mostly TCP
super-packets (one write for several segments). With offloads off: neither.

Unit: the inlined padding and IP-length trimming of Keypair.seal/open; what a WireGuard daemon
does not load until it needs it (PyNaCl for cookie replies, cryptography's serialization
module where raw public bytes exist), and that the fallbacks for Debian 12's cryptography 38
give the same bytes.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys

import pytest

from tests.conftest import REPO, in_ns, ping
from tests.test_wgtunnel import HOSTV, Keys, client_text, server_text
from tunvpnd.wireguard import keys, noise

# -- end to end: GSO batches of sealed datagrams, GRO batches coalesced -------------------------

SOL_PACKET, PACKET_VNET_HDR = 263, 15     # linux/socket.h, linux/if_packet.h
VNET_HDR = struct.Struct("=BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, offset
GSO_UDP_L4, GSO_TCPV4 = 5, 1
PORT = 9090

CAPTURE = """import sys
from tests.test_wgoffload import capture
capture()
"""


def capture() -> None:
    """Run in a lab host: watch eth0 (UDP to or from port 9090 that this host sends) and tun0
    (what the daemon writes into it) until stdin closes; print one JSON line of counts."""
    socks = {}
    for ifname in ("eth0", "tun0"):
        # SOCK_RAW (the vnet header needs it): an Ethernet frame on eth0, the bare IP packet
        # on tun0, which has no link-layer header
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: nothing lost
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.bind((ifname, 3))
        socks[s] = ifname
    found = {"datagrams": 0, "gso_sends": 0, "gso_datagrams": 0, "max_segments": 0,
             "not_transport": 0, "tun_writes": 0, "tun_super": 0, "tun_max_size": 0}
    print("ready", flush=True)
    while True:
        ready = select.select([*socks, sys.stdin], [], [], 60)[0]
        if not ready or sys.stdin in ready:
            break
        for s in ready:
            data, address = s.recvfrom(1 << 17)
            _, gso_type, _, gso_size, _, _ = VNET_HDR.unpack_from(data)
            frame = data[VNET_HDR.size:]
            if socks[s] == "tun0":
                if address[2] != socket.PACKET_OUTGOING:     # written by the daemon
                    found["tun_writes"] += 1
                    found["tun_super"] += gso_type == GSO_TCPV4
                    found["tun_max_size"] = max(found["tun_max_size"], len(frame))
                continue
            if address[2] != socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00" or \
                    frame[23] != 17:
                continue
            ip = frame[14:]
            ihl = (ip[0] & 15) * 4
            sport, dport = struct.unpack_from("!HH", ip, ihl)
            if PORT not in (sport, dport):
                continue
            payload = ip[ihl + 8:]
            size = gso_size if gso_type == GSO_UDP_L4 else len(payload)
            segments = [payload[at:at + size] for at in range(0, len(payload), size)]
            found["datagrams"] += len(segments)
            if len(segments) > 1:
                found["gso_sends"] += 1
                found["gso_datagrams"] += len(segments)
                found["max_segments"] = max(found["max_segments"], len(segments))
                found["not_transport"] += sum(seg[:4] != b"\x04\0\0\0" for seg in segments)
    print(json.dumps(found), flush=True)


def tcp_echo(lab, nbytes: int) -> None:
    echo = lab.spawn("hostv", [sys.executable, "-m", "tunvpnd.lab", "echo-server", "9000"],
                     stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in echo.stdout.readline()
        result = in_ns(lab, "hostu", [sys.executable, "-m", "tunvpnd.lab", "echo-client", HOSTV,
                                      "9000", str(nbytes)], timeout=120)
        assert f"{nbytes} bytes echoed back identical" in result.stdout
    finally:
        echo.kill()
        echo.wait()
        echo.stdout.close()


@pytest.mark.parametrize("offload", ["1", "0"], ids=["offload", "no-offload"])
def test_sealed_datagrams_leave_in_gso_batches_and_gro_batches_are_coalesced(
        lab, daemons, sockdir, offload):
    keys_ = Keys(sockdir)
    env = {"TUNVPN_OFFLOAD": offload}
    server = daemons(lab, "server", server_text(keys_), env=env)
    client = daemons(lab, "hostu", client_text(keys_), name="client", env=env)
    for daemon in (server, client):
        if offload == "1" and "offloads: off" in daemon.log():
            pytest.skip("this kernel refuses TUN offloads")
    ping(lab, "hostu", HOSTV, count=1)     # the handshake: every datagram from now is data
    captures = {role: lab.spawn(role, [sys.executable, "-c", CAPTURE], cwd=str(REPO),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
                for role in ("server", "hostu")}
    try:
        for proc in captures.values():
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        tcp_echo(lab, 2 * 1024 * 1024)
        found = {}
        for role, proc in captures.items():
            proc.stdin.close()
            found[role] = json.loads(proc.stdout.readline())
    finally:
        for proc in captures.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    print(f"offload={offload}: {found}")
    for role, seen in found.items():
        assert seen["datagrams"] > 1000, (role, seen)  # 2 MB each way, at most 1420 B each
        assert seen["tun_writes"] > 0, (role, seen)
        if offload == "1":
            # several sealed transport messages per sendmsg, and most data went that way
            assert seen["max_segments"] > 1 and seen["not_transport"] == 0, (role, seen)
            assert seen["gso_datagrams"] * 2 > seen["datagrams"], (role, seen)
            # decrypted GRO batches reach the TUN as TCP super-packets, bigger than the MTU
            assert seen["tun_super"] > 0 and seen["tun_max_size"] > 1420, (role, seen)
        else:
            assert seen["gso_sends"] == 0 and seen["tun_super"] == 0, (role, seen)
            assert seen["tun_max_size"] <= 1420, (role, seen)
    for daemon in (server, client):
        status = daemon.wait_status(lambda s: int(s.split(" rx ")[1].split()[0]) > 1000)
        assert "dropped 0" in status, status


def python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- footprint --------------------------------------------------------------------------------

def test_pynacl_and_serialization_load_only_when_needed():
    """A running WireGuard device (a handshake, transport both ways) never imports PyNaCl nor
    cryptography's serialization module; the first cookie reply brings PyNaCl in, and works."""
    out = python("""
import sys, random, os
from tunvpnd.wireguard.device import Device
from tunvpnd.wireguard import keys
keys.public_key(os.urandom(32))
a = Device(os.urandom(32), wall_offset=0.0, rng=random.Random(1))
b = Device(os.urandom(32), wall_offset=0.0, rng=random.Random(2))
sa = a.add_peer(b.public_key, None, ("10.0.0.2", 1))
b.add_peer(a.public_key)
sa.initiate(10.0)
for now, (src, dst, where) in enumerate([(a, b, ("10.0.0.1", 1)), (b, a, ("10.0.0.2", 1)),
                                         (a, b, ("10.0.0.1", 1))]):
    out = list(src.outbox)
    src.outbox.clear()
    for datagram, _, _ in out:
        dst.receive(datagram, where, 10.0 + now)
assert b.peers[a.public_key].current is not None
print("nacl" in sys.modules, "cryptography.hazmat.primitives.serialization" in sys.modules)
# under load, an initiation without mac2 gets a cookie reply, which the initiator takes
b._under_load_until = 1e9
sa.last_sent_handshake = None
sa.initiate(100.0)
b.receive(a.outbox.pop()[0], ("10.0.0.1", 1), 100.0)
assert b.drops["cookie_sent"] == 1
a.receive(b.outbox.pop()[0], ("10.0.0.2", 1), 100.0)
print("nacl" in sys.modules, sa.cookies.write_macs is not None, a.drops["bad_mac"])
""").split("\n")
    assert out[0] == "False False", out
    assert out[1] == "True True 0", out


def test_public_keys_without_public_bytes_raw(monkeypatch):
    """cryptography 38 (Debian 12) has no public_bytes_raw: the serialization fallback gives
    the same public keys, in noise.py and keys.py."""
    private = os.urandom(32)
    identity = noise._raw_public(noise.X25519PrivateKey.from_private_bytes(private))
    assert identity == keys.public_key(private)
    monkeypatch.setattr(noise, "_HAS_RAW", False)
    assert noise._raw_public(noise.X25519PrivateKey.from_private_bytes(private)) == identity

    class Old:                                  # what 38's public key object offers
        def __init__(self, real) -> None:
            self.real = real

        def public_bytes(self, *args):
            return self.real.public_bytes(*args)

    class OldPrivate:
        @staticmethod
        def from_private_bytes(data):
            real = noise.X25519PrivateKey.from_private_bytes(data)
            return type("P", (), {"public_key": lambda self: Old(real.public_key())})()

    monkeypatch.setattr(keys, "X25519PrivateKey", OldPrivate)
    assert keys.public_key(private) == identity


# -- the per-packet path ----------------------------------------------------------------------

def _keypairs():
    from tunvpnd.wireguard.keypair import Keypair

    send, receive = os.urandom(32), os.urandom(32)
    return Keypair(send, receive, 1, 2, 0.0, True), Keypair(receive, send, 2, 1, 0.0, False)


def test_seal_pads_every_size_as_padding_size_says():
    """Keypair.seal's inlined padding (to 16 bytes, never past the MTU; no MTU: always) is
    send.go's calculatePaddingSize for every size, and open() gives the packet back."""
    from tests.ipcraft import ipv4
    from tunvpnd.wireguard.keypair import padding_size

    ka, kb = _keypairs()
    for mtu in (0, 1280, 1420):
        for size in (0, *range(20, 1500, 7), 1420, 1421, 1424):
            packet = ipv4("10.0.0.1", "10.0.0.2", bytes(size - 20)) if size else b""
            sealed = ka.seal(memoryview(bytearray(packet)), mtu)
            assert len(sealed) == 32 + size + padding_size(size, mtu), (mtu, size)
            assert kb.open(memoryview(bytearray(sealed)))[1] == packet, (mtu, size)


def test_open_trims_to_the_ip_length_and_refuses_what_is_not_ip():
    from tests.ipcraft import ipv4, ipv6

    ka, kb = _keypairs()
    v4, v6 = ipv4("10.0.0.1", "10.0.0.2", b"a" * 9), ipv6("fd00::1", "fd00::2", b"b" * 5)
    for packet in (v4, v6):
        assert kb.open(ka.seal(packet + b"junk"))[1] == packet      # trailing bytes trimmed
    bad = (b"\x45" + bytes(18),                        # IPv4 shorter than its header
           v4[:2] + (19).to_bytes(2, "big") + v4[4:],   # IPv4 total length below 20
           v4[:2] + (200).to_bytes(2, "big") + v4[4:],  # longer than what arrived
           v6[:4] + (100).to_bytes(2, "big") + v6[6:],  # IPv6 payload length too long
           b"\x60" + bytes(30),                        # IPv6 shorter than its header
           b"\x20" + bytes(40))                        # neither version
    for packet in bad:
        assert kb.open(ka.seal(packet)) is None, packet
