"""Open a TUN device: /dev/net/tun plus one TUNSETIFF ioctl (see linux/if_tun.h), and, for the
fast path, the same with a virtio_net_hdr in front of every packet and the kernel's offloads on.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

TUN_CLONE_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16  # linux/if.h, including the trailing NUL
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001  # layer-3 device: reads and writes are bare IP packets
IFF_NO_PI = 0x1000  # no 4-byte packet-information header in front of each packet
IFF_VNET_HDR = 0x4000  # a struct virtio_net_hdr in front of each packet (offload.VNET_HDR)
IFF_TUN_EXCL = 0x8000  # fail with EBUSY instead of attaching to an existing device of that name
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int): what we can take from the kernel
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
TUN_F_CSUM = 0x01  # partial checksums (we finish them)
TUN_F_TSO4 = 0x02  # TCP super-packets (we split them)
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20  # UDP super-packets (Linux 6.2)
TUN_F_USO6 = 0x40
OFFLOADS = (  # tried in this order: the first set the kernel accepts is kept
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
)
VNET_HDR_SIZE = 10  # sizeof(struct virtio_net_hdr)
_IFREQ = "16sH22x"  # struct ifreq: ifr_name, ifr_flags, padded to 40 bytes


def open_tun(name: str = "tun%d") -> tuple[int, str]:
    """Create a TUN device and return (fd, real interface name).

    ``name`` may hold one ``%d`` for the kernel to fill in.  The fd is non-blocking and
    close-on-exec.  The device is not persistent: when the last fd closes, the kernel
    removes it together with its addresses and routes, so a crash leaves nothing behind.
    It is always a new device: an existing interface of that name (a persistent TUN made
    with `ip tuntap add`, or anything else) is refused, never adopted (`TunExists`).
    """
    return _open(name, IFF_TUN | IFF_NO_PI)


def open_tun_offload(name: str = "tun%d") -> tuple[int, str, int]:
    """Like `open_tun`, but with IFF_VNET_HDR and the first set of `OFFLOADS` the kernel takes.

    Returns (fd, real name, TUN_F_* flags in effect). Flags 0: the kernel refused, and fd is a
    plain TUN exactly as `open_tun` makes it (no virtio header).
    """
    try:
        fd, real = _open(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return (*open_tun(name), 0)
    flags = _set_offloads(fd)
    if flags:
        return fd, real, flags
    os.close(fd)  # the device goes with it; make it again without the header
    return (*open_tun(real), 0)


def _set_offloads(fd: int) -> int:
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
    except OSError:
        return 0
    for flags in OFFLOADS:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError:
            continue
        return flags
    return 0


class TunExists(OSError):
    """An interface with the exact name asked for exists already: we did not create it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"interface {name} exists already (not created by this daemon); "
                         "remove it or choose another interface.name")
        self.errno = errno.EEXIST


def check_free(name: str) -> None:
    """Raise TunExists if an interface named exactly `name` exists (a %d pattern is free)."""
    if "%" in name:
        return
    try:
        socket.if_nametoindex(name)
    except (OSError, ValueError):
        return
    raise TunExists(name)


def _open(name: str, flags: int) -> tuple[int, str]:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw:
        raise OSError(f"invalid TUN interface name {name!r} (1 to {IFNAMSIZ - 1} bytes)")
    try:
        fd = os.open(TUN_CLONE_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"cannot open {TUN_CLONE_DEVICE} for {name!r}: {e.strerror}") from e
    try:
        # IFF_TUN_EXCL: attaching to an existing persistent TUN would change its flags and
        # leave it configured by us after we stop; the kernel refuses atomically instead.
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack(_IFREQ, raw, flags | IFF_TUN_EXCL))
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EBUSY:
            raise TunExists(name) from e
        raise OSError(e.errno, f"cannot create TUN device {name!r}: {e.strerror}") from e
    # The kernel writes the real name back (e.g. "tun%d" -> "tun0").
    real = struct.unpack(_IFREQ, ifr)[0].rstrip(b"\0").decode()
    return fd, real
