"""The one builder of nftables JSON expressions and rules: every fragment (host base chains,
policy, services, pod ingress) builds its rules from these, so an expression has one spelling.

A rule is stored encoded (`rule`): a canonical JSON string, compared and hashed as plain text."""

from __future__ import annotations

import functools
import json
from typing import Any

from tether.calc.addresses import network
from tether.calc.names import CT_DENIED, CT_REJUDGE, LOG_GROUP

ACCEPT: dict = {"accept": None}
DROP: dict = {"drop": None}
RETURN: dict = {"return": None}
COUNTER: dict = {"counter": None}
NOTRACK: dict = {"notrack": None}
REJECT: dict = {"reject": None}
MASQUERADE: dict = {"masquerade": None}


def meta(key: str) -> dict:
    return {"meta": {"key": key}}


def payload(proto: str, fld: str) -> dict:
    return {"payload": {"protocol": proto, "field": fld}}


def ct(key: str) -> dict:
    return {"ct": {"key": key}}


def match(left: Any, right: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def addr_field(version: int, which: str) -> dict:
    """The IPv4 or IPv6 header's `saddr`/`daddr`."""
    return payload("ip" if version == 4 else "ip6", which)


def prefix(cidr: str) -> Any:
    """An address, or a prefix for a CIDR that is not a single address."""
    net = network(cidr)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def one_or_set(values: list[str]) -> Any:
    """A compare's right side for addresses or prefixes: the one value, or an anonymous set."""
    items = [prefix(v) for v in values]
    return items[0] if len(items) == 1 else {"set": items}


MARK = meta("mark")
CT_MARK = ct("mark")
FIB_LOCAL = match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
L4_DPORT = payload("th", "dport")


def mark_set(bit: int) -> dict:
    """meta mark |= bit"""
    return {"mangle": {"key": MARK, "value": {"|": [MARK, bit]}}}


def mark_clear(bits: int) -> dict:
    """meta mark &= ~bits"""
    return {"mangle": {"key": MARK, "value": {"&": [MARK, 0xFFFFFFFF ^ bits]}}}


def ct_mark_clear(bits: int) -> dict:
    """ct mark &= ~bits"""
    return {"mangle": {"key": CT_MARK, "value": {"&": [CT_MARK, 0xFFFFFFFF ^ bits]}}}


def mark_random(n: int) -> dict:
    """meta mark = a random number in 1..n (a backend slot)"""
    return {"mangle": {"key": MARK, "value": {"numgen": {"mode": "random", "mod": n, "offset": 1}}}}


def mark_missing(bit: int) -> dict:
    """meta mark & bit == 0"""
    return match({"&": [MARK, bit]}, 0)


def set_mark(value: int) -> dict:
    """meta mark = value"""
    return {"mangle": {"key": MARK, "value": value}}


def mark_is(value: int) -> dict:
    """meta mark == value"""
    return match(MARK, value)


def ct_mark_or(bits: int) -> dict:
    """ct mark |= bits"""
    return {"mangle": {"key": CT_MARK, "value": {"|": [CT_MARK, bits]}}}


def ct_bits(bits: int, value: int | None = None) -> dict:
    """ct mark & bits == value (default: all of them set)."""
    return match({"&": [CT_MARK, bits]}, bits if value is None else value)


def rule(*statements: dict[str, Any], comment: str | None = None) -> str:
    """Encode one nft rule (a list of nft JSON statements) as a canonical JSON string."""
    body: dict[str, Any] = {"expr": list(statements)}
    if comment:
        # nft refuses a comment over 128 bytes, and with it the whole table: one long object name
        # (a policy's, a group's) must not cost every other rule
        body["comment"] = comment.encode()[:120].decode(errors="ignore") if len(comment) > 30 else comment
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=1 << 15)
def jump_rule(target: str) -> str:
    return rule({"jump": {"target": target}})


# a drop that remembers it on the connection: harmless for a new one (its entry goes with the
# packet), and for an established one being judged again (host's midstream chains) it stops the
# packets coming back from its server too
REMEMBER_DENIAL = ct_mark_or(CT_REJUDGE | CT_DENIED)


def denied(*matches: dict, comment: str, remember: bool = False) -> str:
    """A counted, logged drop; the comment names who denied (the counter metric reads it back).
    `remember`: also mark the connection denied (only in chains of hooks that have conntrack)."""
    text = comment[:120]
    marks = (REMEMBER_DENIAL,) if remember else ()
    return rule(*matches, COUNTER, *marks, {"log": {"prefix": text[:60], "group": LOG_GROUP}}, DROP, comment=text)
