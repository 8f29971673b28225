"""The wire format seam: how a packet becomes a datagram and back, and whose datagram it is.

Everything that knows what travels inside the UDP payload lives behind this small interface, so
an authenticated, encrypted transport can replace `PlainWire` without touching the loop or the
peer table.
"""

from typing import Protocol

from .peers import Peer


class Wire(Protocol):
    name: str
    overhead: int  # bytes added to each packet; the default MTU leaves room for 32

    def seal(self, packet: memoryview, peer: Peer) -> memoryview | bytes:
        """The datagram payload that carries `packet` to `peer`."""
        ...

    def open(self, datagram: memoryview, source: tuple) -> tuple[Peer | None, memoryview] | None:
        """(the peer the datagram proves it is from, or None to look it up by inner source;
        the inner packet) or None when the datagram is not ours. A zero-length inner packet is a
        keepalive; a header-only ANNOUNCE or CHALLENGE inside is consumed by the core too."""
        ...

    def keepalive(self, peer: Peer) -> bytes:
        """A datagram that only says 'I am here'."""
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

    def seal(self, packet: memoryview, peer: Peer) -> memoryview:
        return packet

    def open(self, datagram: memoryview, source: tuple) -> tuple[None, memoryview]:
        return None, datagram

    def keepalive(self, peer: Peer) -> bytes:
        return b""  # an empty datagram, as WireGuard's keepalive is an empty data packet
