"""The anti-replay window of transport counters (RFC 6479), as wireguard-go's replay/replay.go.

A ring of 128 blocks of 64 bits remembers which counters arrived; the newest counter seen is
`last`, and a counter more than WINDOW_SIZE (8128) behind it is too old to tell and refused.
Moving forward clears only the blocks the window slides over, so each call costs O(1) on the
usual in-order path. Call `validate` only after the packet has authenticated: a forged
counter must never move the window.

Ported from wireguard-go (MIT, Copyright (C) 2017-2025 WireGuard LLC), replay/replay.go.
"""

from __future__ import annotations

REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1   # device/constants.go: RejectAfterMessages

_BLOCK_BIT_LOG = 6                          # 1 << 6 == 64 bits a block
_BLOCK_BITS = 1 << _BLOCK_BIT_LOG
_RING_BLOCKS = 1 << 7                       # 128 blocks, 8192 bits
WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS   # 8128: one block is always being reused
_BLOCK_MASK = _RING_BLOCKS - 1
_BIT_MASK = _BLOCK_BITS - 1


class ReplayFilter:
    """Which transport counters of one keypair have been accepted. Not thread-safe."""

    __slots__ = ("_last", "_ring")

    def __init__(self) -> None:
        self._last = 0
        self._ring = [0] * _RING_BLOCKS

    def reset(self) -> None:
        """Forget every counter (a fresh keypair)."""
        self._last = 0
        self._ring = [0] * _RING_BLOCKS

    def validate(self, counter: int, limit: int = REJECT_AFTER_MESSAGES) -> bool:
        """True, and remember it, if `counter` (a u64 off the wire) is new and below `limit`."""
        if not 0 <= counter < limit:
            return False
        ring = self._ring
        last = self._last
        if counter > last:
            # Slide forward: clear the blocks between the old and the new newest counter
            # (all of them at most once when the jump is longer than the ring).
            current = last >> _BLOCK_BIT_LOG
            diff = (counter >> _BLOCK_BIT_LOG) - current
            if diff:
                if diff > _RING_BLOCKS:
                    diff = _RING_BLOCKS
                for i in range(current + 1, current + diff + 1):
                    ring[i & _BLOCK_MASK] = 0
            self._last = counter
        elif last - counter > WINDOW_SIZE:
            return False            # behind the window: cannot tell, so refuse
        index = (counter >> _BLOCK_BIT_LOG) & _BLOCK_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = ring[index]
        if old & bit:
            return False            # seen before
        ring[index] = old | bit
        return True
