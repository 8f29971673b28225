"""A minimal WireGuard peer on a plain UDP socket, built only from tunvpnd.wireguard's noise.py
and keypair.py, for the interop tests (run inside a lab namespace: `python -m tests.wgpeer`).

Reads one JSON object on stdin (test keys only), prints "ready" once its socket is bound, then
one JSON line with what happened. Modes:
  initiate: handshake with `endpoint`, then `count` ICMP echo requests tunnel_src -> tunnel_dst
            through the tunnel; report the echo replies that came back.
  respond:  answer the peer's initiation, then answer `count` ICMP echo requests sent to
            tunnel_src through the tunnel; report them.
  device-initiate, device-respond: the same through tunvpnd.wireguard.device.Device (the
            sans-I/O core with its timers, ticked every 250 ms), `count` echoes one at a time.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

from tests.ipcraft import checksum, icmp_echo, ipv4
from tunvpnd.wireguard import noise
from tunvpnd.wireguard.device import Device


def _icmp(packet: bytes) -> tuple[str, str, int, int, bytes] | None:
    """(src, dst, icmp type, seq, data) of an IPv4 ICMP echo packet, else None."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_ICMP:
        return None
    ihl = (packet[0] & 15) * 4
    body = packet[ihl:]
    kind, _code, _sum, _ident, seq = struct.unpack_from("!BBHHH", body)
    return (socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20]), kind, seq,
            bytes(body))


def _echo_reply(request: bytes) -> bytes:
    src, dst, _kind, _seq, body = _icmp(request)
    reply = b"\0\0\0\0" + body[4:]
    reply = reply[:2] + struct.pack("!H", checksum(reply)) + reply[4:]
    return ipv4(dst, src, reply, proto=socket.IPPROTO_ICMP)


def initiate(cfg: dict, sock: socket.socket, local: noise.StaticIdentity,
             peer: noise.Peer, deadline: float) -> dict:
    endpoint = tuple(cfg["endpoint"])
    init = noise.Initiation.create(local, peer, 0x1234567, time.time())
    sock.sendto(init.message, endpoint)
    keypair = None
    while keypair is None:
        data = _recv(sock, deadline)
        try:
            keypair = init.consume_response(data, time.monotonic())
        except noise.HandshakeError as error:
            return {"error": f"response refused: {error.reason}"}
    replies = []
    for seq in range(1, cfg["count"] + 1):
        request = icmp_echo(cfg["tunnel_src"], cfg["tunnel_dst"], ident=77, seq=seq)
        sock.sendto(keypair.seal(request), endpoint)
        while True:
            opened = keypair.open(_recv(sock, deadline))
            if opened is None:
                return {"error": "a datagram did not open", "replies": replies}
            counter, packet = opened
            if packet:                          # wireguard-go may send keepalives too
                break
        echo = _icmp(packet)
        replies.append({"counter": counter, "src": echo[0], "dst": echo[1], "type": echo[2],
                        "seq": echo[3], "same_data": echo[4][8:] == request[28:]})
    return {"replies": replies, "sent": keypair.send_counter}


def respond(cfg: dict, sock: socket.socket, local: noise.StaticIdentity,
            peer: noise.Peer, deadline: float) -> dict:
    peers = {peer.public_key: peer}
    keypair, confirmed, answered = None, False, []
    while len(answered) < cfg["count"]:
        data, source = _recvfrom(sock, deadline)
        if data[:1] == b"\x01":
            try:
                consumed = noise.consume_initiation(local, data, peers.get, time.monotonic())
            except noise.HandshakeError as error:
                return {"error": f"initiation refused: {error.reason}"}
            response, keypair = consumed.create_response(0x7654321, time.monotonic())
            confirmed = False
            sock.sendto(response, source)
        elif data[:1] == b"\x04" and keypair is not None:
            opened = keypair.open(data)
            if opened is None:
                return {"error": "a datagram did not open"}
            confirmed = True                    # we may send on it only from now on
            _counter, packet = opened
            echo = _icmp(packet) if packet else None
            if echo and echo[2] == 8 and echo[1] == cfg["tunnel_src"]:
                sock.sendto(keypair.seal(_echo_reply(packet)), source)
                answered.append({"src": echo[0], "seq": echo[3]})
    return {"answered": answered, "confirmed": confirmed}


