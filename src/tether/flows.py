"""Flow records with identity (issue 25): pure naming and filtering, shared by the agent
(which records), the server (which names and keeps them) and the CLI (which filters them).

Design: each agent records the connections its kernel sees (conntrack NEW/DESTROY events read
from ctnetlink, `tether.agent.ctevents`: allowed connections, with the NAT to a service backend
and, on DESTROY, packets and bytes both ways) and the packets its policy fragment denies (the
NFLOG group it already uses, with the prefix naming the policy; a connection that opens and
closes between two pushes is one `closed` record). It keeps them in a bounded ring and pushes
what is new once a second to the server (POST /api/v1/hosts/{host}/flows, its own host only;
connection records grouped by what they share, `pack`). The server names both ends from the
desired state (pod, namespace, network, host; a service VIP by its service), finds the deciding
policy of an allowed connection with the same evaluator as `tether trace` (a denied packet's
policy is its log prefix), and keeps a bounded in-memory ring for `tether flows` (GET
/api/v1/flows). Pushing rather than fanning out from the server keeps the agents free of
listeners the server must reach, and costs one request per host per second at most.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from tether.model import Endpoint, Network, Service


def is_noise(rec: dict[str, Any]) -> bool:
    """IPv6 neighbour discovery, DAD and MLD: every new interface sends them (from :: or to
    ff02::/16), they are never a user's connection, and denied they are only 'spoofed source'."""
    src, dst = str(rec.get("src", "")), str(rec.get("dst", ""))
    if rec.get("proto") in ("icmpv6", "ipv6-icmp", "58") or ":" in src:
        return src == "::" or dst.lower().startswith("ff02:") or src.lower().startswith("fe80:")
    return False


@dataclass
class Names:
    """Who holds an address, from the desired state."""

    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    networks: list[tuple[Any, str]] = field(default_factory=list)
    host_ips: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, endpoints: list[Endpoint], services: list[Service], networks: list[Network],
           host_ips: dict[str, str] | None = None) -> Names:
        n = cls()
        n.endpoints = {ip: ep for ep in endpoints for ip in ep.ips}
        n.services = {svc.cluster_ip: svc for svc in services if getattr(svc, "cluster_ip", None)}
        n.networks = [(ipaddress.ip_network(s.cidr), net.name) for net in networks for s in net.subnets]
        n.host_ips = {ip: name for name, ip in (host_ips or {}).items()}
        return n

    def describe(self, ip: str) -> dict[str, Any]:
        """{"pod": "ns/name", "namespace", "network", "host"} or {"service": "ns/name"} or {"host": h}."""
        ep = self.endpoints.get(ip)
        if ep is not None:
            return {"pod": f"{ep.namespace}/{ep.name}", "namespace": ep.namespace, "network": ep.network,
                    "host": ep.host}
        svc = self.services.get(ip)
        if svc is not None:
            return {"service": f"{svc.namespace}/{svc.name}", "namespace": svc.namespace}
        if ip in self.host_ips:
            return {"host": self.host_ips[ip], "node": True}
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return {}
        for cidr, net in self.networks:
            if addr.version == cidr.version and addr in cidr:
                return {"network": net}
        return {"external": True}


def label(end: dict[str, Any], ip: str) -> str:
    """How a table shows one end: the pod or service name, else the host, else the address."""
    return end.get("pod") or (f"svc:{end['service']}" if end.get("service") else "") or \
        (f"host:{end['host']}" if end.get("node") else "") or ip


def policy_of_prefix(reason: str) -> str | None:
    """The policies a drop rule's log prefix names ('deny in np x/p1' -> 'x/p1', 'deny out sg web'
    -> 'sg:web', 'spoofed source' -> 'antispoof'); None when it names none."""
    from tether.calc.policy import drop_owners

    return ", ".join(drop_owners(reason or "")) or None


def end_matches(end: dict[str, Any], ip: str, want: str) -> bool:
    """`--from/--to` POD|NS|SERVICE|IP: 'ns/name' (pod or service), 'svc:ns/name', 'ns' (any pod or
    service in the namespace), 'host:NAME', or an address."""
    if want == ip:
        return True
    if want.startswith("svc:"):
        return end.get("service") == want[4:]
    if want.startswith("host:"):
        return end.get("host") == want[5:]
    if "/" in want:
        return want in (end.get("pod"), end.get("service"))
    return end.get("namespace") == want or (end.get("pod") or "").endswith(f"/{want}")


def matches(rec: dict[str, Any], src: str | None = None, dst: str | None = None, verdict: str | None = None) -> bool:
    """The CLI's and the server's filter."""
    if verdict and rec.get("verdict") != verdict:
        return False
    if src and not end_matches(rec.get("from") or {}, rec.get("src", ""), src):
        return False
    if not dst:
        return True
    return end_matches(rec.get("to") or {}, rec.get("dst", ""), dst) or \
        end_matches(rec.get("backend_of") or {}, rec.get("backend", ""), dst)


# A push groups an agent's connection records by what they share (the two ends, port, backend,
# event): the server names and judges a group once, and rows of numbers cost a fraction of dicts to
# encode and decode (bench/flows.py measures what recording costs the agent and the server).
KEYED = ("event", "verdict", "proto", "src", "dst", "dport", "backend", "backend_port", "host")
VARYING = ("sport", "time", "ended", "packets", "bytes", "reply_packets", "reply_bytes")
GROUPED = frozenset(KEYED) | frozenset(VARYING)
_NUMBERS = frozenset({int, float, type(None)})


def pack(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The body of a push: `{"groups": [{"common": {...}, "columns": [...], "rows": [[...], ...]}],
    "records": [...]}`; a record with fields beyond GROUPED (a denied packet's) goes as it is."""
    groups: dict[tuple, dict[str, Any]] = {}
    others = []
    for r in records:
        if not r.keys() <= GROUPED:
            others.append(r)
            continue
        key = (r.get("event"), r.get("verdict"), r.get("proto"), r.get("src"), r.get("dst"), r.get("dport"),
               r.get("backend"), r.get("backend_port"), r.get("host"), "sport" in r, "ended" in r, "packets" in r,
               "reply_packets" in r)
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"common": {k: r[k] for k in KEYED if k in r},
                               "columns": [k for k in VARYING if k in r], "rows": []}
        g["rows"].append([r.get(k) for k in g["columns"]])
    out: dict[str, Any] = {"groups": list(groups.values())}
    if others:
        out["records"] = others
    return out


def unpack_group(group: Any, room: int) -> tuple[dict[str, Any], list[str], list[list]]:
    """(common fields, columns, rows) of one pushed group, checked: plain values in common, known
    numeric columns, rows of numbers of the right length (others skipped); at most `room` rows."""
    if not isinstance(group, dict):
        return {}, [], []
    common, columns, rows = group.get("common"), group.get("columns"), group.get("rows")
    if not isinstance(common, dict) or not isinstance(columns, list) or not isinstance(rows, list) or \
            not all(type(c) is str and c in VARYING for c in columns) or len(set(columns)) != len(columns):
        return {}, [], []
    common = {k: v for k, v in common.items() if k in KEYED and type(v) in (str, int, float, bool)
              and (type(v) is not str or len(v) < 300)}
    n = len(columns)
    ok = [row for row in rows[:room] if type(row) is list and len(row) == n and _NUMBERS.issuperset(map(type, row))]
    return common, columns, ok
