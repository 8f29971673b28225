"""The packet-handling core: every forwarding decision, and the counters, with no I/O.

In: a packet read from the TUN, or a datagram and its source address from the socket.
Out: (payload, endpoint) to send, or the packet to write to the TUN, or None for a drop, which
is counted by reason. The loop does the system calls; this module is unit-tested on plain bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_network

from . import mss
from . import packet as ip
from .mss import PROTO_AT, SYN, SYN_AT, TCP
from .packet import HEADER_ONLY
from .peers import IPNetwork, Peer, PeerTable, PrefixMap, host_network
from .wire import Wire

# A datagram claiming an address that another endpoint holds is dropped, and that endpoint is
# CHALLENGEd: if it stays silent this long, the address moves to the claimant (NAT rebinding).
CHALLENGE_WAIT = 2.0
CLAIMS_PER_TICK = 1000  # claims settled per resolve_claims() call: bounded work per wake-up
MAX_LEARNED_PEERS = 1024        # profile max_learned_peers
MAX_ADDRESSES_PER_ENDPOINT = 16  # profile max_addresses_per_endpoint
# Sources that are never a host's: unspecified, loopback, multicast, limited broadcast, and
# IPv6 link-local (valid on one link only: every client's TUN is a link of its own, so two
# clients may well use the same one, and a router must not forward it).
NEVER_HOSTS = tuple(ip_network(n) for n in (
    "0.0.0.0/32", "127.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "ff00::/8", "fe80::/10"))

DROP_REASONS = (
    "malformed",       # from outside: not exactly one IPv4/IPv6 packet, or a control packet
                       # that is not for us (a CHALLENGE for an address we do not have)
    "unknown_source",  # inner source belongs to no peer (and may not be learned)
    "bad_source",      # inner source that is never a client's: ours, network, broadcast, ...
    "table_full",      # a new source to learn, but max_learned_peers are learned already
    "endpoint_limit",  # a new source from an endpoint holding max_addresses_per_endpoint already
    "bad_endpoint",    # a peer's datagram from an address other than its pinned endpoint
    "address_held",    # inner source held by another endpoint: dropped, the holder challenged
    "not_allowed",     # an authenticated peer's packet whose inner source is not in its
                       # allowed IPs (cryptokey routing; wireguard)
    "no_peer",         # from the TUN: no peer's allowed IPs hold the destination
    "no_endpoint",     # the peer is known but has not told us where it is yet
    "send_failed",     # socket buffer full or the network said no
    "tun_failed",      # the kernel refused the packet
)


class Counters:
    # staged: packets the wire keeps until a handshake completes (wireguard): not a drop
    __slots__ = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "keepalives", "challenges",
                 "staged", "mss_clamped", *DROP_REASONS)

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    @property
    def dropped(self) -> int:
        return sum(getattr(self, reason) for reason in DROP_REASONS)

    def drops(self) -> dict[str, int]:
        return {reason: getattr(self, reason) for reason in DROP_REASONS if getattr(self, reason)}


class Core:
    """Decides where each packet goes.

    `rx`/`tx` are seen from the tunnel: rx is what arrives from peers (datagrams in, written to
    the TUN), tx what is sent to peers.
    """

    def __init__(
        self,
        peers: PeerTable,
        wire: Wire,
        learn_within: Iterable[IPNetwork] = (),
        echo_keepalives: bool = False,
        log_packet: Callable[[str, memoryview], None] | None = None,
    ) -> None:
        self.peers = peers
        self.wire = wire
        self.counters = Counters()
        self.echo_keepalives = echo_keepalives
        self.log_packet = log_packet
        self.now = 0.0  # set by the loop once per wake-up, not per packet
        # a datagram to send now, for the loop: (payload, endpoint, local address or None)
        self.reply: tuple[bytes, tuple, list | None] | None = None
        # pending claims, oldest first:
        # peer -> [claimant endpoint, version, address, asked at, address the claim came to]
        self._claims: dict[Peer, list] = {}
        self._announcements: dict[tuple[int, int], bytes] = {}
        # A wildcard-bound server's own address, as a sendmsg() control list: the one the
        # datagram being handled arrived at (set by the loop, kept as Peer.local), and the one
        # the packet outbound() just handled must leave from (read by the loop). Else None.
        self.received_at: list | None = None
        self.send_from: list | None = None
        self.set_learning(learn_within)
        self.mss_limits: tuple[int, ...] | None = None  # by IP version; None: no clamping

    def set_mss_clamp(self, mtu: int | None) -> None:
        """Clamp the MSS of SYNs crossing the tunnel to fit `mtu` (the TUN's); None: never."""
        self.mss_limits = mss.limits(mtu) if mtu else None

    def _clamp(self, packet: memoryview, version: int) -> memoryview:
        """Slow path: a TCP packet with the SYN bit at SYN_AT (a SYN, or one with IPv6
        extension headers that looks like one). The packet itself if nothing changed, else
        the clamped one."""
        limits = self.mss_limits
        if limits is not None:
            clamped = mss.clamp(packet, version, limits[version])
            if clamped is not None:
                self.counters.mss_clamped += 1
                return clamped
        return packet

    def set_addresses(self, addresses: Iterable[IPv4Interface | IPv6Interface]) -> None:
        """Our own tunnel addresses (a plain-wire client): each keepalive is one ANNOUNCE per
        address, and a CHALLENGE for one of them is answered with its ANNOUNCE."""
        self._announcements = {
            (a.version, int(a.ip)): ip.announce(a.version, int(a.ip)) for a in addresses}

    def set_learning(
        self,
        networks: Iterable[IPNetwork],
        own: Iterable[IPv4Address | IPv6Address] = (),
        max_peers: int = MAX_LEARNED_PEERS,
        max_per_endpoint: int = MAX_ADDRESSES_PER_ENDPOINT,
    ) -> None:
        """Learn peers from datagrams whose inner source lies in `networks` (empty: never), at
        most `max_peers` of them and `max_per_endpoint` per endpoint, never the addresses in
        `own` (the server's), a subnet's network or broadcast address, nor NEVER_HOSTS."""
        networks = list(networks)
        self._learnable = PrefixMap()
        self._never = PrefixMap()
        for network in networks:
            self._learnable.map(network, True)
            if network.version == 4 and network.prefixlen < 31:
                self._never.map(host_network(4, int(network.network_address)), True)
                self._never.map(host_network(4, int(network.broadcast_address)), True)
            elif network.version == 6 and network.prefixlen < 127:
                # the Subnet-Router anycast address: the server's own once it routes the subnet
                self._never.map(host_network(6, int(network.network_address)), True)
        for network in NEVER_HOSTS:
            self._never.map(network, True)
        for address in own:
            self._never.map(host_network(address.version, int(address)), True)
        self.learning = bool(networks)
        self.max_learned = max_peers
        self.max_per_endpoint = max_per_endpoint
        self.refused_from: dict[str, tuple] = {}  # reason -> endpoint of the last refused

    def outbound(self, packet: memoryview) -> tuple[memoryview | bytes, tuple] | None:
        """A packet read from the TUN: (datagram payload, endpoint) or None if dropped."""
        version = ip.version_of(packet)
        peer = self.peers.lookup(version, ip.destination(packet, version)) if version else None
        counters = self.counters
        if peer is None:
            counters.no_peer += 1
            return None
        if peer.endpoint is None:
            counters.no_endpoint += 1
            return None
        n = len(packet)
        counters.tx_packets += 1
        counters.tx_bytes += n
        peer.tx_packets += 1
        peer.tx_bytes += n
        peer.last_tx = self.now
        self.send_from = peer.local
        try:  # MSS clamping: one byte tested per packet; one too short for it is no SYN
            syn = packet[SYN_AT[version]] & SYN and packet[PROTO_AT[version]] == TCP
        except IndexError:
            syn = False
        if syn:
            packet = self._clamp(packet, version)
        if self.log_packet is not None:
            self.log_packet("From tun ==>", packet)
        datagram = self.wire.seal(packet, peer)
        if datagram is None:  # kept by the wire until its handshake completes
            counters.staged += 1
            return None
        return datagram, peer.endpoint

    def inbound(self, datagram: memoryview, source: tuple) -> memoryview | None:
        """A datagram from `source`: the packet to write to the TUN, or None.

        None also for a keepalive; if it deserves an answer, `self.reply` says what and where.
        A wire that proves the sender (wireguard) gets the cryptokey-routing check instead of
        the plain wire's control packets and learning: the inner source must be that peer's.
        """
        counters = self.counters
        opened = self.wire.open(datagram, source, self.received_at)
        if opened is None:  # consumed or dropped by the wire (which counts its drops)
            return None
        peer, packet = opened
        if not packet:
            self._keepalive(peer, source)
            return None
        version = ip.valid(packet)
        if not version:
            counters.malformed += 1
            return None
        if peer is None:  # plain: whoever the inner source says
            # One length comparison on ordinary packets: only a bare header can be a control
            # packet.
            if len(packet) == HEADER_ONLY[version] and self._control(None, version, packet,
                                                                     source):
                return None
            peer = self._sender(version, ip.source(packet, version), source)
            if peer is None:
                return None
        elif self.peers.lookup(version, ip.source(packet, version)) is not peer:
            counters.not_allowed += 1
            return None
        n = len(packet)
        counters.rx_packets += 1
        counters.rx_bytes += n
        peer.rx_packets += 1
        peer.rx_bytes += n
        peer.last_rx = self.now
        peer.local = self.received_at
        try:  # MSS clamping: as in outbound
            syn = packet[SYN_AT[version]] & SYN and packet[PROTO_AT[version]] == TCP
        except IndexError:
            syn = False
        if syn:
            packet = self._clamp(packet, version)
        if self.log_packet is not None:
            self.log_packet("From socket <==", packet)
        return packet

    def _sender(self, version: int, address: int, source: tuple) -> Peer | None:
        """The peer a datagram with this inner source comes from, learning or following it."""
        peer = self.peers.lookup(version, address)
        if peer is None:
            return self._learn(version, address, source)
        if peer.endpoint != source:
            if not peer.accepts_endpoint(source):
                self.counters.bad_endpoint += 1
                return None
            if peer.endpoint is not None:  # held by another endpoint: ask it before moving
                self._claim(peer, version, address, source)
                return None
            self.peers.move(peer, source)  # first contact
        return peer

    def _claim(self, peer: Peer, version: int, address: int, source: tuple) -> None:
        """`source` says it is `address`, which `peer` holds at another endpoint: drop the
        datagram, challenge the holder (once per claim), remember the latest claimant."""
        self.counters.address_held += 1
        claim = self._claims.get(peer)
        if claim is not None:
            claim[0] = source
            return
        self._claims[peer] = [source, version, address, self.now, self.received_at]
        self.counters.challenges += 1
        challenge = self.wire.seal(memoryview(ip.challenge(version, address)), peer)
        peer.tx_bytes += len(challenge)
        self.reply = (challenge, peer.endpoint, peer.local)

    def resolve_claims(self) -> list[tuple[Peer, tuple, bool]]:
        """Settle the claims whose holder had CHALLENGE_WAIT to answer; call it from a timer.

        Returns (peer, claimant, moved) for each: moved when the holder stayed silent and the
        address now belongs to the claimant (with no need for it to send again), else the
        holder was heard and keeps it.
        """
        claims = self._claims
        settled: list[tuple[Peer, tuple, bool]] = []
        asked_by = self.now - CHALLENGE_WAIT
        while claims and len(settled) < CLAIMS_PER_TICK:
            peer = next(iter(claims))
            claimant, version, address, asked, local = claims[peer]
            if asked > asked_by:
                break  # oldest first: the rest are younger
            del claims[peer]
            if self.peers.lookup(version, address) is not peer:
                continue  # expired or replaced by a reload meanwhile
            moved = peer.last_rx <= asked  # not heard since the challenge went out
            if moved:
                self.peers.move(peer, claimant)
                peer.last_rx = self.now
                peer.local = local
            settled.append((peer, claimant, moved))
        return settled

    def _control(self, peer: Peer | None, version: int, packet: memoryview,
                 source: tuple) -> bool:
        """Consume an ANNOUNCE or CHALLENGE (never written to the TUN); False for a bare header
        that is neither (ordinary traffic)."""
        kind = ip.control(packet, version)
        if kind == ip.ANNOUNCE:
            if peer is None:
                peer = self._sender(version, ip.source(packet, version), source)
                if peer is None:
                    return True  # counted by _sender
            self.counters.keepalives += 1
            peer.last_rx = self.now
            peer.rx_bytes += len(packet)  # whole payloads, control packets too (as wireguard-go)
            peer.local = self.received_at
            if self.echo_keepalives:
                self.reply = (self.wire.keepalive(peer), source, self.received_at)
            return True
        if kind == ip.CHALLENGE:
            announcement = self._announcements.get((version, ip.destination(packet, version)))
            peer = peer or self.peers.by_endpoint.get(source)
            if announcement is None or peer is None:
                self.counters.malformed += 1
                return True
            self.counters.challenges += 1
            peer.last_rx = self.now
            peer.rx_bytes += len(packet)
            answer = self.wire.seal(memoryview(announcement), peer)
            peer.tx_bytes += len(answer)
            self.reply = (answer, source, None)
            return True
        return False
    def _learn(self, version: int, address: int, source: tuple) -> Peer | None:
        """A new learned peer for inner source `address` at `source`, or None (the drop counted)
        when it may not be learned. Slow path: once per new client address."""
        counters = self.counters
        if not self.learning or self._learnable.lookup(version, address) is None:
            counters.unknown_source += 1
            return None
        if self._never.lookup(version, address) is not None:
            counters.bad_source += 1
            return None
        peers = self.peers
        if peers.learned >= self.max_learned:
            counters.table_full += 1
            self.refused_from["table_full"] = source
            return None
        if peers.learned_at(source) >= self.max_per_endpoint:
            counters.endpoint_limit += 1
            self.refused_from["endpoint_limit"] = source
            return None
        network = host_network(version, address)
        peer = Peer(f"learned-{network}", [network], learned=True)
        peer.last_rx = self.now
        peers.add(peer)
        peers.move(peer, source)
        return peer

    def _keepalive(self, peer: Peer | None, source: tuple) -> None:
        peer = peer or self.peers.by_endpoint.get(source)
        if peer is None:
            self.counters.unknown_source += 1
            return
        self.counters.keepalives += 1
        peer.last_rx = self.now
        peer.local = self.received_at
        if self.echo_keepalives:
            self.reply = (self.wire.keepalive(peer), source, self.received_at)

    def keepalives_due(self, interval: float) -> list[tuple[bytes, tuple, list | None]]:
        """Keepalives (payload, endpoint, local) for peers we have sent nothing to for
        `interval` seconds: one ANNOUNCE per address of ours if we have them (so a restarted
        server relearns us), else an empty datagram."""
        due = []
        announcements = self._announcements.values()
        for peer in self.peers.peers:
            if peer.endpoint is not None and self.now - peer.last_tx >= interval:
                peer.last_tx = self.now
                if announcements:
                    sealed = [self.wire.seal(memoryview(a), peer) for a in announcements]
                    peer.tx_bytes += sum(map(len, sealed))
                    due.extend((datagram, peer.endpoint, peer.local) for datagram in sealed)
                else:
                    due.append((self.wire.keepalive(peer), peer.endpoint, peer.local))
        return due
