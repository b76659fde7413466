"""The plan is a pure function of the replica: routes, FDB, neighbours and nft per encapsulation."""

from __future__ import annotations

from tether.calc.host import HostContext, base_nft, compute_nft, compute_plan, merge, path_mode
from tether.calc.names import VTEP_NAME, stateless_chain, vtep_mac_for
from tether.calc.plan import FdbEntry, NftPlan, NftSet, Route
from tether.calc.replica import Replica
from tether.model import Block, Endpoint, Host, Network, NetworkPolicy, Owner, Service, ServicePort, Subnet


def replica(encap: str = "vxlan") -> Replica:
    r = Replica()
    hosts = [Host(name="h1", underlay_ip="198.18.0.1", underlay_cidr="198.18.0.0/24", vtep_ip="169.254.64.1"),
             Host(name="h2", underlay_ip="198.18.0.2", underlay_cidr="198.18.0.0/24", vtep_ip="169.254.64.2"),
             Host(name="h3", underlay_ip="198.18.1.3", underlay_cidr="198.18.1.0/24", vtep_ip="169.254.64.3")]
    for h in hosts:
        r.objects["Host"][h.name] = h
    net = Network(name="n", subnets=[Subnet(cidr="10.1.0.0/16")], encap=encap)
    r.objects["Network"]["n"] = net
    for i, h in enumerate(hosts):
        b = Block(name=f"n:10.1.0.{64 * i}_26", network="n", cidr=f"10.1.0.{64 * i}/26", host=h.name,
                  allocations={f"10.1.0.{64 * i + 1}": f"c{i}/eth0"})
        r.objects["Block"][b.store_name()] = b
        ep = Endpoint(id=f"e{i}", name=f"p{i}", network="n", host=h.name, ips=[f"10.1.0.{64 * i + 1}"],
                      handle=f"c{i}/eth0", interface=f"tthe{i}", owner=Owner(type="cni"))
        r.objects["Endpoint"][ep.id] = ep
    return r


CTX = HostContext("h1", "eth0", 1500)


def test_vxlan_routes_each_remote_block_through_the_vtep_with_static_fdb_and_neighbour() -> None:
    plan = compute_plan(replica("vxlan"), CTX)
    assert plan.vtep is not None and plan.vtep.local_ip == "198.18.0.1" and plan.vtep.mtu == 1450
    assert Route("10.1.0.64/26", VTEP_NAME, via="169.254.64.2", onlink=True) in plan.routes
    assert Route("10.1.0.128/26", VTEP_NAME, via="169.254.64.3", onlink=True) in plan.routes
    assert FdbEntry(vtep_mac_for("h2"), "198.18.0.2", VTEP_NAME) in plan.fdb
    assert {n.ip for n in plan.neighbours} == {"169.254.64.2", "169.254.64.3"}
    assert Route("10.1.0.1/32", "tthe0", scope="link") in plan.routes
    assert not any(r.dst == "10.1.0.0/26" for r in plan.routes), "no route for our own block"


def test_direct_routes_via_the_peer_underlay_address_and_needs_no_vtep() -> None:
    plan = compute_plan(replica("direct"), CTX)
    assert plan.vtep is None and not plan.fdb
    assert Route("10.1.0.64/26", "eth0", via="198.18.0.2") in plan.routes


def test_auto_is_direct_inside_the_underlay_subnet_and_vxlan_across() -> None:
    r = replica("auto")
    plan = compute_plan(r, CTX)
    assert Route("10.1.0.64/26", "eth0", via="198.18.0.2") in plan.routes
    assert Route("10.1.0.128/26", VTEP_NAME, via="169.254.64.3", onlink=True) in plan.routes
    net = r.networks["n"]
    assert path_mode(net, r.hosts["h1"], r.hosts["h2"]) == "direct"
    assert path_mode(net, r.hosts["h1"], r.hosts["h3"]) == "vxlan"


