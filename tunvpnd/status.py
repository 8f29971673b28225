"""What `tunvpnd show` shows: one snapshot of an instance's state, and its text form.

The daemon builds the snapshot in its loop, between wake-ups, from what the packet core and
the WireGuard sessions count anyway: nothing here runs per packet. It is a plain dict that
travels as JSON over the control socket; the command renders it (so `show` and `show --json`
cannot disagree) and judges it for `--check`.

Byte counts are wireguard-go's definition: whole UDP payloads sent to and received from the
peer, handshakes and keepalives included (wireguard: the Session's counters; plain: the Peer's,
whose payload is the packet itself). Times are Unix seconds (integers), None if never.
The snapshot never holds a private or preshared key.
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import transport

HEALTHY_AGE = 180  # seconds: --check wants every configured peer heard from this recently


def snapshot(profile: Any, ifname: str, sock: Any, core: Any, device: Any = None) -> dict:
    """The instance's state now. `device`: the WireGuard Device (None on the plain wire)."""
    wall = time.time()
    to_wall = wall - time.monotonic()  # monotonic -> Unix seconds
    listen = sock.getsockname() if sock is not None else None
    drops = dict(core.counters.drops()) if core is not None else {}
    if core is not None:
        drops.update(core.wire.drops())
    counters = core.counters if core is not None else None
    doc: dict[str, Any] = {
        "name": profile.name,
        "mode": profile.mode,
        "wire": profile.wire,
        "ifname": ifname,
        "pid": os.getpid(),
        "now": int(wall),
        "public_key": _key(device.public_key) if device is not None else None,
        "listen": transport.format_endpoint(listen) if listen else None,
        "listen_port": listen[1] if listen else 0,
        "dropped": sum(drops.values()),
        "drops": drops,
        "rx_packets": counters.rx_packets if counters else 0,
        "tx_packets": counters.tx_packets if counters else 0,
        "keepalives": counters.keepalives if counters else 0,
        "staged": counters.staged if counters else 0,
        "peers": [],
    }
    if core is None:
        return doc
    for peer in core.peers.peers:
        session = peer.session
        endpoint = session.endpoint if session is not None else peer.endpoint
        entry: dict[str, Any] = {
            "name": peer.name,
            "learned": peer.learned,
            "endpoint": transport.format_endpoint(endpoint) if endpoint else None,
            "allowed_ips": [str(network) for network in peer.allowed_ips],
            "latest_packet": int(peer.last_rx + to_wall) if peer.last_rx > 0 else None,
        }
        if session is not None:
            when = session.last_handshake_wall
            entry.update({
                "public_key": _key(session.public_key),
                "latest_handshake": int(when) if when is not None else None,
                "up": session.current is not None,
                "rx_bytes": session.rx_bytes,
                "tx_bytes": session.tx_bytes,
                "persistent_keepalive": session.persistent_keepalive,
            })
        else:
            entry.update({
                "rx_bytes": peer.rx_bytes,
                "tx_bytes": peer.tx_bytes,
                "persistent_keepalive": profile.keepalive if profile.mode == "client" else 0,
            })
        doc["peers"].append(entry)
    return doc


def _key(key: bytes) -> str:
    from .wireguard.keys import encode_key  # only a wireguard instance has keys to show

    return encode_key(key)


# -- the text form, laid out like `wg show` ---------------------------------------------------


def render(doc: dict) -> str:
    now = doc["now"]
    lines = [f"instance: {doc['name']} ({doc['ifname']}, wire {doc['wire']}, pid {doc['pid']})"]
    if doc.get("public_key"):
        lines.append(f"  public key: {doc['public_key']}")
    if doc.get("listen"):
        lines.append(f"  listening: {doc['listen']}")
    drops = ", ".join(f"{reason} {count}" for reason, count in doc["drops"].items())
    lines.append(f"  dropped: {doc['dropped']}" + (f" ({drops})" if drops else ""))
    for peer in doc["peers"]:
        lines += ["", f"peer: {peer['name']}"]
        if peer.get("public_key"):
            lines.append(f"  public key: {peer['public_key']}")
        if peer["endpoint"]:
            lines.append(f"  endpoint: {peer['endpoint']}")
        lines.append(f"  allowed ips: {', '.join(peer['allowed_ips']) or '(none)'}")
        if "latest_handshake" in peer:
            if peer["latest_handshake"] is not None:
                lines.append(f"  latest handshake: {ago(now - peer['latest_handshake'])}")
        elif peer["latest_packet"] is not None:
            lines.append(f"  latest packet: {ago(now - peer['latest_packet'])}")
        if peer["rx_bytes"] or peer["tx_bytes"]:
            lines.append(f"  transfer: {size(peer['rx_bytes'])} received, "
                         f"{size(peer['tx_bytes'])} sent")
        if peer["persistent_keepalive"]:
            lines.append(f"  persistent keepalive: every {duration(peer['persistent_keepalive'])}")
    return "\n".join(lines)


def duration(seconds: int) -> str:
    """wg's pretty_time: '1 minute, 12 seconds'."""
    seconds = max(0, int(seconds))
    parts = []
    for unit, length in (("year", 365 * 24 * 3600), ("day", 24 * 3600), ("hour", 3600),
                         ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, length)
        if count:
            parts.append(f"{count} {unit}{'' if count == 1 else 's'}")
    return ", ".join(parts)


def ago(seconds: int) -> str:
    return f"{duration(seconds)} ago" if seconds > 0 else "Now"


def size(count: int) -> str:
    """wg's pretty_bytes: B, then KiB, MiB, GiB, TiB with two decimals."""
    if count < 1024:
        return f"{count} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.2f} {unit}"
    return f"{count / 1024:.2f} TiB"


# -- the health check -------------------------------------------------------------------------


def healthy(doc: dict, max_age: float = HEALTHY_AGE) -> bool:
    """Every configured peer had a handshake (wireguard; plain: a packet) in the last `max_age`
    seconds. A server that only learns peers has none configured: healthy while it runs."""
    now = doc["now"]
    for peer in doc["peers"]:
        if peer["learned"]:
            continue
        when = peer.get("latest_handshake", peer["latest_packet"])
        if when is None or now - when >= max_age:
            return False
    return True
