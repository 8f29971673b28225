"""Addresses, MTU, routes and IPv4 forwarding over rtnetlink, with a crash-recovery state file.

Everything goes through one pyroute2 IPRoute socket: the daemon may run with PATH empty and
under systemd's ProtectKernelTunables (read-only /proc/sys), so no ip(8) and no sysctl writes.
Works with pyroute2 0.7.2 (Debian 12) and 0.9.x (PyPI).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from ipaddress import IPv4Interface, IPv6Interface, ip_interface, ip_network
from pathlib import Path
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, nla, nlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_SETLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from . import fulltunnel

# Our routes carry this protocol number so we can find (and only ever delete) our own.  Numbers
# above RTPROT_STATIC (4) are free for routing daemons; 86 is neither in linux/rtnetlink.h nor
# in iproute2's rt_protos.  `ip route show proto 86` lists them.
RTPROT_TUNVPND = 86

RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTN_NAMES = {2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
             7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}
RTPROT_NAMES = {1: "redirect", 2: "kernel", 3: "boot", 4: "static", 9: "ra", 16: "dhcp"}
RT_SCOPE_LINK = 253  # what `ip route add NET dev X` uses for an IPv4 route without gateway
IFF_LOOPBACK = 0x8
IFF_MULTICAST = 0x1000
IFA_F_NODAD = 0x02  # a point-to-point TUN has no neighbours: skip DAD, usable at once
IFLA_AF_SPEC = 26
IFLA_INET_CONF = 1
IPV4_DEVCONF_FORWARDING = 1  # linux/ip.h: the devconf indices are 1-based
IN6_ADDR_GEN_MODE_NONE = 1  # linux/if_link.h

STATE_MAX_BYTES = 1 << 20  # ours are a few hundred bytes; anything this big is not one

Address = IPv4Interface | IPv6Interface


class NetConfigError(OSError):
    """A netlink request failed; the message names the interface or route."""


class _InetConfMsg(nlmsg):
    """RTM_SETLINK body: IFLA_AF_SPEC / AF_INET / IFLA_INET_CONF / {devconf index: u32}.

    pyroute2's ifinfmsg models AF_INET as the flat u32 array the kernel sends (fine for
    reading), but the kernel accepts nested attributes whose type is the devconf index
    (net/ipv4/devinet.c, inet_set_link_af).  This is a sibling of ifinfmsg, not a subclass:
    pyroute2 caches each class's compiled nla map, and a subclass would reuse ifinfmsg's.
    """

    fields = ifinfmsg.fields
    nla_map = ((IFLA_AF_SPEC, "IFLA_AF_SPEC", "af_spec"),)

    class af_spec(nla):
        nla_map = ((AF_INET, "AF_INET", "inet"),)

        class inet(nla):
            nla_map = ((IFLA_INET_CONF, "IFLA_INET_CONF", "conf"),)

            class conf(nla):
                nla_map = ((IPV4_DEVCONF_FORWARDING, "IPV4_DEVCONF_FORWARDING", "uint32"),)


def _forwarding(link: Any) -> int | None:
    """The IPv4 forwarding flag from an RTM_NEWLINK message (None: no IPv4 on the link).

    pyroute2 decodes AF_INET as a struct whose first u32 ('dummy') is the IFLA_INET_CONF
    header, so 'forwarding' lands on conf[IPV4_DEVCONF_FORWARDING - 1], as in both versions.
    """
    spec = link.get_attr("IFLA_AF_SPEC")
    inet = spec.get_attr("AF_INET") if spec is not None else None
    return None if inet is None else inet["forwarding"]


def _start_time(pid: int) -> str | None:
    """Start time of a process (field 22 of /proc/PID/stat), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _route_net(msg: Any) -> str:
    dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if msg["family"] == AF_INET else "::")
    return str(ip_network(f"{dst}/{msg['dst_len']}"))


def _route_table(msg: Any) -> int:
    return msg.get_attr("RTA_TABLE") or msg["table"]


