"""Applying the Plan's nftables table (`inet tether`) through `nft -j -f -`, and element changes over netlink.

Every apply is one atomic batch, and changes only what differs from the last apply:
- set elements (a pod joins a label set, a backend is added): when nothing else changes and every
  changed set is a plain (non-interval) set or map of the types `nft_netlink` encodes, one netlink
  batch of element deletes and adds, without running nft (whose fetch before each batch made a
  one-element change cost in proportion to the table: `nft_netlink`, bench/nft_apply.py);
  otherwise, in the nft batch, new elements through `add set|map` with elements (nft 1.0.6 then
  fetches no element), a small shrinking plain set flushed and refilled and a larger one, or an
  interval set, given `delete element` (see `element_commands`);
- structure, at chain and set granularity: a chain whose rules changed is flushed and refilled, new
  chains and sets are added, removed ones deleted, a base chain whose hook/priority/policy changed or
  a set whose definition (type, flags, map type, timeout) changed is deleted and re-added in the same
  batch (chains whose unchanged rules reference it are refilled too). Order inside the batch, so nft
  accepts it: element deletes, chain flushes, set and chain deletes, chain adds (all before any rule
  or map element that jumps to them), set adds, element adds, rules, marker rename.
- the whole table is replaced (still atomic) only when the dataplane has no memory of the kernel's
  structure (first apply, restart with another plan, after `forget()`) or when an incremental batch
  failed (logged; the table is then rebuilt from the plan).
A marker, an empty chain named after a hash of the structure (`plan-<hash>`), so a restarted agent
recognises a table it wrote and, when its plan is unchanged, changes nothing at all; incremental
batches rename it (a chain, not a set or an element: a rename keeps its place in listings and
costs no element fetch).
After a successful apply the dataplane keeps, per chain and per set, a digest of its definition and
rules (`_structure`): the next apply diffs against it.

The periodic verify (`verify`) need not list the table when nothing was committed in the namespace
since the dataplane's own last write. The kernel numbers committed nftables transactions per
namespace (the ruleset generation, `nft_netlink.ElementSocket.generation`: anyone's commit, to any
table, bumps it). Around each write the dataplane reads it: when the write took it from the
generation the dataplane knew the kernel at (or a full replace, which owes nothing to what was
there) to exactly the next one, no one else committed meanwhile and the table is what the
dataplane remembers at that generation (`_ours`). A verify that finds the generation still there
skips the listing (`last_verify` "generation"); any other value (another table written, an element
deleted by hand, a write of ours that committed nothing or raced with someone's) means a full
listing, and a listing that matches at a generation that did not move during it makes that
generation ours again. A full listing is also made at least every FULL_VERIFY_EVERY seconds: the
one case the generation cannot tell apart (a batch of ours that committed nothing while exactly one
other transaction did) is then caught within that time.

Element notation in `NftSet.elements`: addresses and CIDRs as strings ("10.1.0.0/16", "10.1.0.5"),
ranges "a-b", concatenations as tuples, map entries as (key, value) pairs whose value is a verdict
string ("jump in-abc", "goto x", "accept", "drop") or, for data maps, an address/port/tuple.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import pydantic_core

from tether.calc.names import NFT_TABLE, digest, own_link
from tether.calc.plan import NftChain, NftPlan, NftSet
from tether.dataplane import nft_netlink

log = logging.getLogger(__name__)

FAMILY = "inet"
VERDICTS = ("jump ", "goto ")
REFILL_LIMIT = 64  # up to this many elements are re-added rather than deleting some (see element_commands)
MARKER_PREFIX = "plan-"  # the marker chain: MARKER_PREFIX + hash of the table's structure
FULL_VERIFY_EVERY = 600.0  # seconds: a verify lists the table at least this often (module docstring)


class NftError(Exception):
    pass


@dataclass
class NftReport:
    full: bool = False  # the whole table was replaced
    element_commands: int = 0
    structure_commands: int = 0  # chain/set/rule commands of an incremental structure change
    chains_replaced: list[str] = field(default_factory=list)  # flushed and refilled (or re-created)
    chains_added: list[str] = field(default_factory=list)
    chains_removed: list[str] = field(default_factory=list)
    sets_added: list[str] = field(default_factory=list)
    sets_removed: list[str] = field(default_factory=list)
    sets_redefined: list[str] = field(default_factory=list)  # deleted and re-added
    changes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # ingress chains refused (a device that is not ours)

    @property
    def changed(self) -> int:
        return (1 if self.full else 0) + self.element_commands + self.structure_commands


def run_nft(commands: list[dict], netns: str | None = None) -> None:
    if not commands:
        return
    cmd = ["nft", "-j", "-f", "-"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    r = subprocess.run(cmd, input=json.dumps({"nftables": commands}), capture_output=True, text=True)
    if r.returncode != 0:
        raise NftError(f"nft failed: {r.stderr.strip()[:2000]}")


def list_table(netns: str | None = None, terse: bool = False) -> list[dict] | None:
    """The table as nft's JSON items. `terse`: without the sets' elements, which are nearly all of
    it with many endpoints (1.8 MB of JSON, 16 MB parsed, at 10,000 endpoints; 49 KB without)."""
    cmd = ["nft", *(["-t"] if terse else []), "-j", "list", "table", FAMILY, NFT_TABLE]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0:
        return None
    # the bytes parsed as they are, one copy per distinct short string (set names, verdicts): the
    # full listing is a transient at every reconcile, 16 -> 11.5 MB at 10,000 endpoints
    return pydantic_core.from_json(r.stdout)["nftables"]


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


def rendered(s: NftSet, elems: Any) -> list[Any]:
    """Elements of `s` in nft JSON, in a stable order (batches are reproducible)."""
    return [render_element(s, e) for e in sorted(elems, key=repr)]


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
        if c.device:
            body["dev"] = c.device
    return {"chain": body}


Layout = dict[tuple[str, str], tuple[str, str]]
"""The structure of a table, per item: ("set", name) -> (kind "set"/"map", definition) and
("chain", name) -> (definition, digest of its rules). Sets and chains have separate name spaces in
nft (`nested_out` is both a map and a chain)."""


def set_key(s: NftSet) -> tuple[str, str]:
    return ("map" if s.map_type is not None else "set",
            f"{s.type}|{s.flags}|{s.map_type}|{s.timeout}")


def chain_key(c: NftChain) -> str:
    if not c.hook:
        return ""
    return f"{c.hook}|{c.type}|{c.priority}|{c.policy}" + (f"|{c.device}" if c.device else "")


@functools.lru_cache(maxsize=1 << 14)
def rules_digest(rules: tuple[str, ...]) -> str:
    """Memoised: every apply digests every chain's rules to compare layouts (0.6 ms per apply with
    169 chains), while most chains' rules are unchanged from one plan to the next."""
    return digest("\n".join(rules), 24)


