"""Who may talk to whom, decided straight from the model: the reference the nftables compiler is
checked against, and the engine behind `tether trace`.

Written independently of `tether.calc.policy` on purpose (its own selector matching, its own
reading of the Kubernetes and Neutron rules), so a truth-table test that compares real packets with
`decide()` catches a compiler bug instead of repeating it.

Layers, all decided at the endpoints' own hosts:
- loopback (a pod to itself) and traffic from the destination's own host are always allowed;
- egress at the source: each layer that applies to the source must allow the packet: NetworkPolicy
  (when a policy with Egress selects it) and security groups (when it has any, or has port security
  on: then with no group nothing passes, as in Neutron);
- ingress at the destination: the same with Ingress rules; when no layer applies, only sources of
  the destination's own network, or from outside every Tether network, get in;
- a layer that applies and allows is an explicit allow, which also lets traffic cross networks.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy, Router, SecurityGroup, SecurityGroupRule

PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "sctp": 132, "icmpv6": 58, "ipv6-icmp": 58}


@dataclass
class Decision:
    allowed: bool
    reason: str  # one line: what decided
    policy: str | None = None  # "ns/name" or "sg:<name>" that allowed or whose isolation denied
    rule: str | None = None  # e.g. "ingress[0]", "rule <id>"
    steps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "reason": self.reason, "policy": self.policy, "rule": self.rule,
                "steps": self.steps}


@dataclass
class World:
    """The part of the desired state a decision needs."""

    endpoints: list[Endpoint]
    namespaces: list[Namespace] = field(default_factory=list)
    policies: list[NetworkPolicy] = field(default_factory=list)
    security_groups: list[SecurityGroup] = field(default_factory=list)
    networks: list[Network] = field(default_factory=list)
    hosts: list[Host] = field(default_factory=list)
    routers: list[Router] = field(default_factory=list)

    def ns_labels(self, name: str) -> dict[str, str]:
        for ns in self.namespaces:
            if ns.name == name:
                return {"kubernetes.io/metadata.name": name, **ns.labels}
        return {"kubernetes.io/metadata.name": name}

    def endpoint_by_ip(self, ip: str) -> Endpoint | None:
        for ep in self.endpoints:
            if ip in ep.ips:
                return ep
        return None

    def network_of_ip(self, ip: str) -> str | None:
        addr = ipaddress.ip_address(ip)
        for net in self.networks:
            for s in net.subnets:
                if addr in ipaddress.ip_network(s.cidr):
                    return net.name
        return None

    def router_between(self, src_ip: str, dst_ip: str) -> Router | None:
        """A router with interfaces on the subnets of both addresses (it routes between them)."""
        try:
            src, dst = ipaddress.ip_address(src_ip), ipaddress.ip_address(dst_ip)
        except ValueError:
            return None
        for r in self.routers:
            cidrs = [ipaddress.ip_network(leg.cidr) for leg in r.interfaces]
            if any(src in c for c in cidrs) and any(dst in c for c in cidrs):
                return r
        return None

    def sg(self, ref: str) -> SecurityGroup | None:
        return next((g for g in self.security_groups if g.id == ref or g.name == ref), None)


# --- label selectors (Kubernetes LabelSelector) -----------------------------------------------------

def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """matchLabels AND every matchExpression; an empty selector selects everything."""
    if selector is None:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# --- NetworkPolicy -----------------------------------------------------------------------------------

def policy_types(spec: dict[str, Any]) -> list[str]:
    """Kubernetes defaulting: Ingress always, Egress when there are egress rules."""
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress"] + (["Egress"] if spec.get("egress") else [])


def applies(pol: NetworkPolicy, ep: Endpoint, direction: str) -> bool:
    return (pol.namespace == ep.namespace and direction in policy_types(pol.spec)
            and selects(pol.spec.get("podSelector") or {}, ep.labels))


def peer_matches(world: World, pol: NetworkPolicy, peer: dict[str, Any], ip: str, ep: Endpoint | None) -> bool:
    block = peer.get("ipBlock")
    if block:
        addr = ipaddress.ip_address(ip)
        net = ipaddress.ip_network(block["cidr"], strict=False)
        if addr.version != net.version or addr not in net:
            return False
        return not any(addr in ipaddress.ip_network(x, strict=False) for x in block.get("except") or []
                       if ipaddress.ip_network(x, strict=False).version == addr.version)
    if ep is None:
        return False  # pod and namespace selectors only select endpoints
    if "namespaceSelector" in peer and peer["namespaceSelector"] is not None:
        if not selects(peer["namespaceSelector"], world.ns_labels(ep.namespace)):
            return False
    elif ep.namespace != pol.namespace:
        return False
    return selects(peer.get("podSelector") or {}, ep.labels)


def port_matches(port: dict[str, Any], number: int, proto: str, target: Endpoint | None) -> bool:
    if port.get("protocol", "TCP").upper() != proto.upper():
        return False
    p = port.get("port")
    if p is None:
        return True
    if isinstance(p, str) and not p.isdigit():
        if target is None:
            return False
        return any(d.name == p and d.protocol == proto.upper() and d.port == number for d in target.ports)
    lo = int(p)
    return lo <= number <= int(port.get("endPort") or lo)


def np_layer(world: World, ep: Endpoint, direction: str, peer_ip: str, peer_ep: Endpoint | None, port: int,
             proto: str) -> Decision | None:
    """None when no policy isolates `ep` in `direction`; else the union of the selecting policies."""
    pols = sorted((p for p in world.policies if applies(p, ep, direction)), key=lambda p: (p.namespace, p.name))
    if not pols:
        return None
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    target = ep if direction == "Ingress" else peer_ep
    for pol in pols:
        for i, r in enumerate(pol.spec.get(key) or []):
            r = r or {}
            peers = r.get(peers_key) or []
            ports = r.get("ports") or []
            if peers and not any(peer_matches(world, pol, pr, peer_ip, peer_ep) for pr in peers):
                continue
            if ports and not any(port_matches(pt, port, proto, target) for pt in ports):
                continue
            return Decision(True, f"{direction.lower()} allowed by networkpolicy {pol.namespace}/{pol.name} "
                                  f"{key}[{i}]", f"{pol.namespace}/{pol.name}", f"{key}[{i}]")
    names = ", ".join(f"{p.namespace}/{p.name}" for p in pols)
    return Decision(False, f"{direction.lower()} denied: {ep.namespace}/{ep.name} is isolated by networkpolicy "
                           f"{names} and no rule matches", f"{pols[0].namespace}/{pols[0].name}")


# --- security groups ---------------------------------------------------------------------------------

def sg_members(world: World, group_id: str) -> list[str]:
    out: list[str] = []
    for ep in world.endpoints:
        if group_id in ep.security_groups:
            out.extend(ep.ips)
            out.extend(p.ip_address for p in ep.allowed_address_pairs)
    return out


def in_cidr(ip: str, cidr: str) -> bool:
    addr = ipaddress.ip_address(ip)
    net = ipaddress.ip_network(cidr, strict=False)
    return addr.version == net.version and addr in net


def sg_rule_matches(world: World, r: SecurityGroupRule, peer_ip: str, port: int, proto: str) -> bool:
    version = ipaddress.ip_address(peer_ip).version
    if (r.ethertype == "IPv4") != (version == 4):
        return False
    if r.protocol not in (None, "", "any"):
        want = PROTO_NUMBERS.get(str(r.protocol).lower())
        if want is None:
            want = int(r.protocol)
        if PROTO_NUMBERS.get(proto.lower(), -1) != want:
            return False
        if r.port_range_min is not None and want in (6, 17, 132):
            hi = r.port_range_max if r.port_range_max is not None else r.port_range_min
            if not r.port_range_min <= port <= hi:
                return False
        if r.port_range_min is not None and want in (1, 58) and port != r.port_range_min:
            return False  # ICMP: port_range_min is the type
    if r.remote_ip_prefix and not in_cidr(peer_ip, r.remote_ip_prefix):
        return False
    if not r.remote_group_id:
        return True
    return any(in_cidr(peer_ip, m if "/" in m else f"{m}/{32 if version == 4 else 128}")
               for m in sg_members(world, r.remote_group_id))


def sg_layer(world: World, ep: Endpoint, direction: str, peer_ip: str, port: int, proto: str) -> Decision | None:
    want = "ingress" if direction == "Ingress" else "egress"
    if not ep.security_groups:
        if not ep.port_security:
            return None
        return Decision(False, f"{want} denied: {ep.name} has port security on and no security group, so nothing "
                               "passes", "sg:no-groups")
    for ref in sorted(ep.security_groups):
        g = world.sg(ref)
        if g is None:
            continue
        for r in g.rules:
            if r.direction == want and sg_rule_matches(world, r, peer_ip, port, proto):
                return Decision(True, f"{want} allowed by security group {g.name} rule {r.id}", f"sg:{g.name}",
                                f"rule {r.id}")
    return Decision(False, f"{want} denied: {ep.name} has security groups "
                           f"{', '.join(sorted(ep.security_groups))} and no {want} rule matches",
                    f"sg:{sorted(ep.security_groups)[0]}")


# --- the decision --------------------------------------------------------------------------------

def side(world: World, ep: Endpoint, direction: str, peer_ip: str, peer_ep: Endpoint | None, port: int,
         proto: str) -> Decision | None:
    """Every applicable layer must allow; None when no layer applies."""
    layers = [d for d in (np_layer(world, ep, direction, peer_ip, peer_ep, port, proto),
                          sg_layer(world, ep, direction, peer_ip, port, proto)) if d is not None]
    if not layers:
        return None
    denied = next((d for d in layers if not d.allowed), None)
    return denied or layers[0]


def decide(world: World, src: Endpoint | str, dst: Endpoint | str, port: int = 80, proto: str = "TCP") -> Decision:
    """Is a new connection from `src` (an endpoint, an IP, or "host:<name>") to `dst` allowed?"""
    proto = proto.upper()
    src_ep = src if isinstance(src, Endpoint) else None
    dst_ep = dst if isinstance(dst, Endpoint) else None
    if isinstance(dst, str) and not dst.startswith("host:"):
        dst_ep = world.endpoint_by_ip(dst)
    if isinstance(src, str) and not src.startswith("host:"):
        src_ep = world.endpoint_by_ip(src)
    if src_ep is not None and dst_ep is not None and src_ep.id == dst_ep.id:
        return Decision(True, "loopback: an endpoint may always reach itself")
    if isinstance(src, str) and src.startswith("host:"):
        if dst_ep is not None and dst_ep.host == src[5:]:
            return Decision(True, f"traffic from the endpoint's own host {src[5:]} is always allowed")
        host = next((h for h in world.hosts if h.name == src[5:]), None)
        src_ip = host.underlay_ip if host else "0.0.0.0"
    else:
        src_ip = src_ep.ips[0] if src_ep else str(src)
    if isinstance(dst, str) and dst.startswith("host:"):
        host = next((h for h in world.hosts if h.name == dst[5:]), None)
        dst_ip = host.underlay_ip if host else "0.0.0.0"
        if src_ep is not None and src_ep.host == dst[5:]:
            return Decision(True, "traffic from an endpoint to its own host is always allowed (DNS, health)")
    else:
        dst_ip = dst_ep.ips[0] if dst_ep else str(dst)
    steps: list[str] = []
    if src_ep is not None:
        out = side(world, src_ep, "Egress", dst_ip, dst_ep, port, proto)
        steps.append(out.reason if out else "egress: no policy or security group applies to the source")
        if out is not None and not out.allowed:
            return Decision(False, out.reason, out.policy, out.rule, steps)
    if dst_ep is None:
        return Decision(True, "allowed: the destination is not a Tether endpoint here", steps=steps)
    inn = side(world, dst_ep, "Ingress", src_ip, src_ep, port, proto)
    if inn is None:
        src_net = world.network_of_ip(src_ip)
        router = world.router_between(src_ip, dst_ip) if src_net is not None else None
        if src_net is not None and src_net != dst_ep.network and router is not None:
            steps.append(f"ingress: router {router.name or router.id} routes {src_net} -> {dst_ep.network}")
            return Decision(True, f"allowed: router {router.name or router.id} joins the two subnets", steps=steps)
        if src_net is not None and src_net != dst_ep.network:
            steps.append(f"ingress: {src_ip} is in network {src_net}, the destination in {dst_ep.network}")
            return Decision(False, f"denied: network isolation ({src_net} -> {dst_ep.network}) and no policy or "
                                   "security group of the destination allows it", None, None, steps)
        steps.append("ingress: no policy or security group applies to the destination")
        return Decision(True, "allowed: no policy isolates this traffic", steps=steps)
    steps.append(inn.reason)
    return Decision(inn.allowed, inn.reason, inn.policy, inn.rule, steps)
