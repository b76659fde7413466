"""Pure compiler: NetworkPolicy, security groups and network isolation -> an nft fragment.

Shape (see docs/ARCHITECTURE.md, "nftables layout"), chosen so the rule count grows with
policies + endpoints, never their product, and so a new pod or a label change is a set-element
update, not a rewrite of rules:
- one chain per policy and direction (`npi-`/`npe-<id12>`) and per security group (`sgi-`/`sge-<id12>`),
  whose rules say "this packet is allowed" by setting a mark bit;
- peers are named sets of addresses (`sel-<hash>` per distinct selector, `sgm-<id12>` per remote
  group, `pn-in-`/`pn-out-<port name>` for named ports), filled from every endpoint in the cluster;
- endpoints with the same network, policies and groups share one dispatch chain (`in-`/`out-<hash>`),
  reached through the `ep_in`/`ep_out` verdict maps: each applicable layer must have set its bit, or
  the packet is dropped with a counter and an NFLOG record (group `LOG_GROUP`);
- anti-spoofing is not here: each pod interface's own ingress chain does it (`pod_ingress`);
- an endpoint with port security and no group (Neutron's semantics, `Endpoint.port_security`) has a
  security-group layer with no rule (`NO_GROUPS`): everything but its own host is denied;
- endpoints with any policy or security group go into `stateful`, so their traffic is tracked
  (see `calc.base_nft`'s stateless fast path).
The semantics are those of `tether.policy_eval`, which is written separately and checks this module.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tether import yielding
from tether.calc import counted, names
from tether.calc.addresses import ip_version, network, v4_subnets
from tether.calc.memos import Memos
from tether.calc.names import LINK_PREFIX, NP_OK, SG_OK, VTEP_NAME, stateless_chain
from tether.calc.nft import (
    ACCEPT,
    COUNTER,
    DROP,
    FIB_LOCAL,
    RETURN,
    addr_field,
    denied,
    jump_rule,
    mark_clear,
    mark_missing,
    mark_set,
    match,
    meta,
    payload,
    prefix,
    rule,
)
from tether.calc.plan import BY_NAME, NftChain, NftPlan, NftSet
from tether.model import Endpoint, Namespace, Network, NetworkPolicy, SecurityGroup, SecurityGroupRule

PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132, "icmpv6": 58, "ipv6-icmp": 58}
L4_NAMES = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "ipv6-icmp"}
PORT_PROTOS = (6, 17, 132)


def nested_children(endpoints: Iterable[Endpoint]) -> dict[str, list[Endpoint]]:
    """Parent endpoint id -> the nested endpoints behind its interface (`parent` set, no interface)."""
    children: dict[str, list[Endpoint]] = {}
    for ep in endpoints:
        if ep.parent and not ep.interface:
            children.setdefault(ep.parent, []).append(ep)
    return children


MARK_CLEAR = mark_clear(NP_OK | SG_OK)
POD_OIF = [match(meta("oifname"), LINK_PREFIX + "*"), match(meta("oifname"), VTEP_NAME, "!=")]


# rules every dispatch chain shares, encoded once
TO_OWN_HOST = rule(FIB_LOCAL, ACCEPT, comment="to its own host")
CLEAR_MARKS = rule(MARK_CLEAR)
ACCEPT_RULE = rule(ACCEPT)
TO_EP_IN = rule({"vmap": {"key": meta("oifname"), "data": "@ep_in"}})
UNKNOWN_OIF = rule(*POD_OIF, COUNTER, DROP, comment="unknown pod interface")




def stateless_targets(networks: Iterable[Network]) -> dict[str, str]:
    """Network name -> the verdict that takes an IPv4 packet of that network to its stateless chain,
    for networks with an IPv4 subnet (calc.stateless_chains makes exactly those chains)."""
    return {n.name: "goto " + stateless_chain(n.name) for n in networks if v4_subnets(n)}


# --- label selectors -------------------------------------------------------------------------------

def label_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e.get("key"), e.get("operator"), set(e.get("values") or [])
        present = k in labels
        ok = {"In": present and labels.get(k) in vals, "NotIn": not present or labels.get(k) not in vals,
              "Exists": present, "DoesNotExist": not present}.get(op, False)
        if not ok:
            return False
    return True


def rule_types(spec: dict[str, Any]) -> set[str]:
    types = spec.get("policyTypes")
    if types:
        return set(types)
    return {"Ingress", "Egress"} if spec.get("egress") else {"Ingress"}


# --- the cluster, indexed once -----------------------------------------------------------------------

@dataclass
class Index:
    endpoints: list[Endpoint]
    ns_labels: dict[str, dict[str, str]]
    policies: list[NetworkPolicy]
    groups: dict[str, SecurityGroup]
    networks: dict[str, Network]
    v6: bool
    by_label: dict[tuple[str, str], dict[str, Endpoint]] = field(default_factory=dict)  # label -> id -> endpoint
    pols_by_label: dict[tuple[str, str, str], list[NetworkPolicy]] = field(default_factory=dict)
    pols_any: dict[str, list[NetworkPolicy]] = field(default_factory=dict)
    peer_cache: dict[str, Members] = field(default_factory=dict)
    # endpoints changed since the last plan's index, (old version or None, new version or None),
    # None: unknown (all changed); and the last plan's selector members, changed for those
    changed: list[tuple[Endpoint | None, Endpoint | None]] | None = None
    last_peers: dict[str, Members] = field(default_factory=dict)
    selecting_cache: dict[str, list[NetworkPolicy]] = field(default_factory=dict)

    @classmethod
    def build(cls, endpoints: Iterable[Endpoint], namespaces: Iterable[Namespace], policies: Iterable[NetworkPolicy],
              groups: Iterable[SecurityGroup], networks: Iterable[Network], memos: Memos | None = None,
              by_id: dict[str, Endpoint] | None = None,
              policies_by_name: dict[str, NetworkPolicy] | None = None) -> Index:
        """The index of one plan. With `memos`, the label postings are the last plan's, changed for
        the endpoints that changed only (building them all was the largest part of a policy
        fragment with 10,000 endpoints, bench/calc_scale.py); with `by_id` too (the endpoints by
        id), those the journal names (`Memos.delta`), not found by a pass over all. Nothing here
        depends on the order of the endpoints: every use ends in a set, or a name derived from content."""
        eps = list(endpoints)
        nsl: dict[str, dict[str, str]] = {}
        for ns in namespaces:
            nsl[ns.name] = {"kubernetes.io/metadata.name": ns.name, **ns.labels}
        postings, changed, ep_namespaces = _label_postings(eps, memos, by_id)
        for name in sorted(ep_namespaces - nsl.keys()):
            nsl[name] = {"kubernetes.io/metadata.name": name}
        nets = {n.name: n for n in networks}
        v6 = any(ipaddress.ip_network(s.cidr).version == 6 for n in nets.values() for s in n.subnets)
        by_id: dict[str, SecurityGroup] = {}
        for g in groups:
            by_id[g.id] = g
        idx = cls(eps, nsl, [], by_id, nets, v6)
        idx.by_label, idx.changed = postings, changed
        if memos is not None:
            if memos.policy_ns == nsl:  # a namespace's labels change what namespace selectors match
                idx.last_peers = memos.policy_peers
            memos.policy_peers, memos.policy_ns = {}, nsl  # the plan's own when it is done (compile)
        idx.pols_by_label, idx.pols_any = _policy_postings(policies, memos, policies_by_name)
        return idx

    def candidates(self, selector: dict[str, Any]) -> list[Endpoint]:
        """Endpoints that may match: the shortest matchLabels posting list, else all."""
        ml = selector.get("matchLabels") or {}
        if not ml:
            return self.endpoints
        return list(min((self.by_label.get(kv, {}) for kv in ml.items()), key=len).values())

    def selecting(self, ep: Endpoint) -> list[NetworkPolicy]:
        """Policies whose podSelector may select `ep` (checked fully by the caller), in policy order."""
        cached = self.selecting_cache.get(ep.id)
        if cached is not None:
            return cached
        found = list(self.pols_any.get(ep.namespace, []))
        for k, v in ep.labels.items():
            found.extend(self.pols_by_label.get((ep.namespace, k, v), []))
        out = self.selecting_cache[ep.id] = sorted(found, key=lambda p: (p.namespace, p.name))
        return out

    def group(self, ref: str) -> SecurityGroup | None:
        return self.groups.get(ref) or next((g for g in self.groups.values() if g.name == ref), None)

    def peer_ips(self, pol: NetworkPolicy, peer: dict[str, Any], key: str | None = None) -> Members:
        """Addresses of the endpoints a selector peer matches; `key` is its `selector_json`."""
        nsel = peer.get("namespaceSelector")
        psel = peer.get("podSelector") or {}
        key = key or selector_json(pol, peer)
        if key in self.peer_cache:
            return self.peer_cache[key]

        def matches(ep: Endpoint) -> bool:
            if nsel is not None:
                if not label_match(nsel, self.ns_labels.get(ep.namespace, {})):
                    return False
            elif ep.namespace != pol.namespace:
                return False
            return label_match(psel, ep.labels)

        # the last plan's addresses, less those of the changed endpoints' old versions that it
        # matched, plus those of their new versions that it matches
        last = self.last_peers.get(key) if self.changed is not None else None
        if last is not None:
            self.peer_cache[key] = last
            for old, new in self.changed or ():
                if old is not None and matches(old):
                    last.remove(old.ips)
                if new is not None and matches(new):
                    last.add(new.ips)
            return last
        out = self.peer_cache[key] = Members()
        for ep in self.candidates(psel):
            if matches(ep):
                out.add(ep.ips)
        return out


class Members:
    """The addresses a selector matches, each with how many matching endpoints have it, per IP
    version; kept from one plan to the next (`Memos.policy_peers`) and changed for the endpoints
    that changed, with the sets made of them until they change (a pass over every member of
    every selector was most of a policy fragment with 10,000 endpoints, bench/calc_scale.py)."""

    __slots__ = ("counts", "sets")

    def __init__(self) -> None:
        self.counts: dict[int, dict[str, int]] = {4: {}, 6: {}}
        self.sets: dict[int, NftSet] = {}  # version -> its set, while the members are those

    def add(self, ips: Iterable[str]) -> None:
        for ip in ips:
            v = ip_version(ip)
            counted.add(self.counts[v], ip)
            self.sets.pop(v, None)

    def remove(self, ips: Iterable[str]) -> None:
        for ip in ips:
            v = ip_version(ip)
            counted.drop(self.counts[v], ip)
            self.sets.pop(v, None)

    def nft_set(self, version: int, name: str) -> NftSet:
        s = self.sets.get(version)
        if s is None or s.name != name:
            s = self.sets[version] = NftSet(name, "ipv4_addr" if version == 4 else "ipv6_addr",
                                            elements=frozenset(self.counts[version]))
        return s


def _policy_postings(policies: Iterable[NetworkPolicy], memos: Memos | None,
                     by_name: dict[str, NetworkPolicy] | None
                     ) -> tuple[dict[tuple[str, str, str], list[NetworkPolicy]], dict[str, list[NetworkPolicy]]]:
    """Policies by (namespace, a label of their pod selector) and, without matchLabels, by
    namespace (`Index.selecting` sorts what it finds). With `memos` and `by_name` (the policies by
    store name), the last plan's, changed for the policies the journal names."""
    by_label: dict[tuple[str, str, str], list[NetworkPolicy]]
    any_: dict[str, list[NetworkPolicy]]
    delta = memos.delta("policy_postings") if memos is not None and by_name is not None else None
    last, by_label, any_ = memos.policy_postings if memos is not None else ({}, {}, {})
    if memos is not None:
        memos.policy_postings = ({}, {}, {})  # if this raises half way, the next plan starts afresh

    def key(p: NetworkPolicy) -> tuple[str, str, str] | None:
        """The label posting a policy goes in (its first matchLabels pair), None: `any_`."""
        ml = (p.spec.get("podSelector") or {}).get("matchLabels") or {}
        if ml:
            k, v = next(iter(sorted(ml.items())))
            return p.namespace, k, v
        return None

    def posting(p: NetworkPolicy) -> list[NetworkPolicy]:
        at = key(p)
        return by_label.setdefault(at, []) if at is not None else any_.setdefault(p.namespace, [])

    if delta is None or by_name is None:
        last, by_label, any_ = {}, {}, {}
        for p in sorted(policies, key=lambda p: (p.namespace, p.name)):
            last[p.store_name()] = p
            posting(p).append(p)
    else:
        for name in delta.get("NetworkPolicy", ()):
            old, new = last.pop(name, None), by_name.get(name)
            if old is not None:
                found = posting(old)
                found.remove(old)
                if not found:  # no empty lists left behind: the postings are those of a cold build
                    at = key(old)
                    if at is not None:
                        del by_label[at]
                    else:
                        del any_[old.namespace]
            if new is not None:
                last[name] = new
                posting(new).append(new)
    if memos is not None:
        memos.policy_postings = (last, by_label, any_)
    return by_label, any_


