"""`tunvpnd import`: a wg-quick config (wg0.conf) -> a tunvpnd profile and its key files.

The file is read as wg-quick and `wg setconf` read it: `#` starts a comment anywhere, keys and
section headers are case-insensitive, white space around keys, values and list items does not
matter, Address and AllowedIPs may be repeated (they append), any other repeated key keeps its
last value, and a line or key they would refuse is refused here too, as `FILE:LINE: what`
(exit 78). One [Peer] with an Endpoint makes a client profile, anything else a server.

What has no tunvpnd equivalent (DNS, PostUp, SaveConfig, Table/FwMark but on a full-tunnel
client, ...) is listed on
stderr, each as `FILE:LINE: not imported: ...`, never dropped silently. The private and
preshared keys go into key files of mode 0600 beside the profile (keys.write_key_file); no
message, and not the profile, ever holds one. The whole result is checked with load_profile,
as `tunvpnd check` does, in a private directory before anything is moved into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path

import yaml

from .profile import (
    DEFAULT_CONFIG_DIR,
    IPInterface,
    IPNetwork,
    ProfileError,
    _overlaps,  # the profile's own overlap rule, so the import refuses exactly what check would
    covering_route,
    load_profile,
)
from .wireguard import keys

EX_CONFIG = 78
MAX_CONFIG_BYTES = 1024 * 1024
DEFAULT_LISTEN_PORT = 51820  # WireGuard's usual; wg-quick without ListenPort picks one at random
MAX_KEEPALIVE = 3600  # the profile's limit; WireGuard allows up to 65535
_IFNAME = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}")  # wg-quick's rule for the file's stem
_INSTANCE = re.compile(r"[A-Za-z0-9_.@-]+")  # profile.resolve_profile's instance names
_PEER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")  # profile's peer names
_NAME_COMMENT = re.compile(r"\s*name\s*=\s*(.*?)\s*", re.IGNORECASE)
_KEYLIKE = re.compile(r"[A-Za-z0-9+/]{43}=")  # what a key looks like: never quoted
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]{0,31}")  # a key name short enough to quote safely
# wg-quick's own keys in [Interface], that `wg` never sees: Address and MTU are imported
_NOT_IMPORTED = {
    "dns": "tunvpnd does not configure name resolution",
    "table": "routes go to the main table",
    "preup": "tunvpnd runs no commands", "postup": "tunvpnd runs no commands",
    "predown": "tunvpnd runs no commands", "postdown": "tunvpnd runs no commands",
    "saveconfig": "tunvpnd never writes its profile",
    "fwmark": "tunvpnd does not mark its datagrams",
}
_COMMANDS = ("preup", "postup", "predown", "postdown")  # their text is not repeated


class ImportFailed(Exception):
    """The config cannot be imported; `problems` are FILE:LINE: what lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class WgPeer:
    line: int  # of its [Peer] header
    name: str | None = None  # from a `# Name = x` comment
    name_line: int = 0
    public_key: bytes | None = None
    preshared_key: bytes | None = field(default=None, repr=False)
    allowed_ips: list[tuple[IPNetwork, int]] = field(default_factory=list)
    endpoint: tuple[str, int, int] | None = None  # host, port, line
    keepalive: int = 0
    has_keys: bool = False  # a key line seen: a Name comment now belongs to the next peer


@dataclass
class WgConfig:
    interface_line: int = 0
    private_key: bytes | None = field(default=None, repr=False)
    addresses: list[tuple[IPInterface, int]] = field(default_factory=list)
    listen_port: tuple[int, int] | None = None  # port, line
    mtu: tuple[int, int] | None = None
    table: str | None = None
    # Table = N / FwMark = M, (value, line): a client's full tunnel takes them as its
    # `table:`/`fwmark:`; anything else cannot use them
    numbered: dict[str, tuple[int, int]] = field(default_factory=dict)
    peers: list[WgPeer] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, "not imported: ...")


def _excerpt(text: str, size: int = 60) -> str:
    """A value quoted in a message: cut short, and never one holding what looks like a key."""
    if _KEYLIKE.search(text):
        return "(a value not shown: it holds what looks like a key)"
    return repr(text if len(text) <= size else text[:size] + "...")


