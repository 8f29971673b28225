"""Stand-ins for the loop's descriptors in unit tests: the UDP socket (epoll-able, its fd is
/dev/null, takes any socket option; subclasses say what happens to sends) and the TUN's reads."""

from __future__ import annotations

import socket
from collections.abc import Callable


class FakeSocket:
    family = socket.AF_INET

    def __init__(self, devnull) -> None:
        self.devnull = devnull

    def fileno(self) -> int:
        return self.devnull.fileno()

    def getsockopt(self, *args) -> int:
        return 0

    def setsockopt(self, *args) -> None:
        pass


def queued_reads(reads: list[bytes]) -> Callable[[int, list], int]:
    """For monkeypatching os.readv on the TUN: each call hands out the next of `reads` (virtio
    header and packet), then BlockingIOError."""
    def readv(fd: int, buffers: list) -> int:
        if not reads:
            raise BlockingIOError
        data = reads.pop(0)
        buffers[0][:len(data)] = data
        return len(data)
    return readv
