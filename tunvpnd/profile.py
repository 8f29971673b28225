"""Profiles: a YAML file -> a frozen, validated Profile.

Every problem is collected and reported as ``FILE:LINE: key.path: what is wrong``, so an operator
fixes the whole file in one go. We walk the node tree from yaml's compose() rather than using
safe_load() because nodes keep their line numbers and duplicate keys stay visible; each scalar is
still converted by the SafeLoader's constructor, so YAML types are the standard ones.

Whatever the file holds, load_profile() raises nothing but ProfileError: only regular files of at
most MAX_PROFILE_BYTES are read, nesting is limited, no value is echoed whole, at most
MAX_PROBLEMS problems are listed, and every check is near-linear in the size of the file.
"""

import difflib
import functools
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
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
MAX_PROFILE_BYTES = 1024 * 1024  # far above any real profile (10,000 peers take about 500 kB)
MAX_DEPTH = 64  # levels of nesting; a profile needs 5, and deeper ones only exhaust the stack
MAX_PROBLEMS = 20  # problems listed; the rest are counted in one last line
BITS = {4: 32, 6: 128}

LOG_LEVELS = ("debug", "info", "warning", "error")
WIRES = ("plain", "wireguard")
_TOP_KEYS = ("mode", "server", "listen", "interface", "routes", "forward", "keepalive",
             "peer_timeout", "peers", "log", "max_learned_peers", "max_addresses_per_endpoint",
             "wire", "private_key_file", "server_public_key", "preshared_key_file", "masquerade",
             "table", "fwmark", "mss_clamp", "metrics")
_MODE_ONLY = {"server": "client", "listen": "server", "peers": "server", "peer_timeout": "server",
              "max_learned_peers": "server", "max_addresses_per_endpoint": "server",
              "server_public_key": "client", "preshared_key_file": "client",
              "masquerade": "server", "table": "client", "fwmark": "client"}
_WIREGUARD_ONLY = ("private_key_file", "server_public_key", "preshared_key_file")
_PEER_WIREGUARD_ONLY = ("public_key", "preshared_key_file")
_IFACE_KEYS = ("name", "address", "mtu")
_LOG_KEYS = ("level", "packets")
_PEER_KEYS = ("name", "allowed_ips", "endpoint", "public_key", "preshared_key_file")
_PEER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_INSTANCE = re.compile(r"[A-Za-z0-9_.@-]+")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123
_NULL = "tag:yaml.org,2002:null"
_INT = "tag:yaml.org,2002:int"
_HUGE = object()  # an integer written with too many digits to be worth converting
_EXCERPT = 100  # characters of a value quoted in a message


@dataclass(frozen=True)
class PeerConfig:
    name: str
    allowed_ips: tuple[IPNetwork, ...]
    # plain: a pin (ip literal, port or None = any port); wireguard: WireGuard's Endpoint,
    # where to send before the peer has spoken (ip literal, port), then it follows the peer
    endpoint: tuple[str, int | None] | None
    public_key: bytes | None = None  # wireguard: the peer's static public key
    preshared_key: bytes | None = field(default=None, repr=False)  # wireguard, optional: secret


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
    wire: str = "plain"  # "plain" | "wireguard"
    # wireguard only (None with plain). Secrets never go into a repr: repr=False.
    private_key: bytes | None = field(default=None, repr=False)  # ours, from private_key_file
    public_key: bytes | None = None  # ours, computed from private_key (may be shown)
    server_public_key: bytes | None = None  # client: the server's static public key
    preshared_key: bytes | None = field(default=None, repr=False)  # client, optional
    # server: source NAT for the tunnel networks (tunvpnd.nat): False, True (out of every
    # interface but the TUN) or the names of the outgoing interfaces
    masquerade: bool | tuple[str, ...] = False
    # client with 0.0.0.0/0 or ::/0 in routes (fulltunnel.py); None: derived from the TUN
    table: int | None = None
    fwmark: int | None = None
    mss_clamp: bool = True  # lower the MSS of TCP SYNs crossing the tunnel to fit its MTU
    # Prometheus endpoint (tunvpnd.metrics): (IP literal, TCP port), None = off
    metrics: tuple[str, int] | None = None

    @property
    def name(self) -> str:
        """The instance name: the file's stem."""
        return self.path.stem


class ProfileError(Exception):
    """A profile could not be used; ``problems`` lists the reasons found (at most MAX_PROBLEMS,
    then a line counting the rest), ``count`` how many there are in all."""

    def __init__(self, problems: list[str], count: int | None = None):
        super().__init__("\n".join(problems))
        self.problems = problems
        self.count = len(problems) if count is None else count


