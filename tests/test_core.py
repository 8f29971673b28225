"""The packet core on crafted bytes: no sockets, no TUN, no root."""

from ipaddress import ip_address, ip_interface, ip_network

import pytest

from tests.ipcraft import announce, challenge, checksum, icmp_echo, ipv4, ipv6
from tunvpnd import packet as ip
from tunvpnd.core import CHALLENGE_WAIT, Core
from tunvpnd.peers import Peer, PeerTable
from tunvpnd.wire import PlainWire

HOSTU = ("10.9.0.5", 40000)
HOSTU2 = ("10.9.0.6", 40001)
A99 = 0xC0A83563  # 192.168.53.99
ANNOUNCE_99 = announce("192.168.53.99")
CHALLENGE_99 = challenge("192.168.53.99")


def server(*peers: Peer, learn=("192.168.53.0/24",)) -> Core:
    table = PeerTable()
    for peer in peers:
        table.add(peer)
    core = Core(table, PlainWire(), learn_within=[ip_network(n) for n in learn],
                echo_keepalives=True)
    core.now = 100.0
    return core


def mv(data: bytes) -> memoryview:
    return memoryview(data)


# -- packet validation ------------------------------------------------------------------------

def test_valid_ipv4_and_ipv6():
    assert ip.valid(mv(icmp_echo("192.168.53.99", "192.168.60.5"))) == 4
    assert ip.valid(mv(ipv6("fd00::2", "fd00::1", b"hello"))) == 6


@pytest.mark.parametrize("data", [
    b"",
    b"\x45" * 19,                                          # shorter than a header
    icmp_echo("1.2.3.4", "5.6.7.8")[:-1],                  # truncated: length field too big
    icmp_echo("1.2.3.4", "5.6.7.8") + b"junk",             # trailing bytes
    b"\x44" + icmp_echo("1.2.3.4", "5.6.7.8")[1:],         # IHL 4 (< 20 bytes)
    b"\x4f" + ipv4("1.2.3.4", "5.6.7.8")[1:],              # IHL 15 > packet
    ipv6("fd00::2", "fd00::1", b"abc")[:39],               # IPv6 header cut short
    ipv6("fd00::2", "fd00::1", b"abc") + b"x",             # IPv6 payload length wrong
    b"\x00" * 60,                                          # version 0
    bytes(range(256)) * 4,                                 # garbage
])
def test_malformed_is_not_valid(data):
    assert ip.valid(mv(data)) == 0


def test_addresses_as_integers():
    packet = mv(ipv4("192.168.53.99", "192.168.60.5"))
    assert ip.source(packet, 4) == 0xC0A83563
    assert ip.destination(packet, 4) == 0xC0A83C05
    assert ip.describe(packet) == "192.168.53.99 --> 192.168.60.5"
    assert ip.describe(mv(ipv6("fd00::2", "fd00::1"))) == "fd00::2 --> fd00::1"


# -- server: learning, routing, drops ---------------------------------------------------------

def test_server_learns_client_then_routes_replies_to_it():
    core = server()
    request = icmp_echo("192.168.53.99", "192.168.60.5")
    assert bytes(core.inbound(mv(request), HOSTU)) == request
    reply = icmp_echo("192.168.60.5", "192.168.53.99")
    payload, endpoint = core.outbound(mv(reply))
    assert bytes(payload) == reply and endpoint == HOSTU
    c = core.counters
    assert (c.rx_packets, c.rx_bytes, c.tx_packets, c.tx_bytes) == (1, 60, 1, 60)
    assert c.dropped == 0


def test_packet_from_tun_before_any_client_is_dropped_not_fatal():
    core = server()
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.99"))) is None
    assert core.counters.no_peer == 1


def test_two_clients_each_get_their_own_replies():
    core = server()
    core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU)
    core.inbound(mv(icmp_echo("192.168.53.98", "192.168.60.5")), HOSTU2)
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.99")))[1] == HOSTU
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.98")))[1] == HOSTU2
    assert len(core.peers) == 2


def test_learning_only_within_tunnel_networks():
    core = server()
    assert core.inbound(mv(icmp_echo("192.168.60.7", "192.168.60.5")), HOSTU) is None
    assert core.counters.unknown_source == 1 and len(core.peers) == 0


def test_no_learning_without_networks_drops_unknown_source():
    core = server(learn=())
    assert core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU) is None
    assert core.counters.unknown_source == 1