def _describe(msg: Any, links: dict[int, str]) -> str:
    """A route the way `ip route` shows it, e.g. "0.0.0.0/0 via 10.9.0.11 dev eth0 proto boot"."""
    words = [] if msg["type"] == RTN_UNICAST else [RTN_NAMES.get(msg["type"], str(msg["type"]))]
    words.append(_route_net(msg))
    gateway = msg.get_attr("RTA_GATEWAY")
    if gateway:
        words.append(f"via {gateway}")
    oif = msg.get_attr("RTA_OIF")
    if oif is not None:
        words.append(f"dev {links.get(oif, f'#{oif}')}")
    elif msg.get_attr("RTA_MULTIPATH"):
        words.append("with several next hops")
    words.append(f"proto {RTPROT_NAMES.get(msg['proto'], msg['proto'])}")
    metric = msg.get_attr("RTA_PRIORITY")
    if metric:
        words.append(f"metric {metric}")
    return " ".join(words)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _state_problem(state: Any) -> str | None:
    """What is wrong with the shape of a parsed state file (None: it is one of ours)."""
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, not an object"
    if "pid" in state and state["pid"] is not None and not _is_int(state["pid"]):
        return "pid: not an integer"
    if state.get("start") is not None and not isinstance(state["start"], str):
        return "start: not a string"
    for key, fields in (("routes_on", ("ifindex", "ifname")),
                        ("forwarding", ("ifindex", "ifname", "was"))):
        records = state.get(key, [])
        if not isinstance(records, list):
            return f"{key}: not a list"
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                return f"{key}[{i}]: not an object"
            for field in fields:
                ok = isinstance(rec.get(field), str) if field == "ifname" else _is_int(
                    rec.get(field))
                if not ok:
                    kind = "a string" if field == "ifname" else "an integer"
                    return f"{key}[{i}].{field}: missing or not {kind}"
    policy = state.get("policy", [])
    if not isinstance(policy, list):
        return "policy: not a list"
    for i, rec in enumerate(policy):
        problem = fulltunnel.record_problem(rec)
        if problem:
            return f"policy[{i}]: {problem}"
    tables = state.get("nft_tables", [])
    if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
        return "nft_tables: not a list of names"
    return None


