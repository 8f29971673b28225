"""The UDP socket that carries the tunnel: addresses, binding, connecting, buffer sizes, and
the underlay's own addresses as far as the socket cares (which source it sends from)."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from ipaddress import IPv4Address, ip_address

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
)

# Large buffers absorb bursts instead of dropping them: with the kernel default (~200 kB) a fast
# TCP flow through the tunnel loses packets at the socket and retransmits.
SOCKET_BUFFER = 4 * 1024 * 1024
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # <asm-generic/socket.h>; not in Python's socket module
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104  # <linux/udp.h>: GSO send (4.18), GRO receive (5.0)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)                 # <linux/in.h>
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)    # <linux/in6.h>
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
PKTINFO_SPACE = socket.CMSG_SPACE(20)  # struct in6_pktinfo; in_pktinfo (12) fits too
# send() errors after which the client's socket may hold a source address that is gone, or a
# route that changed: it is reconnected, so the kernel chooses the source again
REBIND_ERRORS = frozenset((errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EINVAL))
WILDCARDS = ("0.0.0.0", "::")


class AddressError(OSError):
    """A socket error whose message says which address it is about."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def is_ip(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def family_of(host: str) -> int:
    return socket.AF_INET if isinstance(ip_address(host), IPv4Address) else socket.AF_INET6


def resolve(host: str, port: int, family: int) -> tuple:
    """A socket address for host:port usable on a socket of `family`; raises OSError
    (socket.gaierror) when it does not resolve. An IPv4 answer for an IPv6 socket comes back
    v4-mapped. Blocking on a DNS name: the client calls it from a helper thread.
    """
    flags = socket.AI_V4MAPPED if family == socket.AF_INET6 else 0
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM, socket.IPPROTO_UDP, flags)
    return infos[0][4]


def client_family(host: str) -> int:
    """The socket family a client uses to reach `host`: a DNS name gets a dual-stack socket,
    since we cannot know the answer's family before the socket must be bound."""
    if is_ip(host):
        return family_of(host)
    return socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET


def open_udp(host: str, port: int, family: int | None = None) -> socket.socket:
    """A non-blocking UDP socket bound to host:port, with large buffers.

    `[::]` gets a dual-stack socket so one server answers IPv4 and IPv6 clients.
    """
    family = family or family_of(host)
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        for option, forced in ((socket.SO_RCVBUF, SO_RCVBUFFORCE),
                               (socket.SO_SNDBUF, SO_SNDBUFFORCE)):
            _set_buffer(sock, option, forced)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        where = format_endpoint((host, port))
        raise AddressError(error.errno, f"cannot listen on {where}: {error.strerror}") from None
    return sock


def enable_pktinfo(sock: socket.socket) -> bool:
    """On a socket bound to a wildcard address, ask for each datagram's local address (the
    IP_PKTINFO / IPV6_PKTINFO control message), so replies can leave from the address the
    client sent to: the kernel would pick the route's preferred source instead, and a client's
    connected socket discards a reply from any other address. False (nothing asked) otherwise.
    A dual-stack socket reports IPv4 datagrams' addresses v4-mapped, in IPV6_PKTINFO."""
    if sock.getsockname()[0] not in WILDCARDS:
        return False
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    return True


def pktinfo_kind(sock: socket.socket) -> tuple[int, int]:
    """(level, type) of the local-address control message on `sock`, received and sent."""
    if sock.family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, IPV6_PKTINFO
    return socket.IPPROTO_IP, IP_PKTINFO


class LocalAddresses(dict):
    """Received local-address control data -> the control list that makes sendmsg() send from
    that address. A dict so a hit costs no Python call; few entries (one per local address and
    interface), cleared when it would grow past a bound."""

    LIMIT = 64

    def __init__(self, level: int, kind: int) -> None:
        super().__init__()
        self.level, self.kind = level, kind

    def __missing__(self, data: bytes) -> list[tuple[int, int, bytes]]:
        if len(self) >= self.LIMIT:
            self.clear()
        if self.kind == IPV6_PKTINFO:
            # in6_pktinfo: the address, and the interface only where a link-local one needs it
            link_local = data[0] == 0xFE and data[1] & 0xC0 == 0x80
            info = data[:16] + (data[16:20] if link_local else bytes(4))
        else:
            # in_pktinfo: no interface (routing chooses, as for any reply), the local address
            # (ipi_spec_dst) as the source, ipi_addr unused on send
            info = bytes(4) + data[4:8] + bytes(4)
        control = self[data] = [(self.level, self.kind, info)]
        return control


def source_for(family: int, endpoint: tuple, mark: int = 0) -> str:
    """The source address the kernel would send from to `endpoint` now, as getsockname() on a
    socket of `family` (with SO_MARK `mark`, as ours) spells it. OSError (ENETUNREACH, ...)
    when there is no route."""
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if mark:  # the full tunnel's rules route a marked socket by the main table
            probe.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_MARK", 36), mark)
        probe.connect(endpoint)
        return probe.getsockname()[0]


_libc = ctypes.CDLL(None, use_errno=True)
_UNSPEC = bytes(16)  # a struct sockaddr whose sa_family is AF_UNSPEC (0)


def disconnect(sock: socket.socket) -> None:
    """Undo connect() on a UDP socket (connect to AF_UNSPEC, which Python cannot spell): the
    kernel forgets the source address it chose, and the port (bound as 0) with it."""
    if _libc.connect(sock.fileno(), _UNSPEC, len(_UNSPEC)) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


class AddressWatch:
    """Tells whether an address or a route was added or removed since the last look (either
    can change the source address the kernel picks for the server): a pyroute2 IPRoute bound
    to those multicast groups, read without blocking, a bounded number of messages a look."""

    READS = 32  # netlink messages read per look at most; the rest wait for the next one

    def __init__(self) -> None:
        self._ipr = IPRoute()
        try:
            self._ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
                           | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
            # our own handle on the socket, read with MSG_DONTWAIT whatever mode pyroute2
            # (0.7 threads, 0.9 asyncio) left it in; we only need to know something came
            self._sock = socket.socket(fileno=os.dup(self._ipr.fileno()))
        except BaseException:
            self._ipr.close()
            raise

    def changed(self) -> bool:
        seen = False
        for _ in range(self.READS):
            try:
                self._sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: we fell behind; something changed for sure
                pass
            seen = True
        return seen

    def close(self) -> None:
        self._sock.close()
        self._ipr.close()


def _set_buffer(sock: socket.socket, option: int, forced: int) -> None:
    # SO_*BUFFORCE (CAP_NET_ADMIN, which the daemon has anyway) passes net.core.*mem_max
    try:
        sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


def enable_gro(sock: socket.socket) -> bool:
    """Ask for UDP GRO: one recvmsg() may return several datagrams of one sender back to back,
    cut at the size a UDP_GRO control message gives. False if the kernel says no."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def has_gso(sock: socket.socket) -> bool:
    """Whether sendmsg() takes a UDP_SEGMENT control message on this socket."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def format_host(host: str) -> str:
    """An address as a user wrote it: IPv4 without the dual-stack socket's ::ffff: prefix."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def format_endpoint(endpoint: tuple | None) -> str:
    if endpoint is None:
        return "(unknown)"
    host, port = format_host(endpoint[0]), endpoint[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