def test_nat_rebinding_is_followed_once_the_old_endpoint_is_silent():
    core = server()
    core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU)
    moved = ("10.9.0.5", 50123)
    assert core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), moved) is None
    assert core.reply == (CHALLENGE_99, HOSTU, None)  # "are you still 192.168.53.99?"
    core.now += CHALLENGE_WAIT
    assert core.resolve_claims() == [(core.peers.lookup(4, A99), moved, True)]
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.99")))[1] == moved
    assert core.peers.by_endpoint.get(moved) is not None and HOSTU not in core.peers.by_endpoint


def test_challenge_and_move_use_the_server_address_each_endpoint_talks_to():
    """A wildcard-bound server (IP_PKTINFO): the challenge leaves from the address the holder
    talks to, and a moved peer is answered from the address its claim arrived at."""
    core = server()
    holder_side, claimant_side = [("10.9.0.11",)], [("10.99.0.11",)]
    core.received_at = holder_side
    core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU)
    core.received_at = claimant_side
    assert core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU2) is None
    assert core.reply == (CHALLENGE_99, HOSTU, holder_side)
    core.now += CHALLENGE_WAIT
    assert core.resolve_claims() == [(core.peers.lookup(4, A99), HOSTU2, True)]
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.99")))[1] == HOSTU2
    assert core.send_from is claimant_side


def test_learned_peers_expire():
    core = server()
    core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU)
    core.now = 150.0
    core.inbound(mv(icmp_echo("192.168.53.98", "192.168.60.5")), HOSTU2)
    gone = core.peers.expire(older_than=120.0)
    assert [p.endpoint for p in gone] == [HOSTU]
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.99"))) is None
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.98")))[1] == HOSTU2


def test_garbage_and_truncated_datagrams_are_counted():
    core = server()
    for data in (b"\xff" * 100, icmp_echo("192.168.53.99", "192.168.60.5")[:30], b"\x45"):
        assert core.inbound(mv(data), HOSTU) is None
    assert core.counters.malformed == 3 and core.counters.rx_packets == 0


# -- configured peers: allowed_ips and pinned endpoints ---------------------------------------

def configured() -> Core:
    hostu = Peer("hostu", [ip_network("192.168.53.99/32")], pinned=("10.9.0.5", None))
    lan = Peer("branch", [ip_network("192.168.53.0/24"), ip_network("fd00:53::/64")])
    return server(hostu, lan, learn=())


def test_longest_prefix_wins():
    core = configured()
    core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU)
    core.inbound(mv(icmp_echo("192.168.53.7", "192.168.60.5")), HOSTU2)
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.99")))[1] == HOSTU
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.7")))[1] == HOSTU2


def test_ipv6_inside_the_tunnel():
    core = configured()
    assert core.inbound(mv(ipv6("fd00:53::2", "fd00:60::5", b"ping")), HOSTU2) is not None
    assert core.outbound(mv(ipv6("fd00:60::5", "fd00:53::2", b"pong")))[1] == HOSTU2
    assert core.outbound(mv(ipv6("fd00:60::5", "fd00:99::2", b"pong"))) is None


def test_spoofed_inner_source_is_dropped():
    core = configured()
    assert core.inbound(mv(icmp_echo("10.1.1.1", "192.168.60.5")), HOSTU) is None
    assert core.counters.unknown_source == 1


@pytest.mark.parametrize("endpoint", [("10.9.0.5", 1),
                                      ("::ffff:10.9.0.5", 2, 0, 0)])  # dual-stack spelling
def test_pinned_endpoint_rejects_other_addresses_any_port_accepted(endpoint):
    core = configured()
    assert core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU2) is None
    assert core.counters.bad_endpoint == 1
    assert core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), endpoint) is not None


def test_pinned_port():
    peer = Peer("p", [ip_network("192.168.53.99/32")], pinned=("10.9.0.5", 9999))
    assert peer.accepts_endpoint(("10.9.0.5", 9999))
    assert not peer.accepts_endpoint(("10.9.0.5", 9998))


def test_configured_peer_without_endpoint_yet():
    core = configured()
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.99"))) is None
    assert core.counters.no_endpoint == 1


# -- keepalives -------------------------------------------------------------------------------

def test_keepalive_from_known_peer_is_answered():
    core = server()
    core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU)
    core.now = 130.0
    assert core.inbound(mv(b""), HOSTU) is None
    assert core.reply == (b"", HOSTU, None)
    assert core.counters.keepalives == 1
    assert core.peers.lookup(4, 0xC0A83563).last_rx == 130.0


