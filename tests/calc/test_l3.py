"""Routers and floating IPs in the plan (calc/l3.py): routed subnet pairs pass isolation, a router with
an external gateway source-NATs its subnets, a floating IP is DNAT and SNAT on its port's host only,
external networks are not pod networks, and a cluster without routers plans as before."""

from __future__ import annotations

import json

from tether.calc import l3
from tether.calc.host import HostContext, compute_nft, needs_state
from tether.calc.plan import NftPlan
from tether.calc.replica import Replica
from tether.model import Endpoint, FloatingIP, Host, Network, Owner, Router, RouterInterface, Subnet
from tether.policy_eval import World, decide

SUB_A, SUB_B, SUB_C = Subnet(cidr="10.1.0.0/24"), Subnet(cidr="10.2.0.0/24"), Subnet(cidr="10.3.0.0/24")
EXT_SUB = Subnet(cidr="198.19.128.0/24", gateway=None)


def world() -> Replica:
    r = Replica()
    for i in (1, 2):
        h = Host(name=f"h{i}", underlay_ip=f"198.18.0.{i}", vtep_ip=f"169.254.64.{i}")
        r.objects["Host"][h.name] = h
    for name, sub, ext in (("a", SUB_A, False), ("b", SUB_B, False), ("c", SUB_C, False), ("ext", EXT_SUB, True)):
        r.objects["Network"][name] = Network(name=name, subnets=[sub], external=ext)
    for i, (net, ip, host) in enumerate((("a", "10.1.0.5", "h1"), ("b", "10.2.0.5", "h2"), ("c", "10.3.0.5", "h2"))):
        ep = Endpoint(id=f"e{i}", name=f"p{i}", network=net, host=host, ips=[ip], interface=f"tthe{i}",
                      owner=Owner(type="cni"))
        r.objects["Endpoint"][ep.id] = ep
    return r


def with_router(r: Replica, gateway: bool = True, snat: bool = True) -> Router:
    legs = [RouterInterface(subnet_id=s.id, network=n, cidr=s.cidr, ip=s.cidr.replace("0/24", "1"))
            for n, s in (("a", SUB_A), ("b", SUB_B))]
    router = Router(name="edge", interfaces=legs, external_network="ext" if gateway else None, enable_snat=snat)
    r.objects["Router"][router.id] = router
    return router


def with_fip(r: Replica, router: Router) -> FloatingIP:
    f = FloatingIP(name="198.19.128.7", network="ext", address="198.19.128.7", allocation="alloc", endpoint="e0",
                   fixed_ip="10.1.0.5", router=router.id)
    r.objects["FloatingIP"][f.id] = f
    return f


def nft(r: Replica, host: str = "h2") -> NftPlan:
    return compute_nft(r, HostContext(host, "eth0", 1500))


def elements(plan: NftPlan, name: str) -> frozenset:
    return next((s.elements for s in plan.sets if s.name == name), frozenset())


def chain(plan: NftPlan, name: str):
    return next((c for c in plan.chains if c.name == name), None)


def test_a_router_lets_its_subnets_pass_isolation_and_no_other() -> None:
    r = world()
    with_router(r)
    plan = nft(r)
    assert elements(plan, "routed") == {("10.1.0.0/24", "10.2.0.0/24"), ("10.2.0.0/24", "10.1.0.0/24")}
    # b's ingress dispatch accepts routed pairs before its isolation drop; c's has no such rule
    in_b = [c for c in plan.chains if c.name.startswith("in-") and any("routed" in x for x in c.rules)]
    assert len(in_b) == 1
    rules = [json.loads(x) for x in in_b[0].rules]
    assert rules[0]["comment"] == "routed" and "isolation" in rules[1]["comment"]


def test_without_a_router_the_table_is_what_it_was() -> None:
    r = world()
    before = nft(r)
    assert not l3.has_l3(r) and needs_state(r) == ""
    assert not any(s.name in ("routed", "fip_dnat", "fip_snat") for s in before.sets)


def test_an_external_gateway_with_snat_masquerades_the_routers_subnets() -> None:
    r = world()
    with_router(r)
    plan = nft(r)
    assert needs_state(r) == "routers or floating IPs"
    assert elements(plan, "nat_sources") == {"10.1.0.0/24", "10.2.0.0/24"}
    assert "198.19.128.0/24" not in elements(plan, "tether_nets"), "the floating range is not a pod network"
    r2 = world()
    with_router(r2, snat=False)
    assert elements(nft(r2), "nat_sources") == frozenset()
    r3 = world()
    with_router(r3, gateway=False)
    assert elements(nft(r3), "nat_sources") == frozenset()


def test_a_floating_ip_is_natted_on_its_ports_host_only() -> None:
    r = world()
    with_fip(r, with_router(r))
    on_h1, on_h2 = nft(r, "h1"), nft(r, "h2")
    assert elements(on_h1, "fip_dnat") == {("198.19.128.7", "10.1.0.5")}
    assert elements(on_h1, "fip_snat") == {("10.1.0.5", "198.19.128.7")}
    pre, post = chain(on_h1, "fip_prerouting"), chain(on_h1, "fip_postrouting")
    assert pre is not None and pre.hook == "prerouting" and pre.priority < -100
    assert post is not None and post.hook == "postrouting" and post.priority < 99
    assert "@tether_nets" in post.rules[0], "the fixed address is kept towards Tether networks"
    assert chain(on_h2, "fip_prerouting") is None and not elements(on_h2, "fip_dnat")


def test_an_unassociated_floating_ip_or_one_whose_address_left_the_port_maps_nothing() -> None:
    r = world()
    f = with_fip(r, with_router(r))
    r.objects["FloatingIP"][f.id] = f.model_copy(update={"endpoint": None, "fixed_ip": None})
    assert chain(nft(r, "h1"), "fip_prerouting") is None
    r.objects["FloatingIP"][f.id] = f.model_copy(update={"fixed_ip": "10.1.0.99"})
    assert chain(nft(r, "h1"), "fip_prerouting") is None


def test_trace_allows_what_a_router_joins_and_denies_what_it_does_not() -> None:
    r = world()
    router = with_router(r)
    eps = {e.id: e for e in r.endpoints}
    w = World(endpoints=list(eps.values()), networks=list(r.networks.values()), routers=[router])
    assert decide(w, eps["e0"], eps["e1"], 80, "TCP").allowed
    assert not decide(w, eps["e0"], eps["e2"], 80, "TCP").allowed
    assert not decide(World(endpoints=list(eps.values()), networks=list(r.networks.values())),
                      eps["e0"], eps["e1"], 80, "TCP").allowed
