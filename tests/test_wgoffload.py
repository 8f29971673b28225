"""The secure wire's fast path and footprint.

What a WireGuard daemon does not load until it needs it (PyNaCl for cookie replies,
cryptography's serialization module where raw public bytes exist), and that the fallbacks for
Debian 12's cryptography 38 give the same bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO
from tunvpnd.wireguard import keys, noise


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
    for datagram, _ in out:
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
