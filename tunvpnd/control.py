"""Non-blocking stream sockets served from the forwarding loop: the control socket
(RUN_DIR/NAME.sock, `tunvpnd show`), the WireGuard UAPI (/run/wireguard/IFNAME.sock), and the
Prometheus endpoint (TCP, profile key `metrics:`, tunvpnd.metrics).

Everything lives behind one epoll descriptor of its own (`fileno()`), which the forwarding
loop watches beside the TUN and the UDP socket: the loop pays nothing per packet, and a wake-up
for a client costs one `on_ready()`. What a client can make us do is bounded, so a slow or
hostile one cannot stall forwarding or grow memory:
- at most MAX_CONNECTIONS at once per socket: a new one closes the oldest;
- at most ACCEPTS_PER_WAKE accepts and one read of READ_SIZE bytes per ready connection per
  wake-up;
- a request larger than the protocol's limit closes the connection;
- every connection is closed DEADLINE seconds after it was accepted, answered or not
  (`tick()`, from the service's timer).
Only root and our own user may talk to us on a Unix socket: it is mode 0600, and SO_PEERCRED
is checked on accept in case the directory lets someone else reach it. The TCP listener takes
anyone who reaches its address (metrics are no secret; the default address is loopback).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tunvpnd")

MAX_CONNECTIONS = 16
ACCEPTS_PER_WAKE = 32
READ_SIZE = 4096
DEADLINE = 5.0  # seconds a connection may live
OUTBOX_HIGH = 65536  # answers waiting to be read: no further request is handled until sent
_UCRED = struct.Struct("3i")  # pid, uid, gid

# A protocol turns what a client has sent so far into what to answer:
#   handle(buffer) -> None: wait for more bytes; else (answer, bytes consumed, close after)
Handler = Callable[[bytearray], "tuple[bytes, int, bool] | None"]


class SocketBusy(OSError):
    """Another live process answers on the socket path."""


class _Connection:
    __slots__ = ("sock", "listener", "inbox", "outbox", "deadline", "closing", "eof")

    def __init__(self, sock: socket.socket, listener: _Listener, deadline: float) -> None:
        self.sock = sock
        self.listener = listener
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.deadline = deadline
        self.closing = False  # handle no more requests; close once the outbox is sent
        self.eof = False  # the client sent all it will send: close once answered


class _Listener:
    def __init__(self, sock: socket.socket, path: Path | None, handler: Handler,
                 limit: int) -> None:
        self.sock = sock
        self.path = path  # None: a TCP listener (no file, no SO_PEERCRED)
        self.handler = handler
        self.limit = limit  # the largest request: more unanswered bytes close the connection
        # ours to unlink only while it is still this socket
        self.ino = os.stat(path).st_ino if path is not None else 0
        self.connections: dict[int, _Connection] = {}  # in order of acceptance


class Servers:
    """The daemon's Unix-socket servers, on one epoll descriptor."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._listeners: dict[int, _Listener] = {}
        self._connections: dict[int, _Connection] = {}

    def fileno(self) -> int:
        return self._epoll.fileno()

    def listen(self, path: Path, handler: Handler, limit: int = READ_SIZE,
               replace_stale: bool = True) -> None:
        """Serve `handler` on a new socket at `path`, mode 0600. A socket file already there is
        replaced when nobody answers on it; SocketBusy when a live process does."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            _remove_stale(path)
            umask = os.umask(0o177)  # no moment at which others could connect
            try:
                sock.bind(str(path))
            finally:
                os.umask(umask)
            os.chmod(path, 0o600)
            sock.listen(64)
            listener = _Listener(sock, path, handler, limit)
        except BaseException:
            sock.close()
            raise
        self._listeners[sock.fileno()] = listener
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def listen_tcp(self, address: tuple[str, int], handler: Handler,
                   limit: int = READ_SIZE) -> int:
        """Serve `handler` on TCP `address` (an IPv4 or IPv6 literal, a port). Returns a handle
        for unlisten(); OSError (EADDRINUSE, EADDRNOTAVAIL, ...) when it cannot bind."""
        host, port = address
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0,
                                                       socket.AI_NUMERICHOST)[0]
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            # a reload or restart may bind again while old connections sit in TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        self._listeners[sock.fileno()] = _Listener(sock, None, handler, limit)
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        return sock.fileno()

    def unlisten(self, handle: int) -> None:
        """Stop the TCP listener `handle` (from listen_tcp) and close its connections."""
        listener = self._listeners.pop(handle, None)
        if listener is None:
            return
        for connection in list(listener.connections.values()):
            self._close(connection)
        try:
            self._epoll.unregister(handle)
        except (OSError, ValueError):
            pass
        listener.sock.close()

    def paths(self) -> list[Path]:
        return [listener.path for listener in self._listeners.values()
                if listener.path is not None]

    def on_ready(self) -> None:
        """The loop saw our epoll readable: serve what is ready, a bounded amount of it."""
        for fd, events in self._epoll.poll(0, 64):
            listener = self._listeners.get(fd)
            if listener is not None:
                self._accept(listener)
                continue
            connection = self._connections.get(fd)
            if connection is None:
                continue
            if events & select.EPOLLOUT:
                self._serve(connection)
            elif events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                self._read(connection)

    def tick(self, now: float) -> None:
        """Close connections past their deadline (from the service's timer)."""
        for connection in [c for c in self._connections.values() if now >= c.deadline]:
            self._close(connection)

    def close(self) -> None:
        """Close every connection and socket; unlink the socket files that are still ours."""
        for connection in list(self._connections.values()):
            self._close(connection)
        for listener in self._listeners.values():
            try:
                if listener.path is not None and os.stat(listener.path).st_ino == listener.ino:
                    os.unlink(listener.path)
            except OSError:
                pass
            listener.sock.close()
        self._listeners.clear()
        self._epoll.close()

    # -- connections ----------------------------------------------------------------------

    def _accept(self, listener: _Listener) -> None:
        own = os.geteuid()
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # EMFILE and the like: try again at the next wake-up
                log.warning("control socket %s: accept failed: %s",
                            listener.path or listener.sock.getsockname(), error.strerror)
                return
            sock.setblocking(False)
            if listener.path is not None:
                _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET,
                                                          socket.SO_PEERCRED, _UCRED.size))
                if uid not in (0, own):
                    sock.close()
                    continue
            if len(listener.connections) >= MAX_CONNECTIONS:
                self._close(next(iter(listener.connections.values())))
            connection = _Connection(sock, listener, time.monotonic() + DEADLINE)
            listener.connections[sock.fileno()] = connection
            self._connections[sock.fileno()] = connection
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client is gone, or half-closed: it has said all it will say
            connection.eof = True
        elif not connection.closing:  # after our last word, what it sends is ignored
            connection.inbox += data
        self._serve(connection)

    def _serve(self, connection: _Connection) -> None:
        """Answer the requests received, send what we can, and watch for what comes next:
        more requests only once the client has read our answers (no growing backlog)."""
        inbox, outbox, handler = connection.inbox, connection.outbox, connection.listener.handler
        while True:
            while inbox and not connection.closing and len(outbox) < OUTBOX_HIGH:
                answer = handler(inbox)
                if answer is None:
                    if len(inbox) > connection.listener.limit:  # too long: not answered
                        connection.closing = True
                    break
                out, consumed, close = answer
                del inbox[:consumed]
                outbox += out
                connection.closing = close
            full = len(outbox) >= OUTBOX_HIGH
            if outbox:
                try:
                    sent = connection.sock.send(outbox)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._close(connection)
                    return
                del outbox[:sent]
            if outbox:  # the rest when it is writable (or never: the deadline closes it)
                self._epoll.modify(connection.sock.fileno(), select.EPOLLOUT)
                return
            if connection.closing or connection.eof:
                self._close(connection)
                return
            if not full:
                break
        self._epoll.modify(connection.sock.fileno(), select.EPOLLIN)

    def _close(self, connection: _Connection) -> None:
        fd = connection.sock.fileno()
        if fd < 0:
            return
        self._connections.pop(fd, None)
        connection.listener.connections.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        connection.sock.close()
        connection.inbox = connection.outbox = bytearray()