def resolve_profile(arg: str, config_dir: str | None = None) -> Path:
    """A path as given, or an instance name -> <config dir>/<name>.yaml (existence not checked)."""
    if "/" in arg or arg.endswith((".yaml", ".yml")):
        return Path(arg)
    if not _INSTANCE.fullmatch(arg):
        raise ProfileError([f"{arg!r}: not a profile name (letters, digits and '_.@-' only)"
                            " nor a path to a .yaml file"])
    directory = config_dir or os.environ.get("TUNVPN_CONFIG_DIR") or DEFAULT_CONFIG_DIR
    return Path(directory) / f"{arg}.yaml"


def _only_profile_errors(load: Callable[[str | Path], Profile]) -> Callable[[str | Path], Profile]:
    """The last guard: any other exception becomes a ProfileError (never a traceback at start,
    never a dead daemon on reload). The checks below are meant to make it unreachable."""

    @functools.wraps(load)
    def guarded(path: str | Path) -> Profile:
        try:
            return load(path)
        except ProfileError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever the file, a message, not a crash
            raise ProfileError([f"{path}:1: (file): cannot be checked: "
                                f"{type(error).__name__}: {_excerpt(str(error))}"]) from None
    return guarded


def covering_route(routes: Iterable[IPNetwork], address: str) -> IPNetwork | None:
    """The first of `routes` that holds `address` (an IP literal, maybe with a %zone or
    v4-mapped), or None. A client route holding its server's address would send the daemon's own
    datagrams into its TUN: check refuses it for a literal, the daemon for a resolved name."""
    ip = ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    forms = [ip, mapped] if mapped else [ip]
    for route in routes:
        if any(form.version == route.version and form in route for form in forms):
            return route
    return None


