"""The peer table: who is at the other end of the tunnel, and where to send their packets.

A packet read from the TUN goes to the peer whose allowed IPs hold its destination (longest
prefix wins). A datagram from outside belongs to the peer whose allowed IPs hold its inner
source. Configured peers may pin the endpoint they must come from; learned peers (a server with
no `peers:` list, as in the lab) are created from the first datagram, follow the client when its
address or port changes (NAT rebinding), and expire when silent.

Every table operation costs O(1) or O(log n), whatever the number of peers: adding and removing
touch only the peer's own prefixes, and expiry works through a heap ordered by when each learned
peer was last heard of, a bounded number of entries per call, so a timer tick never stalls
forwarding however many peers fall silent at once.
"""

from __future__ import annotations

import heapq
import itertools
import socket
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_address

IPNetwork = IPv4Network | IPv6Network
BITS = {4: 32, 6: 128}
EXPIRE_BATCH = 4096  # expiry entries looked at per call: a few milliseconds of work


class Peer:
    __slots__ = (
        "name", "allowed_ips", "pinned_host", "pinned_port", "pinned_scope", "endpoint",
        "learned", "last_rx", "last_tx", "rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
        "local", "roams", "session",
    )

    def __init__(
        self,
        name: str,
        allowed_ips: Iterable[IPNetwork],
        endpoint: tuple | None = None,
        pinned: tuple[str, int | None] | None = None,
        learned: bool = False,
        roams: bool = True,
    ) -> None:
        """`roams=False`: the endpoint is only ever set by the daemon (a client's server),
        never taken from a datagram."""
        self.name = name
        self.allowed_ips = tuple(allowed_ips)
        self.pinned_host = normalize_host(pinned[0]) if pinned else None
        self.pinned_port = pinned[1] if pinned else None
        # recvfrom() reports a link-local source as ('fe80::1', port, flowinfo, ifindex): the
        # zone of a pinned "fe80::1%eth0" is compared as that interface index
        self.pinned_scope = zone_index(pinned[0]) if pinned else None
        self.endpoint = endpoint  # a socket address to sendto(), or None until known
        self.learned = learned
        self.last_rx = self.last_tx = 0.0
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        self.local = None  # our address its datagrams arrive at, for replies (core.received_at)
        self.roams = roams
        self.session = None  # wireguard: its tunvpnd.wireguard.session.Session (wire.py)

    def accepts_endpoint(self, source: tuple) -> bool:
        if not self.roams:
            return False
        if self.pinned_host is None:
            return True
        if self.pinned_port is not None and source[1] != self.pinned_port:
            return False
        if self.pinned_scope is not None and (len(source) < 4 or source[3] != self.pinned_scope):
            return False
        return normalize_host(source[0]) == self.pinned_host

    def pinned_sockaddr(self, family: int) -> tuple | None:
        """Where to send before the peer is heard from: its pinned address and port, if both."""
        if self.pinned_host is None or self.pinned_port is None:
            return None
        host = self.pinned_host
        if family != socket.AF_INET6:
            return (host, self.pinned_port)
        if ":" not in host:
            host = "::ffff:" + host  # as a dual-stack socket reports an IPv4 client
        return (host, self.pinned_port, 0, self.pinned_scope or 0)

    def __repr__(self) -> str:
        return f"Peer({self.name!r}, {[str(n) for n in self.allowed_ips]}, {self.endpoint})"


