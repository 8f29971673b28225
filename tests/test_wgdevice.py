"""Unit tests of tunvpnd.wireguard.device: dispatch by type, malformed input of each type,
unknown keys, the index table, peers added/removed, load detection with cookie replies (no DH
under a flood) and the per-source rate limit."""

from __future__ import annotations

import os
import random

import pytest

from tests.test_wgsession import A_EP, B_EP, Pair, ping
from tunvpnd.wireguard import cookie, noise
from tunvpnd.wireguard import device as D
from tunvpnd.wireguard.ratelimit import RateLimiter


def established() -> Pair:
    p = Pair()
    p.send(p.a, ping(1))
    p.send(p.b, ping(1, "192.168.53.1", "192.168.53.99"))
    return p


def assert_still_works(p: Pair) -> None:
    before = len(p.tun[p.b])
    p.send(p.a, ping(99))
    assert p.tun[p.b][before:] == [ping(99)]


def fake_initiation(to_public: bytes) -> bytes:
    """148 random bytes with the right type and a valid mac1: costs the responder a DH."""
    message = bytearray(b"\x01\0\0\0" + os.urandom(144))
    cookie.write_macs(message, cookie.mac1_key(to_public), None)
    return bytes(message)


@pytest.fixture
def dh_calls(monkeypatch):
    calls = []
    real = noise._dh

    def counting(private, public):
        calls.append(1)
        return real(private, public)

    monkeypatch.setattr(noise, "_dh", counting)
    return calls


def test_malformed_messages_of_each_type_are_dropped_by_reason():
    p = established()
    b = p.b
    init = noise.Initiation.create(p.a.identity, p.sa.noise_peer, 5, 1.0)
    transport = bytes(p.sa.current.seal(ping(2)))
    cases = [
        (b"", "bad_size"), (b"\x01", "bad_size"), (init.message[:-1], "bad_size"),
        (init.message + b"\0", "bad_size"), (b"\x01\x01" + init.message[2:], "bad_size"),
        (b"\x02\0\0\0" + bytes(87), "bad_size"),
        (b"\x03\0\0\0" + bytes(59), "bad_size"), (b"\x04\0\0\0" + bytes(27), "bad_size"),
        (b"\x05\0\0\0" + bytes(60), "bad_size"), (b"\x04\0\0\1" + transport[4:], "bad_size"),
        (init.message[:-40] + bytes(40), "bad_mac"),                       # mac1 wrong
        (fake_initiation(b.public_key), "bad_handshake"),
        (b"\x02\0\0\0" + bytes(88), "bad_mac"),
        (b"\x03\0\0\0" + os.urandom(60), "no_session"),
        (b"\x04\0\0\0" + os.urandom(60), "no_session"),
        (transport[:20] + bytes([transport[20] ^ 1]) + transport[21:], "bad_mac"),
    ]
    for datagram, reason in cases:
        b.last_drop = None
        assert b.receive(datagram, A_EP, p.now) is None, reason
        assert b.last_drop == reason, (datagram[:8], reason, b.last_drop)
    # A cookie reply for a known index that does not open; a response with a valid mac1 for
    # a known index that is not an outstanding initiation.
    known = p.sb.current.local_index
    b.receive(b"\x03\0\0\0" + known.to_bytes(4, "little") + os.urandom(56), A_EP, p.now)
    assert b.last_drop == "bad_mac"
    response = bytearray(b"\x02\0\0\0" + os.urandom(4) + known.to_bytes(4, "little") +
                         os.urandom(80))
    cookie.write_macs(response, b.identity.mac1_key, None)
    b.receive(bytes(response), A_EP, p.now)
    assert b.last_drop == "no_session"
    assert_still_works(p)


def test_random_datagrams_never_raise():
    p = established()
    rng = random.Random(7)
    for _ in range(2000):
        size = rng.choice((0, 1, 4, 31, 32, 64, 92, 148, rng.randrange(200)))
        head = bytes([rng.choice((1, 2, 3, 4, 9)), 0, 0, 0])
        p.b.receive((head + rng.randbytes(size))[:size], A_EP, p.now)
    assert sum(p.b.drops.values()) == 2000 and p.b.drops["bad_handshake"] == 0
    assert_still_works(p)


def test_response_to_wrong_or_garbled_initiation(dh_calls):
    p = Pair()
    p.sa.initiate(p.now)
    init = p.a.outbox.pop()[0]
    p.b.receive(init, A_EP, p.now)
    response = bytearray(p.b.outbox.pop()[0])
    response[20] ^= 1                                  # inside the ephemeral: mac1 now wrong
    cookie.write_macs(response, p.a.identity.mac1_key, None)  # ... made right again
    assert p.a.receive(bytes(response), B_EP, p.now) is None
    assert p.a.last_drop == "bad_handshake" and p.sa.current is None


def test_initiation_from_an_unknown_key():
    p = Pair()
    stranger = noise.StaticIdentity(os.urandom(32))
    init = noise.Initiation.create(stranger, noise.Peer(p.b.public_key), 9, 1.0)
    assert p.b.receive(init.message, ("10.9.0.66", 1), p.now) is None
    assert p.b.last_drop == "unknown_peer" and p.b.index == {} and not p.b.outbox


def test_replayed_initiation_and_flood_guard():
    p = Pair()
    p.sa.initiate(p.now)
    init = p.a.outbox.pop()[0]
    p.b.receive(init, A_EP, p.now)
    p.b.outbox.clear()
    p.b.receive(init, A_EP, p.now + 1)
    assert p.b.last_drop == "replay"
    again = noise.Initiation.create(p.a.identity, p.sa.noise_peer, 8, p.now + 0.05 +
                                    p.a.wall_offset)
    p.b.receive(again.message, A_EP, p.now + 0.01)
    assert p.b.last_drop == "flood" and not p.b.outbox


