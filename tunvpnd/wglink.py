"""`wg` for a wireguard instance run by the systemd unit: /run/wireguard/IFNAME.sock as a root
symlink to the UAPI socket the daemon serves in its own run directory (RUN_DIR/NAME.uapi).

Under the unit the daemon is a DynamicUser on a read-only /run (ProtectSystem=strict), and
/run/wireguard is root's: `wg` (as root) trusts what answers there, for wireguard-go and, for a
`wg set`, before it tries a kernel interface. So the daemon gets no write access to it; root
(the unit's `ExecStartPost=+`) adds one entry, for the instance's own interface only, and never
replaces a live socket or another program's link. `wg` stat()s and connects through the link
(it follows symlinks); the daemon's socket stays mode 0600, reachable by root and its user.
`ExecStopPost=+` removes the links that point at the instance's socket.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
from pathlib import Path

from . import uapi

IFNAME = re.compile(r"[^/\s:]{1,15}")  # what the kernel accepts as a netdev name, minus ':'


def private_path(directory: Path, name: str) -> Path:
    """Where the daemon serves its UAPI when /run/wireguard is not writable for it."""
    return directory / f"{name}.uapi"


def link(directory: Path, name: str) -> str:
    """Make /run/wireguard/IFNAME.sock lead to instance `name`'s UAPI socket; say what was
    done. OSError when nothing could be done."""
    from .control import query

    target = private_path(directory, name)
    try:
        if not stat.S_ISSOCK(os.lstat(target).st_mode):
            raise OSError(errno.EINVAL, f"{target} is not a socket")
    except FileNotFoundError:
        return f"no {target}: nothing to link (plain wire, or the UAPI is in {uapi.SOCKET_DIR})"
    ifname = query(directory / f"{name}.sock").get("ifname")
    if not isinstance(ifname, str) or ifname in (".", "..") or not IFNAME.fullmatch(ifname):
        raise OSError(errno.EPROTO, f"{name}: not an interface name: {ifname!r}")
    _own_directory(uapi.SOCKET_DIR)
    path = uapi.socket_path(ifname)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISLNK(mode) and os.readlink(path) == str(target):
            return f"{path} -> {target} already"
        if not (stat.S_ISLNK(mode) or stat.S_ISSOCK(mode)) or _answers(path):
            raise OSError(errno.EADDRINUSE, f"{path} is in use by another process: left as is")
        os.unlink(path)  # a dead socket or a dangling link, as wg and wireguard-go remove them
    os.symlink(target, path)
    return f"{path} -> {target}"


def unlink(directory: Path, name: str) -> list[str]:
    """Remove the /run/wireguard links to instance `name`'s UAPI socket; the paths removed."""
    target = str(private_path(directory, name))
    removed = []
    try:
        entries = list(os.scandir(uapi.SOCKET_DIR))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.endswith(".sock") and entry.is_symlink() and \
                os.readlink(entry.path) == target:
            os.unlink(entry.path)
            removed.append(entry.path)
    return removed


def _own_directory(directory: Path) -> None:
    """/run/wireguard as wireguard-go makes it, or refuse one that root does not own."""
    try:
        directory.mkdir()
        os.chmod(directory, 0o755)  # as wireguard-go's, whatever the unit's UMask
    except FileExistsError:
        pass
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise OSError(errno.EPERM, f"{directory} is not a directory that only root can write: "
                      "left as is")


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False  # nobody there (a timeout or EACCES means somebody is)
    except OSError:
        return True
    finally:
        probe.close()
    return True