def test_a_borrowed_address_gets_its_own_host_route() -> None:
    r = replica("vxlan")
    ep = Endpoint(id="borrow", name="b", network="n", host="h3", ips=["10.1.0.70"], handle="x/eth0",
                  interface="tthx", owner=Owner(type="cni"))
    r.objects["Endpoint"]["borrow"] = ep
    plan = compute_plan(r, CTX)
    assert Route("10.1.0.70/32", VTEP_NAME, via="169.254.64.3", onlink=True) in plan.routes


def test_the_plan_is_deterministic_and_hashable() -> None:
    assert compute_plan(replica(), CTX) == compute_plan(replica(), CTX)
    assert hash(compute_plan(replica(), CTX).nft) == hash(compute_plan(replica(), CTX).nft)


def test_local_pods_default_to_accept_and_fragments_override_map_entries() -> None:
    base = base_nft(replica(), "h1")
    ep_in = next(s for s in base.sets if s.name == "ep_in")
    assert ep_in.elements == frozenset({("tthe0", "accept")})
    frag = NftPlan(sets=(NftSet("ep_in", "ifname", map_type="verdict",
                                elements=frozenset({("tthe0", "jump pol-in-e0")})),), chains=())
    merged = merge(base, frag)
    assert next(s for s in merged.sets if s.name == "ep_in").elements == frozenset({("tthe0", "jump pol-in-e0")})


def test_nat_sources_only_for_networks_with_nat_outgoing() -> None:
    r = replica()
    assert next(s for s in base_nft(r).sets if s.name == "nat_sources").elements == frozenset()
    r.objects["Network"]["n"] = r.networks["n"].model_copy(update={"nat_outgoing": True})
    assert next(s for s in base_nft(r).sets if s.name == "nat_sources").elements == frozenset({"10.1.0.0/16"})


def test_nat_chains_exist_only_while_a_service_or_a_masquerading_network_needs_them() -> None:
    """A nat chain is an nf_nat hook call on every packet (bench/policy.py: ~1.5% of a round trip)."""
    nat = {"prerouting_nat", "output_nat", "postrouting_nat", "svc_postrouting"}
    r = replica()
    r.objects["NetworkPolicy"]["x/p"] = NetworkPolicy(id="p", name="p", namespace="x",
                                                      spec={"podSelector": {}, "policyTypes": ["Ingress"]})
    chains = {c.name for c in compute_nft(r, CTX).chains}
    assert "forward" in chains and not chains & nat, "policies need conntrack, not NAT"
    r.objects["Network"]["n"] = r.networks["n"].model_copy(update={"nat_outgoing": True})
    assert nat - {c.name for c in compute_nft(r, CTX).chains} == {"svc_postrouting"}
    r.objects["Network"]["n"] = r.networks["n"].model_copy(update={"nat_outgoing": False})
    r.objects["Service"]["x/s"] = Service(name="s", namespace="x", cluster_ip="10.96.0.10",
                                          ports=[ServicePort(port=80)])
    assert nat <= {c.name for c in compute_nft(r, CTX).chains}


def test_no_host_record_yet_means_no_remote_routes() -> None:
    r = replica()
    del r.objects["Host"]["h1"]
    plan = compute_plan(r, CTX)
    assert plan.vtep is None
    assert all(rt.dev != VTEP_NAME for rt in plan.routes)


def test_each_network_gets_a_stateless_chain_and_local_pods_reach_it_by_address() -> None:
    r = replica()
    r.objects["Network"]["v6"] = Network(name="v6", subnets=[Subnet(cidr="fd00::/64")])
    base = base_nft(r, "h1")
    chains = {c.name: c for c in base.chains}
    st = chains[stateless_chain("n")]
    assert stateless_chain("v6") not in chains  # no IPv4 subnet, nothing to leave untracked
    body = st.rules[0]
    assert '"@stateful"' in body and '"notrack"' in body and '"addr":"10.1.0.0","len":16' in body
    local = next(s for s in base.sets if s.name == "local_dst4").elements
    assert local == frozenset({("10.1.0.1", "goto " + stateless_chain("n"))})  # only h1's pod
    raw = "\n".join(chains["raw_prerouting"].rules)
    assert raw.index("vxlan underlay") < raw.index("ingress chain") < raw.index("@same_net")