def _label_postings(eps: list[Endpoint], memos: Memos | None, by_id: dict[str, Endpoint] | None = None
                    ) -> tuple[dict[tuple[str, str], dict[str, Endpoint]],
                               list[tuple[Endpoint | None, Endpoint | None]] | None, set[str]]:
    """(label key, value) -> endpoint id -> endpoint; with `memos`, the last plan's, updated. And
    the endpoints changed since (old and new versions), or None when they were all built afresh;
    and the endpoints' namespaces."""
    last, postings = memos.policy_labels if memos is not None else ({}, {})
    counts = memos.policy_ep_ns if memos is not None else {}
    delta = memos.delta("policy_labels") if memos is not None and by_id is not None else None
    if memos is not None:
        memos.policy_labels = ({}, {})  # if this raises half way, the next plan starts afresh
        memos.policy_ep_ns = {}

    def drop(ep: Endpoint) -> None:
        for kv in ep.labels.items():
            posting = postings[kv]
            del posting[ep.id]
            if not posting:
                del postings[kv]
        n = counts[ep.namespace] - 1
        if n:
            counts[ep.namespace] = n
        else:
            del counts[ep.namespace]

    def add(ep_id: str, ep: Endpoint) -> None:
        for kv in ep.labels.items():
            postings.setdefault(kv, {})[ep_id] = ep
        counts[ep.namespace] = counts.get(ep.namespace, 0) + 1

    if delta is not None and memos is not None and by_id is not None:  # the journal's endpoints only
        changes: list[tuple[Endpoint | None, Endpoint | None]] = []
        for ep_id in delta.get("Endpoint", ()):
            old, new = last.get(ep_id), by_id.get(ep_id)
            if old is new:
                continue
            changes.append((old, new))
            if old is not None:
                drop(old)
                del last[ep_id]
            if new is not None:
                add(ep_id, new)
                last[ep_id] = new
        memos.policy_labels, memos.policy_ep_ns = (last, postings), counts
        return postings, changes, set(counts)
    now = {ep.id: ep for ep in eps}
    if len(now) != len(eps):  # one id twice: not a replica's endpoints, build without the memo
        last, postings, memos = {}, {}, None
    if not last:
        counts = {}
    changed: list[tuple[Endpoint | None, Endpoint | None]] | None = [] if last else None

    for ep_id, ep in now.items():
        old = last.get(ep_id)
        if old is ep:
            continue
        if old is not None:
            drop(old)
        add(ep_id, ep)
        if changed is not None:
            changed.append((old, ep))
    for ep_id in last.keys() - now.keys():
        drop(last[ep_id])
        if changed is not None:
            changed.append((last[ep_id], None))
    if memos is not None:
        memos.policy_labels, memos.policy_ep_ns = (now, postings), counts
    return postings, changed, set(counts)