def test_indices_are_random_from_the_rng_and_bounded_by_the_peers():
    p = established()
    indices = set(p.b.index)
    assert len(indices) == 1 and all(0 <= i < 2**32 for i in indices)
    expected = random.Random(2).getrandbits(32)
    assert p.sb.current.local_index == expected
    for _ in range(10):                           # many rekeys: old keypairs leave the table
        p.advance(6)
        p.sb.initiate(p.now)
        p.pump()
        p.send(p.b, ping(3, "192.168.53.1", "192.168.53.99"))
    assert len(p.a.index) <= 3 and len(p.b.index) <= 3


def test_remove_and_replace_peers():
    p = established()
    stale = bytes(p.sa.current.seal(ping(5)))
    other = os.urandom(32)
    p.b.replace_peers([(p.a.public_key, None, None, 0), (noise.StaticIdentity(other).public,
                                                          None, ("10.9.0.7", 1), 0)])
    assert len(p.b.peers) == 2 and p.b.receive(stale, A_EP, p.now) is not None   # kept
    p.b.remove_peer(p.a.public_key)
    assert p.b.receive(bytes(p.sa.current.seal(ping(6))), A_EP, p.now) is None
    assert p.b.last_drop == "no_session" and p.b.index == {}
    with pytest.raises(ValueError):
        p.b.add_peer(p.b.public_key)


def test_cookie_flow_under_load(dh_calls):
    p = Pair()
    b = p.b
    # 100 handshake messages with a valid mac1 in one second are fine: each costs a DH.
    for i in range(D.UNDER_LOAD_HANDSHAKES_PER_SECOND):
        b.receive(fake_initiation(b.public_key), (f"10.1.{i // 250}.{i % 250}", 1000), p.now)
    assert b.drops["bad_handshake"] == 100 and len(dh_calls) == 100 and not b.under_load(p.now)
    flood_dh = []

    def flood(start: float, batch: int) -> None:
        """120 more a second from as many sources: under load, cookie replies and no DH."""
        before = len(dh_calls)
        for i in range(120):
            b.receive(fake_initiation(b.public_key), (f"10.2.{i}.{batch}", 2000 + i),
                      start + i / 120)
        flood_dh.append(len(dh_calls) - before)

    flood(p.now, 0)
    assert b.under_load(p.now + 0.99)
    # The legitimate peer starts in the middle of the flood: a cookie reply, no DH by b.
    p.now += 1
    p.sa.initiate(p.now)
    init = p.a.outbox.pop()[0]
    before = len(dh_calls)
    assert b.receive(init, A_EP, p.now) is None and b.last_drop == "cookie_sent"
    assert len(dh_calls) == before
    reply, where, _local = b.outbox[-1]
    assert where == A_EP and len(reply) == 64 and reply[0] == 3
    assert p.a.receive(reply, B_EP, p.now) is None and p.a.last_drop is None
    assert not p.a.outbox                  # nothing resent at once
    for batch in range(1, 7):
        flood(p.now, batch)
        p.now += 1
    assert b.under_load(p.now)
    # a's retransmit (after 5 s + jitter) carries mac2: b does the DH and answers.
    b.outbox.clear()
    p.a.tick(p.now)
    init = p.a.outbox.pop()[0]
    assert init[-16:] != bytes(16)
    b.receive(init, A_EP, p.now)
    assert b.last_drop == "cookie_sent"    # (the flood's) ... but no new drop for a:
    response = b.outbox.pop()[0]
    assert response[0] == 2 and not b.outbox
    assert p.a.receive(response, B_EP, p.now) is None and p.sa.current is not None
    p.pump()
    assert p.sb.current is not None        # confirmed by a's keepalive
    assert flood_dh == [0] * 7 and b.drops["cookie_sent"] == 7 * 120 + 1


def test_rate_limit_under_load_with_valid_mac2():
    limiter = RateLimiter(max_entries=2)
    now = 10.0
    assert [limiter.allow("x", now) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("x", now + 0.05)                   # 20/s refill
    assert not limiter.allow("x", now + 0.06)
    assert limiter.allow("y", now) and not limiter.allow("z", now)    # table full
    assert limiter.allow("z", now + 2)                      # idle ones swept
    assert len(limiter) <= 2


def test_replies_leave_from_the_local_address_the_message_arrived_at():
    """What the Device sends a peer carries the `local` note of that peer's latest
    authenticated datagram; a cookie reply carries the one of the initiation it answers."""
    p = Pair()
    p.sa.initiate(p.now)
    init = p.a.outbox.pop()[0]
    p.b.receive(init, A_EP, p.now, local="asked")
    response, endpoint, local = p.b.outbox.pop()
    assert (endpoint, local) == (A_EP, "asked")
    assert p.a.receive(response, B_EP, p.now, local="a-side") is None
    keepalive, endpoint, local = p.a.outbox.pop()            # confirms b's keypair
    assert (endpoint, local) == (B_EP, "a-side")
    assert p.b.receive(keepalive, A_EP, p.now, local="asked") == (p.sb, b"")
    p.sb.send_keepalive(p.now)
    assert p.b.outbox.pop()[1:] == (A_EP, "asked")           # a timer's send, later
    p.b._under_load_until = p.now + 10                       # noqa: SLF001 (force "under load")
    p.b.receive(fake_initiation(p.b.public_key), ("10.9.0.66", 1), p.now, local="other")
    assert p.b.outbox.pop()[1:] == (("10.9.0.66", 1), "other")
    assert p.b.last_drop == "cookie_sent"
