"""The nftables ruleset of the current network namespace, read and changed through netlink
(tests run it inside a lab host: `python -m tests.nftread dump|flush|add-foreign`).

dump: one JSON object: tables [family, name], chains [family, table, name, hook, type] and rules
[family, table, chain, text], text being the expression names with the data they compare, e.g.
"meta nfproto cmp eq 02 payload bitwise cmp eq c0a83500 meta oifname cmp neq 74756e30... masq".
flush: what `nft flush ruleset` sends (one NFT_MSG_DELTABLE for every family and name).
add-foreign: a table that is not ours (inet tvtest, a filter chain on input, one rule).
"""

from __future__ import annotations

import json
import sys

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELTABLE,
    NFT_MSG_GETCHAIN,
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


def _name(value, prefix: str) -> str:
    """A decoded enum attribute (e.g. 'NFT_META_OIFNAME') as nft writes it ('oifname')."""
    return value[len(prefix):].lower() if isinstance(value, str) else str(value)


def _expr_text(expr) -> str:
    name = expr.get_attr("NFTA_EXPR_NAME")
    data = expr.get_attr("NFTA_EXPR_DATA")
    if name == "meta" and data is not None:
        return f"meta {_name(data.get_attr('NFTA_META_KEY'), 'NFT_META_')}"
    if name == "cmp" and data is not None:
        value = data.get_attr("NFTA_CMP_DATA").get_attr("NFTA_DATA_VALUE")
        if isinstance(value, str):
            value = value.encode("latin-1")
        return f"cmp {_name(data.get_attr('NFTA_CMP_OP'), 'NFT_CMP_')} {bytes(value).hex()}"
    return name


def dump() -> dict:
    sock = NFTSocket(nfgen_family=0)  # NFPROTO_UNSPEC: every family
    try:
        tables = [[m["nfgen_family"], m.get_attr("NFTA_TABLE_NAME")]
                  for m in sock.request_get(nft_table_msg(), NFT_MSG_GETTABLE)]
        chains = []
        for m in sock.request_get(nft_chain_msg(), NFT_MSG_GETCHAIN):
            hook = m.get_attr("NFTA_CHAIN_HOOK")
            chains.append([m["nfgen_family"], m.get_attr("NFTA_CHAIN_TABLE"),
                           m.get_attr("NFTA_CHAIN_NAME"),
                           hook.get_attr("NFTA_HOOK_HOOKNUM") if hook else None,
                           m.get_attr("NFTA_CHAIN_TYPE")])
        rules = [[m["nfgen_family"], m.get_attr("NFTA_RULE_TABLE"), m.get_attr("NFTA_RULE_CHAIN"),
                  " ".join(_expr_text(e) for e in m.get_attr("NFTA_RULE_EXPRESSIONS") or ())]
                 for m in sock.request_get(nft_rule_msg(), NFT_MSG_GETRULE)]
    finally:
        sock.close()
    return {"tables": sorted(tables), "chains": sorted(chains), "rules": sorted(rules)}


def _mark(kind: int):
    msg = nfgen_msg()
    msg["res_id"] = NFNL_SUBSYS_NFTABLES
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST
    return msg


def _msg(cls, kind: int, family: int, attrs: list, flags: int = 0):
    msg = cls()
    msg["attrs"] = attrs
    msg["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | kind
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
    msg["nfgen_family"] = family
    return msg


def send(messages: list) -> None:
    sock = NFTSocket(nfgen_family=0)
    try:
        sock.nlm_request_batch([_mark(0x10), *messages, _mark(0x11)])
    finally:
        sock.close()


def flush() -> None:
    # nft flush ruleset: DELTABLE without a name, family NFPROTO_UNSPEC = every table
    send([_msg(nft_table_msg, NFT_MSG_DELTABLE, 0, [])])


def add_foreign() -> None:
    hook = {"attrs": [("NFTA_HOOK_HOOKNUM", 1), ("NFTA_HOOK_PRIORITY", 0)]}
    counter = {"attrs": [("NFTA_EXPR_NAME", "counter"), ("NFTA_EXPR_DATA", {"attrs": []})]}
    send([_msg(nft_table_msg, NFT_MSG_NEWTABLE, 1, [("NFTA_TABLE_NAME", "tvtest")], NLM_F_CREATE),
          _msg(nft_chain_msg, NFT_MSG_NEWCHAIN, 1, [
              ("NFTA_CHAIN_TABLE", "tvtest"), ("NFTA_CHAIN_NAME", "input"),
              ("NFTA_CHAIN_HOOK", hook), ("NFTA_CHAIN_TYPE", "filter")], NLM_F_CREATE),
          _msg(nft_rule_msg, NFT_MSG_NEWRULE, 1, [
              ("NFTA_RULE_TABLE", "tvtest"), ("NFTA_RULE_CHAIN", "input"),
              ("NFTA_RULE_EXPRESSIONS", [counter])], NLM_F_CREATE)])


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "dump"
    if command == "dump":
        print(json.dumps(dump()))
    elif command == "flush":
        flush()
    elif command == "add-foreign":
        add_foreign()
    else:
        sys.exit(f"unknown command {command!r}")