class NetConfig:
    """Configures links in the current network namespace; records outside changes in a file."""

    def __init__(self, state_path: Path) -> None:
        self.state_path = Path(state_path)
        self._ipr = IPRoute()
        # pyroute2 0.9.x: the synchronous IPRoute never sets this key, yet nlm_request() reads it.
        status = getattr(self._ipr, "status", None)
        if status is not None and "nlm_generator" not in status:
            status["nlm_generator"] = False
        pid = os.getpid()
        self._state: dict[str, Any] = {
            "pid": pid, "start": _start_time(pid), "forwarding": [], "routes_on": [],
            "policy": [], "nft_tables": []}
        # The file at state_path is ours once we wrote it or recovered what it held: until
        # then (an unreadable file, another live run's) restore() must leave it where it is.
        self._own_file = False

    def __enter__(self) -> NetConfig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._ipr.close()

    # -- netlink helpers ---------------------------------------------------------------------

    def _do(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NetlinkError as e:
            err = NetConfigError(f"{what}: {os.strerror(e.code)}")
            err.errno = e.code
            raise err from e

    def _links(self) -> dict[int, str]:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}

    def _set_forwarding(self, ifindex: int, ifname: str, value: int) -> None:
        msg = _InetConfMsg()
        msg["index"] = ifindex
        conf = {"attrs": [("IPV4_DEVCONF_FORWARDING", value)]}
        inet = {"attrs": [("IFLA_INET_CONF", conf)]}
        msg["attrs"] = [("IFLA_AF_SPEC", {"attrs": [("AF_INET", inet)]})]
        self._do(f"set IPv4 forwarding={value} on {ifname}", self._ipr.nlm_request,
                 msg, RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK)

    def _route(self, cmd: str, net: str, ifindex: int, ifname: str, **extra: Any) -> None:
        n = ip_network(net)
        spec = dict(family=AF_INET if n.version == 4 else AF_INET6, dst=str(n.network_address),
                    dst_len=n.prefixlen, oif=ifindex, proto=RTPROT_TUNVPND, table=RT_TABLE_MAIN)
        if n.version == 4:
            spec["scope"] = RT_SCOPE_LINK
        self._do(f"{cmd} route {n} dev {ifname}", self._ipr.route, cmd, **spec, **extra)

    def _main_routes(self) -> Iterator[Any]:
        for family in (AF_INET, AF_INET6):
            for msg in self._ipr.get_routes(family=family):
                if _route_table(msg) == RT_TABLE_MAIN:
                    yield msg

    def _tagged_routes(self, ifindex: int) -> Iterator[Any]:
        """Our routes on `ifindex`: our protocol tag *and* that device, nothing else."""
        for msg in self._main_routes():
            if msg["proto"] == RTPROT_TUNVPND and msg.get_attr("RTA_OIF") == ifindex:
                yield msg

    def _delete_route(self, msg: Any, ifname: str) -> str:
        net = _route_net(msg)
        prio = msg.get_attr("RTA_PRIORITY")
        self._route("del", net, msg.get_attr("RTA_OIF"), ifname,
                    **({} if prio is None else {"priority": prio}))
        return net

    def _save(self) -> None:
        """Write the state file atomically, so a crash never leaves a torn one."""
        self.state_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._own_file = True
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self._state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        dirfd = os.open(self.state_path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    # -- public API --------------------------------------------------------------------------

    def setup_interface(self, ifname: str, addresses: Iterable[Address | str], mtu: int) -> int:
        """Set the MTU, make the addresses exactly `addresses`, bring the link up."""
        found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            raise NetConfigError(f"no interface named {ifname!r}")
        idx = found[0]
        # MTU first: IPv6 addresses cannot exist while the MTU is below 1280.
        self._do(f"set MTU {mtu} on {ifname}", self._ipr.link, "set", index=idx, mtu=mtu)
        want = {ip_interface(a) for a in addresses}
        for msg in self._ipr.get_addr(index=idx):
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            have = ip_interface(f"{addr}/{msg['prefixlen']}")
            if have in want:
                want.discard(have)
            elif not (have.version == 6 and have.ip.is_link_local):  # the kernel's fe80:: stays
                self._do(f"remove address {have} from {ifname}", self._ipr.addr, "del",
                         index=idx, address=str(have.ip), prefixlen=have.network.prefixlen)
        for a in sorted(want, key=str):
            extra = {"flags": IFA_F_NODAD} if a.version == 6 else {}
            self._do(f"add address {a} to {ifname}", self._ipr.addr, "add", index=idx,
                     address=str(a.ip), prefixlen=a.network.prefixlen, **extra)
        # No automatic fe80:: address: a layer-3 tunnel has no neighbours to discover, and the
        # router solicitations and MLD reports it would send only reach the peer to be dropped.
        self._do(f"switch off IPv6 link-local on {ifname}", self._ipr.link, "set", index=idx,
                 IFLA_AF_SPEC={"attrs": [("AF_INET6", {"attrs": [
                     ("IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE)]})]})
        # Nor multicast, as a WireGuard interface has none: the MLD reports the kernel sends
        # on joining a group would only reach the core to be dropped as no_peer (a router's
        # kernel still sends two when the link comes up).
        self._do(f"switch off multicast on {ifname}", self._ipr.link, "set", index=idx,
                 flags=0, change=IFF_MULTICAST)
        self._do(f"bring {ifname} up", self._ipr.link, "set", index=idx, state="up")
        return idx

    def sync_routes(self, ifindex: int, routes: Iterable[Any], *, strict: bool = True
                    ) -> list[str]:
        """Make our routes on `ifindex` exactly `routes`, never touching a route not ours.

        Ours: protocol RTPROT_TUNVPND *and* output device `ifindex` (the TUN we created).
        A wanted destination that the main table has already (any metric, protocol or
        device) and that is not ours is a conflict.  strict (start): raise naming every
        conflict, before anything is changed.  Otherwise (reload): skip those, apply the
        rest, and return one line per skipped route.
        """
        links = self._links()
        ifname = links.get(ifindex)
        if ifname is None:
            raise NetConfigError(f"no interface with index {ifindex}")
        existing: dict[str, list[Any]] = {}
        for msg in self._main_routes():
            existing.setdefault(_route_net(msg), []).append(msg)
        want = {str(ip_network(r)) for r in routes}
        conflicts: list[str] = []
        missing: list[str] = []
        for net in sorted(want):
            there = existing.get(net, [])
            if any(m["proto"] == RTPROT_TUNVPND and m.get_attr("RTA_OIF") == ifindex
                   for m in there):
                continue  # ours already
            # A route on our own TUN (the kernel's, for the prefix of one of its addresses)
            # already sends this destination where we want it: it stays the kernel's.
            others = [m for m in there if m.get_attr("RTA_OIF") != ifindex]
            if others:
                conflicts.append(f"route {net} dev {ifname}: {_describe(others[0], links)} "
                                 "exists already (not ours)")
            elif not there:
                missing.append(net)
        if conflicts and strict:
            raise NetConfigError("; ".join(conflicts))
        rec = {"ifindex": ifindex, "ifname": ifname}
        if rec not in self._state["routes_on"]:
            self._state["routes_on"].append(rec)
            self._save()
        for net in missing:
            self._route("add", net, ifindex, ifname)
        for msg in list(self._tagged_routes(ifindex)):
            if _route_net(msg) not in want:
                self._delete_route(msg, ifname)
        return conflicts

    def enable_forwarding(self, ifindex: int) -> None:
        """Turn IPv4 forwarding on for every non-loopback link, the TUN included.

        Linux asks the *input* device's flag whether a packet may be forwarded, so traffic
        from the TUN needs it on the TUN and replies need it on the other links.  The previous
        values are written to the state file before anything changes.
        """
        links = [(m["index"], m.get_attr("IFLA_IFNAME"), _forwarding(m))
                 for m in self._ipr.get_links() if not m["flags"] & IFF_LOOPBACK]
        if ifindex not in {idx for idx, _, _ in links}:
            raise NetConfigError(f"no interface with index {ifindex}")
        recorded = {r["ifindex"] for r in self._state["forwarding"]}
        for idx, name, was in links:
            if was is not None and idx not in recorded:  # a second call keeps the originals
                self._state["forwarding"].append({"ifindex": idx, "ifname": name, "was": was})
        self._save()
        for idx, name, was in links:
            if was == 0:
                self._set_forwarding(idx, name, 1)

    def full_tunnel(self, ifindex: int, versions: Iterable[int], table: int | None,
                    fwmark: int | None) -> list[dict[str, Any]]:
        """Route IPv`versions` everywhere through `ifindex` by policy routing (fulltunnel.py):
        refuse a table or mark in use, record, then make. Returns the records (table, mark)."""
        ifname = self._links().get(ifindex)
        if ifname is None:
            raise NetConfigError(f"no interface with index {ifindex}")
        recs = fulltunnel.records(versions, ifindex, ifname, table, fwmark)
        problems = fulltunnel.conflicts(self._ipr, recs)
        if problems:
            raise NetConfigError("full tunnel: " + "; ".join(problems)
                                 + " (set table: and fwmark: in the profile to others)")
        self._state["policy"].extend(r for r in recs if r not in self._state["policy"])
        self._save()
        for rec in recs:
            fulltunnel.apply(self._ipr, rec, self._do)
        return recs

    def strict_rp_filter(self, skip_ifindex: int) -> list[str]:
        """Links (but `skip_ifindex` and loopback) with strict IPv4 reverse-path filtering."""
        return fulltunnel.strict_rp_filter(
            m.get_attr("IFLA_IFNAME") for m in self._ipr.get_links()
            if m["index"] != skip_ifindex and not m["flags"] & IFF_LOOPBACK)

    def global_ipv6(self, skip_ifindex: int) -> str | None:
        """A global IPv6 address outside `skip_ifindex` ("ADDR on IFNAME"), or None."""
        return fulltunnel.global_ipv6(self._ipr, skip_ifindex)

    def record_nft_table(self, name: str) -> None:
        """Note an nftables table of ours (tunvpnd.nat) in the state file before it is made."""
        if name not in self._state["nft_tables"]:
            self._state["nft_tables"].append(name)
            self._save()

    def _undo(self, state: dict[str, Any]) -> list[str]:
        """Remove policy rules, tagged routes and put forwarding flags back, on links that
        still exist (rules are removed whether or not their link is still there)."""
        lines: list[str] = []
        errors: list[str] = []
        links = self._links()
        for rec in state.get("policy", []):
            try:
                lines.extend(fulltunnel.undo(self._ipr, rec, links, self._do))
            except NetConfigError as e:
                errors.append(str(e))
        for rec in state.get("routes_on", []):
            idx, name = rec["ifindex"], rec["ifname"]
            if links.get(idx) != name:
                continue  # the link is gone, and its routes went with it
            for msg in list(self._tagged_routes(idx)):
                try:
                    lines.append(f"removed route {self._delete_route(msg, name)} dev {name}")
                except NetConfigError as e:
                    errors.append(str(e))
        flags = {m["index"]: _forwarding(m) for m in self._ipr.get_links()}
        for rec in state.get("forwarding", []):
            idx, name, was = rec["ifindex"], rec["ifname"], rec["was"]
            if links.get(idx) != name:
                lines.append(f"skipped {name} (ifindex {idx}): gone")
            elif flags.get(idx) not in (None, was):
                try:
                    self._set_forwarding(idx, name, was)
                    lines.append(f"IPv4 forwarding on {name} set back to {was}")
                except NetConfigError as e:
                    errors.append(str(e))
        for name in state.get("nft_tables", []):
            from .nat import delete_table  # here: a profile without masquerade never needs it
            try:
                if delete_table(name):
                    lines.append(f"removed nftables table inet {name}")
            except OSError as e:
                errors.append(str(e))
        if errors:
            raise NetConfigError("; ".join(errors))
        return lines

    def _read_state(self) -> dict[str, Any] | None:
        """The state file left by an earlier run (None: there is none), its shape checked."""
        path = self.state_path
        damaged = (f"; check `ip route show table all proto {RTPROT_TUNVPND}`, `ip rule show "
                   f"proto {RTPROT_TUNVPND}`, `nft list tables` and the IPv4 forwarding flags, "
                   "then delete it")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise NetConfigError(f"unreadable state file {path}: {e.strerror}{damaged}") from e
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            data = os.read(fd, STATE_MAX_BYTES + 1) if regular else b""
        except OSError as e:
            raise NetConfigError(f"unreadable state file {path}: {e.strerror}{damaged}") from e
        finally:
            os.close(fd)
        if not regular:
            raise NetConfigError(f"state file {path} is not a regular file{damaged}")
        if len(data) > STATE_MAX_BYTES:
            raise NetConfigError(f"state file {path} is not a tunvpnd state file (larger than "
                                 f"{STATE_MAX_BYTES} bytes){damaged}")
        try:
            state = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise NetConfigError(f"state file {path} is not valid JSON ({e}){damaged}") from None
        problem = _state_problem(state)
        if problem:
            raise NetConfigError(f"state file {path} is not a tunvpnd state file ({problem})"
                                 f"{damaged}")
        return state

    def _remove_state_file(self) -> None:
        self.state_path.unlink(missing_ok=True)
        # a run killed while writing it may have left its temporary copy
        self.state_path.with_name(self.state_path.name + ".tmp").unlink(missing_ok=True)

    def recover(self) -> list[str]:
        """Undo what a dead earlier run recorded in the state file; say what was undone."""
        old = self._read_state()
        if old is None:
            self._own_file = True
            self._remove_state_file()
            return []
        pid = old.get("pid")
        # Our own pid means an earlier run in this process (or a restarted pid namespace).
        started = _start_time(pid) if isinstance(pid, int) else None
        if pid != os.getpid() and started is not None and started == old.get("start"):
            raise NetConfigError(f"{self.state_path} belongs to running process {pid}")
        lines = self._undo(old)
        self._own_file = True
        self._remove_state_file()
        return lines

    def restore(self) -> None:
        """Remove our routes, put forwarding back as recorded, delete the state file."""
        self._undo(self._state)
        self._state["forwarding"], self._state["routes_on"] = [], []
        self._state["policy"], self._state["nft_tables"] = [], []
        if self._own_file:
            self._remove_state_file()