def parse_wg_quick(text: str, file: str) -> WgConfig:
    """Read a wg-quick config; ImportFailed lists every problem (never quoting a key)."""
    config = WgConfig()
    problems: list[str] = []
    section = None
    pending_name: tuple[str, int] | None = None

    def fail(line: int, what: str) -> None:
        problems.append(f"{file}:{line}: {what}")

    for number, raw in enumerate(text.splitlines(), 1):
        body, hash_sign, comment = raw.partition("#")
        if hash_sign and (named := _NAME_COMMENT.fullmatch(comment)) and named[1]:
            peer = config.peers[-1] if section == "peer" else None
            if peer is not None and not peer.has_keys and peer.name is None:
                peer.name, peer.name_line = named[1], number  # just below its [Peer]
            else:
                pending_name = (named[1], number)  # for the [Peer] that comes next
        compact = "".join(body.split())
        if not compact:
            continue
        if compact.startswith("["):
            header = compact.lower()
            if header == "[interface]":
                section = "interface"
                config.interface_line = config.interface_line or number
            elif header == "[peer]":
                section = "peer"
                config.peers.append(WgPeer(number))
                if pending_name:
                    config.peers[-1].name, config.peers[-1].name_line = pending_name
            else:
                what = _excerpt(compact) if len(compact) <= 40 else "this one"
                fail(number, f"unknown section {what}: wg-quick knows only [Interface] and "
                     "[Peer]")
                section = "unknown"
            pending_name = None
            continue
        if "=" not in compact:  # never quoted: it may be a key with its '=' lost
            fail(number, "not a `Key = value` line, an [Interface] or [Peer] header or a "
                 "comment")
            continue
        key, value = body.split("=", 1)
        key, value = "".join(key.split()), value.strip()
        lower = key.lower()
        shown = key if _WORD.fullmatch(key) else "(key not shown)"
        if section is None:
            fail(number, f"{shown} before any [Interface] or [Peer] section")
        elif section == "interface":
            _interface_key(config, lower, shown, value, number, fail)
        elif section == "peer":
            peer = config.peers[-1]
            peer.has_keys = True
            _peer_key(config, peer, lower, shown, value, number, fail)
        pending_name = None
    if not problems:
        _check_whole(config, problems, file)
    if problems:
        raise ImportFailed(problems)
    return config


def _key(value: str, shown: str, number: int, fail) -> bytes | None:
    try:
        return keys.decode_key("".join(value.split()))
    except ValueError as error:  # its message never quotes the text
        fail(number, f"{shown}: {error}")
        return None


def _interface_key(config: WgConfig, lower: str, shown: str, value: str, number: int,
                   fail) -> None:
    if lower == "privatekey":
        config.private_key = _key(value, shown, number, fail)
    elif lower == "address":
        for item in value.replace(",", " ").split():  # wg-quick: commas or spaces
            try:
                address = ip_interface(item)
            except ValueError:
                fail(number, f"{shown}: {_excerpt(item)} is not an IP address (with an "
                     "optional /prefix)")
                continue
            if any(address == known for known, _ in config.addresses):
                fail(number, f"{shown}: {address} is listed twice")
            else:
                config.addresses.append((address, number))
    elif lower == "listenport":
        port = _number(value, 0, 65535)
        if port is None:
            fail(number, f"{shown}: {_excerpt(value)} is not a port (0 to 65535)")
        config.listen_port = (port, number) if port else None  # 0: a random port, as absent
    elif lower == "mtu":
        mtu = _number(value, 576, 65535)
        if mtu is None:
            fail(number, f"{shown}: {_excerpt(value)} is not an MTU tunvpnd can use (576 to "
                 "65535)")
        config.mtu = (mtu, number)
    elif lower in _NOT_IMPORTED:
        if lower == "table":
            config.table = value.lower()
            if config.table in ("", "auto"):
                return  # wg-quick's default: the main table, as tunvpnd does
            if config.table == "off":  # honoured: `routes: []`
                config.skipped.append((number, "note: Table = off: no routes for the AllowedIPs, "
                                       "as wg-quick would add none"))
                return
        if lower in ("table", "fwmark"):
            wanted = _number(value, 1, 2**32 - 1, hex_too=True)
            if wanted is not None:
                config.numbered[lower] = (wanted, number)
                return
            if lower == "fwmark" and value.lower() in ("off", "0"):
                return
        text = shown if lower in _COMMANDS or _KEYLIKE.search(value) else f"{shown} = {value}"
        config.skipped.append((number, f"not imported: {text}: {_NOT_IMPORTED[lower]}"))
    else:
        fail(number, f"{shown}: not a key of [Interface] (wg-quick refuses it too)")