def selector_json(pol: NetworkPolicy, peer: dict[str, Any]) -> str:
    """A selector peer, canonically (names its set and keys the peer cache)."""
    key = {"ns": None if peer.get("namespaceSelector") is not None else pol.namespace,
           "nsel": peer.get("namespaceSelector"), "psel": peer.get("podSelector") or {}}
    return json.dumps(key, sort_keys=True)


def selector_set_name(pol: NetworkPolicy, peer: dict[str, Any], version: int, key: str | None = None) -> str:
    return names.selector_set(version, key or selector_json(pol, peer))


# --- compilation -----------------------------------------------------------------------------------

class Builder:
    def __init__(self, idx: Index, host: str, memos: Memos | None = None,
                 routed: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.idx = idx
        self.host = host
        self.routed = routed  # (subnet, subnet) pairs a router joins (calc/l3.py)
        self.memos = Memos() if memos is None else memos  # policy_rules, dispatch_rules, workloads
        self.sets: dict[str, NftSet] = {}
        self.chains: dict[str, NftChain] = {}
        self.versions = (4, 6) if idx.v6 else (4,)
        self._layers: dict[tuple, tuple[list[NetworkPolicy], list[SecurityGroup]]] = {}
        self._dispatch: dict[tuple, str] = {}
        self.workloads: dict[str, tuple[Endpoint, tuple]] = {}  # this plan's part of `Memos.workloads`

    def add_set(self, name: str, typ: str | tuple[str, ...], elements: Iterable[Any], flags: tuple[str, ...] = ()
                ) -> str:
        if name not in self.sets:
            self.sets[name] = NftSet(name, typ, flags, elements=frozenset(elements))
        return "@" + name

    # --- NetworkPolicy --------------------------------------------------------------------------

    def peer_matches(self, pol: NetworkPolicy, peer: dict[str, Any], which: str) -> list[list[dict]]:
        """Alternatives (ORed) of statement lists (ANDed) matching one peer on the remote address."""
        block = peer.get("ipBlock")
        if block:
            net = network(block["cidr"])
            stmts = [match(addr_field(net.version, which), prefix(block["cidr"]))]
            excepts = [x for x in block.get("except") or [] if network(x).version ==
                       net.version]
            if excepts:
                stmts.append(match(addr_field(net.version, which), {"set": [prefix(x) for x in excepts]}, "!="))
            return [stmts]
        refs = self.selector_sets(pol, peer, selector_json(pol, peer))
        return [[match(addr_field(v, which), ref)] for v, ref in zip(self.versions, refs, strict=True)]

    def selector_sets(self, pol: NetworkPolicy, peer: dict[str, Any], key: str) -> list[str]:
        """The per-IP-version sets of the addresses a selector peer matches (`key`: its selector_json)."""
        members = self.idx.peer_ips(pol, peer, key)
        refs = []
        for v in self.versions:
            made = members.sets.get(v)
            name = made.name if made is not None else selector_set_name(pol, peer, v, key)
            if name not in self.sets:
                self.sets[name] = members.nft_set(v, name)
            refs.append("@" + name)
        return refs

    def named_port_set(self, name: str, direction: str) -> str:
        """(local interface | address) . protocol . port for every endpoint declaring port `name`."""
        if direction == "Ingress":
            ifaces = {ep.id: ep.interface for ep in self.idx.endpoints if ep.host == self.host and ep.interface}
            elems = {(ifaces.get(ep.id) or ifaces.get(ep.parent or ""), d.protocol.lower(), d.port)
                     for ep in self.idx.endpoints for d in ep.ports if d.name == name}
            elems = {e for e in elems if e[0]}
            return self.add_set(names.named_port_set("Ingress", name), ("ifname", "inet_proto", "inet_service"), elems)
        elems = {(ip, d.protocol.lower(), d.port) for ep in self.idx.endpoints for d in ep.ports if d.name == name
                 for ip in ep.ips if ipaddress.ip_address(ip).version == 4}
        return self.add_set(names.named_port_set("Egress", name), ("ipv4_addr", "inet_proto", "inet_service"), elems)

    def port_matches(self, ports: list[dict[str, Any]], direction: str) -> list[list[dict]]:
        if not ports:
            return [[]]
        by_proto: dict[str, list[Any]] = {}
        whole: set[str] = set()
        out: list[list[dict]] = []
        for p in ports:
            proto = (p.get("protocol") or "TCP").lower()
            port = p.get("port")
            if port is None:
                whole.add(proto)
            elif isinstance(port, str) and not port.isdigit():
                who = meta("oifname") if direction == "Ingress" else payload("ip", "daddr")
                key = {"concat": [who, meta("l4proto"), payload("th", "dport")]}
                out.append([match(meta("l4proto"), proto), match(key, self.named_port_set(port, direction))])
            else:
                lo, hi = int(port), int(p.get("endPort") or port)
                by_proto.setdefault(proto, []).append(lo if lo == hi else {"range": [lo, hi]})
        for proto in sorted(whole):
            out.append([match(meta("l4proto"), proto)])
        for proto, vals in sorted(by_proto.items()):
            if proto in whole:
                continue
            right = vals[0] if len(vals) == 1 else {"set": vals}
            out.append([match(meta("l4proto"), proto), match(payload("th", "dport"), right)])
        return out

    def policy_chain(self, pol: NetworkPolicy, direction: str) -> str:
        name = names.policy_chain(direction, pol.id)
        if name in self.chains:
            return name
        key, peers_key, which = (("ingress", "from", "saddr") if direction == "Ingress" else ("egress", "to", "daddr"))
        spec_rules = pol.spec.get(key) or []
        # the encoded rules depend only on this (set names follow from the policy and its peers), so an
        # unchanged policy is not re-encoded: only its sets are made again, from the recorded peers
        memo = (pol.namespace, pol.name, direction, self.versions, json.dumps(spec_rules, sort_keys=True, default=str))
        hit = self.memos.policy_rules.get(memo)
        if hit is not None:
            encoded, sets = hit
            for peer, peer_key, port_name in sets:
                if port_name is not None:
                    self.named_port_set(port_name, direction)
                else:
                    self.selector_sets(pol, peer, peer_key)
            self.chains[name] = NftChain(name, encoded)
            return name
        rules: list[str] = []
        recipe: list[tuple[dict[str, Any], str, str | None]] = []  # what makes this chain's sets, in order
        for i, r in enumerate(spec_rules):
            r = r or {}
            peers = r.get(peers_key) or []
            peer_alts = [alt for pr in peers for alt in self.peer_matches(pol, pr, which)] if peers else [[]]
            recipe += [(pr, selector_json(pol, pr), None) for pr in peers if not pr.get("ipBlock")]
            ports = self.port_matches(r.get("ports") or [], direction)
            recipe += [({}, "", str(p["port"])) for p in r.get("ports") or []
                       if isinstance(p.get("port"), str) and not p["port"].isdigit()]
            comment = f"{pol.namespace}/{pol.name} {key}[{i}]"[:120]
            rules.extend(rule(*peer, *port, mark_set(NP_OK), RETURN, comment=comment)
                         for peer in peer_alts for port in ports)
        if len(self.memos.policy_rules) >= 1 << 15:
            self.memos.policy_rules.clear()
        encoded = tuple(rules)
        self.memos.policy_rules[memo] = (encoded, tuple(recipe))
        self.chains[name] = NftChain(name, encoded)
        return name

    # --- security groups ------------------------------------------------------------------------

    def group_members(self, group_id: str, version: int) -> str:
        elems = set()
        for ep in self.idx.endpoints:
            if group_id in ep.security_groups:
                for a in [*ep.ips, *(p.ip_address for p in ep.allowed_address_pairs)]:
                    net = network(a)
                    if net.version == version:
                        elems.add(str(net))
        return self.add_set(names.group_members_set(version, group_id),
                            "ipv4_addr" if version == 4 else "ipv6_addr", elems, ("interval",))

    def sg_rule(self, r: SecurityGroupRule, which: str) -> list[dict] | None:
        version = 4 if r.ethertype == "IPv4" else 6
        if version == 6 and not self.idx.v6:
            return None
        stmts: list[dict] = [match(meta("nfproto"), "ipv4" if version == 4 else "ipv6")]
        if r.protocol not in (None, "", "any"):
            num = PROTO_NUMBERS.get(str(r.protocol).lower())
            if num is None:
                num = int(r.protocol)
            stmts.append(match(meta("l4proto"), num))
            if num in PORT_PROTOS and r.port_range_min is not None:
                hi = r.port_range_max if r.port_range_max is not None else r.port_range_min
                stmts.append(match(payload("th", "dport"), r.port_range_min if hi == r.port_range_min
                                   else {"range": [r.port_range_min, hi]}))
            if num in (1, 58) and r.port_range_min is not None:
                proto = "icmp" if num == 1 else "icmpv6"
                stmts.append(match(payload(proto, "type"), r.port_range_min))
                if r.port_range_max is not None:
                    stmts.append(match(payload(proto, "code"), r.port_range_max))
        if r.remote_ip_prefix:
            net = network(r.remote_ip_prefix)
            if net.version != version:
                return None
            if net.prefixlen:
                stmts.append(match(addr_field(version, which), prefix(r.remote_ip_prefix)))
        if r.remote_group_id:
            stmts.append(match(addr_field(version, which), self.group_members(r.remote_group_id, version)))
        return stmts

    def group_chain(self, g: SecurityGroup, direction: str) -> str:
        name = names.group_chain(direction, g.id)
        if name in self.chains:
            return name
        want, which = ("ingress", "saddr") if direction == "Ingress" else ("egress", "daddr")
        rules = []
        for r in g.rules:
            if r.direction != want:
                continue
            stmts = self.sg_rule(r, which)
            if stmts is not None:
                rules.append(rule(*stmts, mark_set(SG_OK), RETURN, comment=f"sg {g.name} {r.id}"[:120]))
        self.chains[name] = NftChain(name, tuple(rules))
        return name

    # --- per-endpoint dispatch ------------------------------------------------------------------

    def _layer_key(self, ep: Endpoint, direction: str) -> tuple:
        """What an endpoint's layers depend on: replicas of one workload share it, so the layers
        (and the dispatch chain) are found once for all of them. Its workload part (namespace,
        sorted labels, groups) is kept per endpoint object from one plan to the next."""
        hit = self.workloads.get(ep.id)
        if hit is None or hit[0] is not ep:
            hit = self.memos.workloads.get(ep.id)
            if hit is None or hit[0] is not ep:
                hit = (ep, (ep.namespace, tuple(sorted(ep.labels.items())), tuple(ep.security_groups),
                            ep.port_security))
            self.workloads[ep.id] = hit
        return direction, hit[1]

    def layers(self, ep: Endpoint, direction: str) -> tuple[list[NetworkPolicy], list[SecurityGroup]]:
        key = self._layer_key(ep, direction)
        found = self._layers.get(key)
        if found is None:
            found = self._layers[key] = self._find_layers(ep, direction)
        return found

    def _find_layers(self, ep: Endpoint, direction: str) -> tuple[list[NetworkPolicy], list[SecurityGroup]]:
        pols = [p for p in self.idx.selecting(ep) if direction in rule_types(p.spec)
                and label_match(p.spec.get("podSelector") or {}, ep.labels)]
        groups = [g for g in (self.idx.group(ref) for ref in sorted(set(ep.security_groups))) if g is not None]
        missing = [ref for ref in ep.security_groups if self.idx.group(ref) is None]
        if missing and not groups:  # a group we have not seen yet: fail closed with an empty group
            groups = [SecurityGroup(id=missing[0], name=missing[0])]
        if ep.port_security and not ep.security_groups:  # Neutron: port security on, no group: nothing passes
            groups = [NO_GROUPS]
        return pols, groups

    def dispatch_chain(self, ep: Endpoint, direction: str) -> str:
        key = (self._layer_key(ep, direction), ep.network)
        name = self._dispatch.get(key)
        if name is None:
            name = self._dispatch[key] = self._dispatch_chain(ep, direction)
        return name

    @staticmethod
    def _layered_rules(d: str, pols: tuple[tuple[str, str], ...], groups: tuple[tuple[str, str], ...]
                       ) -> tuple[str, ...]:
        """A dispatch chain for endpoints with policies or groups: (chain, name) of each, in order."""
        rules: list[str] = [TO_OWN_HOST] if d == "out" else []
        rules.append(CLEAR_MARKS)
        if pols:
            rules.extend(jump_rule(chain) for chain, _ in pols)
            names = " ".join(n for _, n in pols)
            rules.append(denied(mark_missing(NP_OK), comment=f"deny {d} np {names}", remember=True))
        if groups:
            rules.extend(jump_rule(chain) for chain, _ in groups)
            names = " ".join(n for _, n in groups)
            rules.append(denied(mark_missing(SG_OK), comment=f"deny {d} sg {names}", remember=True))
        rules.extend((ACCEPT_RULE,) if d == "in" else (TO_EP_IN, UNKNOWN_OIF, ACCEPT_RULE))
        return tuple(rules)

    def _dispatch_chain(self, ep: Endpoint, direction: str) -> str:
        pols, groups = self.layers(ep, direction)
        d = "in" if direction == "Ingress" else "out"
        name = names.dispatch_chain(d, ep.network if direction == "Ingress" else "", tuple(p.id for p in pols),
                             tuple(g.id for g in groups))
        if name in self.chains:
            return name
        if pols or groups:
            # the rules follow from the chains jumped to and the names in the drop comments alone
            targets = (tuple((self.policy_chain(p, direction), f"{p.namespace}/{p.name}") for p in pols),
                       tuple((self.group_chain(g, direction), g.name) for g in groups))
            encoded = self.memos.dispatch_rules.get((d, targets))
            if encoded is None:
                if len(self.memos.dispatch_rules) >= 1 << 15:
                    self.memos.dispatch_rules.clear()
                encoded = self.memos.dispatch_rules[(d, targets)] = self._layered_rules(d, *targets)
            self.chains[name] = NftChain(name, encoded)
            return name
        if direction == "Egress":
            self.chains[name] = NftChain(name, (TO_EP_IN, UNKNOWN_OIF, ACCEPT_RULE))
            return name
        rules: list[str] = []  # ingress without layers: only the network isolation
        own = {s.cidr for s in self.idx.networks[ep.network].subnets} if ep.network in self.idx.networks else set()
        if any(dst in own for _, dst in self.routed):  # a router joins another network's subnet to this one
            rules.append(rule(match({"concat": [addr_field(4, "saddr"), addr_field(4, "daddr")]},
                                    self.add_set("routed", ("ipv4_addr", "ipv4_addr"), self.routed, ("interval",))),
                              ACCEPT, comment="routed"))
        for v in self.versions:
            # external networks (floating IP ranges) hold no pod: a source there is the outside
            others = [s.cidr for n in self.idx.networks.values() if n.name != ep.network and not n.external
                      for s in n.subnets if ipaddress.ip_network(s.cidr).version == v]
            if not others:
                continue
            ref = self.add_set(names.others_set(v, ep.network),
                               "ipv4_addr" if v == 4 else "ipv6_addr", others, ("interval",))
            rules.append(denied(match(addr_field(v, "saddr"), ref), comment=f"deny in isolation {ep.network}",
                                remember=True))
        rules.append(ACCEPT_RULE)
        self.chains[name] = NftChain(name, tuple(rules))
        return name


# the layer of an endpoint with port security and no group: a group without rules (chains `sgi-`/`sge-nogroups`)
NO_GROUPS = SecurityGroup(id="no-groups", name="no-groups")

def compile(endpoints: Iterable[Endpoint], namespaces: Iterable[Namespace], policies: Iterable[NetworkPolicy],
            security_groups: Iterable[SecurityGroup], networks: Iterable[Network], host: str,
            memos: Memos | None = None, routed: frozenset[tuple[str, str]] = frozenset(),
            local: list[Endpoint] | None = None, children: dict[str, list[Endpoint]] | None = None,
            by_id: dict[str, Endpoint] | None = None,
            policies_by_name: dict[str, NetworkPolicy] | None = None) -> NftPlan:
    """The policy fragment of `host`'s nft table (merged into the base by `calc.merge`); `routed`:
    the subnet pairs routers join, which isolation lets through.

    Nested endpoints (a container inside a VM: `parent` set, no interface of its own) share their
    parent's interface, so that interface dispatches by address first (`nested_out`/`nested_in`)
    and falls back to the parent's own chain (`parent_out`/`parent_in`). `local` (this host's
    endpoints with an interface), `children` (`nested_children`), `by_id` (the endpoints by id) and
    `policies_by_name` (the policies by store name): when the caller knows them, so they are not
    found by a pass over every endpoint, and the indexes change for what the journal names."""
    idx = Index.build(endpoints, namespaces, policies, security_groups, networks, memos, by_id, policies_by_name)
    b = Builder(idx, host, memos, routed)
    if memos is not None:
        # a workload's layers (policies and groups) are the last plan's while neither changed
        delta = memos.delta("policy_layers")
        if delta is not None and not delta.keys() & {"NetworkPolicy", "SecurityGroup"} \
                and len(memos.policy_layers) < 1 << 13:
            b._layers = memos.policy_layers
        memos.policy_layers = {}  # if this raises half way, the next plan starts afresh
    if local is None:
        local = [ep for ep in idx.endpoints if ep.host == host and ep.interface]
    if children is None:
        children = nested_children(idx.endpoints)
    maps: dict[str, set] = {k: set() for k in ("ep_out", "ep_in", "parent_out", "parent_in", "nested_out",
                                               "nested_in")}
    for ep in local:
        yielding.checkpoint()
        out_v, in_v = "goto " + b.dispatch_chain(ep, "Egress"), "goto " + b.dispatch_chain(ep, "Ingress")
        kids = children.get(ep.id, [])
        if not kids:
            maps["ep_out"].add((ep.interface, out_v))
            maps["ep_in"].add((ep.interface, in_v))
            continue
        maps["ep_out"].add((ep.interface, "goto nested_out"))
        maps["ep_in"].add((ep.interface, "goto nested_in"))
        maps["parent_out"].add((ep.interface, out_v))
        maps["parent_in"].add((ep.interface, in_v))
        for kid in kids:
            kout, kin = "goto " + b.dispatch_chain(kid, "Egress"), "goto " + b.dispatch_chain(kid, "Ingress")
            for ip in kid.ips:
                if ip_version(ip) == 4:
                    maps["nested_out"].add(((ep.interface, ip), kout))
                    maps["nested_in"].add(((ep.interface, ip), kin))
    stateful = set()  # see calc.base_nft: endpoints whose traffic needs conntrack on this host
    for ep in [*local, *(kid for parent in local for kid in children.get(parent.id, []))]:
        if any(any(b.layers(ep, d)) for d in ("Ingress", "Egress")):
            stateful.update(ip for ip in ep.ips if ip_version(ip) == 4)
    b.add_set("stateful", "ipv4_addr", stateful)
    b.memos.workloads = b.workloads
    if memos is not None:
        memos.policy_layers, memos.policy_peers = b._layers, idx.peer_cache
    b.chains["nested_out"] = NftChain("nested_out", (
        rule({"vmap": {"key": {"concat": [meta("iifname"), payload("ip", "saddr")]}, "data": "@nested_out"}}),
        rule({"vmap": {"key": meta("iifname"), "data": "@parent_out"}}),
        rule(COUNTER, DROP, comment="nested: no endpoint"),
    ))
    b.chains["nested_in"] = NftChain("nested_in", (
        rule({"vmap": {"key": {"concat": [meta("oifname"), payload("ip", "daddr")]}, "data": "@nested_in"}}),
        rule({"vmap": {"key": meta("oifname"), "data": "@parent_in"}}),
        rule(COUNTER, DROP, comment="nested: no endpoint"),
    ))
    sets = list(b.sets.values())
    for name, elems in maps.items():
        key: str | tuple[str, ...] = ("ifname", "ipv4_addr") if name.startswith("nested") else "ifname"
        sets.append(NftSet(name, key, map_type="verdict", elements=frozenset(elems)))
    return NftPlan(sets=tuple(sorted(sets, key=BY_NAME)),
                   chains=tuple(sorted(b.chains.values(), key=BY_NAME)))


def drop_owners(comment: str) -> list[str]:
    """Which policies or groups a drop rule's comment names (`deny in np ns/a ns/b` -> [ns/a, ns/b])."""
    parts = comment.split()
    if len(parts) >= 4 and parts[0] == "deny" and parts[2] == "np":
        return parts[3:]
    if len(parts) >= 4 and parts[0] == "deny" and parts[2] == "sg":
        return [f"sg:{p}" for p in parts[3:]]
    if len(parts) >= 4 and parts[0] == "deny" and parts[2] == "isolation":
        return [f"isolation:{parts[3]}"]
    if comment.startswith("spoofed"):
        return ["antispoof"]
    return []
