"""One WireGuard peer's state, sans-I/O: its keypairs, staged packets and timers.

The model is boringtun's `Tunn` and wireguard-go's device/{peer,timers,keypair,send}.go; the
rules below are wireguard-go's, line for line where it matters:

- Keypairs previous / current / next. Sending uses current. The initiator, on a response:
  previous <- next if there was an unconfirmed one (current dropped), else current; current <-
  new. The responder, on sending a response: next <- new, previous dropped; the first transport
  packet that authenticates on next promotes it (previous <- current, current <- next).
- Packets with no usable keypair are staged (at most STAGED_MAX, oldest dropped) and sent when
  one is there; a handshake is started for them.
- Timers are deadlines (monotonic `now`, seconds), fired by `tick(now)`, which the caller runs at
  least every ~250 ms - 1 s: retransmit the initiation after REKEY_TIMEOUT + jitter, give up
  after MAX_TIMER_HANDSHAKES retries (staged packets dropped), passive keepalive
  KEEPALIVE_TIMEOUT after data arrived with nothing sent, a new handshake when data was sent and
  nothing authenticated came back for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter, persistent
  keepalive, and all key material dropped REJECT_AFTER_TIME * 3 after the last new keypair.

Output: datagrams go to the device's outbox as (datagram, endpoint, local); `encapsulate`
returns its datagram directly (the hot path) for `session.endpoint`. `local` is the caller's
opaque note of the local address the peer's latest authenticated datagram arrived at (None if
unknown), so that what we send leaves from the address the peer talks to. Python cannot
overwrite the key bytes held by `cryptography`'s AEAD objects: "zeroing" drops every reference
to them (keypairs, handshake state) so that the library frees them.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from . import noise
from .cookie import CookieGenerator
from .keypair import DEFAULT_MTU, REJECT_AFTER_MESSAGES, REKEY_AFTER_MESSAGES, Keypair

if TYPE_CHECKING:
    from .device import Device

# device/constants.go
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.334
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)    # 18
KEEPALIVE_TIMEOUT = 10.0
ZERO_KEY_MATERIAL_AFTER = REJECT_AFTER_TIME * 3                 # 540 s
# The initiator's last-minute rekey when it receives on a keypair this old (receive.go).
LAST_MINUTE_REKEY = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT   # 165 s
STAGED_MAX = 128                                                # device/queueconstants.go

Endpoint = tuple        # a socket address as the caller's socket gives it: (host, port, ...)


class Session:
    """A configured peer: identity (public key, psk), endpoint, keypairs, staged packets, timers.

    Made by Device.add_peer. `user` is free for the caller (e.g. its peer-table entry)."""

    __slots__ = (
        "device", "public_key", "noise_peer", "cookies", "endpoint", "local",
        "persistent_keepalive",
        "mtu", "user",
        "previous", "current", "next", "initiation", "staged",
        "last_sent_handshake", "handshake_attempts", "sent_last_minute_handshake",
        "need_another_keepalive", "last_handshake_wall", "rx_bytes", "tx_bytes",
        "retransmit_at", "keepalive_at", "new_handshake_at", "zero_at", "persistent_at",
    )

    def __init__(self, device: Device, public_key: bytes, preshared_key: bytes | None = None,
                 endpoint: Endpoint | None = None, persistent_keepalive: int = 0,
                 mtu: int = DEFAULT_MTU) -> None:
        self.device = device
        self.public_key = public_key
        self.noise_peer = noise.Peer(public_key, preshared_key or noise.ZERO_KEY)
        self.cookies = CookieGenerator(public_key)
        self.endpoint = endpoint
        self.local: object = None       # see the module docstring
        self.persistent_keepalive = persistent_keepalive
        self.mtu = mtu
        self.user: object = None
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None
        self.initiation: noise.Initiation | None = None     # ours, waiting for a response
        self.staged: deque[bytes] = deque()
        self.last_sent_handshake: float | None = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.need_another_keepalive = False
        self.last_handshake_wall: float | None = None      # for STATUS: when one completed
        # wireguard-go's transfer counters: whole UDP payloads of every authenticated message
        # received (handshakes, keepalives, data) and of every datagram made for the peer
        self.rx_bytes = self.tx_bytes = 0
        # Timer deadlines (monotonic seconds) or None when not armed.
        self.retransmit_at: float | None = None
        self.keepalive_at: float | None = None
        self.new_handshake_at: float | None = None
        self.zero_at: float | None = None
        # Persistent keepalive: a configured peer with an endpoint speaks up at the first tick.
        self.persistent_at: float | None = 0.0 if persistent_keepalive and endpoint else None

    def __repr__(self) -> str:
        return f"Session(public_key={self.public_key.hex()}, endpoint={self.endpoint})"

    def configure(self, preshared_key: bytes | None, endpoint: Endpoint | None,
                  persistent_keepalive: int) -> None:
        """Replace the configuration, keeping the sessions (a reload)."""
        psk = preshared_key or noise.ZERO_KEY
        if psk != self.noise_peer.preshared_key:
            self.noise_peer.preshared_key = psk
        if endpoint is not None and endpoint != self.endpoint:
            self.endpoint, self.local = endpoint, None
        if persistent_keepalive != self.persistent_keepalive:
            self.persistent_keepalive = persistent_keepalive
            self.persistent_at = 0.0 if persistent_keepalive and self.endpoint else None

    # -- sending ---------------------------------------------------------------------------

    def encapsulate(self, packet: bytes, now: float) -> bytes | None:
        """The transport datagram carrying `packet` for `self.endpoint`, or None: staged (a
        handshake may be in the device's outbox). `packet` b"" is a keepalive."""
        kp = self.current
        if kp is None or self.staged or self.endpoint is None or \
                kp.send_counter >= REJECT_AFTER_MESSAGES or now - kp.created >= REJECT_AFTER_TIME:
            self._stage(packet)
            self.send_staged(now)
            return None
        datagram = kp.seal(packet, self.mtu)
        self.tx_bytes += len(datagram)
        # timersAnyAuthenticatedPacketTraversal, ...Sent, DataSent (send.go, timers.go)
        if self.persistent_keepalive:
            self.persistent_at = now + self.persistent_keepalive
        self.keepalive_at = None
        if packet and self.new_handshake_at is None:
            self.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
        # keepKeyFreshSending
        if kp.send_counter > REKEY_AFTER_MESSAGES or \
                (kp.is_initiator and now - kp.created > REKEY_AFTER_TIME):
            self.initiate(now)
        return datagram

    def _stage(self, packet: bytes) -> None:
        if len(self.staged) >= STAGED_MAX:
            self.staged.popleft()
            self.device.count_drop("staged_overflow")
        # a copy: the caller's packet may be a view of a buffer the next read overwrites
        self.staged.append(bytes(packet))

    def send_keepalive(self, now: float) -> None:
        """SendKeepalive: an empty packet unless data is already staged, then send them."""
        if not self.staged:
            self.staged.append(b"")
        self.send_staged(now)

    def send_staged(self, now: float) -> None:
        """Seal and send the staged packets in order, or start a handshake for them."""
        if not self.staged:
            return
        kp = self.current
        if kp is None or kp.send_counter >= REJECT_AFTER_MESSAGES or \
                now - kp.created >= REJECT_AFTER_TIME:
            self.initiate(now)
            return
        endpoint = self.endpoint
        if endpoint is None:
            return
        out, local = self.device.outbox, self.local
        staged, mtu, data = self.staged, self.mtu, False
        while staged:
            packet = staged.popleft()
            data = data or bool(packet)
            sealed = kp.seal(packet, mtu)
            self.tx_bytes += len(sealed)
            out.append((sealed, endpoint, local))
        if self.persistent_keepalive:
            self.persistent_at = now + self.persistent_keepalive
        self.keepalive_at = None
        if data and self.new_handshake_at is None:
            self.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
        if kp.send_counter > REKEY_AFTER_MESSAGES or \
                (kp.is_initiator and now - kp.created > REKEY_AFTER_TIME):
            self.initiate(now)

    def initiate(self, now: float, retry: bool = False) -> None:
        """SendHandshakeInitiation: at most one initiation per REKEY_TIMEOUT."""
        if not retry:
            self.handshake_attempts = 0
        if self.last_sent_handshake is not None and \
                now - self.last_sent_handshake < REKEY_TIMEOUT:
            return
        if self.endpoint is None:
            self.device.count_drop("no_endpoint")
            return
        self.last_sent_handshake = now
        device = self.device
        self.forget_initiation()
        index = device.new_index(self, None)
        init = noise.Initiation.create(device.identity, self.noise_peer, index,
                                       now + device.wall_offset)
        message = bytearray(init.message)
        self.cookies.write_macs(message, now)       # mac2 from a cookie reply, if we have one
        init.message = bytes(message)
        self.initiation = init
        if self.persistent_keepalive:
            self.persistent_at = now + self.persistent_keepalive
        self.keepalive_at = None
        self.tx_bytes += len(init.message)
        device.outbox.append((init.message, self.endpoint, self.local))
        self.retransmit_at = now + REKEY_TIMEOUT + self._jitter()

    def forget_initiation(self) -> None:
        if self.initiation is not None:
            self.device.drop_index(self.initiation.sender_index)
            self.initiation = None

    # -- handshake results (called by Device) ----------------------------------------------

    def authenticated_received(self, source: Endpoint, now: float, local: object = None
                               ) -> None:
        """Any authenticated message from the peer: the endpoint follows it, timers."""
        self.endpoint = source
        self.local = local
        if self.persistent_keepalive:
            self.persistent_at = now + self.persistent_keepalive
        self.new_handshake_at = None

    def responded(self, response: bytes, keypair: Keypair, now: float) -> None:
        """We answered an initiation: the new keypair waits in `next` for confirmation."""
        device = self.device
        self.forget_initiation()    # one handshake state per peer, as wireguard-go
        self.last_sent_handshake = now
        if self.next is not None:
            device.drop_index(self.next.local_index)
        if self.previous is not None:
            device.drop_index(self.previous.local_index)
        self.previous = None
        self.next = keypair
        self.zero_at = now + ZERO_KEY_MATERIAL_AFTER
        if self.persistent_keepalive:
            self.persistent_at = now + self.persistent_keepalive
        self.keepalive_at = None
        self.tx_bytes += len(response)
        device.outbox.append((response, self.endpoint, self.local))

    def response_consumed(self, keypair: Keypair, now: float) -> None:
        """Our initiation was answered: the new keypair is current at once."""
        device = self.device
        self.initiation = None      # its index now belongs to the keypair
        if self.next is not None:
            if self.current is not None:
                device.drop_index(self.current.local_index)
            self.current, self.next = self.next, None
        if self.previous is not None:
            device.drop_index(self.previous.local_index)
        self.previous, self.current = self.current, keypair
        self.zero_at = now + ZERO_KEY_MATERIAL_AFTER
        self._handshake_complete(now)
        self.send_keepalive(now)

    def confirm(self, keypair: Keypair, now: float) -> None:
        """ReceivedWithKeypair: the first authentic transport packet on `next`."""
        if self.previous is not None:
            self.device.drop_index(self.previous.local_index)
        self.previous, self.current, self.next = self.current, keypair, None
        self._handshake_complete(now)
        self.send_staged(now)

    def _handshake_complete(self, now: float) -> None:
        self.retransmit_at = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake_wall = now + self.device.wall_offset

    def keep_key_fresh_receiving(self, now: float) -> None:
        """The initiator's last-minute rekey on receive (receive.go)."""
        kp = self.current
        if not self.sent_last_minute_handshake and kp is not None and kp.is_initiator and \
                now - kp.created > LAST_MINUTE_REKEY:
            self.sent_last_minute_handshake = True
            self.initiate(now)

    # -- timers ----------------------------------------------------------------------------

    def _jitter(self) -> float:
        return self.device.jitter() * REKEY_TIMEOUT_JITTER_MAX

    def tick(self, now: float) -> None:
        """Fire every timer whose deadline has passed (timers.go's expired* functions)."""
        if self.retransmit_at is not None and now >= self.retransmit_at:
            self.retransmit_at = None
            if self.handshake_attempts > MAX_TIMER_HANDSHAKES:
                # Give up: drop what waited for a keypair; clear the residue later.
                self.keepalive_at = None
                self.flush_staged("handshake_timeout")
                if self.zero_at is None:
                    self.zero_at = now + ZERO_KEY_MATERIAL_AFTER
            else:
                self.handshake_attempts += 1
                self.initiate(now, retry=True)
        if self.keepalive_at is not None and now >= self.keepalive_at:
            self.keepalive_at = None
            self.send_keepalive(now)
            if self.need_another_keepalive:
                self.need_another_keepalive = False
                self.keepalive_at = now + KEEPALIVE_TIMEOUT
        if self.new_handshake_at is not None and now >= self.new_handshake_at:
            self.new_handshake_at = None
            self.initiate(now)
        if self.zero_at is not None and now >= self.zero_at:
            self.zero_at = None
            self.zero_and_flush_all()
        if self.persistent_at is not None and now >= self.persistent_at:
            self.persistent_at = None
            if self.persistent_keepalive:
                self.send_keepalive(now)

    def flush_staged(self, reason: str) -> None:
        if self.staged:
            self.device.count_drop(reason, len(self.staged))
            self.staged.clear()

    def zero_and_flush_all(self) -> None:
        """Drop every keypair, the handshake state and the staged packets."""
        device = self.device
        for kp in (self.previous, self.current, self.next):
            if kp is not None:
                device.drop_index(kp.local_index)
        self.previous = self.current = self.next = None
        self.forget_initiation()
        self.flush_staged("handshake_timeout")