def layout_of(plan: NftPlan) -> Layout:
    out: Layout = {("set", s.name): set_key(s) for s in plan.sets}
    for c in plan.chains:
        out[("chain", c.name)] = (chain_key(c), rules_digest(c.rules))
    return out


def layout_hash(layout: Layout) -> str:
    text = "\n".join(f"{k}:{n}:{a}:{b}" for (k, n), (a, b) in sorted(layout.items()))
    return MARKER_PREFIX + digest(text, 24)


def structure_hash(plan: NftPlan) -> str:
    """Name of the empty marker chain that records which structure a table was built from (nft
    1.0.6 does not list table comments). Elements of the plan's sets do not count."""
    return layout_hash(layout_of(plan))


def managed(s: NftSet) -> bool:
    """Sets whose elements we own (dynamic sets, e.g. session affinity, are the kernel's)."""
    return s.timeout is None and "dynamic" not in s.flags


def rule_commands(c: NftChain) -> list[dict]:
    return [{"add": {"rule": {"family": FAMILY, "table": NFT_TABLE, "chain": c.name, **json.loads(r)}}}
            for r in c.rules]


def add_into(s: NftSet, elems: list[Any]) -> dict:
    """`add set|map` with elements: adds them as `add element` would, but nft 1.0.6 then skips
    fetching every set's elements from the kernel first (which `add/delete element` always do)."""
    definition = set_definition(s)
    next(iter(definition.values()))["elem"] = elems
    return {"add": definition}


