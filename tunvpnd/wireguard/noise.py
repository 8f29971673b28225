"""The WireGuard handshake (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s), as wireguard-go's
device/noise-protocol.go and noise-helpers.go do it, without I/O.

The initiator: `Initiation.create(...)` gives the 148-byte message and the state that waits for
the answer; `Initiation.consume_response(...)` turns a 92-byte response into a Keypair. The
responder: `consume_initiation(...)` checks an initiation and updates the peer's replay state;
the returned `ConsumedInitiation.create_response(...)` gives the response and the Keypair.

Indices come from the caller (it owns the index table), times too: `wall` is Unix time (for
TAI64N), `now` a monotonic clock in seconds (flood guard, keypair age). Every refusal raises
HandshakeError with a short `reason` for the drop counters; no message ever holds key material.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from . import cookie
from .keypair import Keypair

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"

KEY_SIZE = 32
TAG_SIZE = 16
TIMESTAMP_SIZE = 12
ZERO_KEY = bytes(KEY_SIZE)          # the preshared key when there is none
_ZERO_NONCE = bytes(12)

# Message types: byte 0, then three zero bytes (wireguard-go reads the four as one u32 LE).
MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4
TYPE_INITIATION = b"\x01\0\0\0"
TYPE_RESPONSE = b"\x02\0\0\0"

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE     # = a keepalive

# type, sender, ephemeral, encrypted static (32+16), encrypted timestamp (12+16), mac1, mac2
INITIATION = struct.Struct("<4sI32s48s28s16s16s")
# type, sender, receiver, ephemeral, encrypted nothing, mac1, mac2
RESPONSE = struct.Struct("<4sII32s16s16s16s")

HANDSHAKE_INITIATION_RATE = 0.020   # s: wireguard-go drops an initiation <= 20 ms after the last

_TAI64_BASE = 0x400000000000000A
_TAI64N = struct.Struct(">QI")
_WHITENER_MASK = 0xFFFFFF           # wireguard-go hides the low 24 bits of the nanoseconds


def hash_(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mix_hash(h: bytes, data: bytes) -> bytes:
    return hash_(h, data)


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    prk = _hmac(key, data)
    return _hmac(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = _hmac(key, data)
    t1 = _hmac(prk, b"\x01")
    return t1, _hmac(prk, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = _hmac(key, data)
    t1 = _hmac(prk, b"\x01")
    t2 = _hmac(prk, t1 + b"\x02")
    return t1, t2, _hmac(prk, t2 + b"\x03")


C0 = hash_(CONSTRUCTION)            # initial chaining key
H0 = mix_hash(C0, IDENTIFIER)       # initial hash


def tai64n(wall: float | int) -> bytes:
    """TAI64N of Unix time `wall` (seconds, a float, or an int of nanoseconds if >= 2**40)."""
    if isinstance(wall, int) and wall >= 1 << 40:
        seconds, nanos = divmod(wall, 1_000_000_000)
    else:
        seconds = int(wall // 1)
        nanos = int(round((wall - seconds) * 1e9))
        if nanos >= 1_000_000_000:
            seconds, nanos = seconds + 1, 0
    return _TAI64N.pack(_TAI64_BASE + seconds, nanos & ~_WHITENER_MASK)


class HandshakeError(Exception):
    """A refused handshake message. `reason` names the drop counter; never holds keys."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Reasons (the caller's drop counters).
BAD_SIZE = "bad_size"               # wrong length or type/reserved bytes
BAD_MAC = "bad_mac"                 # mac1 wrong
BAD_HANDSHAKE = "bad_handshake"     # an AEAD field did not authenticate, or a bad public key
UNKNOWN_PEER = "unknown_peer"       # the decrypted static key is not one of our peers
REPLAY = "replay"                   # timestamp not newer than the peer's last
FLOOD = "flood"                     # initiation within 20 ms of the last accepted one
WRONG_INDEX = "wrong_index"         # a response for another initiation


# cryptography >= 40 gives raw public bytes directly; Debian 12's 38 needs the serialization
# module, which costs ~0.8 MB of RSS: imported only there.
_HAS_RAW = hasattr(X25519PublicKey, "public_bytes_raw")


def _raw_public(key: X25519PrivateKey) -> bytes:
    if _HAS_RAW:
        return key.public_key().public_bytes_raw()
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:              # all-zero result: a low-order point
        raise HandshakeError(BAD_HANDSHAKE) from None


def _seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, plaintext, ad)


def _open(key: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, ciphertext, ad)
    except InvalidTag:
        raise HandshakeError(BAD_HANDSHAKE) from None