def test_keepalive_from_stranger_is_dropped():
    core = server()
    assert core.inbound(mv(b""), HOSTU) is None
    assert core.reply is None and core.counters.unknown_source == 1


def test_client_keepalives_only_when_idle():
    table = PeerTable()
    srv = Peer("server", [ip_network("0.0.0.0/0"), ip_network("::/0")])
    table.add(srv)
    table.move(srv, ("10.9.0.11", 9090))
    core = Core(table, PlainWire())
    core.now = 10.0
    assert core.keepalives_due(25) == []  # 10 s since start: not idle long enough
    core.now = 30.0
    assert core.keepalives_due(25) == [(b"", ("10.9.0.11", 9090), None)]
    core.now = 40.0
    core.outbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")))
    core.now = 60.0
    assert core.keepalives_due(25) == []


def test_client_sends_everything_to_the_server():
    table = PeerTable()
    srv = Peer("server", [ip_network("0.0.0.0/0"), ip_network("::/0")])
    table.add(srv)
    core = Core(table, PlainWire())
    assert core.outbound(mv(icmp_echo("192.168.53.99", "192.168.60.5"))) is None  # unresolved
    table.move(srv, ("10.9.0.11", 9090))
    assert core.outbound(mv(icmp_echo("192.168.53.99", "8.8.8.8")))[1] == ("10.9.0.11", 9090)
    assert core.outbound(mv(ipv6("fd00::2", "2001:db8::1")))[1] == ("10.9.0.11", 9090)


# -- plain-wire control packets: ANNOUNCE / CHALLENGE -----------------------------------------

def test_control_packets_are_valid_bare_headers():
    for data in (announce("192.168.53.99"), challenge("192.168.53.99")):
        assert len(data) == 20 and ip.valid(mv(data)) == 4 and checksum(data) == 0
    for data in (announce("fd53::99"), challenge("fd53::99")):
        assert len(data) == 40 and ip.valid(mv(data)) == 6
    assert ip.control(mv(announce("192.168.53.99")), 4) == ip.ANNOUNCE
    assert ip.control(mv(challenge("fd53::99")), 6) == ip.CHALLENGE
    assert ip.announce(4, A99) == ANNOUNCE_99 and ip.challenge(4, A99) == CHALLENGE_99
    assert ip.announce(6, 0xFD53 << 112 | 0x99) == announce("fd53::99")


@pytest.mark.parametrize("data", [
    ipv4("192.168.53.99", "0.0.0.0", proto=17),       # another protocol
    ipv4("192.168.53.99", "192.168.60.5", proto=253),  # both addresses set
    ipv4("0.0.0.0", "0.0.0.0", proto=253),             # neither
    ipv6("fd53::99", "::", next_header=17),
], ids=["udp", "both-addresses", "no-address", "ipv6-udp"])
def test_other_bare_headers_are_ordinary_packets(data):
    core = server(learn=("192.168.53.0/24", "fd53::/64"))
    assert ip.control(mv(data), ip.valid(mv(data))) == 0
    if ip.source(mv(data), ip.valid(mv(data))):
        assert bytes(core.inbound(mv(data), HOSTU)) == data


def test_announce_makes_a_fresh_server_learn_an_idle_client():
    core = server()  # e.g. just restarted: knows nobody
    assert core.inbound(mv(ANNOUNCE_99), HOSTU) is None  # consumed, never written to the TUN
    assert core.reply == (b"", HOSTU, None)  # echoed like a keepalive
    assert core.counters.keepalives == 1 and core.counters.rx_packets == 0
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.99")))[1] == HOSTU
    assert core.inbound(mv(announce("fd53::99")), HOSTU) is None  # outside the tunnel networks
    assert core.counters.unknown_source == 1


def learned_99() -> tuple[Core, Peer]:
    core = server()
    core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU)
    return core, core.peers.lookup(4, A99)