def elements_command(verb: str, s: NftSet, elems: list[Any]) -> dict:
    return {verb: {"element": {"family": FAMILY, "table": NFT_TABLE, "name": s.name, "elem": elems}}}


def full_commands(plan: NftPlan, marker: str | None = None) -> list[dict]:
    table = {"family": FAMILY, "name": NFT_TABLE}
    cmds: list[dict] = [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}},
                        {"add": {"chain": {"family": FAMILY, "table": NFT_TABLE,
                                           "name": marker or structure_hash(plan)}}}]
    for s in plan.sets:
        cmds.append({"add": set_definition(s)})
    for c in plan.chains:  # all chains before any rule, so jumps resolve
        cmds.append({"add": chain_definition(c)})
    for s in plan.sets:
        if s.elements and managed(s):
            cmds.append(elements_command("add", s, rendered(s, s.elements)))
    for c in plan.chains:
        cmds.extend(rule_commands(c))
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


@functools.lru_cache(maxsize=1 << 16)
def _norm_prefix(v: str) -> str:
    """Memoised: every apply normalises every element of a changed set, and parsing thousands of
    prefixes with ipaddress was a tenth of an agent's CPU during a burst of CNI ADDs."""
    try:
        net = ipaddress.ip_network(v, strict=False)
    except ValueError:
        return v
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def canon_mine(s: NftSet, e: Any) -> Any:
    """Our element, normalised the way the kernel lists it (single addresses without /32). An
    element already in that form is returned itself, not a copy: the element memory then shares
    the plan's tuples (a service map's 10,000 entries were copied, ~1.5 MB each)."""
    def norm(v: Any) -> Any:
        if isinstance(v, tuple):
            out = tuple(norm(x) for x in v)
            return v if out == v else out
        if isinstance(v, str) and "/" in v:
            return _norm_prefix(v)
        return v

    if "/" not in repr(e):  # nothing to normalise (most elements: no prefix anywhere in them)
        return e
    if s.map_type is not None:
        k, v = norm(e[0]), norm(e[1])
        return e if k is e[0] and v is e[1] else (k, v)
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


def rule_counts(table: list[dict]) -> dict[str, int]:
    """Rules per chain (but the marker chain)."""
    out: dict[str, int] = {}
    for item in table:
        if "chain" in item and not item["chain"]["name"].startswith(MARKER_PREFIX):
            out.setdefault(item["chain"]["name"], 0)
        elif "rule" in item:
            name = item["rule"]["chain"]
            out[name] = out.get(name, 0) + 1
    return out


def planned_rule_counts(plan: NftPlan) -> dict[str, int]:
    """Rules per chain of a plan, to compare with `rule_counts` of a listed table."""
    return {c.name: len(c.rules) for c in plan.chains}


def table_comment(table: list[dict]) -> str | None:
    """The structure marker of a table we wrote (see structure_hash)."""
    for item in table:
        name = item.get("chain", {}).get("name", "")
        if name.startswith(MARKER_PREFIX):
            return name
    return None


@dataclass
class Changed:
    """A managed set whose elements change: `gone` as the kernel lists them, `new` as planned, `every`
    all its planned elements (for a refill); `fresh`: the set is (re)created in the batch."""
    s: NftSet
    every: Collection
    gone: set
    new: list
    fresh: bool = False


def element_commands(changed: list[Changed]) -> tuple[list[dict], list[dict]]:
    """nft commands for element changes: deletes (first in a batch) and adds. In nft 1.0.6 a
    `delete element` makes nft fetch the table's chains, sets and objects and every (non-concatenated)
    interval set's elements before the batch, a `flush set` only the sets; a small shrinking plain
    set is flushed and refilled (up to REFILL_LIMIT elements in all), a larger one gets its element
    deletes: a refill costs in proportion to the set (10,000 endpoints: a service's three 1,500-entry
    maps refilled, 28 ms of CPU; their element deletes, 10 ms; bench/NOTES.md#nft_apply)."""
    deletes: list[dict] = []
    adds: list[dict] = []
    shrinking = [c for c in changed if c.gone]
    refill = (all("interval" not in c.s.flags for c in shrinking)
              and sum(len(c.every) for c in shrinking) <= REFILL_LIMIT)
    for c in [*(c for c in changed if c.fresh), *(c for c in changed if not c.fresh)]:  # fills first
        s = c.s
        if c.gone and refill:
            deletes.append({"flush": {"map" if s.map_type is not None else "set":
                                      {"family": FAMILY, "table": NFT_TABLE, "name": s.name}}})
            if c.every:
                adds.append(add_into(s, rendered(s, c.every)))
            continue
        if c.gone and s.map_type is not None:  # a key whose value changed: delete the old entry first
            deletes.append(elements_command("delete", s, [render_value(k) for k, _ in c.gone]))
        elif c.gone:
            deletes.append(elements_command("delete", s, [render_value(x) for x in c.gone]))
        if c.new:
            adds.append(add_into(s, rendered(s, c.new)))
    return deletes, adds


