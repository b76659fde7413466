"""Flow records with identity (issue 25): pure naming and filtering, shared by the agent
(which records), the server (which names and keeps them) and the CLI (which filters them).

Design: each agent records the connections its kernel sees (conntrack NEW/DESTROY events read
from ctnetlink, `tether.agent.ctevents`: allowed connections, with the NAT to a service backend
and, on DESTROY, packets and bytes both ways) and the packets its policy fragment denies (the NFLOG group it already uses, with the prefix naming the
policy; a connection that opens and closes between two pushes is one `closed` record). It keeps
them in a bounded ring and pushes what is new once a second to the server
(POST /api/v1/hosts/{host}/flows, its own host only). The server names both ends from the desired
state (pod, namespace, network, host; a service VIP by its service), finds the deciding policy of
an allowed connection with the same evaluator as `tether trace` (a denied packet's policy is its
log prefix), and keeps a bounded in-memory ring for `tether flows` (GET /api/v1/flows). Pushing
rather than fanning out from the server keeps the agents free of listeners the server must reach,
and costs one request per host per second at most.
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
