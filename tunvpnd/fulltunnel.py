"""Full tunnel: a client route 0.0.0.0/0 or ::/0 through policy routing, as wg-quick does it.

A default route in the main table would also catch the daemon's own datagrams to the server and
send them into the TUN. Instead, for each family routed "everywhere":

    route  0.0.0.0/0 dev TUN table T                       (proto 86, like our other routes)
    rule   32764: not fwmark M lookup main suppress_prefixlength 0   (proto 86)
    rule   32765: not fwmark M lookup T                              (proto 86)

and the daemon's UDP socket carries SO_MARK M. Unmarked traffic first tries the main table
without its default routes (so the LAN and anything routed more specifically stays where it
is), then table T: the tunnel. The daemon's own datagrams carry M, skip both rules and reach
the server through the main table as before. wg-quick's suppress rule has no fwmark selector;
ours has `not fwmark M` so that it is this instance's own (two full-tunnel instances would
otherwise need the very same rule, and the kernel refuses a duplicate); the routing is the same,
since marked packets end in the main table either way.

Defaults: table T = fwmark M = TABLE_BASE + the TUN's ifindex, so instances running at the same
time in one namespace never collide (their TUNs have different indices). `table:` and `fwmark:`
in the profile override them; start refuses a table that has routes or rules already, or a
mark some rule uses, unless they are ours. Everything is recorded in the state file first
(NetConfig) and removed by undo(), which matches rules exactly (priority, table, mark, inverted,
suppress_prefixlength, protocol 86), never a rule that is not ours.

Works with pyroute2 0.7.2 and 0.9.x: rules are built as fibmsg by hand (their keyword
filters differ between the two), routes go through IPRoute.route().
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from ipaddress import ip_network
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_DELRULE, RTM_NEWRULE
from pyroute2.netlink.rtnl.fibmsg import fibmsg

RTPROT_TUNVPND = 86  # as netconf.RTPROT_TUNVPND: `ip rule show proto 86` lists our rules
TABLE_BASE = 0x74760000  # "tv" in the high half; + ifindex for the default table and mark
SO_MARK = getattr(socket, "SO_MARK", 36)
PRIO_SUPPRESS = 32764  # what wg-quick's two `ip rule add` get on a host with the default rules
PRIO_TABLE = 32765
RT_TABLE_MAIN = 254
RT_TABLE_COMPAT = 252  # what the 8-bit table field says when FRA_TABLE holds a larger table
RESERVED_TABLES = (0, 253, 254, 255)  # unspec, default, main, local
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
EVERYWHERE = {4: ip_network("0.0.0.0/0"), 6: ip_network("::/0")}


def split_routes(routes: Iterable[Any]) -> tuple[list[Any], list[int]]:
    """(the routes for the main table, the IP versions routed everywhere: [4], [6], [4, 6])."""
    others, everywhere = [], []
    for route in routes:
        net = ip_network(route)
        if net == EVERYWHERE[net.version]:
            everywhere.append(net.version)
        else:
            others.append(route)
    return others, sorted(everywhere)


def records(versions: Iterable[int], ifindex: int, ifname: str, table: int | None,
            fwmark: int | None) -> list[dict[str, Any]]:
    """What the state file holds for each family routed everywhere (defaults filled in)."""
    table = TABLE_BASE + ifindex if table is None else table
    fwmark = TABLE_BASE + ifindex if fwmark is None else fwmark
    return [{"version": v, "table": table, "fwmark": fwmark, "ifindex": ifindex,
             "ifname": ifname} for v in versions]


def record_problem(rec: Any) -> str | None:
    """What is wrong with one state-file record (None: it is one of ours)."""
    if not isinstance(rec, dict):
        return "not an object"
    if rec.get("version") not in (4, 6):
        return "version: not 4 or 6"
    for key in ("table", "fwmark", "ifindex"):
        value = rec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 32:
            return f"{key}: missing or not a 32-bit integer"
    if not isinstance(rec.get("ifname"), str):
        return "ifname: missing or not a string"
    return None


def _rule_msg(rec: dict[str, Any], priority: int) -> fibmsg:
    table = RT_TABLE_MAIN if priority == PRIO_SUPPRESS else rec["table"]
    msg = fibmsg()
    msg["family"] = FAMILIES[rec["version"]]
    msg["table"] = table if table < 256 else RT_TABLE_COMPAT
    msg["action"] = FR_ACT_TO_TBL
    msg["flags"] = FIB_RULE_INVERT
    attrs = [("FRA_PRIORITY", priority), ("FRA_TABLE", table), ("FRA_FWMARK", rec["fwmark"]),
             ("FRA_FWMASK", 0xFFFFFFFF), ("FRA_PROTOCOL", RTPROT_TUNVPND)]
    if priority == PRIO_SUPPRESS:
        attrs.append(("FRA_SUPPRESS_PREFIXLEN", 0))
    msg["attrs"] = attrs
    return msg


def _rule_table(msg: Any) -> int:
    return msg.get_attr("FRA_TABLE") or msg["table"]


def _is_ours(msg: Any, rec: dict[str, Any]) -> bool:
    """Is this dumped rule one of the two that `rec` stands for, exactly?"""
    priority = msg.get_attr("FRA_PRIORITY") or 0
    if priority not in (PRIO_SUPPRESS, PRIO_TABLE):
        return False
    want = RT_TABLE_MAIN if priority == PRIO_SUPPRESS else rec["table"]
    suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
    return (msg["family"] == FAMILIES[rec["version"]] and _rule_table(msg) == want
            and msg["action"] == FR_ACT_TO_TBL and msg["flags"] & FIB_RULE_INVERT
            and msg.get_attr("FRA_FWMARK") == rec["fwmark"]
            and msg.get_attr("FRA_PROTOCOL") == RTPROT_TUNVPND
            and (suppress == 0 if priority == PRIO_SUPPRESS else suppress in (None, 0xFFFFFFFF))
            and not msg.get_attr("FRA_IIFNAME") and not msg.get_attr("FRA_OIFNAME")
            and not msg["src_len"] and not msg["dst_len"])


def _table_routes(ipr: Any, family: int, table: int) -> list[Any]:
    return [m for m in ipr.get_routes(family=family, table=table)
            if (m.get_attr("RTA_TABLE") or m["table"]) == table]


def _scope(version: int) -> dict[str, int]:
    return {"scope": 253} if version == 4 else {}  # link, as `ip route add default dev X`


def conflicts(ipr: Any, recs: list[dict[str, Any]]) -> list[str]:
    """Why these records cannot be applied: their table or mark is someone else's."""
    found = []
    for rec in recs:
        family, table, mark = FAMILIES[rec["version"]], rec["table"], rec["fwmark"]
        name = f"IPv{rec['version']}"
        if table in RESERVED_TABLES:
            found.append(f"table {table} is one of the kernel's (main, local, default)")
            continue
        for msg in ipr.get_rules(family=family):
            if _is_ours(msg, rec):
                continue
            prio = msg.get_attr("FRA_PRIORITY") or 0
            if _rule_table(msg) == table:
                found.append(f"{name} rule {prio} already looks up table {table}")
            elif msg.get_attr("FRA_FWMARK") == mark:
                found.append(f"{name} rule {prio} already matches fwmark {mark:#x}")
        routes = [m for m in _table_routes(ipr, family, table)
                  if not (m["proto"] == RTPROT_TUNVPND and m.get_attr("RTA_OIF") == rec["ifindex"])]
        if routes:
            found.append(f"{name} table {table} already has {len(routes)} routes")
    return found


