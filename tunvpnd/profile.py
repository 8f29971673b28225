"""Profiles: a YAML file -> a frozen, validated Profile.

Every problem is collected and reported as ``FILE:LINE: key.path: what is wrong``, so an operator
fixes the whole file in one go. We walk the node tree from yaml's compose() rather than using
safe_load() because nodes keep their line numbers and duplicate keys stay visible; each scalar is
still converted by the SafeLoader's constructor, so YAML types are the standard ones.
"""

import difflib
import os
import re
from dataclasses import dataclass
from ipaddress import (
    IPv4Interface,
    IPv4Network,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

DEFAULT_PORT = 9090
DEFAULT_MTU = 1420  # fits an IPv6 underlay (48) + 32 bytes for a future AEAD header in 1500
DEFAULT_CONFIG_DIR = "/etc/tunvpn"
IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface

LOG_LEVELS = ("debug", "info", "warning", "error")
_TOP_KEYS = ("mode", "server", "listen", "interface", "routes", "forward", "keepalive",
             "peer_timeout", "peers", "log", "max_learned_peers", "max_addresses_per_endpoint")
_MODE_ONLY = {"server": "client", "listen": "server", "peers": "server", "peer_timeout": "server",
              "max_learned_peers": "server", "max_addresses_per_endpoint": "server"}
_IFACE_KEYS = ("name", "address", "mtu")
_LOG_KEYS = ("level", "packets")
_PEER_KEYS = ("name", "allowed_ips", "endpoint")
_PEER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_INSTANCE = re.compile(r"[A-Za-z0-9_.@-]+")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123
_NULL = "tag:yaml.org,2002:null"


@dataclass(frozen=True)
class PeerConfig:
    name: str
    allowed_ips: tuple[IPNetwork, ...]
    endpoint: tuple[str, int | None] | None  # pinned (ip literal, port or None = any port)


@dataclass(frozen=True)
class Profile:
    path: Path
    mode: str  # "client" | "server"
    server: tuple[str, int] | None  # client only: (host, port); host is an IP literal or DNS name
    listen: tuple[str, int]
    ifname: str
    addresses: tuple[IPInterface, ...]
    mtu: int
    routes: tuple[IPNetwork, ...]
    forward: bool
    peers: tuple[PeerConfig, ...]
    keepalive: int  # seconds, 0 = off
    peer_timeout: int
    log_level: str
    log_packets: bool
    max_learned_peers: int = 1024  # server: learned peers at most (core.MAX_LEARNED_PEERS)
    max_addresses_per_endpoint: int = 16  # server: learned addresses per endpoint at most

    @property
    def name(self) -> str:
        """The instance name: the file's stem."""
        return self.path.stem


class ProfileError(Exception):
    """A profile could not be used; ``problems`` lists every reason found."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def resolve_profile(arg: str, config_dir: str | None = None) -> Path:
    """A path as given, or an instance name -> <config dir>/<name>.yaml (existence not checked)."""
    if "/" in arg or arg.endswith((".yaml", ".yml")):
        return Path(arg)
    if not _INSTANCE.fullmatch(arg):
        raise ProfileError([f"{arg!r}: not a profile name (letters, digits and '_.@-' only)"
                            " nor a path to a .yaml file"])
    directory = config_dir or os.environ.get("TUNVPN_CONFIG_DIR") or DEFAULT_CONFIG_DIR
    return Path(directory) / f"{arg}.yaml"


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile; raises ProfileError listing every problem."""
    file = str(path)
    loader, root = _compose(file)
    c = _Checker(loader)
    got = c.mapping(root, "", _TOP_KEYS) or {}

    mode = c.choice(got["mode"], "mode", ("client", "server")) if "mode" in got else None
    if "mode" not in got:
        c.fail(root, "mode", "required (client or server)")
    for key in got:
        if mode and _MODE_ONLY.get(key, mode) != mode:  # mode-specific keys; skip if mode unknown
            c.fail(c.keys[key], key, f"only allowed in {_MODE_ONLY[key]} mode")

    server = None
    if mode == "client" and "server" not in got:
        c.fail(root, "server", "required in client mode")
    elif mode == "client":
        server = c.hostport(got["server"], "server", True, DEFAULT_PORT)
    listen = ("0.0.0.0", DEFAULT_PORT)
    if mode == "server" and "listen" in got:
        listen = c.hostport(got["listen"], "listen", False, DEFAULT_PORT)

    if "interface" not in got:
        c.fail(root, "interface", "required (at least interface.address)")
    iface = c.mapping(got.get("interface"), "interface", _IFACE_KEYS)
    if iface is not None and "interface" in got and "address" not in iface:
        c.fail(got["interface"], "interface.address", "required")
    iface = iface or {}
    ifname = c.ifname(iface["name"], "interface.name") if "name" in iface else "tun%d"
    addresses = c.addresses(iface["address"], "interface.address") if "address" in iface else []
    mtu = DEFAULT_MTU
    if "mtu" in iface:
        node = iface["mtu"]
        mtu = c.integer(node, "interface.mtu", 576, 65535)
        if mtu is not None and mtu < 1280 and any(a.version == 6 for a in addresses):
            c.fail(node, "interface.mtu", f"must be at least 1280 with an IPv6 address, got {mtu}")

    routes = c.networks(got.get("routes"), "routes")
    forward = c.boolean(got["forward"], "forward") if "forward" in got else False
    keepalive = 25 if mode == "client" else 0
    if "keepalive" in got:
        keepalive = c.integer(got["keepalive"], "keepalive", 0, 3600)
    peer_timeout = 180
    peers: tuple[PeerConfig, ...] = ()
    if mode == "server":
        if "peer_timeout" in got:
            peer_timeout = c.integer(got["peer_timeout"], "peer_timeout", 10, 86400)
        peers = c.peers(got.get("peers"))

    limits = {}  # server only (_MODE_ONLY); absent: the Profile defaults
    for key, high in (("max_learned_peers", 1000000), ("max_addresses_per_endpoint", 65536)):
        if key in got:
            limits[key] = c.integer(got[key], key, 1, high)
    log = c.mapping(got.get("log"), "log", _LOG_KEYS) or {}
    level = c.choice(log["level"], "log.level", LOG_LEVELS) if "level" in log else "info"
    packets = c.boolean(log["packets"], "log.packets") if "packets" in log else False

    if c.problems:
        c.problems.sort(key=lambda problem: problem[0])  # stable: same-line problems keep order
        raise ProfileError([f"{file}:{line}: {text}" for line, text in c.problems])
    return Profile(Path(path), mode, server, listen, ifname, tuple(addresses), mtu, tuple(routes),
                   forward, peers, keepalive, peer_timeout, level, packets, **limits)


def _compose(file: str) -> tuple[yaml.SafeLoader, MappingNode]:
    """The file's top node, or ProfileError for problems with the file as a whole."""

    def broken(line: int, what: str) -> ProfileError:
        return ProfileError([f"{file}:{line}: (file): {what}"])

    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise broken(1, "no such file") from None
    except IsADirectoryError:
        raise broken(1, "is a directory, not a profile") from None
    except UnicodeDecodeError:
        raise broken(1, "not UTF-8 text") from None
    except OSError as e:
        raise broken(1, f"cannot read: {e.strerror or e}") from None
    try:
        loader = yaml.SafeLoader(text)  # checks for unprintable characters up front
        root = loader.get_single_node()  # what yaml.compose() does, keeping the loader
        loader.dispose()
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise broken(line, f"not valid YAML: {e.reason} (#x{e.character:04x})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = ", ".join(filter(None, (e.context, e.problem)))
        raise broken(mark.line + 1 if mark else 1, f"not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise broken(1, f"not valid YAML: {e}") from None
    if root is None or root.tag == _NULL:
        raise broken(1, "empty profile (expected settings such as 'mode: client')")
    if not isinstance(root, MappingNode):
        raise broken(root.start_mark.line + 1,
                     f"must be a mapping of settings (key: value), got {_show(root)}")
    return loader, root


def _show(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return repr(node.value) if node.value else "nothing"


class _Checker:
    """Converters from nodes to values. Each records a problem and returns None when it fails."""

    def __init__(self, loader: yaml.SafeLoader):
        self.loader = loader
        self.problems: list[tuple[int, str]] = []
        self.keys: dict[str, Node] = {}  # key path -> key node

    def fail(self, node: Node, path: str, message: str) -> None:
        self.problems.append((node.start_mark.line + 1, f"{path}: {message}"))

    def scalar(self, node: Node) -> Any:
        if not isinstance(node, ScalarNode):
            return node  # a collection: never equal to a wanted scalar type
        try:
            return self.loader.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError):  # unknown tag, or '!!int abc'
            return node

    def mapping(self, node: Node | None, path: str, keys: tuple[str, ...]) -> dict | None:
        """key -> value node for a mapping (key nodes go to self.keys); null counts as empty."""
        if node is None or node.tag == _NULL:
            return {}
        if not isinstance(node, MappingNode):
            return self.fail(node, path, f"must be a mapping, got {_show(node)}")
        entries: dict[str, Node] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, ScalarNode):
                self.fail(knode, path or "(top level)", f"keys must be names, got {_show(knode)}")
                continue
            key = knode.value
            where = f"{path}.{key}" if path else key
            if key in entries:
                first = self.keys[where].start_mark.line + 1
                self.fail(knode, where, f"duplicate key (first at line {first})")
            elif key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(knode, where, f"unknown key{hint}")
            else:
                entries[key], self.keys[where] = vnode, knode
        return entries

    def items(self, node: Node | None, path: str) -> list[tuple[Node, str]]:
        """(node, path) of each list item; null counts as empty."""
        if node is None or node.tag == _NULL:
            return []
        if not isinstance(node, SequenceNode):
            self.fail(node, path, f"must be a list, got {_show(node)}")
            return []
        return [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]

    def text(self, node: Node, path: str) -> str | None:
        value = self.scalar(node)
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return node.value  # e.g. a peer named 1234: keep what was written
        return self.fail(node, path, f"must be a string, got {_show(node)}")

    def choice(self, node: Node, path: str, choices: tuple[str, ...]) -> str | None:
        value = self.text(node, path)
        if value is None or value in choices:
            return value
        return self.fail(node, path, f"must be one of {', '.join(choices)}, got {value!r}")

    def integer(self, node: Node, path: str, low: int, high: int) -> Any:
        value = self.scalar(node)
        if type(value) is not int:  # bool is an int subclass; 'yes' must not pass as 1
            return self.fail(node, path, f"must be an integer, got {_show(node)}")
        if not low <= value <= high:
            return self.fail(node, path, f"must be from {low} to {high}, got {value}")
        return value

    def boolean(self, node: Node, path: str) -> Any:
        value = self.scalar(node)
        if isinstance(value, bool):
            return value
        return self.fail(node, path, f"must be true or false, got {_show(node)}")

    def network(self, node: Node, path: str) -> IPNetwork | None:
        text = self.text(node, path)
        if text is None:
            return None
        try:
            return ip_network(text)  # a bare address is a /32 or /128
        except ValueError:
            pass
        try:
            loose = ip_network(text, strict=False)
        except ValueError:
            return self.fail(node, path, f"{text!r} is not an IP network")
        return self.fail(node, path, f"{text!r} has host bits set (did you mean {loose}?)")

    def networks(self, node: Node | None, path: str) -> list[Any]:
        found: dict[IPNetwork, str] = {}
        for item, where in self.items(node, path):
            net = self.network(item, where)
            if net in found:
                self.fail(item, where, f"{str(net)!r} is already listed as {found[net]}")
            elif net is not None:
                found[net] = where
        return list(found)

    def addresses(self, node: Node, path: str) -> list[Any]:
        """One address/prefix or a list of them; the prefix is required (a silent /32 would
        leave the tunnel's own subnet unrouted)."""
        many = isinstance(node, SequenceNode)
        found = []
        for item, where in self.items(node, path) if many else [(node, path)]:
            text = self.text(item, where)
            if text is None:
                continue
            try:
                address = ip_interface(text)
            except ValueError:
                self.fail(item, where, f"{text!r} is not an IP address with a prefix length")
                continue
            if "/" not in text:
                self.fail(item, where, f"{text!r} needs a prefix length, like {text}/24")
            elif address in found:
                self.fail(item, where, f"{text!r} is listed twice")
            else:
                found.append(address)
        if many and not node.value:
            self.fail(node, path, "must not be empty")
        return found

    def ifname(self, node: Node, path: str) -> str | None:
        name = self.text(node, path)
        if name is None:
            return None
        if not 0 < len(name.encode()) <= 15 or name in (".", ".."):
            return self.fail(node, path, f"{name!r} must be 1 to 15 characters long")
        if re.search(r"[/:\s]", name):
            return self.fail(node, path, f"{name!r} must not contain '/', ':' or whitespace")
        if "%" in name and (name.count("%") > 1 or "%d" not in name):
            return self.fail(node, path, f"{name!r}: a pattern has one '%d', like 'tun%d'")
        return name

    def hostport(self, node: Node, path: str, names: bool, default: int | None) -> Any:
        """host:port, [v6]:port or a bare host -> (host, port or default)."""
        text = self.text(node, path)
        if text is None:
            return None
        try:
            host, port = _parse_hostport(text, names)
        except ValueError as e:
            return self.fail(node, path, f"{text!r}: {e}")
        return host, port or default

    def peers(self, node: Node | None) -> tuple[PeerConfig, ...]:
        peers: list[PeerConfig] = []
        names: dict[str, int] = {}  # name -> line
        owners: list[tuple[Any, str]] = []  # every allowed IP so far, with its peer
        for item, where in self.items(node, "peers"):
            get = self.mapping(item, where, _PEER_KEYS)
            if get is None:
                continue
            name = self.text(get["name"], f"{where}.name") if "name" in get else None
            owner = where  # overlap messages name the peer only when its name identifies it
            if "name" not in get:
                self.fail(item, f"{where}.name", "required")
            elif name is not None and not _PEER_NAME.fullmatch(name):
                self.fail(get["name"], f"{where}.name", f"{name!r} must be 1 to 32 of A-Za-z0-9_.-")
            elif name in names:
                self.fail(get["name"], f"{where}.name",
                          f"{name!r} is already used (line {names[name]})")
            elif name is not None:
                names[name], owner = get["name"].start_mark.line + 1, f"peer {name!r}"
            allowed = []
            ips = get.get("allowed_ips")
            if ips is None:
                self.fail(item, f"{where}.allowed_ips", "required")
            elif ips.tag == _NULL or (isinstance(ips, SequenceNode) and not ips.value):
                self.fail(ips, f"{where}.allowed_ips", "must not be empty")
            for ip, ipwhere in self.items(ips, f"{where}.allowed_ips"):
                net = self.network(ip, ipwhere)
                if net is None:
                    continue
                clash = next(((o, who) for o, who in owners if net.overlaps(o)), None)
                if clash:
                    self.fail(ip, ipwhere, f"{net} of {owner} overlaps {clash[0]} of {clash[1]}")
                else:
                    owners.append((net, owner))
                    allowed.append(net)
            endpoint = None
            if "endpoint" in get:
                endpoint = self.hostport(get["endpoint"], f"{where}.endpoint", False, None)
            peers.append(PeerConfig(name or "", tuple(allowed), endpoint))
        return tuple(peers)


def _parse_hostport(text: str, names: bool) -> tuple[str, int | None]:
    """(host, port or None). A bare IPv6 address takes no port: write [v6]:port for one."""
    port = None
    if match := re.fullmatch(r"\[([^\]]*)\](?::(.*))?", text):
        host, port = match[1], match[2]
        if ":" not in host:
            raise ValueError("only IPv6 addresses go in brackets")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    if port is not None and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise ValueError("port must be a number from 1 to 65535")
    try:
        host = str(ip_address(host))
    except ValueError:
        labels = host.removesuffix(".").split(".")
        is_name = (0 < len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels)
                   and not labels[-1].isdigit())  # all-numeric last label: a mistyped address
        if not (names and is_name):
            raise ValueError(f"{host!r} is not an IP address"
                             + (" or host name" if names else "")) from None
    return host, None if port is None else int(port)
