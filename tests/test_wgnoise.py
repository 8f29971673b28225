"""Unit tests of tunvpnd.wireguard.noise and .keypair: two in-memory peers, known answers, and
malformed messages of every type (each refused with a HandshakeError reason or None, never an
exception from below)."""

from __future__ import annotations

import os
import struct

import pytest

from tests.ipcraft import icmp_echo, ipv4, ipv6
from tunvpnd.wireguard import cookie, noise
from tunvpnd.wireguard import keypair as kp

WALL = 1_700_000_000.0


class Side:
    def __init__(self) -> None:
        self.private = os.urandom(32)
        self.identity = noise.StaticIdentity(self.private)


def pair(psk: bytes = noise.ZERO_KEY):
    """(initiator side, responder side, the initiator's Peer, the responder's peer dict)."""
    a, b = Side(), Side()
    a_peer = noise.Peer(b.identity.public, psk)          # a's view of b
    b_peers = {a.identity.public: noise.Peer(a.identity.public, psk)}
    return a, b, a_peer, b_peers


def handshake(psk: bytes = noise.ZERO_KEY, now: float = 10.0):
    a, b, a_peer, b_peers = pair(psk)
    init = noise.Initiation.create(a.identity, a_peer, 0x11, WALL)
    consumed = noise.consume_initiation(b.identity, init.message, b_peers.get, now)
    response, kb = consumed.create_response(0x22, now)
    ka = init.consume_response(response, now)
    return ka, kb, init, response


# -- known answers ----------------------------------------------------------------------------

def test_initial_chain_key_and_hash():
    # As boringtun's noise/handshake.rs has them (INITIAL_CHAIN_KEY, INITIAL_CHAIN_HASH).
    assert noise.C0.hex() == "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
    assert noise.H0.hex() == "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"


def test_tai64n_known_answer():
    assert noise.tai64n(1700000000.123456789).hex() == "400000006553f10a07000000"
    assert noise.tai64n(1_700_000_000_123_456_789).hex() == "400000006553f10a07000000"
    assert noise.tai64n(1700000000.0).hex() == "400000006553f10a00000000"
    # Later times compare greater bytewise once past the 16.7 ms whitening granularity.
    assert noise.tai64n(WALL + 0.02) > noise.tai64n(WALL)


# From wireguard-go's device/kdf_test.go (MIT licence, Copyright (C) 2017-2025 WireGuard LLC).
KDF_VECTORS = [
    ("746573742d6b6579", "746573742d696e707574",
     "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
     "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
     "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24"),
    ("776972656775617264", "776972656775617264",
     "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
     "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
     "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160"),
    ("", "",
     "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
     "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
     "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e"),
]


@pytest.mark.parametrize("key,data,t0,t1,t2", KDF_VECTORS)
def test_kdf_vectors(key, data, t0, t1, t2):
    key, data = bytes.fromhex(key), bytes.fromhex(data)
    assert noise.kdf1(key, data).hex() == t0
    assert [t.hex() for t in noise.kdf2(key, data)] == [t0, t1]
    assert [t.hex() for t in noise.kdf3(key, data)] == [t0, t1, t2]


# The Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s vector of cacophony's vectors/cacophony.txt
# (https://github.com/haskell-cryptography/cacophony, released into the public domain; also
# redistributed as tests/vectors/cacophony.txt in mcginty/snow and plizonczyk/noiseprotocol).
IKPSK2 = {
    "prologue": "4a6f686e2047616c74",
    "psk": "54686973206973206d7920417573747269616e20706572737065637469766521",
    "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    "handshake_hash": "f5191b875290abcd41347ac3622d9679688a7e980229cb937ef748336cfde0e5",
    "messages": [
        ("4c756477696720766f6e204d69736573",
         "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944001e21de9f98ddd8e2ad"
         "57527207feb56253c9c94a9e496782ecfcb2a75fbcaf1b52948cc48daefe660c62119ab5000980c848"
         "31215f2441eba616548e832985464cf17e51ee93109008399a21f7e13f"),
        ("4d757272617920526f746862617264",
         "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843cb765f2caef0751b8f00"
         "7572dab0322217755c0632f365717edbf34d33e87a"),
        ("462e20412e20486179656b", "8153ca9833bc3c1b91a7e66e5f4d4f5b59bf9e64c2f20d15f0bba7"),
        ("4361726c204d656e676572", "07af0c9c86e1b4e80f36b04ff7688d51141af3debd0332f0a705ef"),
        ("4a65616e2d426170746973746520536179",
         "6ab1467c0448cc78394494abaaf23afce0e234315d6e2624dcbfa8a21c1c4d073d"),
        ("457567656e2042f6686d20766f6e2042617765726b",
         "dfc346c0d2296ae6cf1acf6f12b8456a1dba228cf8d8b774aacf1c47fc53aa80ebc7a4c292"),
    ],
}


