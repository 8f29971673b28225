"""The forwarding loop: one thread, epoll on the TUN and the socket, no allocation per packet.

Each ready descriptor is drained until EAGAIN (or a budget, so one busy direction cannot starve
the other: epoll is level-triggered and brings us straight back). After the first packet we ask
poll() whether there is a second before reading again: a lone packet (a ping) is then forwarded
without waiting for a read to fail with EAGAIN, which costs Python an exception, and, with
offloads, without going through the batching. Packets are read into one preallocated buffer
per direction and handed on as memoryview slices of it.

With offloads (a TUN opened by tun.open_tun_offload) one TUN read may be a TCP super-packet: it
is split into IP packets, each goes through core.outbound, and the datagrams leave in as few
sendmsg() calls as UDP GSO allows. One recvmsg() with UDP GRO may hold many datagrams: each goes
through core.inbound, and consecutive segments of a flow are written to the TUN as one
super-packet. The packet work is in offload.py; here are only the system calls.

A server socket bound to a wildcard address (`pktinfo`) reads each datagram with the local
address it arrived at (core.received_at, kept with the peer by core.inbound) and sends each
datagram to a peer from that address (core.send_from, set by core.outbound), so a client that
talks to the server's second address gets its replies from there. Other sockets never pay for it.

A failed send is counted, never fatal. On the client, errors that mean the source address may be
gone set `rebind_wanted`; the service reconnects between wake-ups.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable

from . import transport
from .core import Core
from .offload import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_UDP_L4,
    NO_VNET_HDR,
    VNET_HDR,
    VNET_HDR_LEN,
    Coalescer,
    DatagramBatch,
    finish_checksum,
    split,
)
from .tun import TUN_F_USO4, TUN_F_USO6

log = logging.getLogger("tunvpnd")

BUFFER = 65536  # the largest IP packet; a bigger datagram arrives truncated and fails validation
BUDGET = 256    # packets per descriptor per wake-up
SUPER = 2 * 65536  # a TUN super-packet (or a GRO batch) and its headers, with room to spare
GSO_REFUSED = (errno.EINVAL, errno.EIO, errno.EOPNOTSUPP, errno.EMSGSIZE)
_SEGMENT_SIZE = struct.Struct("=H")  # the UDP_SEGMENT control message: a native u16
_GRO_SPACE = socket.CMSG_SPACE(4)  # the UDP_GRO control message: an int


def _readable(fd: int) -> Callable[[float], list]:
    """poll(timeout) on `fd` alone: a non-empty list if it is readable."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return poller.poll


