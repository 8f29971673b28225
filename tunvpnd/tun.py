"""Open a TUN device: /dev/net/tun plus one TUNSETIFF ioctl (see linux/if_tun.h)."""

from __future__ import annotations

import fcntl
import os
import struct

TUN_CLONE_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16  # linux/if.h, including the trailing NUL
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001  # layer-3 device: reads and writes are bare IP packets
IFF_NO_PI = 0x1000  # no 4-byte packet-information header in front of each packet
_IFREQ = "16sH22x"  # struct ifreq: ifr_name, ifr_flags, padded to 40 bytes


def open_tun(name: str = "tun%d") -> tuple[int, str]:
    """Create a TUN device and return (fd, real interface name).

    ``name`` may hold one ``%d`` for the kernel to fill in.  The fd is non-blocking and
    close-on-exec.  The device is not persistent: when the last fd closes, the kernel
    removes it together with its addresses and routes, so a crash leaves nothing behind.
    """
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw:
        raise OSError(f"invalid TUN interface name {name!r} (1 to {IFNAMSIZ - 1} bytes)")
    try:
        fd = os.open(TUN_CLONE_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"cannot open {TUN_CLONE_DEVICE} for {name!r}: {e.strerror}") from e
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack(_IFREQ, raw, IFF_TUN | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, f"cannot create TUN device {name!r}: {e.strerror}") from e
    # The kernel writes the real name back (e.g. "tun%d" -> "tun0").
    real = struct.unpack(_IFREQ, ifr)[0].rstrip(b"\0").decode()
    return fd, real