def test_vxlan_is_decapsulated_only_from_peer_hosts_and_never_sent_by_a_pod() -> None:
    r = replica()
    r.objects["Network"]["n"] = r.objects["Network"]["n"].model_copy(update={"nat_outgoing": True})  # stateful
    base = base_nft(r, "h1")
    chains = {c.name: c for c in base.chains}
    peers = next(s for s in base.sets if s.name == "vxlan_peers").elements
    assert peers == frozenset({"198.18.0.2", "198.18.1.3"})  # not h1 itself
    raw = "\n".join(chains["raw_prerouting"].rules)
    assert "@vxlan_peers" in raw.splitlines()[0]  # untracked (and so accepted) only from a peer
    # anything else to the VXLAN port is tracked and refused on input, before the per-pod verdicts
    inp = chains["input"].rules
    refused = next(i for i, r in enumerate(inp) if "VXLAN from a pod or an unknown host" in r)
    assert '"drop"' in inp[refused] and refused < next(i for i, r in enumerate(inp) if "@ep_out" in r)
    # a pod's own VXLAN packets to another host are dropped by its ingress chain (counted)
    ing = compute_nft(r, CTX).chain("ing-tthe0")
    out = next(r for r in ing.rules if '"VXLAN from a pod"' in r)
    assert '"counter"' in out and '"drop"' in out and '"dport"' in out and "@vxlan_peers" in out


def test_a_replaced_endpoint_or_network_is_planned_anew_not_from_the_last_plan() -> None:
    """Plans keep per-endpoint parts from one plan to the next (by object: replica objects are
    replaced, never changed in place); a replaced endpoint, network or MTU must not reuse them."""
    from tether.calc.planner import Planner

    planner = Planner()
    r = replica("vxlan")
    r.objects["Network"]["n"] = r.objects["Network"]["n"].model_copy(update={"nat_outgoing": True})  # stateful
    first = planner.plan(r, CTX)
    assert {(i.name, i.mtu) for i in first.interfaces} == {("tthe0", 1450)}
    ep = r.objects["Endpoint"]["e0"]
    r.objects["Endpoint"]["e0"] = ep.model_copy(update={"ips": ["10.1.0.2"], "labels": {"app": "db"}})
    second = planner.plan(r, CTX)
    assert Route("10.1.0.2/32", "tthe0", scope="link") in second.routes
    assert Route("10.1.0.1/32", "tthe0", scope="link") not in second.routes
    assert planner.memos.workloads["e0"][1][1] == (("app", "db"),)
    r.objects["Network"]["n"] = r.objects["Network"]["n"].model_copy(update={"mtu": 1300})
    third = planner.plan(r, CTX)
    assert {(i.name, i.mtu) for i in third.interfaces} == {("tthe0", 1300)}
    fourth = compute_plan(r, HostContext("h1", "eth0", 9000))
    assert {(i.name, i.mtu) for i in fourth.interfaces} == {("tthe0", 1300)}  # the network's own MTU wins
    r.objects["Network"]["n"] = r.objects["Network"]["n"].model_copy(update={"mtu": None})
    assert {(i.name, i.mtu) for i in compute_plan(r, HostContext("h1", "eth0", 9000)).interfaces} == {("tthe0", 8950)}


def test_block_owners_find_the_host_of_the_block_an_address_is_in() -> None:
    from tether.calc.host import BlockOwners

    owners = BlockOwners()
    owners.add("10.1.0.0/26", "h1")
    owners.add("10.1.0.64/26", "h2")
    owners.add("10.9.0.7/32", "h3")
    owners.add("fd00:1::/122", "h2")
    owners.add("10.1.0.128/26", None)  # allocated to no host yet
    assert [owners.owner(ip) for ip in ("10.1.0.1", "10.1.0.63", "10.1.0.64", "10.1.0.127")] == ["h1", "h1", "h2", "h2"]
    assert owners.owner("10.9.0.7") == "h3" and owners.owner("10.9.0.8") is None
    assert owners.owner("fd00:1::3f") == "h2" and owners.owner("fd00:1::40") is None
    assert owners.owner("10.1.0.130") is None and owners.owner("10.2.0.1") is None


