"""Applying the Plan's nftables table (`inet tether`) through `nft -j -f -`.

Two kinds of change:
- structure (set/map definitions, chains, rules): the whole table is replaced in one atomic batch;
- elements only (a pod joins a label set, a backend is added): `add element` / `delete element`
  commands only, so rules and chains are untouched.
An empty marker set named after a hash of the structure, so a restarted agent recognises a table it
wrote and, when its plan is unchanged, changes nothing at all.

Element notation in `NftSet.elements`: addresses and CIDRs as strings ("10.1.0.0/16", "10.1.0.5"),
ranges "a-b", concatenations as tuples, map entries as (key, value) pairs whose value is a verdict
string ("jump in-abc", "goto x", "accept", "drop") or, for data maps, an address/port/tuple.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

from tether.dataplane.plan import NFT_TABLE, NftChain, NftPlan, NftSet

FAMILY = "inet"
VERDICTS = ("jump ", "goto ")


class NftError(Exception):
    pass


@dataclass
class NftReport:
    full: bool = False
    element_commands: int = 0
    changes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return (1 if self.full else 0) + self.element_commands


def run_nft(commands: list[dict], netns: str | None = None) -> None:
    if not commands:
        return
    cmd = ["nft", "-j", "-f", "-"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    r = subprocess.run(cmd, input=json.dumps({"nftables": commands}), capture_output=True, text=True)
    if r.returncode != 0:
        raise NftError(f"nft failed: {r.stderr.strip()[:2000]}")


def list_table(netns: str | None = None) -> list[dict] | None:
    cmd = ["nft", "-j", "list", "table", FAMILY, NFT_TABLE]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout)["nftables"]


# --- rendering -------------------------------------------------------------------------------------

def render_value(v: Any) -> Any:
    if isinstance(v, tuple):
        return {"concat": [render_value(x) for x in v]}
    if isinstance(v, str):
        if v.startswith(VERDICTS):
            verb, target = v.split(" ", 1)
            return {verb: {"target": target}}
        if v in ("accept", "drop", "continue", "return"):
            return {v: None}
        if "/" in v:
            try:
                net = ipaddress.ip_network(v, strict=False)
            except ValueError:
                return v
            if net.prefixlen == net.max_prefixlen:
                return str(net.network_address)
            return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
        if "-" in v and v.count(".") == 6:
            a, b = v.split("-")
            return {"range": [a, b]}
    return v


def render_element(s: NftSet, e: Any) -> Any:
    if s.map_type is not None:
        key, value = e
        return [render_value(key), render_value(value)]
    return render_value(e)


def set_definition(s: NftSet) -> dict:
    body: dict[str, Any] = {"family": FAMILY, "table": NFT_TABLE, "name": s.name,
                            "type": list(s.type) if isinstance(s.type, tuple) else s.type}
    if s.map_type is not None:
        body["map"] = list(s.map_type) if isinstance(s.map_type, tuple) else s.map_type
    if s.flags:
        body["flags"] = list(s.flags)
    if s.timeout:
        body["timeout"] = s.timeout
    return {"map" if s.map_type is not None else "set": body}


def chain_definition(c: NftChain) -> dict:
    body: dict[str, Any] = {"family": FAMILY, "table": NFT_TABLE, "name": c.name}
    if c.hook:
        body.update({"type": c.type or "filter", "hook": c.hook, "prio": c.priority or 0,
                     "policy": c.policy or "accept"})
    return {"chain": body}


def structure_of(plan: NftPlan) -> str:
    """Everything but dynamic elements, as a canonical string (hashed into the table comment)."""
    parts = [json.dumps(set_definition(s), sort_keys=True) for s in sorted(plan.sets, key=lambda s: s.name)]
    for c in sorted(plan.chains, key=lambda c: c.name):
        parts.append(json.dumps(chain_definition(c), sort_keys=True))
        parts.extend(c.rules)
    return "\n".join(parts)


def structure_hash(plan: NftPlan) -> str:
    """Name of the empty marker set that records which structure a table was built from
    (nft 1.0.6 does not list table comments, so the marker is a set)."""
    return "plan-" + hashlib.sha256(structure_of(plan).encode()).hexdigest()[:24]


def managed(s: NftSet) -> bool:
    """Sets whose elements we own (dynamic sets, e.g. session affinity, are the kernel's)."""
    return s.timeout is None and "dynamic" not in s.flags


def full_commands(plan: NftPlan) -> list[dict]:
    table = {"family": FAMILY, "name": NFT_TABLE}
    cmds: list[dict] = [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}},
                        {"add": {"set": {"family": FAMILY, "table": NFT_TABLE, "name": structure_hash(plan),
                                         "type": "ipv4_addr"}}}]
    for s in plan.sets:
        cmds.append({"add": set_definition(s)})
    for c in plan.chains:  # all chains before any rule, so jumps resolve
        cmds.append({"add": chain_definition(c)})
    for s in plan.sets:
        if s.elements and managed(s):
            cmds.append({"add": {"element": {"family": FAMILY, "table": NFT_TABLE, "name": s.name,
                                             "elem": [render_element(s, e) for e in sorted(s.elements, key=repr)]}}})
    for c in plan.chains:
        for r in c.rules:
            body = json.loads(r)
            cmds.append({"add": {"rule": {"family": FAMILY, "table": NFT_TABLE, "chain": c.name, **body}}})
    return cmds


# --- reading back elements -------------------------------------------------------------------------

