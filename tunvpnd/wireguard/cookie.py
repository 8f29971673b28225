"""mac1 and mac2 of handshake messages.

# placeholder until the wgcookie/wgkeys branch is merged: only the pinned names wgnoise needs.
"""

from __future__ import annotations

import hashlib
import hmac

MAC_SIZE = 16
_LABEL_MAC1 = b"mac1----"
_LABEL_COOKIE = b"cookie--"


def mac1_key(static_public: bytes) -> bytes:
    return hashlib.blake2s(_LABEL_MAC1 + static_public).digest()


def cookie_key(static_public: bytes) -> bytes:
    return hashlib.blake2s(_LABEL_COOKIE + static_public).digest()


def write_macs(message: bytearray, mac1_key: bytes, cookie: bytes | None) -> None:
    end = len(message)
    message[end - 32:end - 16] = hashlib.blake2s(
        bytes(message[:end - 32]), digest_size=MAC_SIZE, key=mac1_key).digest()
    if cookie is None:
        message[end - 16:] = bytes(MAC_SIZE)
    else:
        message[end - 16:] = hashlib.blake2s(
            bytes(message[:end - 16]), digest_size=MAC_SIZE, key=cookie).digest()


def mac1_ok(message: bytes | memoryview, mac1_key: bytes) -> bool:
    end = len(message)
    if end < 32:
        return False
    expected = hashlib.blake2s(bytes(message[:end - 32]), digest_size=MAC_SIZE,
                               key=mac1_key).digest()
    return hmac.compare_digest(expected, bytes(message[end - 32:end - 16]))