def _peer_key(config: WgConfig, peer: WgPeer, lower: str, shown: str, value: str, number: int,
              fail) -> None:
    if lower == "publickey":
        peer.public_key = _key(value, shown, number, fail)
    elif lower == "presharedkey":
        peer.preshared_key = _key(value, shown, number, fail)
    elif lower == "allowedips":
        for item in value.split(","):
            item = "".join(item.split())
            if not item:
                continue
            try:
                net = ip_network(item, strict=False)
            except ValueError:
                fail(number, f"{shown}: {_excerpt(item)} is not an IP network")
                continue
            if ip_interface(item).ip != net.network_address:  # wg warns, the kernel masks
                config.skipped.append((number, f"note: AllowedIPs {item} has host bits set: "
                                       f"imported as {net}, as WireGuard masks it"))
            peer.allowed_ips.append((net, number))
    elif lower == "endpoint":
        endpoint = _endpoint("".join(value.split()))
        if endpoint is None:
            fail(number, f"{shown}: {_excerpt(value)} is not host:port or [IPv6]:port")
        else:
            peer.endpoint = (*endpoint, number)
    elif lower == "persistentkeepalive":
        seconds = 0 if value.lower() == "off" else _number(value, 0, 65535)
        if seconds is None:
            fail(number, f"{shown}: {_excerpt(value)} is neither off nor 0 to 65535")
        peer.keepalive = seconds or 0
    else:
        fail(number, f"{shown}: not a key of [Peer] (wg refuses it too)")


def _number(text: str, low: int, high: int, hex_too: bool = False) -> int | None:
    """A decimal number (0x hex too where wg takes it: FwMark) within low..high, else None."""
    if hex_too and re.fullmatch(r"0[xX][0-9a-fA-F]{1,8}", text):
        value = int(text, 16)
    elif re.fullmatch(r"[0-9]{1,10}", text):
        value = int(text)
    else:
        return None
    return value if low <= value <= high else None