@_only_profile_errors
def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile; raises ProfileError listing every problem."""
    file = str(path)
    loader, root = _compose(file)
    c = _Checker(loader)
    got = c.mapping(root, "", _TOP_KEYS) or {}

    mode = c.choice(got["mode"], "mode", ("client", "server")) if "mode" in got else None
    if "mode" not in got:
        c.fail(root, "mode", "required (client or server)")
    misplaced = {key for key in got if mode and _MODE_ONLY.get(key, mode) != mode}
    for key in got:
        if key in misplaced:  # mode-specific keys; skipped if the mode is unknown
            c.fail(c.keys[key], key, f"only allowed in {_MODE_ONLY[key]} mode")
    wire = c.choice(got["wire"], "wire", WIRES) if "wire" in got else "plain"
    c.wire = wire
    if wire == "plain":
        for key in _WIREGUARD_ONLY:
            if key in got and key not in misplaced:
                c.fail(c.keys[key], key, _plain_says(got))

    server = None
    if mode == "client" and "server" not in got:
        c.fail(root, "server", "required in client mode")
    elif mode == "client":
        server = c.hostport(got["server"], "server", True, DEFAULT_PORT)
    listen = ("0.0.0.0", DEFAULT_PORT)
    if mode == "server" and "listen" in got:
        listen = c.hostport(got["listen"], "listen", False, DEFAULT_PORT, wildcard=True)

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
    c.loops(server)
    policy = c.full_tunnel(got, routes, Path(path)) if mode == "client" else {}
    forward = c.boolean(got["forward"], "forward") if "forward" in got else False
    keepalive = 25 if mode == "client" else 0
    if "keepalive" in got:
        keepalive = c.integer(got["keepalive"], "keepalive", 0, 3600)
    keys = {}  # wireguard: the Profile's key fields
    if wire == "wireguard" and mode is not None:
        keys = c.wireguard(root, got, mode, Path(path).parent)
    peer_timeout = 180
    peers: tuple[PeerConfig, ...] = ()
    if mode == "server":
        if "peer_timeout" in got:
            peer_timeout = c.integer(got["peer_timeout"], "peer_timeout", 10, 86400)
        peers = c.peers(got.get("peers"))
        node = got.get("peers")
        if wire == "wireguard" and (node is None or node.tag == _NULL
                                    or isinstance(node, SequenceNode) and not node.value):
            c.fail(node or root, "peers", "required with wire: wireguard (each peer with its "
                   "public_key and allowed_ips): a wireguard server learns no peers")
        for peer in peers:
            c.loops(peer.endpoint, f"the endpoint of peer {peer.name!r}")

    limits = {}  # server only (_MODE_ONLY); absent: the Profile defaults
    for key, high in (("max_learned_peers", 1000000), ("max_addresses_per_endpoint", 65536)):
        if key in got:
            limits[key] = c.integer(got[key], key, 1, high)
    if "masquerade" in got and mode == "server":
        limits["masquerade"] = c.masquerade(got["masquerade"], ifname)
    metrics = c.metrics(got["metrics"]) if "metrics" in got else None
    log = c.mapping(got.get("log"), "log", _LOG_KEYS) or {}
    level = c.choice(log["level"], "log.level", LOG_LEVELS) if "level" in log else "info"
    packets = c.boolean(log["packets"], "log.packets") if "packets" in log else False
    mss_clamp = c.boolean(got["mss_clamp"], "mss_clamp") if "mss_clamp" in got else True

    if c.problems:
        raise ProfileError(c.report(file), len(c.problems) + c.dropped)
    return Profile(Path(path), mode, server, listen, ifname, tuple(addresses), mtu, tuple(routes),
                   forward, peers, keepalive, peer_timeout, level, packets, **limits, wire=wire,
                   **keys, **policy, mss_clamp=mss_clamp, metrics=metrics)


def _plain_says(got: dict) -> str:
    how = "wire: plain" if "wire" in got else "wire: plain, the default"
    return f"only used with wire: wireguard (this profile is {how})"


def _compose(file: str) -> tuple[yaml.SafeLoader, MappingNode]:
    """The file's top node, or ProfileError for problems with the file as a whole."""

    def broken(line: int, what: str) -> ProfileError:
        return ProfileError([f"{file}:{line}: (file): {what}"])

    try:
        text = _read(file).decode("utf-8")
    except FileNotFoundError:
        raise broken(1, "no such file") from None
    except UnicodeDecodeError:
        raise broken(1, "not UTF-8 text") from None
    except _Unreadable as e:
        raise broken(1, str(e)) from None
    except OSError as e:
        raise broken(1, f"cannot read: {e.strerror or e}") from None
    except ValueError as e:  # a NUL in the path
        raise broken(1, f"cannot read: {e}") from None
    try:
        loader, root = _parse(text)
    except _TooDeep as e:
        raise broken(e.line, f"nested more than {MAX_DEPTH} levels deep") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise broken(line, f"not valid YAML: {e.reason} (#x{e.character:04x})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = _cut(", ".join(filter(None, (e.context, e.problem))))
        raise broken(mark.line + 1 if mark else 1, f"not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise broken(1, f"not valid YAML: {_cut(str(e))}") from None
    if root is None or root.tag == _NULL:
        raise broken(1, "empty profile (expected settings such as 'mode: client')")
    if not isinstance(root, MappingNode):
        raise broken(root.start_mark.line + 1,
                     f"must be a mapping of settings (key: value), got {_show(root)}")
    return loader, root


class _Unreadable(Exception):
    """A path that is not worth reading as a profile; the message says why."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _check_regular(info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise _Unreadable("is a directory, not a profile")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a file")
        raise _Unreadable(f"is {kind}, not a profile (only regular files are read)")
    if info.st_size > MAX_PROFILE_BYTES:
        raise _Unreadable(f"is {info.st_size} bytes, larger than the limit of "
                          f"{MAX_PROFILE_BYTES} for a profile")


def _read(file: str) -> bytes:
    """A regular file's bytes, at most MAX_PROFILE_BYTES. A FIFO or device is refused before it
    is opened (opening some has side effects); O_NONBLOCK and fstat() catch one swapped in since,
    so nothing here can block, and at most one byte past the limit is ever read."""
    _check_regular(os.stat(file))
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _check_regular(os.fstat(fd))
        chunks, size = [], 0
        while size <= MAX_PROFILE_BYTES:
            chunk = os.read(fd, MAX_PROFILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_PROFILE_BYTES:  # it grew, or its size is not known up front (/proc)
        raise _Unreadable(f"is larger than the limit of {MAX_PROFILE_BYTES} bytes for a profile")
    return b"".join(chunks)


class _TooDeep(Exception):
    def __init__(self, line: int):
        self.line = line


class _Loader(yaml.SafeLoader):
    """The pure-Python SafeLoader, refusing nesting that would exhaust the stack (its composer
    recurses once per level)."""

    depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _parse(text: str) -> tuple[yaml.SafeLoader, Node | None]:
    """(loader, top node). libyaml's parser when there is one, for speed (a profile with 10,000
    peers: 0.3 s instead of 1.5 s); the pure-Python one for anything it finds wrong, so that
    messages are the same with and without libyaml."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None and not yaml.reader.Reader.NON_PRINTABLE.search(text):
        try:
            if _depth_within_limit(fast(text)):  # libyaml's composer recurses too
                loader = fast(text)
                return loader, loader.get_single_node()
        except yaml.YAMLError:
            pass
    loader = _Loader(text)  # checks for unprintable characters up front
    root = loader.get_single_node()  # what yaml.compose() does, keeping the loader
    loader.dispose()
    return loader, root


def _depth_within_limit(parser: yaml.SafeLoader) -> bool:
    depth = 0
    while (event := parser.get_event()) is not None:
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return True


def _cut(text: str) -> str:
    return text if len(text) <= _EXCERPT else f"{text[:_EXCERPT - 8]}..."


def _excerpt(text: str) -> str:
    """`text` quoted, cut short if long: a message never echoes a huge value whole."""
    if len(text) <= _EXCERPT:
        return repr(text)
    return f"{text[:_EXCERPT - 8]!r}... ({len(text)} characters)"


def _show(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return _excerpt(node.value) if node.value else "nothing"


class _Checker:
    """Converters from nodes to values. Each records a problem and returns None when it fails."""

    def __init__(self, loader: yaml.SafeLoader):
        self.loader = loader
        self.problems: list[tuple[int, int, str]] = []  # (line, order found, text)
        self.dropped = 0  # problems beyond the MAX_PROBLEMS first ones, by line
        self.keys: dict[str, Node] = {}  # key path -> key node
        self.listed: dict[str, list[tuple[Any, Node, str]]] = {}  # path -> (value, node, where)
        self._networks: dict[str, tuple[IPNetwork | None, str]] = {}  # text -> (net, problem)
        self.wire: str | None = "plain"  # None: unknown (the value was wrong)
        self.profile_dir = Path(".")  # where relative key file names are found (after creds)
        self.own_public: bytes | None = None  # wireguard: the public key of our private key

    def fail(self, node: Node, path: str, message: str) -> None:
        self.problems.append((node.start_mark.line + 1, len(self.problems) + self.dropped,
                              f"{path}: {message}"))
        if len(self.problems) > 10 * MAX_PROBLEMS:  # keep memory bounded, whatever the file
            self._trim()

    def _trim(self) -> None:
        self.problems.sort()
        self.dropped += len(self.problems[MAX_PROBLEMS:])
        del self.problems[MAX_PROBLEMS:]

    def report(self, file: str) -> list[str]:
        """The first MAX_PROBLEMS problems in line order (same-line ones in the order found),
        each as FILE:LINE: text, and a count of the rest."""
        self._trim()
        lines = [f"{file}:{line}: {text}" for line, _, text in self.problems]
        if self.dropped:
            lines.append(f"... and {self.dropped} more problem{'s' * (self.dropped > 1)}")
        return lines

    def scalar(self, node: Node) -> Any:
        if not isinstance(node, ScalarNode):
            return node  # a collection: never equal to a wanted scalar type
        if node.tag == _INT and _huge_integer(node.value):
            return _HUGE  # converting it would fail (4300 digits) or take long (sexagesimal)
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
            shown = key if len(key) <= _EXCERPT and key.isprintable() else _excerpt(key)
            where = f"{path}.{shown}" if path else shown
            if key in entries:
                first = self.keys[where].start_mark.line + 1
                self.fail(knode, where, f"duplicate key (first at line {first})")
            elif key not in keys:
                close = difflib.get_close_matches(key, keys, n=1) if key is shown else []
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
        if value is _HUGE or isinstance(value, int | float) and not isinstance(value, bool):
            return node.value  # e.g. a peer named 1234: keep what was written
        return self.fail(node, path, f"must be a string, got {_show(node)}")

    def choice(self, node: Node, path: str, choices: tuple[str, ...]) -> str | None:
        value = self.text(node, path)
        if value is None or value in choices:
            return value
        return self.fail(node, path, f"must be one of {', '.join(choices)}, "
                         f"got {_excerpt(value)}")

    def integer(self, node: Node, path: str, low: int, high: int) -> Any:
        value = self.scalar(node)
        if value is not _HUGE and type(value) is not int:  # a bool must not pass as 0 or 1
            return self.fail(node, path, f"must be an integer, got {_show(node)}")
        if value is _HUGE or not low <= value <= high:
            shown = value if len(node.value) <= 20 else _excerpt(node.value)
            return self.fail(node, path, f"must be from {low} to {high}, got {shown}")
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
        if text not in self._networks:  # aliases can repeat one list thousands of times
            self._networks[text] = _parse_network(text)
        net, problem = self._networks[text]
        if problem:
            self.fail(node, path, problem)
        return net

    def networks(self, node: Node | None, path: str) -> list[Any]:
        found: dict[IPNetwork, str] = {}
        listed = self.listed.setdefault(path, [])
        for item, where in self.items(node, path):
            net = self.network(item, where)
            if net in found:
                self.fail(item, where, f"{str(net)!r} is already listed as {found[net]}")
            elif net is not None:
                found[net] = where
                listed.append((net, item, where))
        return list(found)

    def addresses(self, node: Node, path: str) -> list[Any]:
        """One address/prefix or a list of them; the prefix is required (a silent /32 would
        leave the tunnel's own subnet unrouted)."""
        many = isinstance(node, SequenceNode)
        found = []
        listed = self.listed.setdefault(path, [])
        for item, where in self.items(node, path) if many else [(node, path)]:
            text = self.text(item, where)
            if text is None:
                continue
            try:
                address = ip_interface(text)
            except ValueError:
                self.fail(item, where, f"{_excerpt(text)} is not an IP address with a prefix "
                          "length")
                continue
            if "/" not in text:
                self.fail(item, where, f"{_excerpt(text)} needs a prefix length, like "
                          f"{_cut(text)}/24")
            elif address in found:
                self.fail(item, where, f"{text!r} is listed twice")
            else:
                found.append(address)
                listed.append((address, item, where))
        if many and not node.value:
            self.fail(node, path, "must not be empty")
        return found

    def ifname(self, node: Node, path: str) -> str | None:
        name = self.text(node, path)
        if name is None:
            return None
        if re.search(r"[/:\s]", name):
            return self.fail(node, path, f"{_excerpt(name)} must not contain '/', ':' or "
                             "whitespace")
        if not name.isprintable():  # a NUL would cut the name short in the kernel
            return self.fail(node, path, f"{_excerpt(name)} must not contain control "
                             "characters")
        if not 0 < len(name.encode()) <= 15 or name in (".", ".."):
            return self.fail(node, path, f"{_excerpt(name)} must be 1 to 15 characters long")
        if "%" in name and (name.count("%") > 1 or "%d" not in name):
            return self.fail(node, path, f"{name!r}: a pattern has one '%d', like 'tun%d'")
        if name == "%d":
            return self.fail(node, path, "'%d' alone would name the interface '0': put a name "
                             "before it, like 'tun%d'")
        return name

    def masquerade(self, node: Node, tun: str | None) -> Any:
        """true/false, or a list of outgoing interface names (not the TUN, no patterns)."""
        if not isinstance(node, SequenceNode):
            value = self.scalar(node)
            if isinstance(value, bool):
                return value
            return self.fail(node, "masquerade", "must be true, false or a list of interface "
                             f"names, got {_show(node)}")
        found: list[str] = []
        for item, where in self.items(node, "masquerade"):
            name = self.ifname(item, where)
            if name is None:
                continue
            if "%" in name:
                self.fail(item, where, f"{name!r}: an interface name, not a pattern")
            elif name == tun:
                self.fail(item, where, f"{name!r} is the tunnel's own interface: list the "
                          "interfaces traffic leaves through")
            elif name in found:
                self.fail(item, where, f"{name!r} is listed twice")
            else:
                found.append(name)
        if not node.value:
            self.fail(node, "masquerade", "must not be empty (false turns masquerade off)")
        return tuple(found)

    def metrics(self, node: Node) -> tuple[str, int] | None:
        """ADDRESS:PORT or [V6]:PORT to serve /metrics on (a bare address: port 9586);
        null or false: off."""
        value = self.scalar(node)
        if node.tag == _NULL or value is False:
            return None
        if not isinstance(value, str):
            return self.fail(node, "metrics", "must be an address and TCP port like "
                             f"127.0.0.1:9586 or [::1]:9586, or false, got {_show(node)}")
        return self.hostport(node, "metrics", False, 9586, wildcard=True)

    def hostport(self, node: Node, path: str, names: bool, default: int | None,
                 wildcard: bool = False) -> Any:
        """host:port, [v6]:port or a bare host -> (host, port or default). An address must be
        one a UDP socket can use as that end: `wildcard` allows 0.0.0.0 and :: (listen)."""
        text = self.text(node, path)
        if text is None:
            return None
        try:
            host, port = _parse_hostport(text, names)
            if ip := _as_ip(host):
                _check_unicast(ip, wildcard)
        except ValueError as e:
            return self.fail(node, path, f"{_excerpt(text)}: {e}")
        return host, port or default

    def loops(self, hostport: tuple[str, int | None] | None, what: str = "the server") -> None:
        """A tunnel network or route holding the address our datagrams go to would carry them
        into the TUN itself: known before start when that address is a literal."""
        ip = _as_ip(hostport[0]) if hostport else None
        if ip is None:
            return
        # 0.0.0.0/0 and ::/0 go through policy routing (a full tunnel): our datagrams carry a
        # mark that keeps them out of the tunnel (fulltunnel.py)
        routes = [(net, node, where) for net, node, where in self.listed.get("routes", [])
                  if net.prefixlen or what != "the server"]
        route = covering_route([net for net, _, _ in routes], hostport[0])
        if route is not None:
            node, where = next((n, w) for net, n, w in routes if net == route)
            full = what == "the server"  # a client: its full tunnel is routed around that
            self.fail(node, where, f"{route} covers {what} {ip}, so the tunnel would carry its "
                      "own datagrams into itself" + ("; only 0.0.0.0/0 and ::/0 (a full "
                                                     "tunnel) are routed around that" if full
                                                     else ""))
        for address, node, where in self.listed.get("interface.address", ()):
            if covering_route([address.network], hostport[0]):
                self.fail(node, where, f"{address} puts {what} {ip} inside the tunnel network, "
                          "so the tunnel would carry its own datagrams into itself")

    def full_tunnel(self, got: dict, routes: list[Any], path: Path) -> dict:
        """table: and fwmark: of a client; they need 0.0.0.0/0 or ::/0 in routes, must not be
        the kernel's tables or 0, nor the same as another profile's in this directory."""
        found: dict[str, int] = {}
        full = any(net.prefixlen == 0 for net in routes)
        for key in ("table", "fwmark"):
            if key not in got:
                continue
            node = got[key]
            value = self.integer(node, key, 1, 0xFFFFFFFF)
            if value is None:
                continue
            if not full:
                self.fail(node, key, "only used with a full tunnel (0.0.0.0/0 or ::/0 in "
                          "routes)")
            elif key == "table" and value in (253, 254, 255):
                self.fail(node, key, f"{value} is one of the kernel's tables (default, main, "
                          "local): choose another, or leave table: out")
            elif (other := _sibling_with(path, key, value)) is not None:
                self.fail(node, key, f"{value} is also the {key} of {other}: two instances "
                          "would share it")
            else:
                found[key] = value
        return found

    def key(self, node: Node, path: str) -> bytes | None:
        """A public key written in the profile, as `wg pubkey` prints it."""
        from .wireguard.keys import decode_key  # here: plain profiles never load cryptography

        text = self.text(node, path)
        if text is None:
            return None
        try:
            return decode_key(text)
        except ValueError as error:  # its message never quotes the text
            return self.fail(node, path, str(error))

    def key_file(self, node: Node, path: str) -> bytes | None:
        """The secret key in the file a profile names, read as `run` reads it: the message of a
        KeyFileError names the file, never its content."""
        from .wireguard.keys import KeyFileError, decode_key, read_key_file

        name = self.text(node, path)
        if name is None:
            return None
        try:
            decode_key(name)
        except ValueError:
            pass  # a file name, as expected
        else:  # a secret in the profile: never echoed, not even as a missing file's name
            return self.fail(node, path, "is a key, not the name of a file: put the key in a "
                             "file (`tunvpnd genkey > NAME.key`, mode 0600) and name that file "
                             "here")
        try:
            return read_key_file(name, self.profile_dir, private=True)
        except KeyFileError as error:
            return self.fail(node, path, str(error))
        except ValueError:  # a NUL in the name
            return self.fail(node, path, f"{_excerpt(name)} is not a file name")

    def wireguard(self, root: Node, got: dict, mode: str, profile_dir: Path) -> dict:
        """The key fields of a wireguard Profile: ours, and the client's server keys."""
        from .wireguard.keys import public_key

        self.profile_dir = profile_dir
        keys: dict[str, Any] = {}
        if "private_key_file" in got:
            private = self.key_file(got["private_key_file"], "private_key_file")
            if private is not None:
                self.own_public = public_key(private)
                keys.update(private_key=private, public_key=self.own_public)
        else:
            self.fail(root, "private_key_file", "required with wire: wireguard (a file holding "
                      "our private key, as `tunvpnd genkey` or `wg genkey` writes it)")
        if mode == "client":
            if "server_public_key" in got:
                node = got["server_public_key"]
                key = self.key(node, "server_public_key")
                if key is not None and key == self.own_public:
                    self.fail(node, "server_public_key", "is our own public key (that of "
                              "private_key_file): the server has a key of its own")
                keys["server_public_key"] = key
            else:
                self.fail(root, "server_public_key", "required with wire: wireguard in client "
                          "mode (the server's public key, as `wg pubkey` prints it)")
            if "preshared_key_file" in got:
                keys["preshared_key"] = self.key_file(got["preshared_key_file"],
                                                      "preshared_key_file")
        return keys

    def peer_keys(self, item: Node, get: dict, where: str, owner: str,
                  seen: dict[bytes, tuple[str, int]]) -> dict:
        """A peer's public_key and preshared key (wireguard), or problems for them (plain)."""
        if self.wire != "wireguard":
            for key in _PEER_WIREGUARD_ONLY:
                if key in get and self.wire == "plain":
                    self.fail(self.keys[f"{where}.{key}"], f"{where}.{key}",
                              "only used with wire: wireguard (this profile is wire: plain)")
            return {}
        found: dict[str, Any] = {}
        if "public_key" not in get:
            self.fail(item, f"{where}.public_key", "required with wire: wireguard (the peer's "
                      "public key, as `wg pubkey` prints it)")
        else:
            node = get["public_key"]
            key = found["public_key"] = self.key(node, f"{where}.public_key")
            line = node.start_mark.line + 1
            if key is not None and key == self.own_public:
                self.fail(node, f"{where}.public_key", "is our own public key (that of "
                          "private_key_file): a peer is another host, with a key of its own")
            elif key is not None and key in seen:
                other, first = seen[key]
                self.fail(node, f"{where}.public_key", f"the same public key as {other} (line "
                          f"{first}): each peer has a key of its own")
            elif key is not None:
                seen[key] = (owner, line)
        if "preshared_key_file" in get:
            found["preshared_key"] = self.key_file(get["preshared_key_file"],
                                                   f"{where}.preshared_key_file")
        return found

    def peers(self, node: Node | None) -> tuple[PeerConfig, ...]:
        peers: list[PeerConfig] = []
        names: dict[str, int] = {}  # name -> line
        owners: list[tuple[Any, str, Node, str]] = []  # every allowed IP: (net, peer, node, path)
        lists: dict[Node, str] = {}  # each allowed_ips list node -> its first path
        public_keys: dict[bytes, tuple[str, int]] = {}  # wireguard: key -> (peer, line)
        for item, where in self.items(node, "peers"):
            get = self.mapping(item, where, _PEER_KEYS)
            if get is None:
                continue
            name = self.text(get["name"], f"{where}.name") if "name" in get else None
            owner = where  # overlap messages name the peer only when its name identifies it
            if "name" not in get:
                self.fail(item, f"{where}.name", "required")
            elif name is not None and not _PEER_NAME.fullmatch(name):
                self.fail(get["name"], f"{where}.name",
                          f"{_excerpt(name)} must be 1 to 32 of A-Za-z0-9_.-")
            elif name in names:
                self.fail(get["name"], f"{where}.name",
                          f"{name!r} is already used (line {names[name]})")
            elif name is not None:
                names[name], owner = get["name"].start_mark.line + 1, f"peer {name!r}"
            allowed = []
            ips = get.get("allowed_ips")
            shared = lists.get(ips) if isinstance(ips, SequenceNode) and ips.value else None
            if ips is None:
                self.fail(item, f"{where}.allowed_ips", "required")
            elif ips.tag == _NULL or (isinstance(ips, SequenceNode) and not ips.value):
                self.fail(ips, f"{where}.allowed_ips", "must not be empty")
            elif shared:  # one problem, not one per network, however long the list
                self.fail(self.keys[f"{where}.allowed_ips"], f"{where}.allowed_ips",
                          f"the same list as {shared} (a YAML "
                          "alias), so each of its networks would belong to two peers")
                ips = None
            elif isinstance(ips, SequenceNode):
                lists[ips] = f"{where}.allowed_ips"
            for ip, ipwhere in self.items(ips, f"{where}.allowed_ips"):
                net = self.network(ip, ipwhere)
                if net is not None:
                    owners.append((net, owner, ip, ipwhere))
                    allowed.append(net)
            endpoint = None
            if "endpoint" in get:
                endpoint = self.hostport(get["endpoint"], f"{where}.endpoint", False, None)
                if endpoint and endpoint[1] is None and self.wire == "wireguard":
                    host = f"[{endpoint[0]}]" if ":" in endpoint[0] else endpoint[0]
                    endpoint = self.fail(get["endpoint"], f"{where}.endpoint", "needs a port "
                                         "with wire: wireguard (where the first handshake is "
                                         f"sent), like {host}:{DEFAULT_PORT}")
            keys = self.peer_keys(item, get, where, owner, public_keys)
            peers.append(PeerConfig(name or "", tuple(allowed), endpoint, **keys))
        for later, earlier in _overlaps([net for net, *_ in owners]):
            net, owner, ip, ipwhere = owners[later]
            other, who = owners[earlier][:2]
            self.fail(ip, ipwhere, f"{net} of {owner} overlaps {other} of {who}")
        return tuple(peers)


def _sibling_with(path: Path, key: str, value: int) -> str | None:
    """Another profile in the same directory whose `key` (table, fwmark) is `value`: the name of
    its file, or None. Only what can be seen: unreadable or broken files are skipped."""
    here = path.resolve() if path.exists() else path
    try:
        siblings = sorted(path.parent.glob("*.yaml"))
    except OSError:
        return None
    for other in siblings[:1000]:
        try:
            if other.resolve() == here or not other.is_file():
                continue
            if other.stat().st_size > MAX_PROFILE_BYTES:
                continue
            data = yaml.safe_load(_read(str(other)))
        except (OSError, ValueError, yaml.YAMLError, _Unreadable, RecursionError):
            continue
        if isinstance(data, dict) and data.get(key) == value and type(data.get(key)) is int:
            return other.name
    return None


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
            raise ValueError(f"{_excerpt(host)} is not an IP address"
                             + (" or host name" if names else "")) from None
    return host, None if port is None else int(port)


def _parse_network(text: str) -> tuple[IPNetwork | None, str]:
    """(network, "") or (None, what is wrong with the text)."""
    try:
        return ip_network(text), ""  # a bare address is a /32 or /128
    except ValueError:
        pass
    try:
        loose = ip_network(text, strict=False)
    except ValueError:
        return None, f"{_excerpt(text)} is not an IP network"
    return None, f"{text!r} has host bits set (did you mean {loose}?)"


def _overlaps(nets: list[IPNetwork]) -> list[tuple[int, int]]:
    """(i, j) for each network nets[i] that overlaps an earlier one, j the earliest of those.

    Two CIDR networks overlap only when one holds the other, so one sweep in address order
    with a stack of the networks that hold the current one finds every pair in O(n log n):
    the 10,000 peers of a large profile are checked in milliseconds, not minutes.
    """
    never = len(nets)  # an index after every real one
    order = sorted((net.version, int(net.network_address), net.prefixlen, i)
                   for i, net in enumerate(nets))
    found: dict[int, int] = {}
    # each frame: [version, last address, index, earliest holder above, earliest held within]
    stack: list[list[int]] = []

    def pop() -> None:
        _, _, index, above, within = stack.pop()
        earliest = min(above, within)
        if earliest < index:
            found[index] = earliest
        if stack:
            stack[-1][4] = min(stack[-1][4], index, within)

    for version, first, prefix, i in order:
        while stack and (stack[-1][0] != version or stack[-1][1] < first):
            pop()
        above = min(stack[-1][2], stack[-1][3]) if stack else never
        last = first | ((1 << (BITS[version] - prefix)) - 1)
        stack.append([version, last, i, above, never])
    while stack:
        pop()
    return sorted(found.items())


def _huge_integer(text: str) -> bool:
    """Whether a YAML 1.1 integer is far beyond any setting's range (more than 100 digits, or
    base 60 with more than 10 parts), so it is never converted."""
    digits = text.replace("_", "").lstrip("+-")
    if ":" in digits:
        return digits.count(":") > 10 and re.fullmatch(r"[0-9:]+", digits) is not None
    if digits[:2] in ("0x", "0b"):
        digits = digits[2:]
    return len(digits.lstrip("0")) > 100 and re.fullmatch(r"[0-9a-fA-F]+", digits) is not None


def _as_ip(host: str) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(host)
    except ValueError:
        return None


def _check_unicast(address: IPv4Address | IPv6Address, wildcard: bool) -> None:
    """Raise ValueError unless a UDP socket can talk to (or, `wildcard`, listen on) `address`:
    the kernel refuses the others at run time (EACCES, EINVAL), or nothing ever answers."""
    plain = getattr(address, "ipv4_mapped", None) or address
    if plain.is_unspecified and not wildcard:
        raise ValueError(f"{plain} is the unspecified address, not one that can be reached")
    if plain == IPv4Address("255.255.255.255"):
        raise ValueError(f"{plain} is the broadcast address")
    if plain.is_multicast:
        raise ValueError(f"{plain} is a multicast address")
    zone = getattr(address, "scope_id", None)
    if zone is not None and not address.is_link_local:
        raise ValueError(f"{address}: only a link-local address takes a %zone")
    if zone is not None and not (zone.isprintable() and len(zone.encode()) <= 15):
        raise ValueError(f"{_excerpt(zone)} is not an interface name or number")
    if address.version == 6 and address.is_link_local and zone is None:
        raise ValueError(f"{address} is link-local: add the interface as a zone, like "
                         f"{address}%eth0")
