"""A stand-in for the loop's UDP socket in unit tests: epoll-able (its fd is /dev/null), takes
any socket option; subclasses say what happens to sends."""

from __future__ import annotations

import socket


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
