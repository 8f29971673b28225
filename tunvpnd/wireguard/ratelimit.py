"""A per-source token bucket for handshake messages, as wireguard-go's ratelimiter/.

20 messages a second, a burst of 5, per source IP. Used only under load and only for messages
with a valid mac2 (the sender proved it receives at its address), so the table stays small;
it is bounded anyway: idle entries (over 1 s) are swept when it is full, and a new source is
refused while it is still full.
"""

from __future__ import annotations

PACKETS_PER_SECOND = 20
PACKETS_BURSTABLE = 5
GARBAGE_COLLECT_TIME = 1.0
MAX_ENTRIES = 4096
_COST = 1.0 / PACKETS_PER_SECOND
_MAX_TOKENS = _COST * PACKETS_BURSTABLE


class RateLimiter:
    """allow(key, now) -> bool; `key` is the source IP (any hashable)."""

    __slots__ = ("_table", "max_entries")

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._table: dict[object, list[float]] = {}     # key -> [tokens (s), last time]
        self.max_entries = max_entries

    def __len__(self) -> int:
        return len(self._table)

    def allow(self, key: object, now: float) -> bool:
        entry = self._table.get(key)
        if entry is None:
            if len(self._table) >= self.max_entries:
                self.sweep(now)
                if len(self._table) >= self.max_entries:
                    return False
            self._table[key] = [_MAX_TOKENS - _COST, now]
            return True
        tokens = min(entry[0] + (now - entry[1]), _MAX_TOKENS)
        entry[1] = now
        if tokens > _COST - 1e-9:           # wireguard-go: tokens > cost, in integer ns
            entry[0] = tokens - _COST
            return True
        entry[0] = tokens
        return False

    def sweep(self, now: float) -> None:
        """Forget sources idle for more than GARBAGE_COLLECT_TIME."""
        stale = [k for k, (_t, last) in self._table.items() if now - last > GARBAGE_COLLECT_TIME]
        for key in stale:
            del self._table[key]
