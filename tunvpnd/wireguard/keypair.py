"""A transport keypair: seal and open type-4 messages (wireguard-go's device/keypair.go,
send.go and receive.go), without I/O.

Message: type 4 and three zero bytes, the receiver's index (u32 LE), the counter (u64 LE), then
ChaCha20-Poly1305 of the packet padded with zeros to a multiple of 16 (never past the MTU), with
nonce = 4 zero bytes + counter and no associated data. An empty packet is a keepalive.

`open` trims the plaintext to its IP header's length (as wireguard-go's receive.go does) and
returns it with the counter; the replay window (replay.py) is the caller's, to update only after
`open` succeeded. Neither function logs or raises on hostile input.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

HEADER = struct.Struct("<4sIQ")     # type + reserved, receiver index, counter
HEADER_SIZE = 16
TAG_SIZE = 16
TYPE_TRANSPORT = b"\x04\0\0\0"
PADDING_MULTIPLE = 16
DEFAULT_MTU = 1420
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1

_NONCE = struct.Struct("<4xQ")
_ZEROS = bytes(PADDING_MULTIPLE)
_U16 = struct.Struct(">H")
# cryptography >= 43 also has encrypt_into/decrypt_into (Debian 12's 38 has not). Not used:
# measured on 50 (bench/micro.py's packet sizes), encrypt()/decrypt() and one concatenation
# are faster than exporting an output buffer (96 B: 1.07 vs 1.36 us; 1408 B: 1.27 vs 1.96 us).


def _takes_buffers() -> bool:
    """Whether the AEAD accepts memoryviews (38 insists on bytes: then we copy once)."""
    try:
        ChaCha20Poly1305(bytes(32)).encrypt(bytes(12), memoryview(b""), None)
    except TypeError:
        return False
    return True


_TAKES_BUFFERS = _takes_buffers()


class KeypairExhausted(Exception):
    """The send counter reached REJECT_AFTER_MESSAGES: a new handshake is overdue."""


def padding_size(size: int, mtu: int) -> int:
    """Zeros to append to a `size`-byte packet (send.go calculatePaddingSize)."""
    last = size % mtu if 0 < mtu < size else size
    padded = (last + PADDING_MULTIPLE - 1) & ~(PADDING_MULTIPLE - 1)
    if mtu and padded > mtu:
        padded = mtu
    return padded - last


def ip_length(packet: bytes) -> int:
    """The length the packet's IP header claims, or -1 when it is no IP packet that fits."""
    size = len(packet)
    version = packet[0] >> 4
    if version == 4:
        if size < 20:
            return -1
        length = _U16.unpack_from(packet, 2)[0]
        return length if 20 <= length <= size else -1
    if version == 6:
        if size < 40:
            return -1
        length = _U16.unpack_from(packet, 4)[0] + 40
        return length if length <= size else -1
    return -1


class Keypair:
    """One session's two directions. `created` is the caller's monotonic `now`."""

    __slots__ = ("_send", "_receive", "local_index", "remote_index", "created", "is_initiator",
                 "send_counter")

    def __init__(self, send_key: bytes, receive_key: bytes, local_index: int, remote_index: int,
                 created: float, is_initiator: bool) -> None:
        self._send = ChaCha20Poly1305(send_key)
        self._receive = ChaCha20Poly1305(receive_key)
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.is_initiator = is_initiator
        self.send_counter = 0

    def __repr__(self) -> str:
        return (f"Keypair(local={self.local_index:#x}, remote={self.remote_index:#x}, "
                f"initiator={self.is_initiator}, sent={self.send_counter})")

    def seal(self, packet: bytes | bytearray | memoryview,
             mtu: int = DEFAULT_MTU) -> bytes:
        """The transport message carrying `packet` (b"" = keepalive) with the next counter."""
        counter = self.send_counter
        if counter >= REJECT_AFTER_MESSAGES:
            raise KeypairExhausted()
        self.send_counter = counter + 1
        size = len(packet)
        pad = -size & 15                              # to 16 bytes ...
        if size + pad > mtu:                          # ... unless that passes the MTU
            pad = padding_size(size, mtu)
        if pad:
            packet = b"".join((packet, _ZEROS[:pad]))     # join takes memoryviews too
        elif not _TAKES_BUFFERS and type(packet) is not bytes:
            packet = bytes(packet)
        return HEADER.pack(TYPE_TRANSPORT, self.remote_index, counter) + \
            self._send.encrypt(_NONCE.pack(counter), packet, None)

    def open(self, datagram: bytes | bytearray | memoryview) -> tuple[int, bytes] | None:
        """(counter, packet trimmed to its IP length; b"" for a keepalive), or None.

        None for anything that is not an authentic type-4 message for this keypair's index,
        a counter past REJECT_AFTER_MESSAGES, or a plaintext that is no IP packet.
        """
        if len(datagram) < HEADER_SIZE + TAG_SIZE:
            return None
        kind, receiver, counter = HEADER.unpack_from(datagram)
        if kind != TYPE_TRANSPORT or receiver != self.local_index or \
                counter >= REJECT_AFTER_MESSAGES:
            return None
        try:
            plain = self._receive.decrypt(
                _NONCE.pack(counter),
                datagram[HEADER_SIZE:] if _TAKES_BUFFERS or type(datagram) is bytes else
                bytes(datagram[HEADER_SIZE:]), None)
        except InvalidTag:
            return None
        size = len(plain)
        if not size:
            return counter, plain
        # the IP header's length (ip_length, inlined: once per packet)
        version = plain[0] >> 4
        if version == 4 and size >= 20:
            length = _U16.unpack_from(plain, 2)[0]
            if length < 20:
                return None
        elif version == 6 and size >= 40:
            length = _U16.unpack_from(plain, 4)[0] + 40
        else:
            return None
        if length == size:
            return counter, plain
        return (counter, plain[:length]) if length < size else None
