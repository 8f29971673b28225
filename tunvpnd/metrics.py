"""Prometheus metrics at http://ADDRESS/metrics (profile key `metrics:`).

The names and labels are prometheus_wireguard_exporter's, so its dashboards work unchanged:
`wireguard_sent_bytes_total`, `wireguard_received_bytes_total` and
`wireguard_latest_handshake_seconds` (a Unix time, 0 for never), each with `interface`,
`public_key`, `allowed_ips` (comma-separated, as the exporter writes them) and `name` (the
peer's profile name). tunvpnd adds `tunvpnd_up`, `tunvpnd_peers`,
`tunvpnd_dropped_packets_total{reason}` and `tunvpnd_latest_packet_seconds`.
The plain wire has no keys and no handshakes: its peers get the byte counters with an empty
`public_key` (to Prometheus, the same as no such label), no handshake gauge, and
`tunvpnd_latest_packet_seconds` says when they were last heard from.

Everything comes from the status snapshot (tunvpnd.status), the same as `tunvpnd show`, so the
two cannot disagree, and nothing is counted per packet for it.

Served from the forwarding loop (a TCP listener of control.Servers), not with
prometheus_client's start_http_server: that is a threaded HTTP server with no limits (a thread
per connection, each waiting forever for its request, which it reads without a size bound), so
1,000 idle connections would be 1,000 threads; each of them would take the GIL from the loop,
and a thread reading the packet core's state while the loop changes it needs locks the hot path
should not pay for. Here the snapshot is built in the loop, the request is read with the
control sockets' bounds (16 connections, 8 KiB, 5 seconds each), and the text is rendered at
most once per RENDER_INTERVAL however many scrapers ask.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

try:
    from prometheus_client import CONTENT_TYPE_LATEST
except ImportError:  # older releases keep it in exposition only
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("tunvpnd")

REQUEST_LIMIT = 8192  # bytes of request head; a longer one is not answered
RENDER_INTERVAL = 1.0  # seconds: scrapes within this share one rendering
DEFAULT_PORT = 9586  # prometheus_wireguard_exporter's
PATH = "/metrics"

_PEER_LABELS = ("interface", "public_key", "allowed_ips", "name")


class SnapshotCollector:
    """A prometheus_client collector over one status snapshot (`doc`), set before each
    rendering. `reasons`: every drop reason, so that each counter exists from the start (a
    counter appearing only at its first drop would hide that drop from rate())."""

    def __init__(self, reasons: Iterable[str] = ()) -> None:
        self.reasons = tuple(dict.fromkeys(reasons))  # the core's and the wire's, once each
        self.doc: dict | None = None

    def collect(self) -> Iterator:
        doc = self.doc
        if doc is None:
            return
        ifname = doc["ifname"]
        up = GaugeMetricFamily("tunvpnd_up", "1 while the tunvpnd instance forwards",
                               labels=("interface", "wire", "mode"))
        up.add_metric((ifname, doc["wire"], doc["mode"]), 1)
        yield up
        peers = GaugeMetricFamily("tunvpnd_peers", "Peers configured or learned",
                                  labels=("interface",))
        peers.add_metric((ifname,), len(doc["peers"]))
        yield peers
        drops = CounterMetricFamily("tunvpnd_dropped_packets", "Packets dropped, by reason",
                                    labels=("interface", "reason"))
        counts = doc["drops"]
        for reason in (*self.reasons, *(r for r in counts if r not in self.reasons)):
            drops.add_metric((ifname, reason), counts.get(reason, 0))
        yield drops

        sent = CounterMetricFamily("wireguard_sent_bytes", "Bytes sent to the peer",
                                   labels=_PEER_LABELS)
        received = CounterMetricFamily("wireguard_received_bytes", "Bytes received from the peer",
                                       labels=_PEER_LABELS)
        handshake = GaugeMetricFamily("wireguard_latest_handshake_seconds",
                                      "Unix time of the latest handshake with the peer "
                                      "(0: never)", labels=_PEER_LABELS)
        heard = GaugeMetricFamily("tunvpnd_latest_packet_seconds",
                                  "Unix time of the latest datagram from the peer (0: never)",
                                  labels=_PEER_LABELS)
        for peer in doc["peers"]:
            labels = (ifname, peer.get("public_key") or "", ",".join(peer["allowed_ips"]),
                      peer["name"])
            sent.add_metric(labels, peer["tx_bytes"])
            received.add_metric(labels, peer["rx_bytes"])
            if "latest_handshake" in peer:  # wireguard only
                handshake.add_metric(labels, peer["latest_handshake"] or 0)
            heard.add_metric(labels, peer["latest_packet"] or 0)
        yield sent
        yield received
        if doc["wire"] != "plain":
            yield handshake
        yield heard


class Endpoint:
    """A control.Servers handler answering HTTP GET/HEAD /metrics, one request a connection.
    `snapshot` is called in the loop, at most once per RENDER_INTERVAL."""

    def __init__(self, snapshot: Callable[[], dict], reasons: Iterable[str] = ()) -> None:
        self.snapshot = snapshot
        self.collector = SnapshotCollector(reasons)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._body = b""
        self._rendered_at = -1.0e18

    def render(self) -> bytes:
        now = time.monotonic()
        if now - self._rendered_at >= RENDER_INTERVAL:
            self.collector.doc = self.snapshot()
            try:
                self._body = generate_latest(self.registry)
            finally:
                self.collector.doc = None
            self._rendered_at = now
        return self._body

    def __call__(self, inbox: bytearray) -> tuple[bytes, int, bool] | None:
        end = inbox.find(b"\r\n\r\n")
        if end < 0:
            end = inbox.find(b"\n\n")  # a bare-LF client, as HTTP servers tolerate
            if end < 0:
                return None  # more to come (control.Servers hangs up past REQUEST_LIMIT)
        line = bytes(inbox[:inbox.find(b"\n")]).strip()
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response(400, b"bad request\n"), len(inbox), True
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != PATH.encode():
            return _response(404, b"not found: metrics are at /metrics\n",
                             head=method == b"HEAD"), len(inbox), True
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET and HEAD\n", extra=b"Allow: GET, HEAD\r\n"), \
                len(inbox), True
        try:
            body = self.render()
        except Exception:  # noqa: BLE001 - a bug here must not stop the loop that calls us
            log.exception("metrics: could not render")
            return _response(500, b"internal error\n"), len(inbox), True
        return _response(200, body, CONTENT_TYPE_LATEST, method == b"HEAD"), len(inbox), True


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              head: bool = False, extra: bytes = b"") -> bytes:
    header = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()
    return header + extra + b"\r\n" + (b"" if head else body)
