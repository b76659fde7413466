"""`tether trace`, end to end (issue 25): the path a new connection would take, each step named.

Pure: from the desired state (`policy_eval.World` plus services). Steps, in the order a packet
meets them: the source and anti-spoofing; the node-local DNS; a service's load balancing (VIP or
node port, with the backend port); the egress policy and security groups on the source host; the
route (local, VXLAN, direct, or out of the cluster with or without nat_outgoing); the ingress
policy and security groups on the destination host. A path that the agents' path health reports
down (tether.agent.peers) stops the route step. The first step that stops the packet is the
answer's `failed`. The same helpers as the agent decide each step (`policy_eval.decide`,
`agent.services.backends_of`, `agent.calc.path_mode`), so trace and datapath share one rule each.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from tether.model import Endpoint, Host, Network, Service
from tether.policy_eval import World, decide

DNS_IP = "169.254.20.10"  # the agent's default node-local DNS address (agent/dns.py)


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    host: str | None = None
    refused: bool = False  # stopped with an immediate refusal (TCP reset / ICMP unreachable), not a silent drop


@dataclass
class Trace:
    source: str
    destination: str
    port: int
    proto: str
    steps: list[Step] = field(default_factory=list)
    policy: str | None = None  # the policy or group that decided, when one did
    rule: str | None = None

    @property
    def reached(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def failed(self) -> Step | None:
        return next((s for s in self.steps if not s.ok), None)

    @property
    def refused(self) -> bool:
        """Is the sender told at once (a reset or ICMP unreachable) rather than left to time out?"""
        f = self.failed
        return f is not None and f.refused

    def add(self, name: str, ok: bool, detail: str, host: str | None = None, refused: bool = False) -> bool:
        self.steps.append(Step(name, ok, detail, host, refused))
        return ok

    def as_dict(self) -> dict[str, Any]:
        f = self.failed
        return {"source": self.source, "destination": self.destination, "port": self.port, "protocol": self.proto,
                "allowed": self.reached, "refused": self.refused, "policy": self.policy, "rule": self.rule,
                "failed_step": f.name if f else None,
                "reason": f.detail if f else self.steps[-1].detail if self.steps else "",
                "steps": [vars(s) for s in self.steps]}


def _host(world: World, name: str) -> Host | None:
    return next((h for h in world.hosts if h.name == name), None)


def _network(world: World, name: str) -> Network | None:
    return next((n for n in world.networks if n.name == name), None)


def _ep_text(ep: Endpoint) -> str:
    return f"{ep.namespace}/{ep.name} ({', '.join(ep.ips)}) on {ep.host}, network {ep.network}"


def find_service(services: list[Service], dst: str) -> Service | None:
    """A service by VIP, `namespace/name`, `svc:namespace/name` or a unique name."""
    ref = dst.removeprefix("svc:")
    for s in services:
        if s.cluster_ip == ref or f"{s.namespace}/{s.name}" == ref:
            return s
    named = [s for s in services if s.name == ref]
    return named[0] if len(named) == 1 else None


def may_send_from(ep: Endpoint, address: str) -> bool:
    """Does the anti-spoofing let `ep` send from `address`: one of its own, or an allowed address pair."""
    a = ipaddress.ip_address(address)
    if any(ipaddress.ip_address(ip) == a for ip in ep.ips):
        return True
    return any(a in ipaddress.ip_network(p.ip_address, strict=False) for p in ep.allowed_address_pairs)


def trace(world: World, services: list[Service], src: Endpoint | str, dst: Endpoint | str, port: int = 80,
          proto: str = "TCP", src_address: str | None = None, health: dict[str, Any] | None = None) -> Trace:
    """The steps of a new connection from `src` to `dst` (an endpoint, `host:NAME`, an address, or a
    service reference / VIP). `src_address`: the packet leaves `src` from this address instead of its
    own (the anti-spoofing step). `health`: the server's path health reports (GET /api/v1/peers), so
    a path between two hosts that the underlay does not carry stops the route step."""
    from tether.calc.services import backends_of

    proto = proto.upper()
    t = Trace(_ep_text(src) if isinstance(src, Endpoint) else src,
              _ep_text(dst) if isinstance(dst, Endpoint) else dst, port, proto)
    src_host = src.host if isinstance(src, Endpoint) else src[5:] if src.startswith("host:") else None
    if isinstance(src, Endpoint):
        t.add("source", True, f"from {_ep_text(src)}" + (f", source address {src_address}" if src_address else ""),
              src.host)
        if src_address is not None and not may_send_from(src, src_address):
            t.add("anti-spoofing", False, f"{src_address} is not {src.name}'s address ({', '.join(src.ips)}) nor "
                  "an allowed address pair: its host drops the packet as 'spoofed source' before conntrack",
                  src.host)
            return t
        t.add("anti-spoofing", True, f"leaves {src.name}'s interface with its own address "
              f"{src_address or src.ips[0]} and MAC (any other source is dropped as 'spoofed source')", src.host)
    else:
        t.add("source", True, f"from {src}", src_host)

    # node-local DNS: answered by the source's own agent, never subject to policies
    dns_ips = {DNS_IP} | {h.dns_ip for h in world.hosts if h.dns_ip}
    if isinstance(dst, str) and dst in dns_ips and port == 53:
        t.add("dns", True, f"answered by the agent's DNS on {src_host or 'the source host'} ({dst}); "
              "node-local DNS is exempt from policies and security groups", src_host)
        return t

    # a service: VIP or node port -> a backend
    target: Endpoint | str = dst
    svc = find_service(services, dst) if isinstance(dst, str) else None
    node_port_host = None
    if svc is None and isinstance(dst, str) and dst.startswith("host:"):
        svc = next((s for s in services if s.type == "NodePort" and any(
            p.node_port == port and p.protocol == proto for p in s.ports)), None)
        node_port_host = dst[5:] if svc is not None else None
    if svc is not None:
        ref = f"{svc.namespace}/{svc.name}"
        sp = next((p for p in svc.ports if (p.node_port if node_port_host else p.port) == port
                   and p.protocol == proto), None)
        if sp is None:
            ports = ", ".join(f"{p.port}/{p.protocol}" for p in svc.ports) or "none"
            t.add("service", False, f"service {ref} ({svc.cluster_ip}) has no port {port}/{proto} (its ports: "
                  f"{ports}): nothing answers there", src_host)
            return t
        backends = backends_of(svc, sp, world.endpoints, src_host or "")
        if not backends:
            t.add("service", False, f"service {ref} has no ready backend for port {port}/{proto} (selector "
                  f"{svc.selector or {}}): the connection is refused at once (TCP reset / ICMP unreachable)",
                  src_host, refused=True)
            return t
        b = backends[0]
        ep = world.endpoint_by_ip(b.ip)
        via = f"node port {port} on {node_port_host} (source NAT to that host)" if node_port_host else \
            f"VIP {svc.cluster_ip}:{port}"
        t.add("service", True, f"{via} of service {ref} load-balanced over {len(backends)} backend(s); this "
              f"trace follows {b.ip}:{b.port}" + (f" ({ep.namespace}/{ep.name} on {ep.host})" if ep else ""),
              src_host)
        target, port = (ep if ep is not None else b.ip), b.port
        if node_port_host is not None:
            # the source's egress policy sees the node's address (the node port's NAT is on that host)
            node = _host(world, node_port_host)
            if isinstance(src, Endpoint) and node is not None:
                eg = decide(world, src, node.underlay_ip, sp.node_port or port, proto)
                if not eg.allowed:
                    t.policy, t.rule = eg.policy, eg.rule
                    t.add("egress policy", False, f"to node port {node.underlay_ip}:{sp.node_port}: {eg.reason}",
                          src.host)
                    return t
            src = f"host:{node_port_host}"  # the backend sees the node port's host as the source

    d = decide(world, src, target, port, proto)
    t.policy, t.rule = d.policy, d.rule
    dst_ep = target if isinstance(target, Endpoint) else None
    if isinstance(target, str) and not target.startswith("host:"):
        dst_ep = world.endpoint_by_ip(target)
    egress_denied = not d.allowed and len(d.steps) <= 1 and isinstance(src, Endpoint)
    if isinstance(src, Endpoint):
        detail = d.steps[0] if d.steps else d.reason
        if not t.add("egress policy", not egress_denied, detail, src.host):
            return t

    # the route between the two hosts
    if not _route(world, t, src, src_host, dst_ep, target, health or {}):
        return t

    if dst_ep is not None:
        detail = d.reason if not d.allowed or not d.steps else d.steps[-1]
        t.add("ingress policy", d.allowed, detail, dst_ep.host)
    elif not d.allowed:
        t.add("policy", False, d.reason, src_host)
    else:
        t.add("destination", True, d.reason, src_host)
    return t


def path_down(health: dict[str, Any], a: str, b: str, overlay: bool = False) -> str | None:
    """Why the last path health report of `a` (or of `b`, the other way) says the underlay between
    them (or with `overlay`, the VXLAN tunnel) does not carry packets; None when it carries them or
    nobody reported."""
    for me, peer in ((a, b), (b, a)):
        report = health.get(me) or {}
        p = next((p for p in report.get("peers", []) if p.get("peer") == peer), None)
        age = f", {report['age_s']:.0f} s ago" if isinstance(report.get("age_s"), int | float) else ""
        if p is not None and not (p.get("underlay") or {}).get("ok", True):
            return f"{me}'s path health{age}: {peer} ({p.get('underlay_ip')}) does not answer on the underlay"
        if p is not None and overlay and not (p.get("overlay") or {}).get("ok", True):
            return f"{me}'s path health{age}: {peer}'s VTEP does not answer through the VXLAN overlay"
    return None


def _route(world: World, t: Trace, src: Endpoint | str, src_host: str | None, dst_ep: Endpoint | None,
           target: Endpoint | str, health: dict[str, Any]) -> bool:
    from tether.calc.host import path_mode, same_family
    from tether.calc.names import VXLAN_PORT, vxlan_overhead

    if dst_ep is not None:
        if src_host == dst_ep.host:
            return t.add("route", True, f"local on {dst_ep.host}: straight to {dst_ep.name}'s interface", src_host)
        down = path_down(health, src_host or "", dst_ep.host) if src_host else None
        if down is not None:
            return t.add("route", False, f"{src_host} -> {dst_ep.host}: the underlay does not carry this path "
                         f"({down}); check the link, router and firewall between the hosts "
                         "(`tether status --peers`)", src_host)
        net = _network(world, dst_ep.network)
        me, peer = _host(world, src_host or ""), _host(world, dst_ep.host)
        if net is None or me is None or peer is None:
            return t.add("route", True, f"to host {dst_ep.host}", src_host)
        if not same_family(me, peer):
            return t.add("route", False, f"{me.name} ({me.underlay_ip}) and {peer.name} ({peer.underlay_ip}) have "
                         "underlay addresses of different families: no route or tunnel joins them; give every host "
                         "an underlay address of one family", src_host)
        mode = path_mode(net, me, peer)
        if mode == "direct":
            if me.underlay_cidr and ipaddress.ip_address(peer.underlay_ip) not in \
                    ipaddress.ip_network(me.underlay_cidr, strict=False):
                return t.add("route", False, f"network {net.name} routes directly (encap direct), but {me.name} "
                             f"({me.underlay_cidr}) and {peer.name} ({peer.underlay_ip}) are on different underlay "
                             "subnets: the underlay router does not know pod addresses and drops the packet; use "
                             "encap vxlan or auto", src_host)
            return t.add("route", True, f"direct: via {peer.underlay_ip} on the underlay (no encapsulation)",
                         src_host)
        down = path_down(health, me.name, peer.name, overlay=True)
        if down is not None:
            return t.add("encapsulation", False, f"vxlan {me.name} -> {peer.name}: the tunnel does not carry this "
                         f"path ({down}); check that UDP {VXLAN_PORT} passes between the hosts "
                         "(`tether status --peers`)", src_host)
        return t.add("encapsulation", True, f"vxlan: {me.name} {me.underlay_ip} -> {peer.name} {peer.underlay_ip} "
                     f"over the underlay ({vxlan_overhead(me.underlay_ip)} bytes of overhead)", src_host)
    if isinstance(target, str) and target.startswith("host:"):
        return t.add("route", True, f"to host {target[5:]}'s underlay address", src_host)
    try:
        addr = ipaddress.ip_address(str(target))
    except ValueError:
        return t.add("route", False, f"{target} is not an address, endpoint or service", src_host)
    if world.network_of_ip(str(addr)) is not None:
        return t.add("route", False, f"{addr} is in network {world.network_of_ip(str(addr))} but no endpoint holds "
                     "it: nothing answers", src_host)
    if any(h.underlay_ip == str(addr) for h in world.hosts):
        return t.add("route", True, f"to a host's underlay address {addr}", src_host)
    net = _network(world, src.network) if isinstance(src, Endpoint) else None
    if net is not None and not net.nat_outgoing:
        return t.add("nat-outgoing", False, f"{addr} is outside the cluster and network {net.name} has "
                     "nat_outgoing off: the packet leaves with the pod address, which the outside cannot answer; "
                     f"set nat_outgoing on {net.name}", src_host)
    if net is not None:
        return t.add("nat-outgoing", True, f"leaves the cluster source-NATed to {src_host}'s address "
                     f"(network {net.name} has nat_outgoing)", src_host)
    return t.add("route", True, f"out of the cluster to {addr}", src_host)