def test_noise_ikpsk2_known_answer():
    """The handshake's own step functions (what Initiation.create and create_response run)
    reproduce a Noise vector: both messages, the handshake hash, the split transport keys."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    v = {k: bytes.fromhex(x) if isinstance(x, str) else x for k, x in IKPSK2.items()}
    init_s = X25519PrivateKey.from_private_bytes(v["init_static"])
    resp_s = X25519PrivateKey.from_private_bytes(v["resp_static"])
    init_e = X25519PrivateKey.from_private_bytes(v["init_ephemeral"])
    resp_e = X25519PrivateKey.from_private_bytes(v["resp_ephemeral"])
    init_pub = noise.StaticIdentity(v["init_static"]).public
    resp_pub = noise.StaticIdentity(v["resp_static"]).public
    # Noise: a protocol name longer than 32 bytes is hashed into h, ck = h; MixHash(prologue);
    # the pre-message: MixHash(responder's static). WireGuard's C0/H0 are exactly this.
    c0 = noise.hash_(noise.CONSTRUCTION)
    h = noise.mix_hash(noise.mix_hash(c0, v["prologue"]), resp_pub)
    (p1, m1), (p2, m2), *transport = [(bytes.fromhex(p), bytes.fromhex(c))
                                       for p, c in IKPSK2["messages"]]
    e_pub, static, sealed, h, c = noise.initiator_message_steps(
        h, c0, init_e, init_pub, init_s.exchange(resp_s.public_key()), resp_pub, p1)
    assert e_pub + static + sealed == m1
    e_pub, sealed, h, c = noise.responder_message_steps(
        h, c, resp_e, m1[:32], init_pub, v["psk"], p2)
    assert e_pub + sealed == m2
    assert h == v["handshake_hash"]
    t1, t2 = noise.kdf2(c, b"")                          # as noise._derive splits them
    for n, (plaintext, ciphertext) in enumerate(transport):
        key = t1 if n % 2 == 0 else t2                   # initiator, responder, ...
        nonce = bytes(4) + (n // 2).to_bytes(8, "little")
        assert ChaCha20Poly1305(key).encrypt(nonce, plaintext, b"") == ciphertext


# -- the handshake and transport --------------------------------------------------------------

@pytest.mark.parametrize("psk", [noise.ZERO_KEY, os.urandom(32)], ids=["no-psk", "psk"])
def test_handshake_then_transport_both_ways(psk):
    ka, kb, init, response = handshake(psk)
    assert len(init.message) == 148 and len(response) == 92
    assert (ka.is_initiator, kb.is_initiator) == (True, False)
    assert (ka.local_index, ka.remote_index, kb.local_index, kb.remote_index) == \
        (0x11, 0x22, 0x22, 0x11)
    up = icmp_echo("192.168.53.99", "192.168.53.1", seq=1)
    down = icmp_echo("192.168.53.1", "192.168.53.99", seq=2, data=b"y" * 100)
    for n in range(3):
        sealed = ka.seal(up)
        assert struct.unpack_from("<4sIQ", sealed) == (b"\x04\0\0\0", 0x22, n)
        assert kb.open(bytes(sealed)) == (n, up)
        assert ka.open(bytes(kb.seal(down))) == (n, down)
    # A keepalive: exactly 32 bytes, opens to nothing.
    keepalive = ka.seal(b"")
    assert len(keepalive) == 32 and kb.open(bytes(keepalive)) == (3, b"")


def test_seal_without_buffer_arguments(monkeypatch):
    """cryptography 38 (Debian 12) takes only bytes: the fallback gives the same."""
    ka, kb, *_ = handshake()
    packet = memoryview(bytearray(icmp_echo("10.0.0.1", "10.0.0.2")))
    fast = bytes(ka.seal(packet))
    monkeypatch.setattr(kp, "_TAKES_BUFFERS", False)
    ka.send_counter = 0
    assert bytes(ka.seal(packet)) == fast
    assert kb.open(memoryview(fast)) == (0, bytes(packet))


def test_mismatched_psk_fails_on_the_response():
    a, b, a_peer, b_peers = pair(os.urandom(32))
    b_peers[a.identity.public].preshared_key = os.urandom(32)
    init = noise.Initiation.create(a.identity, a_peer, 1, WALL)
    response, _ = noise.consume_initiation(b.identity, init.message, b_peers.get, 1.0) \
        .create_response(2, 1.0)
    with pytest.raises(noise.HandshakeError) as error:
        init.consume_response(response, 1.0)
    assert error.value.reason == noise.BAD_HANDSHAKE


def test_padding_to_16_never_past_the_mtu():
    ka, kb, *_ = handshake()
    for size, padded in ((20, 32), (32, 32), (33, 48), (1415, 1420), (1420, 1420)):
        packet = ipv4("10.0.0.1", "10.0.0.2", bytes(size - 20))
        sealed = ka.seal(packet, mtu=1420)
        assert len(sealed) == 16 + padded + 16, size
        assert kb.open(bytes(sealed))[1] == packet   # trimmed back to the IPv4 length
    packet6 = ipv6("fd00::1", "fd00::2", b"z" * 7)
    assert kb.open(bytes(ka.seal(packet6)))[1] == packet6
    assert kp.padding_size(33, 0) == 15              # no MTU: pad anyway


def test_open_refuses_non_ip_plaintexts():
    ka, kb, *_ = handshake()
    assert kb.open(bytes(ka.seal(b"\x00" * 40))) is None                    # version 0
    short = ipv4("10.0.0.1", "10.0.0.2", b"abc")
    lying = short[:2] + struct.pack("!H", 200) + short[4:]                 # claims 200 bytes
    assert kb.open(bytes(ka.seal(lying))) is None


# -- the responder's replay and flood guards --------------------------------------------------

def test_replayed_initiation_refused_and_state_kept():
    a, b, a_peer, b_peers = pair()
    init = noise.Initiation.create(a.identity, a_peer, 1, WALL)
    noise.consume_initiation(b.identity, init.message, b_peers.get, 1.0)
    stored = b_peers[a.identity.public].last_timestamp
    with pytest.raises(noise.HandshakeError) as error:
        noise.consume_initiation(b.identity, init.message, b_peers.get, 5.0)
    assert error.value.reason == noise.REPLAY
    # A fresh initiation with the same timestamp is a replay too.
    again = noise.Initiation.create(a.identity, a_peer, 2, WALL)
    with pytest.raises(noise.HandshakeError) as error:
        noise.consume_initiation(b.identity, again.message, b_peers.get, 5.0)
    assert error.value.reason == noise.REPLAY
    assert b_peers[a.identity.public].last_timestamp == stored
    assert b_peers[a.identity.public].last_initiation == 1.0


def test_initiation_within_20ms_refused():
    a, b, a_peer, b_peers = pair()
    first = noise.Initiation.create(a.identity, a_peer, 1, WALL)
    noise.consume_initiation(b.identity, first.message, b_peers.get, 1.0)
    second = noise.Initiation.create(a.identity, a_peer, 2, WALL + 1)
    with pytest.raises(noise.HandshakeError) as error:
        noise.consume_initiation(b.identity, second.message, b_peers.get, 1.019)
    assert error.value.reason == noise.FLOOD
    # The refused one stored nothing: it is accepted once 20 ms have passed.
    noise.consume_initiation(b.identity, second.message, b_peers.get, 1.021)


def test_unknown_static_key_refused():
    a, b, a_peer, _ = pair()
    with pytest.raises(noise.HandshakeError) as error:
        noise.consume_initiation(b.identity, noise.Initiation.create(
            a.identity, a_peer, 1, WALL).message, {}.get, 1.0)
    assert error.value.reason == noise.UNKNOWN_PEER


def test_low_order_peer_key_is_a_handshake_failure():
    a = Side()
    zero_peer = noise.Peer(bytes(32))                # X25519 with it gives all zeros
    with pytest.raises(noise.HandshakeError) as error:
        noise.Initiation.create(a.identity, zero_peer, 1, WALL)
    assert error.value.reason == noise.BAD_HANDSHAKE


# -- malformed messages of every type ---------------------------------------------------------

def variants(message: bytes):
    """(name, bytes) mutations: truncated, extended, each bit-flip region, reserved bytes."""
    yield "empty", b""
    yield "truncated", message[:-1]
    yield "extended", message + b"\0"
    for i in range(1, 4):
        yield f"reserved{i}", message[:i] + b"\x01" + message[i + 1:]
    yield "type", b"\x09" + message[1:]
    for offset in range(0, len(message), 7):
        flipped = bytearray(message)
        flipped[offset] ^= 0x01
        yield f"bit@{offset}", bytes(flipped)


def test_malformed_initiations_refused():
    a, b, a_peer, b_peers = pair()
    init = noise.Initiation.create(a.identity, a_peer, 1, WALL)
    for name, data in variants(init.message):
        if len(data) == 148 and data[:132] == init.message[:132]:
            continue                                 # a flipped mac2 bit: not checked here
        with pytest.raises(noise.HandshakeError):
            noise.consume_initiation(b.identity, data, b_peers.get, 1.0)
        assert b_peers[a.identity.public].last_initiation is None, name
    # mac2 is not the responder's to check here, so flipping it alone changes nothing; every
    # other field is refused, and the real message still works afterwards.
    noise.consume_initiation(b.identity, init.message, b_peers.get, 1.0)


def test_malformed_responses_refused():
    a, b, a_peer, b_peers = pair()
    init = noise.Initiation.create(a.identity, a_peer, 1, WALL)
    response, _ = noise.consume_initiation(b.identity, init.message, b_peers.get, 1.0) \
        .create_response(2, 1.0)
    for _name, data in variants(response):
        if data[76:] != response[76:] and data[:76] == response[:76]:
            continue                                 # a flipped mac2 bit: not checked here
        with pytest.raises(noise.HandshakeError):
            init.consume_response(data, 1.0)
    assert init.consume_response(response, 1.0).remote_index == 2


def remac(message: bytes, offset: int, mac1_key: bytes) -> bytes:
    """`message` with one bit flipped at `offset` and a valid mac1 again: reaches the Noise."""
    data = bytearray(message)
    data[offset] ^= 0x80
    cookie.write_macs(data, mac1_key, None)
    return bytes(data)


def test_initiation_fields_tampered_under_a_valid_mac1():
    a, b, a_peer, b_peers = pair()
    init = noise.Initiation.create(a.identity, a_peer, 1, WALL)
    for offset in range(8, 116):                     # ephemeral, static, timestamp
        with pytest.raises(noise.HandshakeError) as error:
            noise.consume_initiation(b.identity, remac(init.message, offset, b.identity.mac1_key),
                                     b_peers.get, 1.0)
        assert error.value.reason == noise.BAD_HANDSHAKE, offset
    zero_ephemeral = bytearray(init.message)
    zero_ephemeral[8:40] = bytes(32)                 # a low-order point: X25519 gives zeros
    cookie.write_macs(zero_ephemeral, b.identity.mac1_key, None)
    with pytest.raises(noise.HandshakeError) as error:
        noise.consume_initiation(b.identity, bytes(zero_ephemeral), b_peers.get, 1.0)
    assert error.value.reason == noise.BAD_HANDSHAKE
    assert b_peers[a.identity.public].last_initiation is None


def test_response_fields_tampered_under_a_valid_mac1():
    a, b, a_peer, b_peers = pair()
    init = noise.Initiation.create(a.identity, a_peer, 1, WALL)
    response, _ = noise.consume_initiation(b.identity, init.message, b_peers.get, 1.0) \
        .create_response(2, 1.0)
    for offset in range(12, 60):                     # ephemeral, encrypted nothing
        with pytest.raises(noise.HandshakeError) as error:
            init.consume_response(remac(response, offset, a.identity.mac1_key), 1.0)
        assert error.value.reason == noise.BAD_HANDSHAKE, offset
    with pytest.raises(noise.HandshakeError) as error:
        init.consume_response(remac(response, 8, a.identity.mac1_key), 1.0)
    assert error.value.reason == noise.WRONG_INDEX


def test_malformed_transport_refused():
    ka, kb, *_ = handshake()
    sealed = bytes(ka.seal(icmp_echo("10.0.0.1", "10.0.0.2")))
    for _name, data in variants(sealed):
        assert kb.open(data) is None
    assert kb.open(sealed) is not None
    assert kb.open(bytes(31)) is None and kb.open(b"\x04") is None


def test_seal_refuses_an_exhausted_counter():
    ka, *_ = handshake()
    ka.send_counter = kp.REJECT_AFTER_MESSAGES
    with pytest.raises(kp.KeypairExhausted):
        ka.seal(b"")


def test_no_key_material_in_reprs():
    ka, kb, init, _ = handshake()
    side = Side()
    text = repr(ka) + repr(kb) + repr(side.identity) + repr(noise.Peer(side.identity.public))
    assert side.private.hex() not in text and "<private>" in repr(side.identity)