class DeviceLoop:
    """A tiny event loop around a Device: a UDP socket, ticks every 250 ms."""

    def __init__(self, cfg: dict, sock: socket.socket) -> None:
        self.sock = sock
        self.dev = Device(bytes.fromhex(cfg["private"]),
                          wall_offset=time.time() - time.monotonic())
        psk = bytes.fromhex(cfg["psk"]) if cfg.get("psk") else None
        endpoint = tuple(cfg["endpoint"]) if cfg.get("endpoint") else None
        self.session = self.dev.add_peer(bytes.fromhex(cfg["peer_public"]), psk, endpoint)
        self.next_tick = time.monotonic()

    def flush(self) -> None:
        for datagram, endpoint, _local in self.dev.outbox:
            self.sock.sendto(datagram, endpoint)
        self.dev.outbox.clear()

    def send(self, packet: bytes) -> None:
        datagram = self.session.encapsulate(packet, time.monotonic())
        if datagram is not None:
            self.sock.sendto(datagram, self.session.endpoint)
        self.flush()

    def packet(self, deadline: float) -> bytes:
        """The next packet for the TUN, running timers meanwhile."""
        while True:
            now = time.monotonic()
            if now >= self.next_tick:
                self.dev.tick(now, time.time())
                self.flush()
                self.next_tick = now + 0.25
            if now >= deadline:
                raise TimeoutError
            self.sock.settimeout(max(0.001, min(self.next_tick, deadline) - now))
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            got = self.dev.receive(data, source, time.monotonic())
            self.flush()
            if got is not None and got[1]:    # data, not a keepalive
                return got[1]

    def report(self) -> dict:
        return {"drops": {k: v for k, v in self.dev.drops.items() if v},
                "initiator": self.session.current.is_initiator if self.session.current
                else None}


def device_initiate(cfg: dict, sock: socket.socket, deadline: float) -> dict:
    loop = DeviceLoop(cfg, sock)
    seqs, same = [], True
    for seq in range(1, cfg["count"] + 1):
        request = icmp_echo(cfg["tunnel_src"], cfg["tunnel_dst"], ident=77, seq=seq)
        loop.send(request)
        echo = _icmp(loop.packet(deadline))
        while echo is None or echo[2] != 0:
            echo = _icmp(loop.packet(deadline))
        seqs.append(echo[3])
        same = same and echo[4][8:] == request[28:] and echo[0] == cfg["tunnel_dst"]
    return {"seqs": seqs, "same_data": same, **loop.report()}


def device_respond(cfg: dict, sock: socket.socket, deadline: float) -> dict:
    loop = DeviceLoop(cfg, sock)
    answered = []
    while len(answered) < cfg["count"]:
        packet = loop.packet(deadline)
        echo = _icmp(packet)
        if echo and echo[2] == 8 and echo[1] == cfg["tunnel_src"]:
            loop.send(_echo_reply(packet))
            answered.append(echo[3])
    return {"answered": answered, **loop.report()}


def _recvfrom(sock: socket.socket, deadline: float) -> tuple[bytes, tuple]:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)
    return sock.recvfrom(65535)


def _recv(sock: socket.socket, deadline: float) -> bytes:
    return _recvfrom(sock, deadline)[0]


def main() -> int:
    cfg = json.loads(sys.stdin.readline())
    local = noise.StaticIdentity(bytes.fromhex(cfg["private"]))
    psk = bytes.fromhex(cfg["psk"]) if cfg.get("psk") else noise.ZERO_KEY
    peer = noise.Peer(bytes.fromhex(cfg["peer_public"]), psk)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(tuple(cfg["bind"]))
    print("ready", flush=True)
    deadline = time.monotonic() + cfg.get("timeout", 15)
    try:
        if cfg["mode"].startswith("device-"):
            run = device_initiate if cfg["mode"] == "device-initiate" else device_respond
            result = run(cfg, sock, deadline)
        else:
            run = initiate if cfg["mode"] == "initiate" else respond
            result = run(cfg, sock, local, peer, deadline)
    except TimeoutError:
        result = {"error": "timed out"}
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