def netlink_changes(changed: list[Changed]) -> nft_netlink.Batch | None:
    """The element changes as one netlink batch (`nft_netlink`): deletes, then adds; None when
    some element is not encoded there (interval sets, other types, a very large change)."""
    out: list[nft_netlink.Change] = []
    for c in changed:
        s = c.s
        if c.gone:
            keys = tuple(sorted((k for k, _ in c.gone) if s.map_type is not None else c.gone, key=repr))
            out.append(nft_netlink.Change(False, s.name, s.type, s.map_type, s.flags, keys))
    for c in changed:
        if c.new:
            s = c.s
            out.append(nft_netlink.Change(True, s.name, s.type, s.map_type, s.flags,
                                          tuple(sorted(c.new, key=repr))))
    try:
        return nft_netlink.encode(NFT_TABLE, out)
    except nft_netlink.Unencodable:
        return None


def run_elements(sock: nft_netlink.ElementSocket, batch: nft_netlink.Batch) -> None:
    """Sends an element batch (the netlink twin of `run_nft`)."""
    try:
        sock.send(batch)
    except OSError as e:
        raise NftError(f"element update over netlink failed: {e}") from e


def read_generation(sock: nft_netlink.ElementSocket) -> int | None:
    """The namespace's ruleset generation, or None when it cannot be read (then every verify lists
    the table, as before generations were used)."""
    try:
        return sock.generation()
    except OSError as e:
        log.debug("cannot read the nftables generation: %s", e)
        return None


