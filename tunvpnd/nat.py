"""Server masquerade: source NAT for the tunnel networks, as nftables rules of our own.

One table, `inet tunvpnd_NAME`, holds one chain hooked at postrouting (priority srcnat, 100)
with one rule per tunnel network and outgoing interface, which `nft list ruleset` shows as

    ip saddr 192.168.53.0/24 oifname "eth0" masquerade        (masquerade: [eth0])
    ip6 saddr fd00:53::/64 oifname != "tun0" masquerade       (masquerade: true)

The messages are pyroute2's nfnetlink classes (nft_table_msg, nft_chain_msg, nft_rule_msg:
the same in 0.7.2 and 0.9.x; their higher-level NFTables helpers send one message per batch
and know no oifname or IPv6 match, so the expressions are written here). Everything goes in
one batch, which the kernel applies whole or not at all: add the table (nothing if it exists),
delete it, make it anew. That replaces whatever was there, on start and on reload alike.

Someone may flush the ruleset while we run: the daemon calls repair() every CHECK_INTERVAL
seconds between wake-ups (one dump of our table's rules), which makes the table again if it
is gone or its rules are not ours. (Subscribing to NFNLGRP_NFTABLES would notice at once, but
needs one more socket in the loop and decoding every change anyone makes.)
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network, collapse_addresses, ip_network
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELTABLE,
    NFT_MSG_GETRULE,
    NFT_MSG_GETTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
    NFTSocket,
    nft_chain_msg,
    nft_rule_msg,
    nft_table_msg,
)

log = logging.getLogger("tunvpnd")

CHECK_INTERVAL = 5.0  # seconds between checks that our table is still there (issue: <= 10 s)
NFPROTO_INET = 1      # one table for IPv4 and IPv6
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
TABLE_PREFIX = "tunvpnd_"
CHAIN = "postrouting"
NF_INET_POST_ROUTING = 4
NF_IP_PRI_NAT_SRC = 100  # "priority srcnat"
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_META_OIFNAME, NFT_META_NFPROTO = 7, 15
NFT_PAYLOAD_NETWORK_HEADER = 1
NFT_REG_1 = 1
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
IFNAMSIZ = 16

IPNetwork = IPv4Network | IPv6Network
Message = Any  # a pyroute2 nfnetlink message
Send = Callable[[list[Message]], Any]  # sends one batch; raises NetlinkError on a refusal


class NatError(OSError):
    """Masquerade could not be set up; the message says what is missing or refused."""


def table_name(instance: str) -> str:
    return TABLE_PREFIX + instance


def tunnel_networks(addresses: Iterable[Any], routes: Iterable[IPNetwork],
                    peer_networks: Iterable[IPNetwork]) -> list[IPNetwork]:
    """The sources to masquerade: the TUN's networks, the routes into the tunnel and every
    network a client may send from, without those another one covers (fewer rules)."""
    nets = [a.network for a in addresses] + list(routes) + list(peer_networks)
    found: list[IPNetwork] = []
    for version in (4, 6):
        found += collapse_addresses(n for n in nets if n.version == version)
    return found


# -- messages ----------------------------------------------------------------------------

def _header(msg: Message, kind: int, flags: int) -> Message:
    msg["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | kind
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
    msg["nfgen_family"] = NFPROTO_INET
    return msg


def _batch_mark(kind: int) -> Message:
    msg = nfgen_msg()
    msg["res_id"] = NFNL_SUBSYS_NFTABLES
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST
    return msg


def _batch(messages: list[Message]) -> list[Message]:
    return [_batch_mark(NFNL_MSG_BATCH_BEGIN), *messages, _batch_mark(NFNL_MSG_BATCH_END)]


def _table(kind: int, name: str, flags: int = 0) -> Message:
    msg = nft_table_msg()
    msg["attrs"] = [("NFTA_TABLE_NAME", name)]
    return _header(msg, kind, flags)


def _chain(table: str) -> Message:
    msg = nft_chain_msg()
    hook = {"attrs": [("NFTA_HOOK_HOOKNUM", NF_INET_POST_ROUTING),
                      ("NFTA_HOOK_PRIORITY", NF_IP_PRI_NAT_SRC)]}
    msg["attrs"] = [("NFTA_CHAIN_TABLE", table), ("NFTA_CHAIN_NAME", CHAIN),
                    ("NFTA_CHAIN_HOOK", hook), ("NFTA_CHAIN_TYPE", "nat")]
    return _header(msg, NFT_MSG_NEWCHAIN, NLM_F_CREATE)


def _expr(name: str, **data: Any) -> dict:
    attrs = [(f"NFTA_{name.upper()}_{key.upper()}", value) for key, value in data.items()]
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": attrs})]}


def _value(data: bytes) -> dict:
    return {"attrs": [("NFTA_DATA_VALUE", data)]}


def _match(key: int, data: bytes, op: int = NFT_CMP_EQ) -> list[dict]:
    return [_expr("meta", key=key, dreg=NFT_REG_1),
            _expr("cmp", sreg=NFT_REG_1, op=op, data=_value(data))]


def rule_expressions(net: IPNetwork, ifname: str, negate: bool) -> list[dict]:
    """meta nfproto, ip/ip6 saddr in `net`, oifname (!)= `ifname`, masquerade."""
    v4 = net.version == 4
    exprs = _match(NFT_META_NFPROTO, bytes([NFPROTO_IPV4 if v4 else NFPROTO_IPV6]))
    size = 4 if v4 else 16
    exprs.append(_expr("payload", dreg=NFT_REG_1, base=NFT_PAYLOAD_NETWORK_HEADER,
                       offset=12 if v4 else 8, len=size))  # the source address
    if net.prefixlen < net.max_prefixlen:
        exprs.append(_expr("bitwise", sreg=NFT_REG_1, dreg=NFT_REG_1, len=size,
                           mask=_value(net.netmask.packed), xor=_value(bytes(size))))
    exprs.append(_expr("cmp", sreg=NFT_REG_1, op=NFT_CMP_EQ,
                       data=_value(net.network_address.packed)))
    exprs += _match(NFT_META_OIFNAME, ifname.encode().ljust(IFNAMSIZ, b"\0"),
                    NFT_CMP_NEQ if negate else NFT_CMP_EQ)
    exprs.append(_expr("masq"))
    return exprs


def _rule(table: str, exprs: list[dict]) -> Message:
    msg = nft_rule_msg()
    msg["attrs"] = [("NFTA_RULE_TABLE", table), ("NFTA_RULE_CHAIN", CHAIN),
                    ("NFTA_RULE_EXPRESSIONS", exprs)]
    return _header(msg, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND)


def replace_batch(table: str, rules: Sequence[list[dict]]) -> list[Message]:
    """One batch that makes `table` hold exactly our chain and `rules`, whatever was there."""
    return _batch([_table(NFT_MSG_NEWTABLE, table, NLM_F_CREATE),
                   _table(NFT_MSG_DELTABLE, table),
                   _table(NFT_MSG_NEWTABLE, table, NLM_F_CREATE),
                   _chain(table), *(_rule(table, exprs) for exprs in rules)])


def remove_batch(table: str) -> list[Message]:
    """Delete `table` if it exists (adding it first makes the delete never fail)."""
    return _batch([_table(NFT_MSG_NEWTABLE, table, NLM_F_CREATE),
                   _table(NFT_MSG_DELTABLE, table)])


# -- telling what the kernel lacks ------------------------------------------------------

_NOT_THERE = (errno.ENOENT, errno.EOPNOTSUPP, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)
PROBE_TABLE = TABLE_PREFIX + "probe"
_PROBE_NET = ip_network("192.0.2.0/24")  # TEST-NET-1: the probe's rule never matches


def diagnose(send: Send, table: str) -> str:
    """Why a batch for `table` failed: try the pieces in turn (each probe batch ends by
    deleting its own table, so nothing stays) and name the first one the kernel lacks."""
    steps = [
        ("nf_tables for IPv4 and IPv6 (kernel: CONFIG_NF_TABLES, CONFIG_NF_TABLES_INET)", []),
        ("nftables NAT chains (kernel: CONFIG_NFT_NAT, module nft_chain_nat)",
         [_chain(PROBE_TABLE)]),
        ("nftables masquerade (kernel: CONFIG_NFT_MASQ, module nft_masq)",
         [_chain(PROBE_TABLE), _rule(PROBE_TABLE, rule_expressions(_PROBE_NET, "lo", False))]),
    ]
    for what, body in steps:
        try:
            send(_batch([_table(NFT_MSG_NEWTABLE, PROBE_TABLE, NLM_F_CREATE), *body,
                         _table(NFT_MSG_DELTABLE, PROBE_TABLE)]))
        except NetlinkError as error:
            if error.code == errno.EPERM:
                return "permission denied (needs CAP_NET_ADMIN)"
            if error.code in _NOT_THERE:
                return f"the kernel has no {what}: {os.strerror(error.code)}"
            return f"{what}: {os.strerror(error.code)}"
    return ""


# -- the table ---------------------------------------------------------------------------

def _socket() -> NFTSocket:
    try:
        return NFTSocket(nfgen_family=NFPROTO_INET)
    except OSError as error:
        raise NatError(f"masquerade: no nfnetlink socket ({error.strerror or error}): the "
                       "kernel has no nftables (CONFIG_NETFILTER_NETLINK, CONFIG_NF_TABLES)"
                       ) from None


def delete_table(name: str) -> bool:
    """Remove our table `name` if it is there (for the state file's undo). True if it was."""
    if not name.startswith(TABLE_PREFIX):
        raise NatError(f"{name!r} is not a tunvpnd nftables table: left alone")
    try:
        sock = NFTSocket(nfgen_family=NFPROTO_INET)
    except OSError as error:
        if error.errno in _NOT_THERE:
            return False  # a kernel without nftables holds no table of ours
        raise NatError(f"remove nftables table inet {name}: {error.strerror}") from None
    try:
        there = _table_exists(sock, name)
        if there:
            sock.nlm_request_batch(remove_batch(name))
        return there
    except NetlinkError as error:
        raise NatError(f"remove nftables table inet {name}: {os.strerror(error.code)}") from None
    finally:
        sock.close()


def _table_exists(sock: NFTSocket, table: str) -> bool:
    msg = nft_table_msg()
    msg["attrs"] = [("NFTA_TABLE_NAME", table)]
    try:
        sock.request_get(msg, NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_ACK)
    except NetlinkError as error:
        if error.code in _NOT_THERE:  # no such table, or no nf_tables at all
            return False
        raise
    return True


def _rule_count(sock: NFTSocket, table: str) -> int:
    """Rules in our chain of `table` (0 if there is no such table: a dump filters, no error)."""
    msg = nft_rule_msg()
    msg["attrs"] = [("NFTA_RULE_TABLE", table)]
    rules = sock.request_get(msg, NFT_MSG_GETRULE)
    return sum(1 for rule in rules if rule.get_attr("NFTA_RULE_CHAIN") == CHAIN)


class Masquerade:
    """Our nftables table for one daemon instance: apply(), repair() now and then, close().

    `record(name)` is called before the table is first made (the state file: a run killed
    with -9 leaves it to the next start or `tunvpnd cleanup`); removal goes through that undo.
    """

    CHECK_INTERVAL = CHECK_INTERVAL

    def __init__(self, instance: str, record: Callable[[str], None], sock: Any = None) -> None:
        self.table = table_name(instance)
        self._record = record
        self._sock = sock or _socket()  # tests may pass a fake with nlm_request_batch()
        self._rules: list[list[dict]] = []
        self._broken = False  # repair() failed: say so once, and once when it works again

    def close(self) -> None:
        self._sock.close()

    def apply(self, networks: Sequence[IPNetwork], out: Sequence[str] | None, tun: str
              ) -> None:
        """Masquerade `networks` leaving through `out` (None: every interface but `tun`),
        replacing what the table held, in one batch. Raises NatError."""
        if out is None:
            rules = [rule_expressions(net, tun, True) for net in networks]
        else:
            rules = [rule_expressions(net, name, False) for net in networks for name in out]
        self._record(self.table)
        self._send(replace_batch(self.table, rules))
        self._rules = rules

    def remove(self) -> None:
        """Masquerade off (a reload): the table goes."""
        self._rules = []
        self._send(remove_batch(self.table))

    def repair(self) -> bool:
        """Make the table again if it is gone or changed (someone flushed the ruleset).
        True if it had to. Never raises: a failure is logged, and tried again next time."""
        if not self._rules:
            return False
        try:
            if _rule_count(self._sock, self.table) == len(self._rules):
                return False
            log.warning("nftables table inet %s is gone or changed (ruleset flushed?): "
                        "making it again", self.table)
            self._send(replace_batch(self.table, self._rules))
        except (NetlinkError, NatError) as error:
            if not self._broken:
                log.error("masquerade: cannot make nftables table inet %s again: %s",
                          self.table, error)
            self._broken = True
            return False
        if self._broken:
            log.info("masquerade: nftables table inet %s is back", self.table)
        self._broken = False
        return True

    def _send(self, batch: list[Message]) -> None:
        try:
            self._sock.nlm_request_batch(batch)
        except NetlinkError as error:
            why = diagnose(self._sock.nlm_request_batch, self.table) or os.strerror(error.code)
            raise NatError(f"masquerade: nftables table inet {self.table}: {why}") from None