def canon(v: Any) -> Any:
    """Kernel-listed element value -> the notation used in NftSet.elements."""
    if isinstance(v, dict):
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "concat" in v:
            return tuple(canon(x) for x in v["concat"])
        if "range" in v:
            return f"{v['range'][0]}-{v['range'][1]}"
        if "elem" in v:
            return canon(v["elem"]["val"])
        for verb in ("jump", "goto"):
            if verb in v:
                return f"{verb} {v[verb]['target']}"
        for verdict in ("accept", "drop", "continue", "return"):
            if verdict in v:
                return verdict
    if isinstance(v, list):
        return tuple(canon(x) for x in v)
    return v


def canon_mine(s: NftSet, e: Any) -> Any:
    """Our element, normalised the way the kernel lists it (single addresses without /32)."""
    def norm(v: Any) -> Any:
        if isinstance(v, tuple):
            return tuple(norm(x) for x in v)
        if isinstance(v, str) and "/" in v:
            try:
                net = ipaddress.ip_network(v, strict=False)
            except ValueError:
                return v
            return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        return v

    if s.map_type is not None:
        return (norm(e[0]), norm(e[1]))
    return norm(e)


def kernel_elements(table: list[dict]) -> dict[str, set]:
    out: dict[str, set] = {}
    for item in table:
        for kind in ("set", "map"):
            if kind in item:
                body = item[kind]
                elems = set()
                for e in body.get("elem", []):
                    if kind == "map":
                        k, v = e
                        elems.add((canon(k), canon(v)))
                    else:
                        elems.add(canon(e))
                out[body["name"]] = elems
    return out


def table_comment(table: list[dict]) -> str | None:
    """The structure marker of a table we wrote (see structure_hash)."""
    for item in table:
        name = item.get("set", {}).get("name", "")
        if name.startswith("plan-"):
            return name
    return None


class NftDataplane:
    """Applies NftPlans to one namespace, remembering what it applied last."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._structure: str | None = None
        self._elements: dict[str, set] | None = None

    def forget(self) -> None:
        """Drop the memory of the last apply (the next apply re-reads the kernel)."""
        self._structure = None
        self._elements = None

    def apply(self, plan: NftPlan) -> NftReport:
        report = NftReport()
        want_hash = structure_hash(plan)
        if self._structure is None:
            table = list_table(self.netns)
            if table is not None and table_comment(table) == want_hash:
                self._structure = want_hash
                self._elements = kernel_elements(table)
        if self._structure != want_hash:
            run_nft(full_commands(plan), self.netns)
            report.full = True
            report.changes.append("table replaced")
            self._structure = want_hash
            self._elements = {s.name: {canon_mine(s, e) for e in s.elements} for s in plan.sets if managed(s)}
            return report
        cmds = self.element_commands(plan, report)
        run_nft(cmds, self.netns)
        return report

    def element_commands(self, plan: NftPlan, report: NftReport) -> list[dict]:
        assert self._elements is not None
        deletes: list[dict] = []
        adds: list[dict] = []
        for s in plan.sets:
            if not managed(s):
                continue
            want = {canon_mine(s, e): e for e in s.elements}
            have = self._elements.get(s.name, set())
            gone = have - set(want)
            new = [want[k] for k in set(want) - have]
            if s.map_type is not None:  # a key whose value changed: delete the old entry first
                gone_keys = [k for k, _ in gone]
                if gone_keys:
                    deletes.append({"delete": {"element": {"family": FAMILY, "table": NFT_TABLE, "name": s.name,
                                                           "elem": [render_value(k) for k in gone_keys]}}})
            elif gone:
                deletes.append({"delete": {"element": {"family": FAMILY, "table": NFT_TABLE, "name": s.name,
                                                       "elem": [render_value(x) for x in gone]}}})
            if new:
                adds.append({"add": {"element": {"family": FAMILY, "table": NFT_TABLE, "name": s.name,
                                                 "elem": [render_element(s, e) for e in sorted(new, key=repr)]}}})
            if gone or new:
                report.changes.append(f"{s.name}: +{len(new)} -{len(gone)}")
            self._elements[s.name] = set(want)
        report.element_commands = len(deletes) + len(adds)
        return deletes + adds

    def verify(self, plan: NftPlan) -> bool:
        """Full reconcile: does the kernel still hold what we think? If not, forget and re-apply later."""
        table = list_table(self.netns)
        if table is None or table_comment(table) != structure_hash(plan):
            self.forget()
            return False
        kernel = kernel_elements(table)
        for s in plan.sets:
            if managed(s) and kernel.get(s.name, set()) != {canon_mine(s, e) for e in s.elements}:
                self.forget()
                return False
        return True


def delete_table(netns: str | None = None) -> None:
    try:
        run_nft([{"delete": {"table": {"family": FAMILY, "name": NFT_TABLE}}}], netns)
    except NftError:
        pass


def counters(netns: str | None = None) -> dict[str, int]:
    """Packets counted by rules that carry a comment, keyed by chain/comment (drop metrics)."""
    table = list_table(netns) or []
    out: dict[str, int] = {}
    for item in table:
        r = item.get("rule")
        if not r or not r.get("comment"):
            continue
        for st in r.get("expr", []):
            if "counter" in st and isinstance(st["counter"], dict):
                key = f"{r['chain']}/{r['comment']}"
                out[key] = out.get(key, 0) + st["counter"].get("packets", 0)
    return out
