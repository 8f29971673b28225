"""WireGuard keys: the base64 codec and public-from-private.

# placeholder until the wgcookie/wgkeys branch is merged: only the pinned names wgnoise needs.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_SIZE = 32


def decode_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(key) != KEY_SIZE:
        raise ValueError(f"not a {KEY_SIZE}-byte key")
    return key


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)