def _names(names: list[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class NftDataplane:
    """Applies NftPlans to one namespace, remembering what it applied last."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._structure: Layout | None = None  # per chain/set digests of what the kernel holds
        self._marker: str | None = None
        self._elements: dict[str, set] | None = None  # managed sets: elements as the kernel lists them
        # the plan's managed sets behind _elements (the same elements: no re-diff; their tokens)
        self._sets: dict[str, NftSet] = {}
        self._applied: NftPlan | None = None  # the last plan applied (its rule counts, for verify)
        self._socket: nft_netlink.ElementSocket | None = None  # element-only changes (nft_netlink)
        # the ruleset generation at which the kernel holds exactly what we remember (module docstring)
        self._ours: int | None = None
        self._listed_at = time.monotonic()  # of the last verify that listed the table (or of the start)
        self.last_verify = ""  # how the last verify decided: "generation" or "listing"
        self.verify_ms = 0.0  # what the last verify took (wall)

    def forget(self) -> None:
        """Drop the memory of the last apply (the next apply re-reads the kernel)."""
        self._ours = None
        self._structure = None
        self._marker = None
        self._elements = None
        self._sets = {}
        self._applied = None

    def _remember(self, plan: NftPlan, layout: Layout, marker: str, elements: dict[str, set],
                  sets: dict[str, NftSet]) -> None:
        self._structure, self._marker, self._elements, self._sets = layout, marker, elements, sets
        self._applied = plan

    def apply(self, plan: NftPlan, extra: list[dict] | None = None) -> NftReport:
        """`extra`: commands to run in the same batch, after the plan's (elements for sets whose
        elements the kernel owns, e.g. calc.pickup_grace)."""
        extra = extra or []
        report = NftReport()
        foreign = [c for c in plan.chains if c.device is not None and not own_link(c.device)]
        if foreign:  # never hook a device that is not Tether's, whatever the plan says
            report.failures += [f"ingress chain {c.name} on {c.device!r} refused: not Tether's device" for c in foreign]
            plan = NftPlan(sets=plan.sets, chains=tuple(c for c in plan.chains if c not in foreign))
        layout = layout_of(plan)
        marker = layout_hash(layout)
        before = self._generation()
        # the kernel holds what we remember (nothing committed since our last write, or a listing)
        known = before is not None and before == self._ours
        if self._structure is None:
            table = list_table(self.netns)
            # adopt a table of the same structure and no more: a chain someone added (a stale ingress
            # chain of ours, say) does not change the marker, so the rule counts are compared too
            if (table is not None and table_comment(table) == marker
                    and rule_counts(table) == planned_rule_counts(plan)):
                kernel = kernel_elements(table)
                self._remember(plan, layout, marker, {s.name: kernel.get(s.name, set()) for s in plan.sets
                                                      if managed(s)}, {})
                known = before is not None and self._generation() == before  # listed at `before`
        if self._structure is None:
            self._full(plan, layout, marker, report, "table replaced", extra, before)
            return report
        try:
            cmds, elements, behind, batch = self._commands(plan, layout, marker, report, netlink=not extra)
            self._ours = None  # until the write is known to be the only commit
            if batch is not None:
                run_elements(self._element_socket(), batch)
            else:
                run_nft(cmds + extra, self.netns)
        except NftError as e:  # the batch is atomic: the kernel still holds the previous table
            log.warning("incremental nft update failed, replacing the whole table: %s", e)
            self.forget()
            report = NftReport(failures=report.failures)
            self._full(plan, layout, marker, report, "table replaced (incremental update failed)", extra, before)
            return report
        except BaseException:
            self.forget()  # the element memory is changed in place (`_element_diff`): not to be trusted
            raise
        self._remember(plan, layout, marker, elements, behind)
        if batch is None and not cmds and not extra:  # nothing written, nothing committed
            self._ours = before if known else None
        else:
            self._settle(before if known else None)
        return report

    def _generation(self) -> int | None:
        return read_generation(self._element_socket())

    def _settle(self, before: int | None) -> None:
        """After a write: the generation is ours if the write was the one commit since `before` (the
        generation at which the kernel held what the write was computed from; None: unknown)."""
        after = self._generation() if before is not None else None
        self._ours = after if after is not None and after == nft_netlink.next_generation(before) else None

    def _element_socket(self) -> nft_netlink.ElementSocket:
        if self._socket is None:
            self._socket = nft_netlink.ElementSocket(self.netns)
        return self._socket

    def _full(self, plan: NftPlan, layout: Layout, marker: str, report: NftReport, why: str,
              extra: list[dict] | None = None, before: int | None = None) -> None:
        """Replaces the table. `before`: the generation read before (a replace owes nothing to what
        the table held, so only other commits since then matter)."""
        self._ours = None
        run_nft(full_commands(plan, marker) + (extra or []), self.netns)
        self._settle(before)
        report.full = True
        report.changes.append(why)
        managed_sets = [s for s in plan.sets if managed(s)]
        self._remember(plan, layout, marker, {s.name: {canon_mine(s, e) for e in s.elements} for s in managed_sets},
                       {s.name: s for s in managed_sets})

    def _commands(self, plan: NftPlan, layout: Layout, marker: str, report: NftReport, netlink: bool = True
                  ) -> tuple[list[dict], dict[str, set], dict[str, NftSet], nft_netlink.Batch | None]:
        """One batch taking the kernel from `_structure`/`_elements` to `plan` (nft commands, or
        element changes to send over netlink when only elements changed, `netlink` allows it and
        every changed set's elements can be encoded there), and the element memory after it.
        Touches only chains and sets that differ (see the module docstring for the order)."""
        old = self._structure
        assert old is not None
        if old == layout:
            changed, elements, behind = self._element_diff(plan, set(), report)
            if netlink and changed:
                batch = netlink_changes(changed)
                if batch is not None:
                    report.element_commands = len(batch.names)
                    return [], elements, behind, batch
            deletes, adds = element_commands(changed)
            report.element_commands = len(deletes) + len(adds)
            return deletes + adds, elements, behind, None
        sets = {s.name: s for s in plan.sets}
        chains = {c.name: c for c in plan.chains}
        old_sets = {n: v for (k, n), v in old.items() if k == "set"}
        old_chains = {n: v for (k, n), v in old.items() if k == "chain"}
        s_added = [n for n in sets if n not in old_sets]
        s_removed = sorted(n for n in old_sets if n not in sets)
        s_redef = [n for n in sets if n in old_sets and old_sets[n] != layout[("set", n)]]
        c_added = [n for n in chains if n not in old_chains]
        c_removed = sorted(n for n in old_chains if n not in chains)
        c_redef = [n for n in chains if n in old_chains and old_chains[n][0] != layout[("chain", n)][0]]
        c_refill = [n for n in chains if n in old_chains and old_chains[n][0] == layout[("chain", n)][0]
                    and old_chains[n][1] != layout[("chain", n)][1]]
        if s_redef:  # a set is deleted and re-added: rules that name it must go first, even unchanged ones
            needles = [f'"@{n}"' for n in s_redef]
            busy = {*c_refill, *c_redef, *c_added}
            c_refill += [c.name for c in plan.chains if c.name not in busy
                         and any(nd in r for r in c.rules for nd in needles)]
        # base chains cannot be jump or goto targets, so nothing references a re-created (base) chain

        changed, elements, behind = self._element_diff(plan, {*s_added, *s_redef}, report)
        deletes, adds = element_commands(changed)
        t = {"family": FAMILY, "table": NFT_TABLE}
        cmds: list[dict] = list(deletes)  # first: map entries pointing at chains about to go
        cmds += [{"flush": {"chain": {**t, "name": n}}} for n in (*c_refill, *c_removed, *c_redef)]
        cmds += [{"delete": {old_sets[n][0]: {**t, "name": n}}} for n in (*s_removed, *s_redef)]
        cmds += [{"delete": {"chain": {**t, "name": n}}} for n in (*c_removed, *c_redef)]
        cmds += [{"add": chain_definition(chains[n])} for n in (*c_added, *c_redef)]
        cmds += [{"add": set_definition(sets[n])} for n in (*s_added, *s_redef)]
        cmds += adds
        refill = {*c_refill, *c_added, *c_redef}
        for c in plan.chains:
            if c.name in refill:
                cmds += rule_commands(c)
        if marker != self._marker:
            if self._marker:
                cmds.append({"rename": {"chain": {**t, "name": self._marker, "newname": marker}}})
            else:
                cmds.append({"add": {"chain": {**t, "name": marker}}})
        report.element_commands = len(deletes) + len(adds)
        report.structure_commands = len(cmds) - report.element_commands
        report.chains_replaced = sorted({*c_refill, *c_redef})
        report.chains_added, report.chains_removed = sorted(c_added), c_removed
        report.sets_added, report.sets_removed, report.sets_redefined = sorted(s_added), s_removed, sorted(s_redef)
        report.changes[:0] = [f"{what}: {_names(names)}" for what, names in (
            ("chains replaced", report.chains_replaced), ("chains added", report.chains_added),
            ("chains removed", report.chains_removed), ("sets added", report.sets_added),
            ("sets removed", report.sets_removed), ("sets redefined", report.sets_redefined)) if names]
        return cmds, elements, behind, None

    def _element_diff(self, plan: NftPlan, fresh: set[str], report: NftReport
                      ) -> tuple[list[Changed], dict[str, set], dict[str, NftSet]]:
        """The managed sets whose elements change, and the element memory after the change. Sets in
        `fresh` are (re)created in the batch, so they get all their elements."""
        assert self._elements is not None
        elements: dict[str, set] = {}
        sets: dict[str, NftSet] = {}
        changed: list[Changed] = []
        for s in plan.sets:
            if not managed(s):
                continue
            sets[s.name] = s
            last = self._sets.get(s.name)
            before = last.elements if last is not None else None
            have = self._elements.get(s.name)
            d = s.delta
            if (s.name not in fresh and have is not None and before is not s.elements and d is not None
                    and last is not None and d.base == last.token and len(before) == len(have)):
                # the planner says what changed since the elements applied last: only that is
                # normalised and compared, and the memory is changed in place (a service map holds
                # an entry per backend of the cluster); exact for the reason given below
                fresh_c = {canon_mine(s, e): e for e in d.added}
                gone = ({canon_mine(s, e) for e in d.removed} - fresh_c.keys()) & have
                new = [e for k, e in fresh_c.items() if k not in have]
                have -= gone
                have.update(fresh_c)
                elements[s.name] = have
                if gone or new:
                    changed.append(Changed(s, s.elements, gone, new))
                    report.changes.append(f"{s.name}: +{len(new)} -{len(gone)}")
                continue
            if (s.name not in fresh and have is not None and (before is s.elements or before == s.elements)):
                # same plan elements as last time (an equality test costs in proportion to the set
                # unless the planner hands over the same frozenset)
                elements[s.name] = have
                continue
            if s.name in fresh:
                elements[s.name] = {canon_mine(s, e) for e in s.elements}
                if s.elements:
                    changed.append(Changed(s, s.elements, set(), list(s.elements), fresh=True))
                continue
            have = have if have is not None else set()
            if before is not None and len(before) == len(have):
                # the usual case, a few elements changed: only those are normalised (a set holds one
                # element per pod, and normalising all of them was most of an apply with 500 pods).
                # Exact because no two of the previous elements normalised alike (equal lengths).
                fresh_c = {canon_mine(s, e): e for e in s.elements - before}
                gone = ({canon_mine(s, e) for e in before - s.elements} - fresh_c.keys()) & have
                new = [e for k, e in fresh_c.items() if k not in have]
                elements[s.name] = (have - gone) | fresh_c.keys()
                every: Collection = s.elements
            else:
                want = {canon_mine(s, e): e for e in s.elements}
                elements[s.name] = set(want)
                gone = have - elements[s.name]
                new = [want[k] for k in elements[s.name] - have]
                every = want.values()
            if gone or new:
                changed.append(Changed(s, every, gone, new))
                report.changes.append(f"{s.name}: +{len(new)} -{len(gone)}")
        return changed, elements, sets

    def verify(self, plan: NftPlan) -> bool:
        """Full reconcile: does the kernel still hold what we think (what we applied last, or else
        `plan`)? If nothing was committed in the namespace since our last write (its ruleset
        generation is still ours, module docstring), yes, without listing the table
        (`last_verify` "generation"); otherwise (and at least every FULL_VERIFY_EVERY seconds) the
        table is listed and its structure marker, every managed set's elements and every chain's
        rule count compared. If they differ, forget, so the next apply re-reads or replaces it."""
        t0 = time.monotonic()
        try:
            return self._verify(plan, t0)
        finally:
            self.verify_ms = (time.monotonic() - t0) * 1000

    def _verify(self, plan: NftPlan, now: float) -> bool:
        gen = self._generation()
        if (gen is not None and gen == self._ours and self._structure is not None
                and now - self._listed_at < FULL_VERIFY_EVERY):
            self.last_verify = "generation"
            return True
        self.last_verify = "listing"
        self._listed_at = now
        table = list_table(self.netns)
        if self._structure is not None and self._elements is not None:
            marker, elements = self._marker, self._elements
            counts = planned_rule_counts(self._applied) if self._applied is not None else {}
        else:
            marker = structure_hash(plan)
            elements = {s.name: {canon_mine(s, e) for e in s.elements} for s in plan.sets if managed(s)}
            counts = planned_rule_counts(plan)
        ok = table is not None and table_comment(table) == marker
        if ok:
            assert table is not None
            kernel = kernel_elements(table)
            ok = all(kernel.get(name, set()) == want for name, want in elements.items())
            ok = ok and rule_counts(table) == counts
        if not ok:
            self.forget()
        else:  # what we remember, listed at a generation that held still, is ours
            known = self._structure is not None and gen is not None and self._generation() == gen
            self._ours = gen if known else None
        return ok


def delete_table(netns: str | None = None) -> None:
    try:
        run_nft([{"delete": {"table": {"family": FAMILY, "name": NFT_TABLE}}}], netns)
    except NftError:
        pass


def counters(netns: str | None = None) -> dict[str, int]:
    """Packets counted by rules that carry a comment, keyed by chain/comment (drop metrics)."""
    # read every SAMPLE_INTERVAL while metrics are scraped: the sets' elements are not needed, and
    # parsing them each time was a 16 MB transient at 10,000 endpoints (a fragmented heap after)
    table = list_table(netns, terse=True) or []
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
