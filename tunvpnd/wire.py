"""The wire format seam: how a packet becomes a datagram and back, and whose datagram it is.

Everything that knows what travels inside the UDP payload lives behind this small interface:
`PlainWire` (the lab's cleartext format) and `WireGuardWire` (the WireGuard protocol, through
the sans-I/O tunvpnd.wireguard.device.Device). The loop, the peer table, the counters and the
offload fast path are the same code for both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .peers import Peer

if TYPE_CHECKING:  # plain mode never imports the WireGuard code (nor `cryptography`)
    from .wireguard.device import Device


class Wire(Protocol):
    name: str
    overhead: int  # bytes added to each packet; the default MTU leaves room for 32
    now: float     # monotonic seconds, set by the loop once per wake-up
    # open() proves each packet is exactly what the peer sent (the fast path then trusts its
    # checksums, as Linux's WireGuard does)
    authenticated: bool
    # datagrams the wire wants sent, (payload, endpoint, local): the loop sends and clears them
    # after each pump and each tick (handshakes, cookie replies, keepalives, staged packets);
    # `local` is a `local` that open() was given (send from that address), or None
    outbox: list

    def seal(self, packet: memoryview, peer: Peer) -> memoryview | bytes | None:
        """The datagram payload that carries `packet` to `peer`, or None: the wire keeps the
        packet for later (staged until a handshake completes; not a drop)."""
        ...

    def open(self, datagram: memoryview, source: tuple, local: list | None
             ) -> tuple[Peer | None, memoryview] | None:
        """A datagram from `source` that arrived at `local` (the loop's note of our address,
        or None): (the peer the datagram proves it is from, or None to look it up by inner source;
        the inner packet), or None when the wire consumed the datagram (a handshake message)
        or dropped it; the wire counts its own drops (`drops()`). A zero-length inner packet
        is a keepalive; a header-only ANNOUNCE or CHALLENGE inside is consumed by the core too
        (plain only: a wire that proves the peer needs neither)."""
        ...

    def keepalive(self, peer: Peer) -> bytes:
        """A datagram that only says 'I am here'."""
        ...

    def drops(self) -> dict[str, int]:
        """The wire's own drop counters, by reason (non-zero only)."""
        ...


class PlainWire:
    """The lab's format: the UDP payload is exactly the IP packet, nothing added.

    Nothing is authenticated: the sender is whoever the inner source address says it is. That is
    what lets the lab's own tunclient.py/tunserver.py talk to tunvpnd in both directions.

    So that one spoofed datagram cannot take an address over, the core adds two bare-header IP
    packets on this wire (packet.ANNOUNCE, packet.CHALLENGE; see core.Core._claim): a client's
    keepalive announces its tunnel addresses, and the server challenges an address's current
    endpoint before moving the address to a new one. The lab's scripts write them into their
    TUN, where the kernel drops them as martians. A wire whose open() proves the peer needs
    neither.
    """

    name = "plain"
    overhead = 0
    authenticated = False
    now = 0.0
    outbox: list = []  # never filled: this wire has nothing of its own to send

    def seal(self, packet: memoryview, peer: Peer) -> memoryview:
        return packet

    def open(self, datagram: memoryview, source: tuple, local: list | None
             ) -> tuple[None, memoryview]:
        return None, datagram

    def keepalive(self, peer: Peer) -> bytes:
        return b""  # an empty datagram, as WireGuard's keepalive is an empty data packet

    def drops(self) -> dict[str, int]:
        return {}


_TRANSPORT = 4       # the first byte of a WireGuard transport (data) message
_KEEPALIVE_SIZE = 32  # a transport message with an empty plaintext


class WireGuardWire:
    """The WireGuard protocol: each configured Peer has its Session (`peer.session`, and
    `session.user` is the Peer), made by the service from the profile.

    Outbound, the core has already chosen the Peer by longest prefix on the destination; its
    Session seals the packet, or stages it while a handshake runs (seal returns None). The
    endpoint is the Session's: it follows the peer's latest authenticated datagram (the
    Device's roaming), and seal/open copy it to `peer.endpoint` for the core and STATUS.

    Inbound, the Device authenticates and decrypts; open returns the Session's Peer, so the
    core checks that the inner source lies in that peer's allowed IPs (cryptokey routing) and
    never runs the plain wire's learning, ANNOUNCE or CHALLENGE. Handshake messages and cookie
    replies are consumed here (what they answer goes to `outbox`), keepalives come back as
    (peer, b"") so the core counts them, and every drop is counted in the Device's `drops`.
    """

    name = "wireguard"
    authenticated = True
    overhead = 32  # 16-byte header + 16-byte tag (padding to 16 bytes stays within the MTU)

    def __init__(self, device: Device) -> None:
        self.device = device
        self.outbox = device.outbox  # the same list: the Device appends, the loop drains
        self.now = 0.0
        self._receive = device.receive  # once per datagram: no attribute lookups

    def seal(self, packet: memoryview, peer: Peer) -> bytes | None:
        session = peer.session
        datagram = session.encapsulate(packet, self.now)
        peer.endpoint = session.endpoint  # read by the core right after this call
        return datagram

    def open(self, datagram: memoryview, source: tuple, local: list | None
             ) -> tuple[Peer, bytes] | None:
        if len(datagram) < _KEEPALIVE_SIZE or datagram[0] != _TRANSPORT:
            # a handshake message, a cookie reply or garbage: the slow path, on bytes; what it
            # answers (a response, a cookie reply) leaves from the address it came to
            self._receive(bytes(datagram), source, self.now, local)
            return None
        opened = self._receive(datagram, source, self.now, local)
        if opened is None:
            return None
        session, packet = opened
        peer = session.user
        peer.endpoint = session.endpoint
        return peer, packet

    def keepalive(self, peer: Peer) -> bytes:
        """Not used: the Sessions send WireGuard's keepalives themselves (in outbox)."""
        raise NotImplementedError("WireGuard keepalives come from the Session's timers")

    def drops(self) -> dict[str, int]:
        return {reason: count for reason, count in self.device.drops.items() if count}