class StaticIdentity:
    """Our long-term key pair, with the mac1 key for messages sent to us."""

    __slots__ = ("_private", "public", "mac1_key")

    def __init__(self, private: bytes) -> None:
        self._private = X25519PrivateKey.from_private_bytes(private)
        self.public = _raw_public(self._private)
        self.mac1_key = cookie.mac1_key(self.public)

    def __repr__(self) -> str:
        return "StaticIdentity(<private>)"


@dataclass(eq=False)
class Peer:
    """One remote peer's handshake configuration and replay state (what the responder keeps)."""

    public_key: bytes
    preshared_key: bytes = ZERO_KEY
    last_timestamp: bytes = bytes(TIMESTAMP_SIZE)
    last_initiation: float | None = None        # `now` of the last accepted initiation
    mac1_key: bytes = field(init=False, repr=False)
    _static_static: bytes | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.public_key) != KEY_SIZE or len(self.preshared_key) != KEY_SIZE:
            raise ValueError("keys must be 32 bytes")
        self.mac1_key = cookie.mac1_key(self.public_key)

    def __repr__(self) -> str:
        return f"Peer(public_key={self.public_key.hex()})"

    def static_static(self, local: StaticIdentity) -> bytes:
        """DH(our static, its static), precomputed once; HandshakeError if it is zero."""
        if self._static_static is None:
            self._static_static = _dh(local._private, self.public_key)
        return self._static_static


# -- the Noise steps ---------------------------------------------------------------------------
# WireGuard is Noise_IKpsk2 with IDENTIFIER as the prologue, a TAI64N timestamp as the first
# payload and an empty second one. These two functions are the message steps exactly as the
# Noise spec words them, so that a Noise known-answer vector (any prologue and payloads) runs
# through the same code as the wire: tests/test_wgnoise.py::test_noise_ikpsk2_known_answer.


def initiator_message_steps(h: bytes, c: bytes, e: X25519PrivateKey, static_public: bytes,
                            static_static: bytes, responder_public: bytes, payload: bytes
                            ) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """IK message 1, "e, es, s, ss" + payload, from (h, c) after the pre-message
    (h = HASH(h0 || responder_public)): (e_pub, sealed static, sealed payload, h, c)."""
    e_pub = _raw_public(e)
    c = kdf1(c, e_pub)                          # psk modes: "e" also mixes the key
    h = mix_hash(h, e_pub)
    c, k = kdf2(c, _dh(e, responder_public))    # es
    static = _seal(k, static_public, h)         # s
    h = mix_hash(h, static)
    c, k = kdf2(c, static_static)               # ss
    sealed = _seal(k, payload, h)
    return e_pub, static, sealed, mix_hash(h, sealed), c


def responder_message_steps(h: bytes, c: bytes, e: X25519PrivateKey, initiator_ephemeral: bytes,
                            initiator_public: bytes, psk: bytes, payload: bytes
                            ) -> tuple[bytes, bytes, bytes, bytes]:
    """IKpsk2 message 2, "e, ee, se, psk" + payload: (e_pub, sealed payload, h, c). The
    transport keys are then KDF2(c, "")."""
    e_pub = _raw_public(e)
    h = mix_hash(h, e_pub)
    c = kdf1(c, e_pub)
    c = kdf1(c, _dh(e, initiator_ephemeral))    # ee
    c = kdf1(c, _dh(e, initiator_public))       # se
    c, tau, k = kdf3(c, psk)                    # psk
    h = mix_hash(h, tau)
    sealed = _seal(k, payload, h)
    return e_pub, sealed, mix_hash(h, sealed), c


def _derive(chain_key: bytes, *, initiator: bool, local_index: int, remote_index: int,
            now: float) -> Keypair:
    t1, t2 = kdf2(chain_key, b"")
    send, receive = (t1, t2) if initiator else (t2, t1)
    return Keypair(send, receive, local_index, remote_index, now, initiator)