def _endpoint(text: str) -> tuple[str, int] | None:
    """(host, port) from wg's forms: host:port, [v6]:port (and v6:port, as wg splits at the
    last colon); host is an IP literal or a DNS name."""
    if match := re.fullmatch(r"\[([^\]]+)\]:([0-9]{1,5})", text):
        host, port = match[1], match[2]
    elif ":" in text:
        host, port = text.rsplit(":", 1)
    else:
        return None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    try:
        host = str(ip_address(host))
    except ValueError:
        labels = host.removesuffix(".").split(".")
        if not (0 < len(host) <= 253 and all(re.fullmatch(
                r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels)
                and not labels[-1].isdigit()):
            return None
    return host, int(port)


def _check_whole(config: WgConfig, problems: list[str], file: str) -> None:
    """What a tunvpnd profile needs that a wg-quick config may lack."""
    def fail(line: int, what: str) -> None:
        problems.append(f"{file}:{line}: {what}")

    if not config.interface_line:
        fail(1, "no [Interface] section")
        return
    if config.private_key is None:
        fail(config.interface_line, "[Interface] has no PrivateKey (a tunvpnd profile needs "
             "its private key)")
    if not config.addresses:
        fail(config.interface_line, "[Interface] has no Address (a tunvpnd profile needs the "
             "tunnel's addresses)")
    if config.mtu and config.mtu[0] < 1280 and any(a.version == 6 for a, _ in config.addresses):
        fail(config.mtu[1], f"MTU {config.mtu[0]} is too small for an IPv6 Address (at least "
             "1280)")
    if not config.peers:
        fail(config.interface_line, "no [Peer]: a tunvpnd WireGuard server needs its peers")
    own = keys.public_key(config.private_key) if config.private_key else None
    seen: dict[bytes, int] = {}
    for peer in config.peers:
        if peer.public_key is None:
            fail(peer.line, "this [Peer] has no PublicKey")
        elif peer.public_key == own:
            fail(peer.line, "this [Peer]'s PublicKey is our own (that of PrivateKey)")
        elif peer.public_key in seen:
            fail(peer.line, f"this [Peer] has the same PublicKey as the [Peer] at line "
                 f"{seen[peer.public_key]}")
        else:
            seen[peer.public_key] = peer.line


@dataclass
class Imported:
    mode: str
    text: str  # the profile
    key_files: dict[str, bytes] = field(repr=False)  # file name -> key
    notes: list[str]  # FILE:LINE: not imported: ... lines


def build_profile(config: WgConfig, name: str, ifname: str, file: str) -> Imported:
    """The profile text and key files for a parsed config; ImportFailed if tunvpnd cannot
    carry it (overlapping AllowedIPs between peers)."""
    notes = [f"{file}:{line}: {what}" for line, what in config.skipped]
    client = len(config.peers) == 1 and config.peers[0].endpoint is not None
    files = {f"{name}.key": config.private_key}
    nets = [address.network for address, _ in config.addresses]
    lines = [f"# Imported by `tunvpnd import` from {file}; check it with `tunvpnd check`.",
             f"mode: {'client' if client else 'server'}"]
    if client:
        peer = config.peers[0]
        host, port, line = peer.endpoint
        lines.append(f"server: {_scalar(_hostport(host, port))}")
        if config.listen_port:
            port, line = config.listen_port
            notes.append(f"{file}:{line}: not imported: ListenPort = {port}: a tunvpnd client "
                         "sends from a port the kernel picks")
    else:
        if config.listen_port:
            port = config.listen_port[0]
        else:
            port = DEFAULT_LISTEN_PORT
            notes.append(f"{file}:{config.interface_line}: note: no ListenPort (wg-quick picks "
                         f"a random port): the profile listens on {port}, WireGuard's usual "
                         "port; its peers must send there")
        # [::]: a dual-stack socket, like WireGuard's listening on IPv4 and IPv6 at once
        lines.append(f"listen: {_scalar(_hostport('::', port))}")
    lines += ["wire: wireguard", f"private_key_file: {_scalar(f'{name}.key')}"]
    if client:
        lines.append(f"server_public_key: {_scalar(keys.encode_key(peer.public_key))}")
        if peer.preshared_key:
            files[f"{name}.psk"] = peer.preshared_key
            lines.append(f"preshared_key_file: {_scalar(f'{name}.psk')}")
    lines += ["interface:", f"  name: {_scalar(ifname)}",
              "  address: " + _flow(str(a) for a, _ in config.addresses)]
    if config.mtu:
        lines.append(f"  mtu: {config.mtu[0]}")
    if client:
        pinned = [peer.endpoint]
        routes = _routes(peer.allowed_ips, nets, pinned, config, file, notes, client=True)
        lines.append("routes: " + _flow(map(str, routes)))
        full = any(route.prefixlen == 0 for route in routes)
        for key, (value, line) in sorted(config.numbered.items()):
            if full:    # wg-quick's policy routing for a default route: tunvpnd's own
                lines.append(f"{key}: {value}")
            else:
                shown = {"table": "Table", "fwmark": "FwMark"}[key]
                notes.append(f"{file}:{line}: not imported: {shown} = {value}: "
                             "tunvpnd uses its own table and mark only for a full tunnel")
        lines.append(f"keepalive: {min(peer.keepalive, MAX_KEEPALIVE)}  # "
                     + ("PersistentKeepalive" if peer.keepalive else "off, as in " + file))
        _keepalive_limit(peer, file, notes)
    else:
        peers, routes, keepalive = _server_peers(config, name, files, nets, file, notes)
        lines.append("routes: " + _flow(map(str, routes)))
        lines.append("forward: false  # as wg-quick; true to route between peers and networks")
        lines.append(f"keepalive: {keepalive}")
        lines.append("peers:")
        lines += peers
    notes.sort(key=lambda note: int(note[len(file) + 1:].split(":", 1)[0]))  # in file order
    return Imported("client" if client else "server", "\n".join(lines) + "\n", files, notes)


def _keepalive_limit(peer: WgPeer, file: str, notes: list[str]) -> None:
    if peer.keepalive > MAX_KEEPALIVE:
        notes.append(f"{file}:{peer.line}: note: PersistentKeepalive {peer.keepalive} is "
                     f"above tunvpnd's {MAX_KEEPALIVE}: imported as {MAX_KEEPALIVE}")


def _routes(allowed: Iterable[tuple[IPNetwork, int]], nets: list[IPNetwork],
            pinned: list[tuple[str, int, int]], config: WgConfig, file: str,
            notes: list[str], client: bool = False) -> list[IPNetwork]:
    """AllowedIPs -> routes, as wg-quick adds them: without those in the tunnel's own networks
    (its addresses route them), a default route only on a client (a full tunnel, with policy
    routing), once each."""
    routes: list[IPNetwork] = []
    for net, line in allowed:
        if config.table == "off":
            continue
        if any(net.version == own.version and net.subnet_of(own) for own in nets):
            continue
        if net.prefixlen == 0:
            if client:      # the daemon's fwmark keeps the tunnel's own datagrams out of it
                if net not in routes:
                    routes.append(net)
                continue
            notes.append(f"{file}:{line}: not imported: the route for AllowedIPs {net}: "
                         "a server routes no full tunnel; only the other AllowedIPs are "
                         "routed through it")
            continue
        held = [h for h, _, _ in pinned if _literal(h) and covering_route([net], h)]
        if held:
            notes.append(f"{file}:{line}: not imported: the route for AllowedIPs {net}: it "
                         f"holds the endpoint {held[0]}, so the tunnel would carry its own "
                         "datagrams")
            continue
        if net not in routes:
            routes.append(net)
    return routes


def _literal(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def _server_peers(config: WgConfig, name: str, files: dict[str, bytes], nets: list[IPNetwork],
                  file: str, notes: list[str]) -> tuple[list[str], list[IPNetwork], int]:
    lines: list[str] = []
    owners: list[tuple[IPNetwork, str, int]] = []
    names = _peer_names(config.peers, file, notes)
    pinned = []
    for peer, peer_name in zip(config.peers, names, strict=True):
        if not peer.allowed_ips:
            notes.append(f"{file}:{peer.line}: not imported: the [Peer] {peer_name}: it has no "
                         "AllowedIPs, so it could send nothing through the tunnel (tunvpnd "
                         "needs at least one)")
            continue
        lines += [f"  - name: {_scalar(peer_name)}",
                  f"    public_key: {_scalar(keys.encode_key(peer.public_key))}"]
        allowed: list[IPNetwork] = []
        for net, line in peer.allowed_ips:
            if net not in allowed:
                allowed.append(net)
                owners.append((net, peer_name, line))
        lines.append("    allowed_ips: " + _flow(map(str, allowed)))
        if peer.endpoint:
            host, port, line = peer.endpoint
            if _literal(host):
                lines.append(f"    endpoint: {_scalar(_hostport(host, port))}")
                pinned.append(peer.endpoint)
            else:
                notes.append(f"{file}:{line}: not imported: Endpoint = {host}:{port} of "
                             f"{peer_name}: a tunvpnd server takes an IP address only; it "
                             "answers the peer once the peer has sent a handshake")
        if peer.preshared_key:
            files[f"{name}-{peer_name}.psk"] = peer.preshared_key
            lines.append(f"    preshared_key_file: {_scalar(f'{name}-{peer_name}.psk')}")
    problems = []
    for later, earlier in _overlaps([net for net, _, _ in owners]):
        net, who, line = owners[later]
        other, first, _ = owners[earlier]
        problems.append(f"{file}:{line}: AllowedIPs {net} of {who} overlaps {other} of {first}: "
                        "tunvpnd gives each network to one peer only")
    if problems:
        raise ImportFailed(problems)
    routes = _routes([(net, line) for net, _, line in owners], nets, pinned, config, file, notes)
    return lines, routes, _server_keepalive(config.peers, names, file, notes)


def _server_keepalive(peers: list[WgPeer], names: list[str], file: str, notes: list[str]) -> int:
    """One keepalive for every peer, as the profile has it: theirs if they agree, else the
    shortest one set (said on stderr)."""
    values = {peer.keepalive for peer in peers}
    if len(values) == 1:
        seconds = values.pop()
    else:
        seconds = min(v for v in values if v)
        listed = ", ".join(f"{n} {p.keepalive or 'off'}" for p, n in zip(peers, names, strict=True))
        notes.append(f"{file}:{peers[0].line}: note: PersistentKeepalive differs between the "
                     f"peers ({listed}): tunvpnd has one keepalive for all of them, "
                     f"imported as {min(seconds, MAX_KEEPALIVE)}")
    for peer in peers:
        _keepalive_limit(peer, file, notes)
    return min(seconds, MAX_KEEPALIVE)


def _peer_names(peers: list[WgPeer], file: str, notes: list[str]) -> list[str]:
    """From `# Name = x` comments (made fit for a profile), else peer1, peer2, ...; unique."""
    names: list[str] = []
    for number, peer in enumerate(peers, 1):
        wanted = peer.name
        if wanted is not None:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", wanted).strip("-")[:32] or f"peer{number}"
            if name != wanted:
                notes.append(f"{file}:{peer.name_line}: note: peer name {_excerpt(wanted)} "
                             f"written as {name!r} (1 to 32 of A-Za-z0-9_.-)")
        else:
            name = f"peer{number}"
        base, suffix = name, 2
        while name in names:
            name = f"{base[:29]}-{suffix}"
            suffix += 1
        names.append(name)
    return names


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _scalar(text: str) -> str:
    """A YAML scalar that reads back as this very string."""
    if re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.+/=-]*", text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def _flow(items: Iterable[str]) -> str:
    return "[" + ", ".join(_scalar(item) for item in items) + "]"


# --- the command -----------------------------------------------------------------------------


def _read(path: str) -> str:
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(0, "not a regular file")
    if info.st_size > MAX_CONFIG_BYTES:
        raise OSError(0, f"larger than {MAX_CONFIG_BYTES} bytes: not a wg-quick config")
    with open(path, "rb") as source:
        data = source.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise OSError(0, f"larger than {MAX_CONFIG_BYTES} bytes: not a wg-quick config")
    return data.decode("utf-8")


def import_command(source: str, name: str | None, out: str | None, force: bool) -> int:
    """The `tunvpnd import` command: 0 done, 1 not written (exists, I/O), 2 bad --name,
    78 the config cannot be imported."""
    stem = Path(source).stem
    name = name or stem
    if not _INSTANCE.fullmatch(name) or name in (".", ".."):
        _say(f"tunvpnd import: {name!r} is not a profile name (letters, digits and '_.@-'): "
             "give one with --name")
        return 2
    try:
        text = _read(source)
    except UnicodeDecodeError:
        _say(f"{source}:1: not UTF-8 text")
        return EX_CONFIG
    except OSError as error:
        _say(f"{source}:1: cannot read: {error.strerror or error}")
        return EX_CONFIG if isinstance(error, FileNotFoundError) else 1
    if not _IFNAME.fullmatch(stem):
        _say(f"{source}:1: {stem!r} is not an interface name (1 to 15 of a-zA-Z0-9_=+.-): "
             "wg-quick takes the interface name from the file's name; rename the file")
        return EX_CONFIG
    try:
        imported = build_profile(parse_wg_quick(text, source), name, stem, source)
    except ImportFailed as failed:
        _say("\n".join(failed.problems))
        return EX_CONFIG
    for note in imported.notes:
        _say(note)
    directory = Path(out or os.environ.get("TUNVPN_CONFIG_DIR") or DEFAULT_CONFIG_DIR)
    return _write(directory, name, imported, force)


def _write(directory: Path, name: str, imported: Imported, force: bool) -> int:
    profile = directory / f"{name}.yaml"
    targets = [profile, *(directory / file for file in imported.key_files)]
    existing = [str(t) for t in targets if os.path.lexists(t)]
    if existing and not force:
        _say(f"tunvpnd import: {', '.join(existing)}: exists already, not overwritten "
             "(--force replaces the profile and its key files)")
        return 1
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.import-", dir=directory))
    except OSError as error:
        _say(f"tunvpnd import: {directory}: {error.strerror or error}")
        return 1
    try:
        staged = staging / profile.name
        with open(staged, "x", encoding="utf-8") as out:
            out.write(imported.text)
        os.chmod(staged, 0o644)  # no secret in it: readable like the example profiles
        for file, key in imported.key_files.items():
            keys.write_key_file(staging / file, key)
        problems = _check(staged)
        if problems:
            _say("\n".join(p.replace(str(staging), str(directory)) for p in problems))
            _say("tunvpnd import: the imported profile would not pass `tunvpnd check`: "
                 "nothing written")
            return EX_CONFIG
        for file in imported.key_files:  # keys first: the profile never names a missing file
            os.replace(staging / file, directory / file)
        os.replace(staged, profile)
    except (OSError, keys.KeyFileError) as error:
        _say(f"tunvpnd import: {getattr(error, 'strerror', None) or error}")
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{profile}: imported as a {imported.mode} profile, with "
          f"{', '.join(imported.key_files)} (mode 0600); `tunvpnd check {profile}` "
          "accepts it")
    return 0


def _check(path: Path) -> list[str]:
    """load_profile's problems with the profile, its key files read from beside it (not from
    a $CREDENTIALS_DIRECTORY this shell may have)."""
    credentials = os.environ.pop("CREDENTIALS_DIRECTORY", None)
    try:
        load_profile(path)
    except ProfileError as error:
        return error.problems
    finally:
        if credentials is not None:
            os.environ["CREDENTIALS_DIRECTORY"] = credentials
    return []


def _say(text: str) -> None:
    print(text, file=sys.stderr)

