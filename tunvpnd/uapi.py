"""The WireGuard cross-platform userspace API (UAPI), as wireguard-go answers it, so that the
unmodified `wg` tool shows a tunvpnd wireguard instance: /run/wireguard/IFNAME.sock.

`get=1\\n\\n` is answered with wireguard-go's lines in wireguard-go's order (device/uapi.go,
IpcGetOperation): private_key, listen_port, then per peer public_key, preshared_key,
protocol_version, endpoint, last_handshake_time_sec/nsec, tx_bytes, rx_bytes,
persistent_keepalive_interval, allowed_ip..., and `errno=0`. Keys in hex. Like wireguard-go's
socket, ours is mode 0600: the private and preshared keys reach only root and our own user,
which is what `wg showconf` needs.

`set=1` is refused with errno EPERM and a log line: the profile is the source of truth (edit
it, then reload), so a `wg set` can never make the running tunnel differ from its profile
without anyone noticing; a change made here would also be lost at the next restart.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from typing import Any

from . import transport

log = logging.getLogger("tunvpnd")

SOCKET_DIR = Path("/run/wireguard")  # wg looks there (as /var/run/wireguard): not per netns
SET_LIMIT = 1 << 16  # bytes of a set=1 request read (to answer it) before we hang up
_GET, _SET = b"get=1\n", b"set=1\n"


def socket_path(ifname: str) -> Path:
    return SOCKET_DIR / f"{ifname}.sock"


def get_text(private_key: bytes, listen_port: int, sessions: Any) -> str:
    """The answer to get=1 for our identity and `sessions` (the Device's, with their Peers)."""
    lines = [f"private_key={private_key.hex()}"]
    if listen_port:
        lines.append(f"listen_port={listen_port}")
    for session in sessions:
        peer = session.user
        lines += [f"public_key={session.public_key.hex()}",
                  f"preshared_key={session.noise_peer.preshared_key.hex()}",
                  "protocol_version=1"]
        if session.endpoint is not None:
            lines.append(f"endpoint={transport.format_endpoint(session.endpoint)}")
        when = session.last_handshake_wall or 0.0
        seconds = int(when)
        nanos = min(int(round((when - seconds) * 1e9)), 999_999_999)
        lines += [f"last_handshake_time_sec={seconds}",
                  f"last_handshake_time_nsec={nanos}",
                  f"tx_bytes={session.tx_bytes}",
                  f"rx_bytes={session.rx_bytes}",
                  f"persistent_keepalive_interval={session.persistent_keepalive}"]
        if peer is not None:
            lines += [f"allowed_ip={network}" for network in peer.allowed_ips]
    return "\n".join(lines) + "\nerrno=0\n\n"


class Protocol:
    """A control.Servers handler: `get` builds the get=1 text; `profile` names the source of
    truth in the line logged for a refused set=1."""

    def __init__(self, get, profile: str, reload_hint: str) -> None:
        self.get = get
        self.profile = profile
        self.reload_hint = reload_hint
        self._logged_at = -1.0e18

    def __call__(self, inbox: bytearray) -> tuple[bytes, int, bool] | None:
        if inbox.startswith(_GET):
            if len(inbox) <= len(_GET):
                return None
            if inbox[len(_GET)] != ord("\n"):  # as wireguard-go: a trailing character
                return _errno(errno.EINVAL), len(_GET) + 1, True
            return self.get().encode(), len(_GET) + 1, False
        if inbox.startswith(_SET):
            end = inbox.find(b"\n\n", len(_SET) - 1)
            if end < 0:
                if len(inbox) < SET_LIMIT:
                    return None
                self._refused()
                return _errno(errno.EPERM), len(inbox), True
            self._refused()
            return _errno(errno.EPERM), end + 2, False
        if len(inbox) < len(_GET) and (_GET.startswith(inbox) or _SET.startswith(inbox)):
            return None
        return b"", len(inbox), True  # wireguard-go hangs up on an unknown operation

    def _refused(self) -> None:
        now = time.monotonic()
        if now - self._logged_at >= 1.0:  # a loop of `wg set` is one line a second at most
            self._logged_at = now
            log.warning("refused a WireGuard UAPI set (wg set / wg setconf): the profile %s "
                        "is the source of truth: edit it, then %s", self.profile,
                        self.reload_hint)


def _errno(number: int) -> bytes:
    return f"errno=-{number}\n\n".encode()  # negative, as wireguard-go sends it
