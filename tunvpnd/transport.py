"""The UDP socket that carries the tunnel: addresses, binding, connecting, buffer sizes."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, ip_address

# Large buffers absorb bursts instead of dropping them: with the kernel default (~200 kB) a fast
# TCP flow through the tunnel loses packets at the socket and retransmits.
SOCKET_BUFFER = 4 * 1024 * 1024
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # <asm-generic/socket.h>; not in Python's socket module
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104  # <linux/udp.h>: GSO send (4.18), GRO receive (5.0)


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


def sockaddr(family: int, host: str, port: int) -> tuple:
    """host:port as a socket of `family` reports it (dual-stack sockets see IPv4 v4-mapped)."""
    host = str(ip_address(host))  # the spelling inet_ntop gives, as recvfrom() will report it
    if family == socket.AF_INET6:
        if family_of(host) == socket.AF_INET:
            host = "::ffff:" + host
        return (host, port, 0, 0)
    return (host, port)


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
    except OSError:
        sock.close()
        raise
    return sock


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


def format_endpoint(endpoint: tuple | None) -> str:
    if endpoint is None:
        return "(unknown)"
    host, port = endpoint[0], endpoint[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
