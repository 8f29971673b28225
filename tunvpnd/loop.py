"""The forwarding loop: one thread, epoll on the TUN and the socket, no allocation per packet.

Each ready descriptor is drained until EAGAIN (or a budget, so one busy direction cannot starve
the other: epoll is level-triggered and brings us straight back). Packets are read into one
preallocated buffer per direction and handed on as memoryview slices of it.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable

from .core import Core

BUFFER = 65536  # the largest IP packet; a bigger datagram arrives truncated and fails validation
BUDGET = 256    # packets per descriptor per wake-up


class Forwarder:
    def __init__(self, tun_fd: int, sock: socket.socket, core: Core) -> None:
        self.tun_fd = tun_fd
        self.sock = sock
        self.core = core
        # The client's socket is connected to the server: the kernel filters other senders,
        # and send()/recv_into() skip an address per packet.
        self.peer_endpoint: tuple | None = None
        self._tun_buf = bytearray(BUFFER)
        self._tun_bufs = [self._tun_buf]
        self._tun_view = memoryview(self._tun_buf)
        self._net_buf = bytearray(BUFFER)
        self._net_view = memoryview(self._net_buf)
        self.running = False

    def connect(self, endpoint: tuple | None) -> None:
        """Client mode: exchange datagrams with `endpoint` only (None: not known yet)."""
        if endpoint is not None:
            self.sock.connect(endpoint)
        self.peer_endpoint = endpoint

    def run(self, wake_fd: int, on_wake: Callable[[], None],
            on_tick: Callable[[float], float]) -> None:
        """Forward until `stop()`. `on_wake` runs when `wake_fd` is readable (signals);
        `on_tick(now)` runs when its timer is due and returns seconds until the next one."""
        tun_fd, sock_fd = self.tun_fd, self.sock.fileno()
        poller = select.epoll()
        for fd in (tun_fd, sock_fd, wake_fd):
            poller.register(fd, select.EPOLLIN)
        core = self.core
        self.running = True
        next_tick = 0.0
        try:
            while self.running:
                now = core.now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + on_tick(now)
                for fd, _ in poller.poll(max(0.0, next_tick - now)):
                    if fd == tun_fd:
                        self.pump_tun()
                    elif fd == sock_fd:
                        self.pump_socket()
                    else:
                        on_wake()
        finally:
            poller.close()

    def stop(self) -> None:
        self.running = False

    def pump_tun(self) -> None:
        """Packets from the kernel, out to their peers."""
        fd, bufs, view, sock = self.tun_fd, self._tun_bufs, self._tun_view, self.sock
        outbound, counters, connected = self.core.outbound, self.core.counters, self.peer_endpoint
        for _ in range(BUDGET):
            try:
                n = os.readv(fd, bufs)
            except BlockingIOError:
                return
            sealed = outbound(view[:n])
            if sealed is None:
                continue
            try:
                if connected is not None:
                    sock.send(sealed[0])
                else:
                    sock.sendto(sealed[0], sealed[1])
            except OSError:  # buffer full, or an ICMP error from an earlier datagram
                counters.send_failed += 1

    def pump_socket(self) -> None:
        """Datagrams from peers, into the kernel."""
        fd, buf, view, sock, core = self.tun_fd, self._net_buf, self._net_view, self.sock, self.core
        inbound, counters, connected = core.inbound, core.counters, self.peer_endpoint
        for _ in range(BUDGET):
            try:
                if connected is not None:
                    n, source = sock.recv_into(buf), connected
                else:
                    n, source = sock.recvfrom_into(buf)
            except BlockingIOError:
                return
            except OSError:  # ECONNREFUSED: the server's port was closed when we last sent
                counters.send_failed += 1
                continue
            packet = inbound(view[:n], source)
            if packet is not None:
                try:
                    os.write(fd, packet)
                except OSError:
                    counters.tun_failed += 1
            elif core.reply is not None:
                self.send(*core.reply)
                core.reply = None

    def send(self, payload: bytes, endpoint: tuple) -> None:
        """One datagram outside the hot path (keepalives)."""
        try:
            if self.peer_endpoint is not None:
                self.sock.send(payload)
            else:
                self.sock.sendto(payload, endpoint)
        except OSError:
            self.core.counters.send_failed += 1