def test_a_spoofed_datagram_does_not_take_an_address_whose_holder_answers():
    core, victim = learned_99()
    core.now = 110.0
    spoof = icmp_echo("192.168.53.99", "192.168.60.5")
    assert core.inbound(mv(spoof), HOSTU2) is None
    assert core.counters.address_held == 1 and core.reply == (CHALLENGE_99, HOSTU, None)
    core.reply = None
    core.now = 110.5
    assert core.inbound(mv(ANNOUNCE_99), HOSTU) is None  # the tunvpnd client answers
    assert core.reply == (b"", HOSTU, None)
    core.now = 111.9
    assert core.resolve_claims() == []  # not settled before CHALLENGE_WAIT
    core.now = 112.0
    assert core.resolve_claims() == [(victim, HOSTU2, False)]
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.99")))[1] == HOSTU
    core.now = 120.0
    assert core.resolve_claims() == []  # the claim is gone


def test_an_active_holder_keeps_its_address_without_answering():
    core, victim = learned_99()  # e.g. the lab's tunclient.py: cannot answer, but it talks
    core.now = 110.0
    for _ in range(50):  # a flood from the attacker: one challenge, every datagram counted
        assert core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU2) is None
    assert core.counters.address_held == 50 and core.counters.challenges == 1
    core.now = 111.0
    assert core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), HOSTU) is not None
    core.now = 112.5
    assert core.resolve_claims() == [(victim, HOSTU2, False)]
    assert victim.endpoint == HOSTU


def test_a_silent_holder_loses_its_address_to_the_latest_claimant():
    core, victim = learned_99()
    core.now = 110.0
    core.inbound(mv(ANNOUNCE_99), HOSTU2)
    third = ("10.9.0.7", 40002)
    core.now = 111.0
    core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), third)
    assert core.counters.challenges == 1 and core.counters.address_held == 2
    core.now = 112.0
    assert core.resolve_claims() == [(victim, third, True)]  # without `third` sending again
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.99")))[1] == third
    assert core.inbound(mv(icmp_echo("192.168.53.99", "192.168.60.5")), third) is not None


def test_a_claim_on_a_peer_that_expired_meanwhile_is_dropped():
    core, victim = learned_99()
    core.now = 110.0
    core.inbound(mv(ANNOUNCE_99), HOSTU2)
    core.peers.expire(older_than=105.0)
    core.now = 112.0
    assert core.resolve_claims() == []
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.99"))) is None


def test_a_server_ignores_challenges():
    core, victim = learned_99()
    assert core.inbound(mv(CHALLENGE_99), HOSTU) is None
    assert core.reply is None and core.counters.malformed == 1


def client_core(*addresses: str) -> Core:
    table = PeerTable()
    srv = Peer("server", [ip_network("0.0.0.0/0"), ip_network("::/0")])
    table.add(srv)
    table.move(srv, ("10.9.0.11", 9090))
    core = Core(table, PlainWire())
    core.set_addresses(ip_interface(a) for a in addresses)
    return core


def test_client_keepalive_announces_each_tunnel_address():
    core = client_core("192.168.53.99/24", "fd53::99/64")
    core.now = 30.0
    assert core.keepalives_due(25) == [(ANNOUNCE_99, ("10.9.0.11", 9090), None),
                                       (announce("fd53::99"), ("10.9.0.11", 9090), None)]
    core.now = 40.0
    assert core.keepalives_due(25) == []


def test_client_answers_a_challenge_for_its_address_only():
    core = client_core("192.168.53.99/24", "fd53::99/64")
    srv = ("10.9.0.11", 9090)
    core.now = 5.0
    assert core.inbound(mv(challenge("fd53::99")), srv) is None  # not written to the TUN
    assert core.reply == (announce("fd53::99"), srv, None)
    assert core.counters.challenges == 1 and core.peers.by_endpoint[srv].last_rx == 5.0
    core.reply = None
    assert core.inbound(mv(challenge("192.168.53.98")), srv) is None
    assert core.reply is None and core.counters.malformed == 1
    assert core.inbound(mv(b""), srv) is None  # the server's keepalive echo: no ping-pong
    assert core.reply is None
    assert core.inbound(mv(announce("192.168.53.1")), srv) is None  # harmless from a server
    assert core.counters.rx_packets == 0


# -- learning limits (issue 8, item 2) --------------------------------------------------------

def learning(max_peers=1024, max_per_endpoint=16, learn=("192.168.53.0/24", "fd53::/64"),
             own=("192.168.53.1", "fd53::1")) -> Core:
    core = server(learn=learn)
    core.set_learning([ip_network(n) for n in learn], own=[ip_address(a) for a in own],
                      max_peers=max_peers, max_per_endpoint=max_per_endpoint)
    return core


