"""mac1, mac2 and cookie replies: WireGuard's defence against handshake floods.

As wireguard-go's device/cookie.go. Every handshake message ends in two 16-byte MACs:
mac1, keyed with a hash of the receiver's static public key (anyone who knows whom they talk to
can make it; it keeps out scanners), and mac2, keyed with a cookie the responder handed out,
which proves the sender can receive at its source address. Under load the responder answers an
initiation without a good mac2 with a cookie reply (type 3) instead of doing Diffie-Hellman.

Sans-I/O: no sockets and no clocks here; the caller passes `now` (monotonic seconds). The MAC
is keyed BLAKE2s with a 16-byte digest (not HMAC); XChaCha20-Poly1305 comes from PyNaCl, which
`cryptography` lacks.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct

# PyNaCl (libsodium, cffi: ~0.7 MB of RSS) is imported by the first cookie reply made or
# opened, not at start: most daemons never see one.

MAC_SIZE = 16
COOKIE_REFRESH_TIME = 120.0          # device/constants.go: CookieRefreshTime
MESSAGE_COOKIE_REPLY = 3
COOKIE_REPLY_SIZE = 64               # 4 type, 4 receiver, 24 nonce, 16 cookie + 16 tag
_NONCE_SIZE = 24
_LABEL_MAC1 = b"mac1----"
_LABEL_COOKIE = b"cookie--"
_REPLY_HEADER = struct.Struct("<II")
_TYPE_3 = bytes((MESSAGE_COOKIE_REPLY, 0, 0, 0))   # type byte, then 3 reserved zeros
_NO_MAC2 = bytes(MAC_SIZE)


def mac1_key(static_public: bytes) -> bytes:
    """BLAKE2s("mac1----" || public key): the key of mac1 on messages to that key's owner."""
    return hashlib.blake2s(_LABEL_MAC1 + static_public).digest()


def cookie_key(static_public: bytes) -> bytes:
    """BLAKE2s("cookie--" || public key): the XChaCha20-Poly1305 key of that owner's replies."""
    return hashlib.blake2s(_LABEL_COOKIE + static_public).digest()


def _mac(key: bytes, data: bytes | memoryview) -> bytes:
    return hashlib.blake2s(data, digest_size=MAC_SIZE, key=key).digest()


def _write_macs(message: bytearray, key: bytes, cookie: bytes | None) -> bytes:
    end = len(message)
    if end < 2 * MAC_SIZE:
        raise ValueError(f"a message with MACs is at least 32 bytes, not {end}")
    with memoryview(message) as view:
        mac1 = _mac(key, view[:end - 32])
        message[end - 32:end - 16] = mac1
        message[end - 16:] = _NO_MAC2 if cookie is None else _mac(cookie, view[:end - 16])
    return mac1


def write_macs(message: bytearray, mac1_key: bytes, cookie: bytes | None) -> None:
    """Fill the last 32 bytes of `message`: mac1 over what precedes it, then mac2 over
    everything up to mac2 (mac1 included), or 16 zero bytes without a cookie."""
    _write_macs(message, mac1_key, cookie)


def mac1_ok(message: bytes | memoryview, mac1_key: bytes) -> bool:
    """Whether mac1 (bytes -32:-16) is right for this key; False for anything too short."""
    end = len(message)
    if end < 2 * MAC_SIZE:
        return False
    return hmac.compare_digest(_mac(mac1_key, message[:end - 32]), message[end - 32:end - 16])