def ipv6_replica(encap: str) -> Replica:
    """`replica` with IPv6 blocks and pod addresses beside the IPv4 ones; h2 reported its underlay's
    link-local address, h3 did not."""
    r = replica(encap)
    r.objects["Network"]["n"] = Network(name="n", subnets=[Subnet(cidr="10.1.0.0/16"), Subnet(cidr="fd01::/64")],
                                        encap=encap)
    r.objects["Host"]["h2"] = r.objects["Host"]["h2"].model_copy(update={"underlay_ip6": "fe80::2"})
    for i, h in enumerate(("h1", "h2", "h3")):
        b = Block(name=f"n:fd01::{64 * i:x}_122", network="n", cidr=f"fd01::{64 * i:x}/122", host=h)
        r.objects["Block"][b.store_name()] = b
        ep = r.objects["Endpoint"][f"e{i}"]
        r.objects["Endpoint"][f"e{i}"] = ep.model_copy(update={"ips": [*ep.ips, f"fd01::{64 * i + 1:x}"]})
    return r


def test_ipv6_blocks_route_via_the_peer_vteps_link_local_address_pinned_to_its_mac() -> None:
    from tether.calc.host import vtep_link_local

    plan = compute_plan(ipv6_replica("vxlan"), CTX)
    gw = vtep_link_local(vtep_mac_for("h2"))
    assert gw.startswith("fe80::")
    assert Route("fd01::40/122", VTEP_NAME, via=gw) in plan.routes
    assert any(n.ip == gw and n.lladdr == vtep_mac_for("h2") for n in plan.neighbours)
    assert Route("fd01::1/128", "tthe0") in plan.routes  # IPv6 host routes have no link scope
    assert vtep_link_local("02:00:00:00:00:01") == "fe80::ff:fe00:1"


def test_ipv6_direct_routes_need_the_peers_ipv6_underlay_address() -> None:
    plan = compute_plan(ipv6_replica("direct"), CTX)
    assert Route("fd01::40/122", "eth0", via="fe80::2") in plan.routes
    assert not any(r.dst == "fd01::80/122" for r in plan.routes), "h3 reported no IPv6 underlay address"


def ipv6_underlay(encap: str, mixed: bool = False) -> Replica:
    """`ipv6_replica` on hosts with only IPv6 underlay addresses: h1 and h2 share fd00:18::/64, h3
    is on fd00:19::/64 (`mixed`: h3 keeps its IPv4 underlay)."""
    r = ipv6_replica(encap)
    for name, ip, cidr in (("h1", "fd00:18::1", "fd00:18::/64"), ("h2", "fd00:18::2", "fd00:18::/64"),
                           ("h3", "fd00:19::3", "fd00:19::/64")):
        if mixed and name == "h3":
            continue
        r.objects["Host"][name] = r.objects["Host"][name].model_copy(
            update={"underlay_ip": ip, "underlay_cidr": cidr, "underlay_ip6": None})
    return r


def test_an_ipv6_underlay_tunnels_from_an_ipv6_vtep_with_70_bytes_of_overhead() -> None:
    plan = compute_plan(ipv6_underlay("vxlan"), CTX)
    assert plan.vtep is not None and plan.vtep.local_ip == "fd00:18::1" and plan.vtep.mtu == 1430
    assert FdbEntry(vtep_mac_for("h3"), "fd00:19::3", VTEP_NAME) in plan.fdb
    assert Route("10.1.0.128/26", VTEP_NAME, via="169.254.64.3", onlink=True) in plan.routes
    assert any(r.dst == "fd01::80/122" and r.dev == VTEP_NAME for r in plan.routes)
    assert {(i.name, i.mtu) for i in plan.interfaces} == {("tthe0", 1430)}


