"""The peer table on its own: prefixes, learned-peer bookkeeping, bounded expiry, pinned zones."""

import socket
import time
from ipaddress import IPv6Address, ip_network

from tunvpnd.peers import EXPIRE_BATCH, Peer, PeerTable, host_network, normalize_host
from tunvpnd.ratelog import RateLimit

A = ("10.9.0.5", 40000)
B = ("10.9.0.6", 40001)


def learned(address: str, endpoint: tuple | None = None, last_rx: float = 0.0) -> Peer:
    peer = Peer(f"learned-{address}", [ip_network(address)], endpoint=endpoint, learned=True)
    peer.last_rx = last_rx
    return peer


def v4(text: str) -> int:
    return int(ip_network(text).network_address)


# -- prefixes ---------------------------------------------------------------------------------

def test_removing_a_host_route_falls_back_to_the_shorter_prefix():
    table = PeerTable()
    lan = Peer("lan", [ip_network("192.168.53.0/24")])
    host = learned("192.168.53.7/32", A)
    table.add(lan)
    table.add(host)
    assert table.lookup(4, v4("192.168.53.7")) is host
    table.remove(host)
    assert table.lookup(4, v4("192.168.53.7")) is lan
    assert list(table.peers) == [lan] and len(table) == 1 and A not in table.by_endpoint
    table.remove(lan)
    assert table.lookup(4, v4("192.168.53.7")) is None and table._routes == {4: [], 6: []}


def test_remove_is_idempotent_and_leaves_other_peers_alone():
    table = PeerTable()
    one, two = learned("192.168.53.7/32", A), learned("192.168.53.8/32", B)
    table.add(one)
    table.add(two)
    table.remove(one)
    table.remove(one)
    assert list(table.peers) == [two] and table.learned == 1
    assert table.lookup(4, v4("192.168.53.8")) is two and table.by_endpoint == {B: two}


# -- learned-peer bookkeeping -----------------------------------------------------------------

def test_addresses_per_endpoint_follow_adds_moves_and_removals():
    table = PeerTable()
    peers = [learned(f"192.168.53.{n}/32") for n in (7, 8, 9)]
    for peer in peers:
        table.add(peer)
        table.move(peer, A)
    assert table.learned_at(A) == 3 and table.learned == 3
    table.move(peers[0], B)  # NAT rebinding: one address goes along
    assert (table.learned_at(A), table.learned_at(B)) == (2, 1)
    table.remove(peers[1])
    table.remove(peers[0])
    assert (table.learned_at(A), table.learned_at(B)) == (1, 0)
    assert table._per_endpoint == {A: 1}  # no empty entries left behind


def test_configured_peers_are_not_counted_as_learned():
    table = PeerTable()
    table.add(Peer("branch", [ip_network("10.1.0.0/16")], endpoint=A))
    assert table.learned == 0 and table.learned_at(A) == 0 and len(table) == 1


# -- expiry -----------------------------------------------------------------------------------

def test_expire_forgets_only_silent_learned_peers():
    table = PeerTable()
    branch = Peer("branch", [ip_network("10.1.0.0/16")], endpoint=B)
    quiet, busy = learned("192.168.53.7/32", A, 10.0), learned("192.168.53.8/32", A, 10.0)
    for peer in (branch, quiet, busy):
        table.add(peer)
    busy.last_rx = 150.0  # the loop updates last_rx per packet; the heap catches up on expiry
    assert table.expire(older_than=100.0) == [quiet]
    assert list(table.peers) == [branch, busy] and table.learned_at(A) == 1
    assert table.expire(older_than=149.0) == []  # busy was re-queued, heard of at 150
    assert table.expire(older_than=151.0) == [busy]
    assert list(table.peers) == [branch]


def test_a_removed_or_readded_peer_expires_once():
    table = PeerTable()
    peer = learned("192.168.53.7/32", A, 10.0)
    table.add(peer)
    table.remove(peer)
    table.add(peer)  # e.g. kept across a reload
    assert table.expire(older_than=100.0) == [peer]
    assert table.expire(older_than=100.0) == [] and len(table) == 0 and table._expiry == []