def _xaead_seal(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 (ciphertext || 16-byte tag), by libsodium through PyNaCl."""
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def _xaead_open(key: bytes, nonce: bytes, sealed: bytes, ad: bytes) -> bytes | None:
    """The plaintext, or None when the tag does not verify."""
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt
    from nacl.exceptions import CryptoError

    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, ad, nonce, key)
    except CryptoError:
        return None


def source_bytes(address: tuple) -> bytes:
    """The encoding of a datagram's source that cookies are bound to: the packed IP (4 or 16
    bytes, an IPv6 zone dropped) then the port as u16 little-endian, which is what
    wireguard-go's netip.AddrPort.MarshalBinary gives for an unzoned address. Only the
    responder ever computes its cookies, so this is not an interop matter."""
    host, port = address[0], address[1]
    return ipaddress.ip_address(host.partition("%")[0]).packed + port.to_bytes(2, "little")


class CookieChecker:
    """The responder's side: checks mac1/mac2 of messages to us and makes cookie replies.

    The cookie secret is random, made on the first reply and renewed by the first reply after
    it is COOKIE_REFRESH_TIME old; a mac2 made from an older secret no longer passes."""

    __slots__ = ("_mac1_key", "_cookie_key", "_secret", "_secret_set")

    def __init__(self, static_public: bytes) -> None:
        self._mac1_key = mac1_key(static_public)
        self._cookie_key = cookie_key(static_public)
        self._secret: bytes | None = None
        self._secret_set = 0.0

    def mac1_ok(self, message: bytes | memoryview) -> bool:
        return mac1_ok(message, self._mac1_key)

    def _fresh(self, now: float) -> bool:
        return self._secret is not None and now - self._secret_set <= COOKIE_REFRESH_TIME

    def mac2_ok(self, message: bytes | memoryview, source: bytes, now: float) -> bool:
        """Whether mac2 was made with the cookie we would give `source` (see source_bytes)."""
        end = len(message)
        if end < 2 * MAC_SIZE or not self._fresh(now):
            return False
        cookie = _mac(self._secret, source)
        return hmac.compare_digest(_mac(cookie, message[:end - 16]), message[end - 16:])

    def cookie_reply(self, message: bytes | memoryview, receiver_index: int, source: bytes,
                     now: float) -> bytes:
        """The 64-byte type-3 reply to `message` (a handshake message whose mac1 was checked)
        from `source`; `receiver_index` is that message's sender index (bytes 4:8)."""
        end = len(message)
        if end < 2 * MAC_SIZE:
            raise ValueError(f"a message with MACs is at least 32 bytes, not {end}")
        if not self._fresh(now):
            self._secret = os.urandom(32)
            self._secret_set = now
        cookie = _mac(self._secret, source)
        nonce = os.urandom(_NONCE_SIZE)
        sealed = _xaead_seal(self._cookie_key, nonce, cookie, bytes(message[end - 32:end - 16]))
        return _REPLY_HEADER.pack(MESSAGE_COOKIE_REPLY, receiver_index) + nonce + sealed


class CookieGenerator:
    """The initiator's side, one per peer: writes the MACs of our handshake messages to that
    peer and takes in the cookie replies it sends us."""

    __slots__ = ("_mac1_key", "_cookie_key", "_cookie", "_cookie_set", "_last_mac1")

    def __init__(self, peer_static_public: bytes) -> None:
        self._mac1_key = mac1_key(peer_static_public)
        self._cookie_key = cookie_key(peer_static_public)
        self._cookie: bytes | None = None
        self._cookie_set = 0.0
        self._last_mac1: bytes | None = None

    def write_macs(self, message: bytearray, now: float) -> None:
        """mac1, and mac2 from the peer's cookie if it is at most COOKIE_REFRESH_TIME old.
        Remembers the mac1: a cookie reply is bound to the last message we sent."""
        cookie = self._cookie
        if cookie is not None and now - self._cookie_set > COOKIE_REFRESH_TIME:
            cookie = self._cookie = None
        self._last_mac1 = _write_macs(message, self._mac1_key, cookie)

    def consume_reply(self, reply: bytes | memoryview, now: float) -> bool:
        """Take the cookie from a type-3 reply to our last message; False (and nothing kept)
        for anything else. The caller has matched bytes 4:8 to our sender index. Never
        raises on bad input."""
        if self._last_mac1 is None or len(reply) != COOKIE_REPLY_SIZE or reply[:4] != _TYPE_3:
            return False
        cookie = _xaead_open(self._cookie_key, bytes(reply[8:32]), bytes(reply[32:64]),
                             self._last_mac1)
        if cookie is None:
            return False
        self._cookie = cookie
        self._cookie_set = now
        return True