class Initiation:
    """An initiation we sent, waiting for its response."""

    __slots__ = ("local", "peer", "sender_index", "_ephemeral", "_hash", "_chain_key",
                 "message")

    def __init__(self) -> None:
        raise TypeError("use Initiation.create()")

    @classmethod
    def create(cls, local: StaticIdentity, peer: Peer, sender_index: int, wall: float,
               cookie_value: bytes | None = None) -> Initiation:
        """Build the 148-byte initiation (in `.message`)."""
        self = object.__new__(cls)
        self.local, self.peer, self.sender_index = local, peer, sender_index
        self._ephemeral = X25519PrivateKey.generate()
        e_pub, static, timestamp, self._hash, self._chain_key = initiator_message_steps(
            mix_hash(H0, peer.public_key), C0, self._ephemeral, local.public,
            peer.static_static(local), peer.public_key, tai64n(wall))
        message = bytearray(INITIATION.pack(TYPE_INITIATION, sender_index, e_pub, static,
                                            timestamp, bytes(16), bytes(16)))
        cookie.write_macs(message, peer.mac1_key, cookie_value)
        self.message = bytes(message)
        return self

    def consume_response(self, message: bytes, now: float) -> Keypair:
        """Check a response to this initiation; the Keypair (we are its initiator)."""
        if len(message) != RESPONSE_SIZE:
            raise HandshakeError(BAD_SIZE)
        kind, sender, receiver, e_pub, empty, _mac1, _mac2 = RESPONSE.unpack(message)
        if kind != TYPE_RESPONSE:
            raise HandshakeError(BAD_SIZE)
        if receiver != self.sender_index:
            raise HandshakeError(WRONG_INDEX)
        if not cookie.mac1_ok(message, self.local.mac1_key):
            raise HandshakeError(BAD_MAC)
        h = mix_hash(self._hash, e_pub)
        c = kdf1(self._chain_key, e_pub)
        c = kdf1(c, _dh(self._ephemeral, e_pub))
        c = kdf1(c, _dh(self.local._private, e_pub))
        c, tau, k = kdf3(c, self.peer.preshared_key)
        h = mix_hash(h, tau)
        _open(k, empty, h)
        return _derive(c, initiator=True, local_index=self.sender_index,
                       remote_index=sender, now=now)


@dataclass(eq=False)
class ConsumedInitiation:
    """An accepted initiation: the peer it came from and the state to answer it."""

    peer: Peer
    remote_index: int
    local: StaticIdentity = field(repr=False)
    _remote_ephemeral: bytes = field(repr=False)
    _hash: bytes = field(repr=False)
    _chain_key: bytes = field(repr=False)

    def create_response(self, sender_index: int, now: float,
                        cookie_value: bytes | None = None) -> tuple[bytes, Keypair]:
        """The 92-byte response and the Keypair (we are its responder)."""
        e_pub, empty, _h, c = responder_message_steps(
            self._hash, self._chain_key, X25519PrivateKey.generate(), self._remote_ephemeral,
            self.peer.public_key, self.peer.preshared_key, b"")
        message = bytearray(RESPONSE.pack(TYPE_RESPONSE, sender_index, self.remote_index,
                                          e_pub, empty, bytes(16), bytes(16)))
        cookie.write_macs(message, self.peer.mac1_key, cookie_value)
        return bytes(message), _derive(c, initiator=False, local_index=sender_index,
                                       remote_index=self.remote_index, now=now)


def consume_initiation(local: StaticIdentity, message: bytes,
                       lookup: Callable[[bytes], Peer | None], now: float) -> ConsumedInitiation:
    """Check an initiation to us. `lookup(public_key) -> Peer | None` (a dict's .get will do).

    mac1 is checked here; mac2 (under load) is the caller's, before. The peer's replay state
    (last timestamp, last initiation time) changes only when everything has passed.
    """
    if len(message) != INITIATION_SIZE:
        raise HandshakeError(BAD_SIZE)
    kind, sender, e_pub, static, timestamp, _mac1, _mac2 = INITIATION.unpack(message)
    if kind != TYPE_INITIATION:
        raise HandshakeError(BAD_SIZE)
    if not cookie.mac1_ok(message, local.mac1_key):
        raise HandshakeError(BAD_MAC)
    h = mix_hash(H0, local.public)
    h = mix_hash(h, e_pub)
    c = kdf1(C0, e_pub)
    c, k = kdf2(c, _dh(local._private, e_pub))
    peer_public = _open(k, static, h)
    h = mix_hash(h, static)
    peer = lookup(peer_public)
    if peer is None:
        raise HandshakeError(UNKNOWN_PEER)
    c, k = kdf2(c, peer.static_static(local))
    stamp = _open(k, timestamp, h)
    h = mix_hash(h, timestamp)
    if stamp <= peer.last_timestamp:             # equal length: bytewise = numeric order
        raise HandshakeError(REPLAY)
    if peer.last_initiation is not None and now - peer.last_initiation <= \
            HANDSHAKE_INITIATION_RATE:
        raise HandshakeError(FLOOD)
    peer.last_timestamp = stamp
    peer.last_initiation = now
    return ConsumedInitiation(peer, sender, local, e_pub, h, c)
