"""The peer table: who is at the other end of the tunnel, and where to send their packets.

A packet read from the TUN goes to the peer whose allowed IPs hold its destination (longest
prefix wins). A datagram from outside belongs to the peer whose allowed IPs hold its inner
source. Configured peers may pin the endpoint they must come from; learned peers (a server with
no `peers:` list, as in the lab) are created from the first datagram, follow the client when its
address or port changes (NAT rebinding), and expire when silent.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_address

IPNetwork = IPv4Network | IPv6Network
BITS = {4: 32, 6: 128}


class Peer:
    __slots__ = (
        "name", "allowed_ips", "pinned_host", "pinned_port", "endpoint", "learned",
        "last_rx", "last_tx", "rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "local",
    )

    def __init__(
        self,
        name: str,
        allowed_ips: Iterable[IPNetwork],
        endpoint: tuple | None = None,
        pinned: tuple[str, int | None] | None = None,
        learned: bool = False,
    ) -> None:
        self.name = name
        self.allowed_ips = tuple(allowed_ips)
        self.pinned_host = normalize_host(pinned[0]) if pinned else None
        self.pinned_port = pinned[1] if pinned else None
        self.endpoint = endpoint  # a socket address to sendto(), or None until known
        self.learned = learned
        self.last_rx = self.last_tx = 0.0
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        self.local = None  # our address its datagrams arrive at, for replies (core.received_at)

    def accepts_endpoint(self, source: tuple) -> bool:
        if self.pinned_host is None:
            return True
        if self.pinned_port is not None and source[1] != self.pinned_port:
            return False
        return normalize_host(source[0]) == self.pinned_host

    def __repr__(self) -> str:
        return f"Peer({self.name!r}, {[str(n) for n in self.allowed_ips]}, {self.endpoint})"


def normalize_host(host: str) -> str:
    """One spelling per address: an IPv4 client seen on a dual-stack socket is ::ffff:a.b.c.d."""
    address = ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


class PeerTable:
    def __init__(self) -> None:
        # per IP version: [(prefix length, shift, {network >> shift: peer})], longest first
        self._routes: dict[int, list[tuple[int, int, dict[int, Peer]]]] = {4: [], 6: []}
        self.peers: list[Peer] = []
        self.by_endpoint: dict[tuple, Peer] = {}  # finds the sender of a keepalive

    def __len__(self) -> int:
        return len(self.peers)

    def add(self, peer: Peer) -> None:
        for network in peer.allowed_ips:
            self._slot(network)[int(network.network_address) >> _shift(network)] = peer
        self.peers.append(peer)
        if peer.endpoint is not None:
            self.by_endpoint[peer.endpoint] = peer

    def move(self, peer: Peer, endpoint: tuple) -> None:
        """`peer` is now at `endpoint` (first contact, or NAT rebinding)."""
        if self.by_endpoint.get(peer.endpoint) is peer:
            del self.by_endpoint[peer.endpoint]
        peer.endpoint = endpoint
        self.by_endpoint[endpoint] = peer

    def remove(self, peer: Peer) -> None:
        for network in peer.allowed_ips:
            slot = self._slot(network)
            key = int(network.network_address) >> _shift(network)
            if slot.get(key) is peer:
                del slot[key]
        self.peers.remove(peer)
        if self.by_endpoint.get(peer.endpoint) is peer:
            del self.by_endpoint[peer.endpoint]
        for version, levels in self._routes.items():
            self._routes[version] = [level for level in levels if level[2]]

    def lookup(self, version: int, address: int) -> Peer | None:
        """The peer whose allowed IPs hold `address`, longest prefix first."""
        for _, shift, slot in self._routes[version]:
            peer = slot.get(address >> shift)
            if peer is not None:
                return peer
        return None

    def expire(self, older_than: float) -> list[Peer]:
        """Forget learned peers not heard from since `older_than`; return them."""
        gone = [p for p in self.peers if p.learned and p.last_rx < older_than]
        for peer in gone:
            self.remove(peer)
        return gone

    def _slot(self, network: IPNetwork) -> dict[int, Peer]:
        levels = self._routes[network.version]
        for prefix, _, slot in levels:
            if prefix == network.prefixlen:
                return slot
        slot: dict[int, Peer] = {}
        levels.append((network.prefixlen, _shift(network), slot))
        levels.sort(key=lambda level: -level[0])
        return slot


def _shift(network: IPNetwork) -> int:
    return BITS[network.version] - network.prefixlen


def host_network(version: int, address: int) -> IPNetwork:
    """The /32 or /128 network of one address."""
    return (IPv4Network if version == 4 else IPv6Network)((address, BITS[version]))