def test_an_ipv6_underlay_routes_ipv4_and_ipv6_pods_directly_via_the_peers_ipv6_address() -> None:
    plan = compute_plan(ipv6_underlay("direct"), CTX)
    assert plan.vtep is None
    assert Route("10.1.0.64/26", "eth0", via="fd00:18::2") in plan.routes  # IPv4 via inet6 (RTA_VIA)
    assert Route("fd01::40/122", "eth0", via="fd00:18::2") in plan.routes
    assert {(i.name, i.mtu) for i in plan.interfaces} == {("tthe0", 1500)}


def test_auto_over_ipv6_underlays_is_direct_inside_a_subnet_and_vxlan_across() -> None:
    r = ipv6_underlay("auto")
    plan = compute_plan(r, CTX)
    assert Route("10.1.0.64/26", "eth0", via="fd00:18::2") in plan.routes
    assert Route("10.1.0.128/26", VTEP_NAME, via="169.254.64.3", onlink=True) in plan.routes
    assert FdbEntry(vtep_mac_for("h3"), "fd00:19::3", VTEP_NAME) in plan.fdb
    assert [path_mode(r.networks["n"], r.hosts["h1"], r.hosts[h]) for h in ("h2", "h3")] == ["direct", "vxlan"]


def test_hosts_whose_underlays_are_of_different_families_get_no_path_between_them() -> None:
    """An IPv4-underlay peer of an IPv6-underlay host: no route, no FDB entry (the tunnel could not
    be sent), whatever the encap; path health reports the pair (tests/observe, `peers.unlike_underlays`)."""
    r = ipv6_underlay("auto", mixed=True)
    plan = compute_plan(r, CTX)
    assert not any(x.dst.startswith(("10.1.0.128", "fd01::80")) for x in plan.routes)
    assert not plan.fdb and Route("10.1.0.64/26", "eth0", via="fd00:18::2") in plan.routes
    assert path_mode(r.networks["n"], r.hosts["h1"], r.hosts["h3"]) == "vxlan"  # not direct: other family


def test_an_ipv6_underlay_host_decapsulates_vxlan_only_from_its_ipv6_peers() -> None:
    r = ipv6_underlay("vxlan", mixed=True)
    r.objects["Network"]["n"] = r.objects["Network"]["n"].model_copy(update={"nat_outgoing": True})  # stateful
    base = base_nft(r, "h1")
    sets = {s.name: s for s in base.sets}
    assert sets["vxlan_peers6"].elements == frozenset({"fd00:18::2"})  # not h3 (IPv4), not itself
    assert sets["vxlan_peers6"].type == "ipv6_addr"
    raw = {c.name: c for c in base.chains}["raw_prerouting"].rules[0]
    assert "@vxlan_peers6" in raw and '"ip6"' in raw and "fd00:18::1" in raw
    # an IPv4 underlay's table is as before: no IPv6 peer set
    assert "vxlan_peers6" not in {s.name for s in base_nft(replica(), "h1").sets}


def test_on_an_ipv6_underlay_a_pods_vxlan_over_ipv6_is_refused_where_it_is_sent() -> None:
    """A peer decapsulates VXLAN from any source in a table without conntrack, and from its peers'
    addresses (a masqueraded pod's too) with it: on IPv6 underlays the pod's chain refuses IPv6
    VXLAN as it refuses IPv4's."""
    r = ipv6_underlay("vxlan")
    stateless = "\n".join(compute_nft(r, CTX).chain("ing-tthe0").rules)
    assert stateless.count('"comment":"VXLAN from a pod"') == 2 and '"ipv6"' in stateless
    r.objects["Network"]["n"] = r.objects["Network"]["n"].model_copy(update={"nat_outgoing": True})
    stateful = compute_nft(r, CTX).chain("ing-tthe0").rules
    assert any("@vxlan_peers6" in x and '"VXLAN from a pod"' in x for x in stateful)
    assert "@vxlan_peers6" not in "\n".join(compute_nft(replica(), CTX).chain("ing-tthe0").rules)
