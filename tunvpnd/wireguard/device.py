"""A WireGuard device, sans-I/O: one local identity, many peers (Sessions), the index table,
the responder, load detection with cookie replies, and rate limiting (wireguard-go's
device/{device,receive,indextable}.go).

Input: datagrams with their source address, packets from the TUN (through a Session), and the
time: `now` is monotonic seconds; Unix time for TAI64N is `now + wall_offset` (the caller sets
it at construction and keeps it fresh through `tick(now, wall)`).

Output:
- `receive()` returns `(session, packet)` for an authenticated transport message, else None;
  a keepalive is `(session, b"")`. The caller must do the cryptokey-routing check: the
  packet's inner source must lie in that session's allowed IPs (the caller's peer table owns
  them; `session.user` is free for its entry).
- Datagrams to send collect in `outbox` as (datagram, endpoint, local); the caller sends and
  clears it after each call (or each batch). `local` is whatever the caller passed to
  `receive()` with the peer's latest authenticated datagram (its note of the local address
  that datagram arrived at), or None: replies leave from the address they were asked at.
  `Session.encapsulate()` returns its datagram directly.
- Every drop is counted in `drops[reason]` (reasons: DROP_REASONS) and the last one is in
  `last_drop`. Nothing unauthenticated creates state beyond the bounded rate-limit table, and a
  flood costs at most a MAC (and, under load, a cookie reply) per datagram, never a DH.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable

from . import noise
from .cookie import COOKIE_REPLY_SIZE, CookieChecker, source_bytes
from .keypair import TYPE_TRANSPORT, Keypair
from .ratelimit import RateLimiter
from .replay import ReplayFilter
from .session import KEEPALIVE_TIMEOUT, LAST_MINUTE_REKEY, REJECT_AFTER_TIME, Endpoint, Session

# Drop reasons (counter names for the packet core).
BAD_SIZE = "bad_size"                   # wrong length, unknown type, non-zero reserved bytes
BAD_MAC = "bad_mac"                     # mac1 wrong; a transport or cookie reply that did not open
BAD_HANDSHAKE = "bad_handshake"         # a handshake field did not authenticate / bad key
UNKNOWN_PEER = "unknown_peer"           # an initiation from a key we do not know
REPLAY = "replay"                       # an old TAI64N or a transport counter seen before
FLOOD = "flood"                         # an initiation within 20 ms of the peer's last one
NO_SESSION = "no_session"               # an unknown or stale receiver index, an expired keypair
COOKIE_SENT = "cookie_sent"             # under load without a valid mac2: a cookie reply instead
RATE_LIMITED = "rate_limited"           # under load, the source is over its token bucket
STAGED_OVERFLOW = "staged_overflow"     # more than 128 packets waited for a handshake
HANDSHAKE_TIMEOUT = "handshake_timeout"  # staged packets dropped: no handshake in 90 s
NO_ENDPOINT = "no_endpoint"             # something to send to a peer that never spoke
DROP_REASONS = (BAD_SIZE, BAD_MAC, BAD_HANDSHAKE, UNKNOWN_PEER, REPLAY, FLOOD, NO_SESSION,
                COOKIE_SENT, RATE_LIMITED, STAGED_OVERFLOW, HANDSHAKE_TIMEOUT, NO_ENDPOINT)

# "Under load": more than this many handshake messages with a valid mac1 in one second,
# device-wide, and for UNDER_LOAD_AFTER_TIME after. wireguard-go measures its queue (128 of
# 1024 waiting); a single-threaded loop has no queue, so we count. Why 100: one DH-heavy
# handshake costs this Python core ~0.2-0.5 ms, so 100/s is at most ~5 % of a CPU before
# cookies take over, while real peers rekey every 2 minutes: 100/s still serves ~12,000 peers
# rekeying at once. boringtun uses 10/s, which would turn a server restart with a few hundred
# peers into a round of cookie replies for nothing.
UNDER_LOAD_HANDSHAKES_PER_SECOND = 100
UNDER_LOAD_AFTER_TIME = 1.0
MAX_PEERS = 1 << 16                     # device/constants.go
INDEX_TABLE_MAX = MAX_PEERS * 4         # a handshake and three keypairs per peer at most

_HEADER = struct.Struct("<4sI")         # type + reserved, sender/receiver index
_TRANSPORT = struct.Struct("<4sIQ")
_TYPE_INITIATION = noise.TYPE_INITIATION
_TYPE_RESPONSE = noise.TYPE_RESPONSE
_TYPE_COOKIE = b"\x03\0\0\0"


class Device:
    """One local identity and its peers. Not thread-safe: one event loop drives it."""

    def __init__(self, private_key: bytes, *, wall_offset: float,
                 rng: random.Random | None = None) -> None:
        self.identity = noise.StaticIdentity(private_key)
        self.public_key = self.identity.public
        self.wall_offset = wall_offset
        self.rng = rng or random.SystemRandom()        # indices: unpredictable, as crypto/rand
        # timer jitter: any spread will do (wireguard-go's fastrandn), and this one is drawn
        # on most data packets (timersDataSent after each one received): no syscall for it
        self.jitter = (rng or random.Random()).random
        self.cookie_checker = CookieChecker(self.public_key)
        self.rate_limiter = RateLimiter()
        self.peers: dict[bytes, Session] = {}
        self._noise_peers: dict[bytes, noise.Peer] = {}
        # local index -> (session, keypair, replay filter); keypair None for our initiation.
        self.index: dict[int, tuple[Session, Keypair | None, ReplayFilter | None]] = {}
        self.outbox: list[tuple[bytes, Endpoint, object]] = []
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.last_drop: str | None = None
        self._load_window = -1.0e18
        self._load_count = 0
        self._under_load_until = -1.0e18

    # -- peers -----------------------------------------------------------------------------

    def add_peer(self, public_key: bytes, preshared_key: bytes | None = None,
                 endpoint: Endpoint | None = None, persistent_keepalive: int = 0) -> Session:
        """Add a peer, or reconfigure the one with this key (its sessions are kept)."""
        session = self.peers.get(public_key)
        if session is not None:
            session.configure(preshared_key, endpoint, persistent_keepalive)
            return session
        if public_key == self.public_key:
            raise ValueError("a peer cannot have our own public key")
        if len(self.peers) >= MAX_PEERS:
            raise ValueError(f"at most {MAX_PEERS} peers")
        session = Session(self, public_key, preshared_key, endpoint, persistent_keepalive)
        self.peers[public_key] = session
        self._noise_peers[public_key] = session.noise_peer
        return session

    def remove_peer(self, public_key: bytes) -> None:
        session = self.peers.pop(public_key, None)
        if session is None:
            return
        del self._noise_peers[public_key]
        session.zero_and_flush_all()
        session.staged.clear()

    def replace_peers(self, peers: Iterable[tuple[bytes, bytes | None, Endpoint | None, int]]
                      ) -> None:
        """Make the peer set exactly `peers` (key, psk, endpoint, keepalive): a reload."""
        wanted = {}
        for public_key, psk, endpoint, keepalive in peers:
            wanted[public_key] = self.add_peer(public_key, psk, endpoint, keepalive)
        for public_key in [k for k in self.peers if k not in wanted]:
            self.remove_peer(public_key)

    # -- the index table -------------------------------------------------------------------

    def new_index(self, session: Session, keypair: Keypair | None) -> int:
        """A fresh random local index for `session` (wireguard-go: NewIndexForHandshake)."""
        index = self.index
        if len(index) >= INDEX_TABLE_MAX:       # cannot happen with <= MAX_PEERS peers
            raise RuntimeError("index table full")
        getrandbits = self.rng.getrandbits
        while True:
            value = getrandbits(32)
            if value not in index:
                index[value] = (session, keypair, None if keypair is None else ReplayFilter())
                return value

    def drop_index(self, value: int) -> None:
        self.index.pop(value, None)

    # -- counters --------------------------------------------------------------------------

    def count_drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] += count
        self.last_drop = reason

    # -- input -----------------------------------------------------------------------------

    def receive(self, datagram: bytes, source: Endpoint, now: float, local: object = None
                ) -> tuple[Session, bytes] | None:
        """A datagram from `source`: (session, packet) for an authenticated transport message
        (packet b"" for a keepalive), else None (consumed: a handshake message or cookie reply,
        or dropped: see `last_drop`). `local`: the caller's note of where it arrived."""
        size = len(datagram)
        if size >= 32 and datagram[:4] == TYPE_TRANSPORT:
            # The hot path: one dict lookup, open, replay check, timers.
            _kind, receiver, counter = _TRANSPORT.unpack_from(datagram)
            entry = self.index.get(receiver)
            if entry is None or entry[1] is None:
                self.drops[NO_SESSION] += 1
                self.last_drop = NO_SESSION
                return None
            session, kp, replay = entry
            if now - kp.created >= REJECT_AFTER_TIME:
                self.drops[NO_SESSION] += 1
                self.last_drop = NO_SESSION
                return None
            opened = kp.open(datagram)
            if opened is None:
                self.drops[BAD_MAC] += 1
                self.last_drop = BAD_MAC
                return None
            counter, packet = opened
            if not replay.validate(counter):
                self.drops[REPLAY] += 1
                self.last_drop = REPLAY
                return None
            session.rx_bytes += size            # wireguard-go: counted before the allowed-IPs check
            if kp is session.next:
                session.endpoint = source
                session.confirm(kp, now)
            # timersAnyAuthenticatedPacket{Traversal,Received}, keepKeyFreshReceiving
            session.endpoint = source
            session.local = local
            if session.persistent_keepalive:
                session.persistent_at = now + session.persistent_keepalive
            session.new_handshake_at = None
            if kp.is_initiator and now - kp.created > LAST_MINUTE_REKEY:
                session.keep_key_fresh_receiving(now)
            if not packet:
                return session, packet          # a keepalive
            if session.keepalive_at is None:    # timersDataReceived
                session.keepalive_at = now + KEEPALIVE_TIMEOUT
            else:
                session.need_another_keepalive = True
            return session, packet
        kind = datagram[:4]
        if kind == _TYPE_INITIATION:
            if size != noise.INITIATION_SIZE:
                return self._drop(BAD_SIZE)
            self._initiation(datagram, source, now, local)
        elif kind == _TYPE_RESPONSE:
            if size != noise.RESPONSE_SIZE:
                return self._drop(BAD_SIZE)
            self._response(datagram, source, now, local)
        elif kind == _TYPE_COOKIE:
            if size != COOKIE_REPLY_SIZE:
                return self._drop(BAD_SIZE)
            self._cookie_reply(datagram, now)
        else:
            return self._drop(BAD_SIZE)         # unknown type, reserved bytes, too short
        return None

    def _drop(self, reason: str) -> None:
        self.drops[reason] += 1
        self.last_drop = reason

    def under_load(self, now: float) -> bool:
        return now < self._under_load_until

    def _admit(self, message: bytes, source: Endpoint, now: float, local: object) -> bool:
        """mac1, then (under load) mac2 or a cookie reply, and the per-source rate limit."""
        if not self.cookie_checker.mac1_ok(message):
            self._drop(BAD_MAC)
            return False
        if now - self._load_window >= 1.0:
            self._load_window, self._load_count = now, 0
        self._load_count += 1
        if self._load_count > UNDER_LOAD_HANDSHAKES_PER_SECOND:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME
        if now >= self._under_load_until:
            return True
        where = source_bytes(source)
        if not self.cookie_checker.mac2_ok(message, where, now):
            sender = _HEADER.unpack_from(message)[1]
            self.outbox.append((self.cookie_checker.cookie_reply(message, sender, where, now),
                                source, local))
            self._drop(COOKIE_SENT)
            return False
        if not self.rate_limiter.allow(source[0], now):
            self._drop(RATE_LIMITED)
            return False
        return True

    def _initiation(self, message: bytes, source: Endpoint, now: float, local: object) -> None:
        if not self._admit(message, source, now, local):
            return
        try:
            consumed = noise.consume_initiation(self.identity, message, self._noise_peers.get,
                                                now)
        except noise.HandshakeError as error:
            self._drop(error.reason)
            return
        session = self.peers[consumed.peer.public_key]
        session.rx_bytes += len(message)
        session.authenticated_received(source, now, local)
        session.forget_initiation()
        index = self.new_index(session, None)
        response, keypair = consumed.create_response(index, now)
        message_out = bytearray(response)
        session.cookies.write_macs(message_out, now)    # mac2 if the peer gave us a cookie
        self.index[index] = (session, keypair, ReplayFilter())
        session.responded(bytes(message_out), keypair, now)

    def _response(self, message: bytes, source: Endpoint, now: float, local: object) -> None:
        if not self._admit(message, source, now, local):
            return
        receiver = _HEADER.unpack_from(message, 4)[1]
        entry = self.index.get(receiver)
        session = entry[0] if entry is not None else None
        if session is None or entry[1] is not None or session.initiation is None or \
                session.initiation.sender_index != receiver:
            self._drop(NO_SESSION)
            return
        try:
            keypair = session.initiation.consume_response(message, now)
        except noise.HandshakeError as error:
            self._drop(error.reason)
            return
        session.rx_bytes += len(message)
        session.authenticated_received(source, now, local)
        self.index[receiver] = (session, keypair, ReplayFilter())
        session.response_consumed(keypair, now)

    def _cookie_reply(self, message: bytes, now: float) -> None:
        receiver = _HEADER.unpack_from(message)[1]
        entry = self.index.get(receiver)
        if entry is None:
            self._drop(NO_SESSION)
            return
        if not entry[0].cookies.consume_reply(message, now):
            self._drop(BAD_MAC)

    # -- timers ----------------------------------------------------------------------------

    def tick(self, now: float, wall: float | None = None) -> None:
        """Run every peer's timers; call at least every ~250 ms - 1 s. `wall` (Unix time)
        refreshes wall_offset, should the wall clock have been set."""
        if wall is not None:
            self.wall_offset = wall - now
        for session in list(self.peers.values()):
            session.tick(now)
        if len(self.rate_limiter) and not self.under_load(now):
            self.rate_limiter.sweep(now)