def apply(ipr: Any, rec: dict[str, Any], do: Callable[..., Any]) -> None:
    """Add the route and the two rules of one record (`do(what, fn, *args)` wraps errors)."""
    version, family = rec["version"], FAMILIES[rec["version"]]
    net, ifname = EVERYWHERE[version], rec["ifname"]
    have = [m for m in _table_routes(ipr, family, rec["table"])
            if m["proto"] == RTPROT_TUNVPND and m.get_attr("RTA_OIF") == rec["ifindex"]]
    if not have:
        do(f"add route {net} dev {ifname} table {rec['table']}", ipr.route, "add",
           family=family, dst=str(net.network_address), dst_len=0, oif=rec["ifindex"],
           proto=RTPROT_TUNVPND, table=rec["table"], **_scope(version))
    present = [m for m in ipr.get_rules(family=family) if _is_ours(m, rec)]
    for priority in (PRIO_TABLE, PRIO_SUPPRESS):  # the tunnel last: never a half-made detour
        if any((m.get_attr("FRA_PRIORITY") or 0) == priority for m in present):
            continue
        do(f"add IPv{version} rule {priority} (fwmark {rec['fwmark']:#x})", ipr.nlm_request,
           _rule_msg(rec, priority), RTM_NEWRULE,
           NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)


def undo(ipr: Any, rec: dict[str, Any], links: dict[int, str], do: Callable[..., Any]
         ) -> list[str]:
    """Remove what apply() made for `rec` (what is left of it); one line per thing removed."""
    version, family = rec["version"], FAMILIES[rec["version"]]
    lines = []
    for msg in ipr.get_rules(family=family):
        if _is_ours(msg, rec):
            priority = msg.get_attr("FRA_PRIORITY")
            do(f"remove IPv{version} rule {priority}", ipr.nlm_request, _rule_msg(rec, priority),
               RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK)
            lines.append(f"removed IPv{version} rule {priority} (fwmark {rec['fwmark']:#x})")
    if links.get(rec["ifindex"]) == rec["ifname"]:  # else the link is gone, its routes with it
        for msg in _table_routes(ipr, family, rec["table"]):
            if msg["proto"] == RTPROT_TUNVPND and msg.get_attr("RTA_OIF") == rec["ifindex"]:
                do(f"remove route {EVERYWHERE[version]} table {rec['table']}", ipr.route, "del",
                   family=family, dst=str(EVERYWHERE[version].network_address), dst_len=0,
                   oif=rec["ifindex"], proto=RTPROT_TUNVPND, table=rec["table"],
                   **_scope(version))
                lines.append(f"removed route {EVERYWHERE[version]} dev {rec['ifname']} "
                             f"table {rec['table']}")
    return lines


def mark_socket(sock: socket.socket, fwmark: int) -> None:
    """Our datagrams carry the mark, so the rules let them through the main table."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)


def strict_rp_filter(ifnames: Iterable[str]) -> list[str]:
    """The interfaces among `ifnames` with strict IPv4 reverse-path filtering (the larger of
    conf/all and conf/IF is 1): there the server's replies, whose reverse route is the
    tunnel, are dropped. Read from /proc/sys (readable under ProtectKernelTunables)."""
    def value(name: str) -> int:
        try:
            with open(f"/proc/sys/net/ipv4/conf/{name}/rp_filter") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0
    everywhere = value("all")
    return [name for name in ifnames if max(everywhere, value(name)) == 1]


def global_ipv6(ipr: Any, skip_ifindex: int) -> str | None:
    """A global-scope IPv6 address of this host outside our TUN ("ifname addr"), or None."""
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    for msg in ipr.get_addr(family=socket.AF_INET6):
        if msg["scope"] == 0 and msg["index"] != skip_ifindex:
            addr = msg.get_attr("IFA_ADDRESS")
            if addr and addr != "::1":
                return f"{addr} on {names.get(msg['index'], msg['index'])}"
    return None