def test_expiry_of_a_full_table_is_bounded_per_call():
    """419,151 learned peers stalled the old table's expiry for 13.8 s: one call expired them
    all, each list.remove() O(n). Now one call does at most EXPIRE_BATCH of them, quickly."""
    table = PeerTable()
    count = 3 * EXPIRE_BATCH + 100
    base = int(IPv6Address("fd53::")) + 0x10000
    for n in range(count):
        table.add(learned(str(host_network(6, base + n)), (f"10.9.{n >> 8 & 255}.{n & 255}", 9)))
    calls, worst = 0, 0.0
    while len(table):
        started = time.perf_counter()
        gone = table.expire(older_than=100.0)
        worst = max(worst, time.perf_counter() - started)
        calls += 1
        assert 0 < len(gone) <= EXPIRE_BATCH
    assert calls == 4 and table.learned == 0 and table._per_endpoint == {}
    assert worst < 0.25, f"one expiry call took {worst * 1000:.0f} ms"


# -- pinned endpoints -------------------------------------------------------------------------

def test_pinned_link_local_endpoint_with_a_zone():
    """recvfrom() reports a link-local source as ('fe80::1', port, 0, ifindex), without '%lo':
    the zone of a pinned "[fe80::1%lo]:9090" must be compared as that index."""
    lo = socket.if_nametoindex("lo")
    for zone in ("lo", str(lo)):
        peer = Peer("p", [ip_network("fd53::2/128")], pinned=(f"fe80::1%{zone}", 9090))
        assert peer.accepts_endpoint(("fe80::1", 9090, 0, lo))
        assert not peer.accepts_endpoint(("fe80::1", 9090, 0, lo + 1))  # another link
        assert not peer.accepts_endpoint(("fe80::2", 9090, 0, lo))
        assert not peer.accepts_endpoint(("fe80::1", 9091, 0, lo))
        assert peer.pinned_sockaddr(socket.AF_INET6) == ("fe80::1", 9090, 0, lo)


def test_pinned_zone_of_an_unknown_interface_matches_nothing():
    peer = Peer("p", [ip_network("fd53::2/128")], pinned=("fe80::1%nosuchif0", None))
    assert peer.pinned_scope == -1
    assert not peer.accepts_endpoint(("fe80::1", 9090, 0, 0))


def test_pinned_endpoints_without_zones():
    peer = Peer("p", [ip_network("fd53::2/128")], pinned=("2001:db8::1", None))
    assert peer.accepts_endpoint(("2001:db8::1", 5, 0, 0))
    peer = Peer("p", [ip_network("192.168.53.2/32")], pinned=("10.9.0.5", 9090))
    assert peer.accepts_endpoint(("::ffff:10.9.0.5", 9090, 0, 0))
    assert peer.pinned_sockaddr(socket.AF_INET6) == ("::ffff:10.9.0.5", 9090, 0, 0)
    assert peer.pinned_sockaddr(socket.AF_INET) == ("10.9.0.5", 9090)
    assert normalize_host("fe80::1%eth0") == "fe80::1"


# -- rate-limited log lines -------------------------------------------------------------------

def test_rate_limit_shows_a_few_then_one_summary_per_interval():
    limit = RateLimit(burst=5, interval=10.0)
    assert limit.take(100.0, 3) == 3 and limit.summary(100.0) == 0
    assert limit.take(100.5, 419_149) == 2
    assert limit.summary(100.5) == 419_147
    assert limit.take(101.0, 10) == 0 and limit.summary(101.0) == 0  # too soon for another
    assert limit.summary(110.5) == 10
    assert limit.take(111.0, 1) == 1  # a new interval: one by one again
    limit.add(7)
    assert limit.summary(121.0) == 7 and limit.summary(200.0) == 0