def _remove_stale(path: Path) -> None:
    """Unlink a socket file at `path` that nobody answers on; SocketBusy if somebody does."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # a dead process's socket
    except OSError as error:
        raise OSError(error.errno, f"{path}: {error.strerror}") from error
    else:
        raise SocketBusy(errno.EADDRINUSE, f"{path} is in use by another live process")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- the control socket's protocol: `show\n` -> one JSON document, then the server hangs up ----

SHOW = b"show\n"
CONTROL_LIMIT = 256  # a request longer than this (without its newline) is not answered


def show_handler(snapshot: Callable[[], dict]) -> Handler:
    """Answers `show\\n` with the JSON snapshot; anything else with an error line."""
    import json

    def handle(inbox: bytearray) -> tuple[bytes, int, bool] | None:
        end = inbox.find(b"\n")
        if end < 0:
            return None
        if bytes(inbox[:end + 1]) == SHOW:
            return json.dumps(snapshot()).encode() + b"\n", end + 1, True
        return b'{"error": "unknown request"}\n', end + 1, True

    return handle


def query(path: Path, timeout: float = 5.0) -> dict:
    """Ask the instance at control socket `path` for its snapshot (a client, for the CLI).
    OSError (FileNotFoundError, ConnectionRefusedError, ...) when nobody answers there."""
    import json

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(SHOW)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError as error:
        raise OSError(errno.EPROTO, f"{path}: not an answer from tunvpnd") from error
    if not isinstance(doc, dict) or "error" in doc:
        raise OSError(errno.EPROTO, f"{path}: {doc.get('error') if isinstance(doc, dict) else doc}")
    return doc