def normalize_host(host: str) -> str:
    """One spelling per address: an IPv4 client seen on a dual-stack socket is ::ffff:a.b.c.d,
    and a zone (fe80::1%eth0) is not part of the spelling: Peer.pinned_scope holds it."""
    address = ip_address(host.partition("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def zone_index(host: str) -> int | None:
    """The interface index of a link-local address's zone (None: no zone, or the address is
    not link-local, where the kernel reports scope 0 anyway); -1 if the interface is unknown,
    which then matches no source."""
    address, _, zone = host.partition("%")
    if not zone or not ip_address(address).is_link_local:
        return None
    if zone.isdigit():
        return int(zone)
    try:
        return socket.if_nametoindex(zone)
    except OSError:
        return -1


class PrefixMap:
    """Longest-prefix match from integer addresses to values, one dict per prefix length."""

    def __init__(self) -> None:
        # per IP version: [(prefix length, shift, {network >> shift: value})], longest first
        self._routes: dict[int, list[tuple[int, int, dict[int, object]]]] = {4: [], 6: []}

    def map(self, network: IPNetwork, value: object) -> None:
        self._slot(network)[int(network.network_address) >> _shift(network)] = value

    def unmap(self, network: IPNetwork, value: object) -> None:
        """Forget `network` if it still maps to `value`; O(1) but for dropping an emptied level."""
        levels = self._routes[network.version]
        for i, (prefix, shift, slot) in enumerate(levels):
            if prefix == network.prefixlen:
                key = int(network.network_address) >> shift
                if slot.get(key) is value:
                    del slot[key]
                    if not slot:
                        del levels[i]
                return

    def lookup(self, version: int, address: int):  # -> the value, or None
        """The value whose network holds `address`, longest prefix first."""
        for _, shift, slot in self._routes[version]:
            value = slot.get(address >> shift)
            if value is not None:
                return value
        return None

    def _slot(self, network: IPNetwork) -> dict[int, object]:
        levels = self._routes[network.version]
        for prefix, _, slot in levels:
            if prefix == network.prefixlen:
                return slot
        slot: dict[int, object] = {}
        levels.append((network.prefixlen, _shift(network), slot))
        levels.sort(key=lambda level: -level[0])
        return slot


class PeerTable(PrefixMap):
    def __init__(self) -> None:
        super().__init__()
        self.peers: dict[Peer, None] = {}  # every peer, in the order added (a dict: O(1) removal)
        self.by_endpoint: dict[tuple, Peer] = {}  # finds the sender of a keepalive
        self._per_endpoint: dict[tuple, int] = {}  # learned peers at each endpoint
        # Learned peers by when they were last known to be heard from: a heap of
        # (last_rx when queued, tie-breaker, peer). The loop updates last_rx per packet without
        # touching the heap; expire() re-queues an entry that turns out to be stale.
        self._expiry: list[tuple[float, int, Peer]] = []
        self._queued: dict[Peer, tuple[float, int, Peer]] = {}  # learned peer -> its heap entry
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self.peers)

    @property
    def learned(self) -> int:
        """How many learned peers the table holds."""
        return len(self._queued)

    def learned_at(self, endpoint: tuple) -> int:
        """How many learned peers (addresses) are at `endpoint`."""
        return self._per_endpoint.get(endpoint, 0)

    def add(self, peer: Peer) -> None:
        for network in peer.allowed_ips:
            self.map(network, peer)
        self.peers[peer] = None
        if peer.learned:
            self._queue(peer)
            if peer.endpoint is not None:
                self._per_endpoint[peer.endpoint] = self.learned_at(peer.endpoint) + 1
        if peer.endpoint is not None:
            self.by_endpoint[peer.endpoint] = peer

    def move(self, peer: Peer, endpoint: tuple) -> None:
        """`peer` is now at `endpoint` (first contact, or NAT rebinding)."""
        old = peer.endpoint
        if self.by_endpoint.get(old) is peer:
            del self.by_endpoint[old]
        if peer in self._queued:
            if old is not None:
                self._uncount(old)
            self._per_endpoint[endpoint] = self.learned_at(endpoint) + 1
        peer.endpoint = endpoint
        self.by_endpoint[endpoint] = peer

    def remove(self, peer: Peer) -> None:
        for network in peer.allowed_ips:
            self.unmap(network, peer)
        self.peers.pop(peer, None)
        if self.by_endpoint.get(peer.endpoint) is peer:
            del self.by_endpoint[peer.endpoint]
        # its heap entry stays behind until expire() reaches it and sees it is no longer queued
        if self._queued.pop(peer, None) is not None and peer.endpoint is not None:
            self._uncount(peer.endpoint)

    def expire(self, older_than: float, limit: int = EXPIRE_BATCH) -> list[Peer]:
        """Forget learned peers not heard from since `older_than`; return them.

        Looks at `limit` heap entries at most: the rest wait for the next call (one tick later).
        """
        heap, queued, gone = self._expiry, self._queued, []
        for _ in range(limit):
            if not heap or heap[0][0] >= older_than:
                break
            entry = heapq.heappop(heap)
            peer = entry[2]
            if queued.get(peer) is not entry:
                continue  # removed (or re-added) since it was queued
            if peer.last_rx < older_than:
                self.remove(peer)
                gone.append(peer)
            else:
                self._queue(peer)  # heard from since it was queued: its place is further on
        return gone

    def _queue(self, peer: Peer) -> None:
        entry = (peer.last_rx, next(self._order), peer)
        self._queued[peer] = entry
        heapq.heappush(self._expiry, entry)

    def _uncount(self, endpoint: tuple) -> None:
        left = self._per_endpoint.get(endpoint, 0) - 1
        if left > 0:
            self._per_endpoint[endpoint] = left
        else:
            self._per_endpoint.pop(endpoint, None)


def _shift(network: IPNetwork) -> int:
    return BITS[network.version] - network.prefixlen


def host_network(version: int, address: int) -> IPNetwork:
    """The /32 or /128 network of one address."""
    return (IPv4Network if version == 4 else IPv6Network)((address, BITS[version]))