def test_learned_peer_table_is_bounded_and_known_peers_keep_working():
    core = learning(max_peers=3)
    for n, endpoint in zip((10, 11, 12), (HOSTU, HOSTU2, ("10.9.0.7", 1)), strict=True):
        assert core.inbound(mv(icmp_echo(f"192.168.53.{n}", "192.168.60.5")), endpoint)
    assert core.inbound(mv(icmp_echo("192.168.53.13", "192.168.60.5")), ("10.9.0.8", 1)) is None
    assert core.inbound(mv(ipv6("fd53::13", "fd60::5")), ("10.9.0.8", 1)) is None
    assert len(core.peers) == 3 and core.counters.drops() == {"table_full": 2}
    assert core.refused_from == {"table_full": ("10.9.0.8", 1)}
    assert core.inbound(mv(icmp_echo("192.168.53.10", "192.168.60.5")), HOSTU) is not None
    assert core.outbound(mv(icmp_echo("192.168.60.5", "192.168.53.11")))[1] == HOSTU2
    core.now = 1000.0  # all silent: once expired, there is room again
    assert len(core.peers.expire(older_than=900.0)) == 3
    assert core.inbound(mv(icmp_echo("192.168.53.13", "192.168.60.5")), ("10.9.0.8", 1))


def test_one_endpoint_claims_a_bounded_number_of_addresses():
    core = learning(max_per_endpoint=2)
    assert core.inbound(mv(icmp_echo("192.168.53.10", "192.168.60.5")), HOSTU)
    assert core.inbound(mv(ipv6("fd53::10", "fd60::5")), HOSTU)  # a dual-stack client: fine
    assert core.inbound(mv(icmp_echo("192.168.53.11", "192.168.60.5")), HOSTU) is None
    assert core.counters.drops() == {"endpoint_limit": 1}
    assert core.refused_from == {"endpoint_limit": HOSTU}
    assert core.inbound(mv(icmp_echo("192.168.53.11", "192.168.60.5")), HOSTU2)  # other endpoint
    assert core.inbound(mv(icmp_echo("192.168.53.10", "192.168.60.5")), HOSTU)  # known: still ok
    assert len(core.peers) == 3


@pytest.mark.parametrize("source", [
    "192.168.53.0", "192.168.53.255",    # the subnet's network and broadcast addresses
    "192.168.53.1", "fd53::1",           # the server's own
    "fd53::",                            # the Subnet-Router anycast address (the server's)
    "10.0.0.0", "10.255.255.255",        # a routed subnet's network and broadcast
    "0.0.0.0", "127.0.0.1", "224.0.0.1", "239.255.255.250", "255.255.255.255",
    "::", "::1", "ff02::1", "ff05::2", "fe80::1",
])
def test_never_learns_what_is_never_a_client(source):
    core = learning(learn=("192.168.53.0/24", "fd53::/64", "10.0.0.0/8", "0.0.0.0/0", "::/0"))
    packet = ipv6(source, "fd53::1") if ":" in source else ipv4(source, "192.168.53.1")
    assert core.inbound(mv(packet), HOSTU) is None
    assert core.counters.drops() == {"bad_source": 1} and len(core.peers) == 0


def test_both_addresses_of_a_point_to_point_subnet_are_hosts():
    core = learning(learn=("192.168.53.8/31", "192.168.53.12/30"), own=())
    assert core.inbound(mv(icmp_echo("192.168.53.8", "192.168.60.5")), HOSTU)
    assert core.inbound(mv(icmp_echo("192.168.53.9", "192.168.60.5")), HOSTU2)
    assert core.inbound(mv(icmp_echo("192.168.53.12", "192.168.60.5")), HOSTU2) is None
    assert core.inbound(mv(icmp_echo("192.168.53.13", "192.168.60.5")), HOSTU2)
    assert core.counters.drops() == {"bad_source": 1}


def test_refused_sources_are_dropped_before_anything_is_allocated():
    core = learning(max_peers=1)
    core.inbound(mv(icmp_echo("192.168.53.10", "192.168.60.5")), HOSTU)
    for n in range(2, 200):
        core.inbound(mv(ipv6(f"fd53::{n:x}", "fd53::1")), ("10.9.0.9", 1000 + n))
    assert len(core.peers) == 1 and core.counters.table_full == 198
    assert core.peers.by_endpoint.keys() == {HOSTU} and core.peers._per_endpoint == {HOSTU: 1}