class Forwarder:
    def __init__(self, tun_fd: int, sock: socket.socket, core: Core,
                 tun_offloads: int = 0, pktinfo: bool = False) -> None:
        """`tun_offloads`: the TUN_F_* flags open_tun_offload gave (0: a plain TUN).
        `pktinfo`: transport.enable_pktinfo said yes on `sock` (answer from the arrival address)."""
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
        self._net_bufs = [self._net_buf]
        self._net_view = memoryview(self._net_buf)
        self._one: list = [b""]  # sendmsg()'s buffer list, reused: no list per datagram
        self.pktinfo = pktinfo
        self._locals = transport.LocalAddresses(*transport.pktinfo_kind(sock) if pktinfo
                                                else (-1, -1))  # matches no control message
        self._batch_from: list | None = None  # the local address of the batch being built
        self.rebind_wanted = False
        self._tun_more = _readable(tun_fd)
        self._sock_more = _readable(sock.fileno())
        self.running = False
        self.offloads = tun_offloads
        self.gso = self.gro = False
        if tun_offloads:
            self.gso = transport.has_gso(sock)
            self.gro = transport.enable_gro(sock)
            self._tun_buf = bytearray(VNET_HDR_LEN + SUPER)
            self._tun_bufs = [self._tun_buf]
            self._tun_view = memoryview(self._tun_buf)
            self._net_buf = bytearray(SUPER)
            self._net_bufs = [self._net_buf]
            self._net_view = memoryview(self._net_buf)
            self._segments = memoryview(bytearray(2 * SUPER))
            self._batch = DatagramBatch(self._send_batch)
            both_uso = TUN_F_USO4 | TUN_F_USO6
            self._coalescer = Coalescer(self._write_tun, udp=tun_offloads & both_uso == both_uso,
                                        verify=not core.wire.authenticated)

    def describe_offloads(self) -> str:
        if not self.offloads:
            return "off"
        uso = self.offloads & TUN_F_USO4
        return (f"TUN checksum, TSO{', USO' if uso else ''}; UDP "
                f"GSO {'on' if self.gso else 'off'}, GRO {'on' if self.gro else 'off'}")

    def connect(self, endpoint: tuple | None) -> None:
        """Client mode: exchange datagrams with `endpoint` only (None: not known yet).

        A connected socket is disconnected first, so the kernel chooses the source address
        anew (a plain connect() would keep the old one, even when it is gone). OSError if the
        kernel refuses (no route); the socket is then unconnected.
        """
        if self.peer_endpoint is not None:
            transport.disconnect(self.sock)
            self.peer_endpoint = None
        if endpoint is not None:
            self.sock.connect(endpoint)
        self.peer_endpoint = endpoint
        self.rebind_wanted = False

    def _send_failed(self, error: OSError, count: int = 1) -> None:
        self.core.counters.send_failed += count
        if error.errno in transport.REBIND_ERRORS and self.peer_endpoint is not None:
            self.rebind_wanted = True

    def run(self, wake_fd: int, on_wake: Callable[[], None],
            on_tick: Callable[[float], float],
            others: dict[int, Callable[[], None]] | None = None) -> None:
        """Forward until `stop()`. `on_wake` runs when `wake_fd` is readable (signals);
        `on_tick(now)` runs when its timer is due and returns seconds until the next one.
        `others`: more descriptors to watch (the control sockets' epoll) and what to call when
        one is readable (one comparison per wake-up, nothing per packet)."""
        tun_fd, sock_fd = self.tun_fd, self.sock.fileno()
        others = others or {}
        poller = select.epoll()
        for fd in (tun_fd, sock_fd, wake_fd, *others):
            poller.register(fd, select.EPOLLIN)
        core = self.core
        wire = core.wire
        outbox = wire.outbox  # what the wire has to send of its own (wireguard), else empty
        if self.offloads:
            pump_tun, pump_socket = self.pump_tun_offload, self.pump_socket_offload
        else:
            pump_tun, pump_socket = self.pump_tun, self.pump_socket
        self.running = True
        next_tick = 0.0
        try:
            while self.running:
                now = core.now = wire.now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + on_tick(now)
                    if outbox:
                        self.send_outbox()
                for fd, _ in poller.poll(max(0.0, next_tick - now)):
                    if fd == tun_fd:
                        pump_tun()
                    elif fd == sock_fd:
                        pump_socket()
                    elif fd == wake_fd:
                        on_wake()
                    else:
                        others[fd]()
                if outbox:
                    self.send_outbox()
        finally:
            poller.close()

    def send_outbox(self) -> None:
        """The wire's own datagrams (handshakes, cookie replies, keepalives, packets that
        waited for a handshake), in order, then forgotten."""
        outbox = self.core.wire.outbox
        send = self.send
        for payload, endpoint, local in outbox:
            send(payload, endpoint, local)
        outbox.clear()

    def stop(self) -> None:
        self.running = False

    def pump_tun(self) -> None:
        """Packets from the kernel, out to their peers."""
        fd, bufs, view, sock = self.tun_fd, self._tun_bufs, self._tun_view, self.sock
        core, connected, one = self.core, self.peer_endpoint, self._one
        outbound = core.outbound
        more = self._tun_more
        for i in range(BUDGET):
            if i == 1 and not more(0):
                return
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
                elif core.send_from is not None:  # a pktinfo server: from the peer's address
                    one[0] = sealed[0]
                    sock.sendmsg(one, core.send_from, 0, sealed[1])
                else:
                    sock.sendto(sealed[0], sealed[1])
            except OSError as error:  # buffer full, or an ICMP error from an earlier datagram
                self._send_failed(error)

    def pump_socket(self) -> None:
        """Datagrams from peers, into the kernel."""
        fd, buf, view, sock, core = self.tun_fd, self._net_buf, self._net_view, self.sock, self.core
        inbound, counters, connected = core.inbound, core.counters, self.peer_endpoint
        more, pktinfo, bufs, local = self._sock_more, self.pktinfo, self._net_bufs, self._locals
        for i in range(BUDGET):
            if i == 1 and not more(0):
                return
            try:
                if connected is not None:
                    n, source = sock.recv_into(buf), connected
                elif pktinfo:  # the only control message asked for: the local address
                    n, control, _, source = sock.recvmsg_into(bufs, transport.PKTINFO_SPACE)
                    core.received_at = local[control[0][2]] if control else None
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

    # -- with offloads -------------------------------------------------------------------------

    def pump_tun_offload(self) -> None:
        """Packets and super-packets from the kernel, out to their peers in GSO batches."""
        fd, bufs, buf, view = self.tun_fd, self._tun_bufs, self._tun_buf, self._tun_view
        core = self.core
        outbound, counters = core.outbound, core.counters
        segments, add, header = self._segments, self._batch.add, VNET_HDR.unpack_from
        more, lone, lone_from = self._tun_more, None, None
        # A batch holds datagrams from one local address (pktinfo): a datagram from another
        # flushes it first. Without pktinfo send_from stays None and this never fires.
        flush = self._batch.flush
        for i in range(BUDGET):
            if i == 1:
                if not more(0):
                    break
                if lone is not None:  # not alone after all; the next read reuses the buffer
                    self._batch_from = lone_from
                    add(*lone)
                    lone = None
            try:
                n = os.readv(fd, bufs)
            except BlockingIOError:
                break
            flags, gso_type, _, gso_size, csum_start, csum_offset = header(buf)
            packet = view[VNET_HDR_LEN:n]
            if gso_type == GSO_NONE:
                if flags & F_NEEDS_CSUM and not finish_checksum(packet, csum_start, csum_offset):
                    counters.tun_failed += 1
                    continue
                sealed = outbound(packet)
                if sealed is not None:
                    if i:
                        if core.send_from is not self._batch_from:
                            flush()
                            self._batch_from = core.send_from
                        add(*sealed)
                    else:
                        lone, lone_from = sealed, core.send_from
                continue
            end, size = split(packet, gso_type, gso_size, csum_start, segments)
            if not end:
                counters.tun_failed += 1
                continue
            packets = segments[:end]
            for at in range(0, end, size):
                sealed = outbound(packets[at:at + size])
                if sealed is not None:
                    if core.send_from is not self._batch_from:
                        flush()
                        self._batch_from = core.send_from
                    add(*sealed)
        if lone is not None:  # a lone packet (a ping) goes as it is, no batch
            self.send(*lone, lone_from)
        flush()

    def _send_batch(self, data: memoryview, size: int, count: int, endpoint: tuple | None) -> None:
        """DatagramBatch's output: `count` datagrams of `size` bytes (the last maybe shorter)."""
        local = self._batch_from
        if count == 1:
            self.send(data, endpoint, local)
            return
        sock, connected = self.sock, self.peer_endpoint
        try:
            if self.gso:
                control = [(transport.SOL_UDP, transport.UDP_SEGMENT, _SEGMENT_SIZE.pack(size))]
                if connected is not None:
                    sock.sendmsg([data], control)
                else:
                    sock.sendmsg([data], control + local if local else control, 0, endpoint)
                return
        except OSError as error:
            if error.errno not in GSO_REFUSED:
                self._send_failed(error, count)
                return
            # EINVAL may be the path (GSO's fault) or the source address gone (not its fault):
            # if one datagram alone fails as well, keep GSO and count the batch as failed
            if not self.send(data[:size], endpoint, local):
                self.core.counters.send_failed += count - 1
                return
            # e.g. a path MTU below the segment size: one datagram per sendmsg from now on
            log.warning("UDP GSO refused (%s): sending datagrams one by one", error.strerror)
            self.gso = False
            data = data[size:]
        for at in range(0, len(data), size):
            self.send(data[at:at + size], endpoint, local)

    def pump_socket_offload(self) -> None:
        """Datagrams (GRO batches of them) from peers, into the kernel as super-packets."""
        bufs, view, receive = self._net_bufs, self._net_view, self.sock.recvmsg_into
        core = self.core
        inbound, counters, connected = core.inbound, core.counters, self.peer_endpoint
        add, local, space = self._coalescer.add, self._locals, _GRO_SPACE
        if self.pktinfo:
            space += transport.PKTINFO_SPACE
        more, lone = self._sock_more, None
        for i in range(BUDGET):
            if i == 1:
                if not more(0):
                    break
                if lone is not None:  # not alone after all; the next read reuses the buffer
                    add(lone)
                    lone = None
            try:
                n, control, _, source = receive(bufs, space)
            except BlockingIOError:
                break
            except OSError:  # ECONNREFUSED: the server's port was closed when we last sent
                counters.send_failed += 1
                continue
            if connected is not None:
                source = connected
            size = n
            for level, kind, data in control:
                if level == transport.SOL_UDP and kind == transport.UDP_GRO:
                    size = int.from_bytes(data, sys.byteorder)
                elif kind == local.kind and level == local.level:
                    core.received_at = local[data]
            if 0 < size < n:
                datagrams = view[:n]
                for at in range(0, n, size):
                    packet = inbound(datagrams[at:at + size], source)
                    if packet is not None:
                        add(packet)
                    elif core.reply is not None:
                        self.send(*core.reply)
                        core.reply = None
                continue
            packet = inbound(view[:n], source)
            if packet is not None:
                if i:
                    add(packet)
                else:
                    lone = packet
            elif core.reply is not None:
                self.send(*core.reply)
                core.reply = None
        if lone is not None:  # a lone packet (a ping) goes in as it is, no coalescing
            try:
                os.writev(self.tun_fd, [NO_VNET_HDR, lone])
            except OSError:
                counters.tun_failed += 1
        self._coalescer.flush()

    def _write_tun(self, data: memoryview, count: int) -> None:
        """Coalescer's output: a virtio header and a packet standing for `count` packets."""
        try:
            os.write(self.tun_fd, data)
            return
        except OSError as error:
            if count == 1 or error.errno != errno.EINVAL:
                self.core.counters.tun_failed += count
                return
        # This kernel does not take such a super-packet: its packets one by one, and no more
        # merging of that kind.
        _, gso_type, _, gso_size, csum_start, _ = VNET_HDR.unpack_from(data)
        kind = "UDP" if gso_type == GSO_UDP_L4 else "TCP"
        log.warning("the TUN refused a %s super-packet: writing %s packets one by one", kind,
                    kind)
        if gso_type == GSO_UDP_L4:
            self._coalescer.udp = False
        else:
            self._coalescer.tcp = False
        end, size = split(data[VNET_HDR_LEN:], gso_type, gso_size, csum_start, self._segments)
        packets = self._segments[:end]
        for at in range(0, end, size):
            try:
                os.writev(self.tun_fd, [NO_VNET_HDR, packets[at:at + size]])
            except OSError:
                self.core.counters.tun_failed += 1

    def send(self, payload: memoryview | bytes, endpoint: tuple | None,
             local: list | None = None) -> bool:
        """One datagram: keepalives, a lone packet, or a batch the kernel would not segment.
        `local`: the peer's Peer.local (send from that address). False if it failed (counted)."""
        try:
            if self.peer_endpoint is not None:
                self.sock.send(payload)
            elif local is not None:
                one = self._one
                one[0] = payload
                self.sock.sendmsg(one, local, 0, endpoint)
            else:
                self.sock.sendto(payload, endpoint)
        except OSError as error:
            self._send_failed(error)
            return False
        return True
