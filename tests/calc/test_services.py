"""The services compiler is pure: services + endpoints -> map elements and generic chains."""

from __future__ import annotations

from tether.calc.host import HostContext, compute_nft
from tether.calc.plan import NftPlan
from tether.calc.replica import Replica
from tether.calc.services import compile as compile_services
from tether.dataplane.nft import structure_hash
from tether.model import Endpoint, Network, PortDecl, Service, ServiceBackend, ServicePort, Subnet

NET = Network(name="n", subnets=[Subnet(cidr="10.1.0.0/16")])


def ep(i: int, host: str = "h1", labels: dict | None = None, ready: bool = True, ns: str = "default") -> Endpoint:
    return Endpoint(id=f"e{i}", name=f"p{i}", network="n", host=host, namespace=ns, ips=[f"10.1.0.{i}"],
                    labels={"app": "web"} if labels is None else labels, ready=ready, interface=f"tthe{i}",
                    ports=[PortDecl(name="http", port=8080)])


def web(**kw) -> Service:
    args = {"name": "web", "cluster_ip": "10.96.0.10", "selector": {"app": "web"},
            "ports": [ServicePort(port=80, target_port=8080)]}
    args.update(kw)
    return Service(**args)


def elements(plan, name: str) -> set:
    s = plan.set(name)
    return set(s.elements) if s else set()


def test_vip_goes_to_the_chain_for_its_number_of_ready_backends() -> None:
    plan = compile_services([web()], [ep(1), ep(2), ep(3, ready=False), ep(4, labels={"app": "db"})], [NET], "h1", [])
    assert elements(plan, "svc_vips") == {(("10.96.0.10", "tcp", 80), "goto svc-lb-2")}
    assert elements(plan, "svc_backend_ip") == {(("10.96.0.10", "tcp", 80, 1), "10.1.0.1"),
                                                (("10.96.0.10", "tcp", 80, 2), "10.1.0.2")}
    assert elements(plan, "svc_backend_port") == {(("10.96.0.10", "tcp", 80, 1), 8080),
                                                  (("10.96.0.10", "tcp", 80, 2), 8080)}
    chain = plan.chain("svc-lb-2")
    assert chain is not None and '"mod":2' in chain.rules[0] and '"offset":1' in chain.rules[0]


def test_selector_stays_inside_the_service_namespace_and_named_target_ports_resolve() -> None:
    svc = web(ports=[ServicePort(port=80, target_port="http")])
    plan = compile_services([svc], [ep(1), ep(2, ns="other")], [NET], "h1", [])
    assert elements(plan, "svc_backend_ip") == {(("10.96.0.10", "tcp", 80, 1), "10.1.0.1")}
    assert elements(plan, "svc_backend_port") == {(("10.96.0.10", "tcp", 80, 1), 8080)}


def test_explicit_backends_without_selector() -> None:
    svc = web(selector=None, backends=[ServiceBackend(ip="10.9.9.9")], ports=[ServicePort(port=53, protocol="UDP")])
    plan = compile_services([svc], [], [NET], "h1", [])
    assert elements(plan, "svc_vips") == {(("10.96.0.10", "udp", 53), "goto svc-lb-1")}
    assert elements(plan, "svc_backend_ip") == {(("10.96.0.10", "udp", 53, 1), "10.9.9.9")}


def test_a_service_without_ready_backends_is_rejected_not_balanced() -> None:
    plan = compile_services([web()], [ep(1, ready=False)], [NET], "h1", [])
    assert elements(plan, "svc_vips") == set()
    assert elements(plan, "svc_empty") == {("10.96.0.10", "tcp", 80)}


def test_node_port_is_published_on_the_host_addresses_and_source_nated() -> None:
    svc = web(type="NodePort", ports=[ServicePort(port=80, target_port=8080, node_port=30080)])
    plan = compile_services([svc], [ep(1)], [NET], "h1", ["198.18.0.1"])
    assert elements(plan, "svc_nodeports") == {(("tcp", 30080), "goto svc-np-lb-1")}
    assert (("198.18.0.1", "tcp", 30080, 1), "10.1.0.1") in elements(plan, "svc_backend_ip")
    np = plan.chain("svc-np-lb-1")
    assert np is not None and "16384" in np.rules[0]  # ct mark | 0x4000: source NAT
    post = plan.chain("svc_postrouting")
    assert post is not None and all("198.18.0.1" in r for r in post.rules)


def test_hairpin_pairs_cover_every_backend() -> None:
    plan = compile_services([web()], [ep(1), ep(2, host="h2")], [NET], "h1", ["198.18.0.1"])
    assert elements(plan, "svc_hairpin") == {("10.1.0.1", "10.1.0.1"), ("10.1.0.2", "10.1.0.2")}


def test_affinity_uses_slot_sets_with_the_service_timeout() -> None:
    plan = compile_services([web(session_affinity="ClientIP", affinity_timeout=60)], [ep(1), ep(2)], [NET], "h1", [])
    assert elements(plan, "svc_vips") == {(("10.96.0.10", "tcp", 80), "goto svc-aff-60-2")}
    chain = plan.chain("svc-aff-60-2")
    assert chain is not None
    text = "\n".join(chain.rules)
    assert "@svc_aff_1" in text and "@svc_aff_2" in text and "@svc_aff_3" not in text
    assert '"timeout":60' in text
    s = plan.set("svc_aff_1")
    assert s is not None and "timeout" in s.flags and s.timeout  # kernel-owned elements: not diffed


def without_ingress(plan: NftPlan) -> NftPlan:
    return NftPlan(sets=plan.sets, chains=tuple(c for c in plan.chains if c.hook != "ingress"))


def test_backend_changes_and_new_services_change_elements_only() -> None:
    """Scaling 1 -> 10 backends and adding services keeps the table structure: no rule rewrite (but
    for each new local pod's own ingress chain)."""
    rep = Replica()
    rep.objects["Network"]["n"] = NET
    rep.objects["Service"]["default/web"] = web()
    ctx = HostContext("h1", "eth0", 1500)
    hashes = set()
    for n in range(1, 11):
        rep.objects["Endpoint"] = {f"e{i}": ep(i) for i in range(1, n + 1)}
        hashes.add(structure_hash(without_ingress(compute_nft(rep, ctx))))
    rep.objects["Service"]["default/api"] = web(name="api", cluster_ip="10.96.0.11")
    hashes.add(structure_hash(without_ingress(compute_nft(rep, ctx))))
    assert len(hashes) == 1


def test_past_the_predefined_slots_lb_chains_come_in_whole_steps() -> None:
    """A service growing from 17 to 32 backends (every agent gets each new pod of the biggest
    deployment) changes elements only; the 33rd makes the next step's chains, and going back
    below it removes them."""
    rep = Replica()
    rep.objects["Network"]["n"] = NET
    rep.objects["Service"]["default/web"] = web()
    ctx = HostContext("h1", "eth0", 1500)
    chains: dict[int, set[str]] = {}
    for n in (16, 17, 24, 32, 33, 48, 49, 20):
        rep.objects["Endpoint"] = {f"e{i}": ep(i) for i in range(1, n + 1)}
        chains[n] = {c.name for c in compute_nft(rep, ctx).chains if c.name.startswith("svc-lb-")}
    assert chains[16] == {f"svc-lb-{k}" for k in range(1, 17)}
    assert chains[17] == chains[24] == chains[32] == chains[20] == {f"svc-lb-{k}" for k in range(1, 33)}
    assert chains[33] == chains[48] == {f"svc-lb-{k}" for k in range(1, 49)}
    assert max(int(c.rsplit("-", 1)[1]) for c in chains[49]) == 64


def test_5000_services_compile_quickly() -> None:
    import time

    svcs = [web(name=f"s{i}", cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}") for i in range(5000)]
    t = time.perf_counter()
    plan = compile_services(svcs, [ep(1), ep(2)], [NET], "h1", [])
    assert time.perf_counter() - t < 5
    assert len(elements(plan, "svc_vips")) == 5000


def test_only_backends_and_frontends_inside_a_network_are_kept_stateful() -> None:
    """`stateful` exempts addresses from the stateless rule, which only matches network subnet
    pairs: a VIP outside every subnet is tracked anyway and stays out of the set (a big cluster's
    VIPs there slowed every packet's lookup); a frontend inside a subnet must be listed."""
    inside = web(name="inside", cluster_ip="10.1.200.1")
    plan = compile_services([web(), inside], [ep(1), ep(2, ready=False)], [NET], "h1", [])
    assert elements(plan, "stateful") == {"10.1.0.1", "10.1.200.1"}


def test_a_host_published_node_port_is_served_only_on_its_host_and_address() -> None:
    """Docker's -p: frontends on the container's host only; -p IP:port on that address only."""
    from tether.calc.services import frontends

    svc = Service(name="pub", type="NodePort", cluster_ip="10.96.0.20", host="h1",
                  backends=[ServiceBackend(ip="10.1.0.1")], ports=[ServicePort(port=80, node_port=8080)])
    published = [f for f in frontends([svc], [], "h1", ["192.0.2.1", "192.0.2.9"]) if f.published]
    assert sorted(f.ip for f in published) == ["192.0.2.1", "192.0.2.9"]
    assert not [f for f in frontends([svc], [], "h2", ["192.0.2.2"]) if f.published]
    one = svc.model_copy(update={"host_ip": "192.0.2.9"})
    assert [f.ip for f in frontends([one], [], "h1", ["192.0.2.1", "192.0.2.9"]) if f.published] == ["192.0.2.9"]
def test_an_ipv6_vip_balances_over_the_backends_ipv6_addresses_and_ipv4_only_tables_have_no_ipv6_names() -> None:
    dual = [Endpoint(id=f"d{i}", name=f"d{i}", network="n", host="h1", namespace="default", labels={"app": "web"},
                     ips=[f"10.1.0.{i}", f"fd01::{i}"]) for i in (1, 2)]
    svc = Service(name="web6", selector={"app": "web"}, ports=[ServicePort(port=80)], ip_families=["IPv4", "IPv6"],
                  cluster_ips=["10.96.0.20", "fd96::20"])
    plan = compile_services([svc], dual, [], "h1", [])
    assert elements(plan, "svc_vips6") == {(("fd96::20", "tcp", 80), "goto svc6-lb-2")}
    assert {v for _k, v in elements(plan, "svc_backend_ip6")} == {"fd01::1", "fd01::2"}
    assert {v for _k, v in elements(plan, "svc_backend_ip")} == {"10.1.0.1", "10.1.0.2"}
    v4_only = compile_services([web()], [ep(1)], [], "h1", [])
    assert not [s for s in v4_only.sets if s.name.endswith("6") or "6_" in s.name]
    assert not [c for c in v4_only.chains if c.name.startswith("svc6")]
    # hairpin: a backend reaching itself through the IPv6 VIP is source-NATed to its gateway fe80::1
    assert elements(plan, "svc_hairpin6") == {("fd01::1", "fd01::1"), ("fd01::2", "fd01::2")}
    (hairpin6,) = [r for r in plan.chain("svc_postrouting").rules if "svc_hairpin6" in r]
    assert '"snat":{"addr":"fe80::1","family":"ip6"}' in hairpin6


def test_a_kubernetes_dual_stack_service_manifest_asks_for_both_families() -> None:
    from tether.manifests import parse

    (svc,) = parse("apiVersion: v1\nkind: Service\nmetadata: {name: w}\nspec:\n  ipFamilyPolicy: RequireDualStack\n"
                   "  ipFamilies: [IPv6, IPv4]\n  selector: {app: w}\n  ports: [{port: 80}]\n")
    assert svc.ip_families == ["IPv6", "IPv4"]


def test_an_ipv6_node_port_is_published_on_every_local_ipv6_address_and_masqueraded() -> None:
    """Dual-stack NodePort: the IPv4 port as before, the IPv6 one keyed by proto . port (the host's
    global IPv6 addresses are not known to the plan) with its own chain and backend maps, marked
    for the IPv6 masquerade in `svc_postrouting`; Local keeps the client's address (no mark), and
    the host's NAT chains look IPv6 node ports up before IPv4's proto . port map."""
    dual = [Endpoint(id=f"d{i}", name=f"d{i}", network="n", host=f"h{i}", namespace="default", labels={"app": "web"},
                     ips=[f"10.1.0.{i}", f"fd01::{i}"]) for i in (1, 2)]
    svc = Service(name="np6", selector={"app": "web"}, type="NodePort", ip_families=["IPv4", "IPv6"],
                  cluster_ips=["10.96.0.30", "fd96::30"], ports=[ServicePort(port=80, target_port=8080,
                                                                              node_port=30080)])
    plan = compile_services([svc], dual, [], "h1", ["198.18.0.1"])
    assert elements(plan, "svc_nodeports") == {(("tcp", 30080), "goto svc-np-lb-2")}
    assert elements(plan, "svc_nodeports6") == {(("tcp", 30080), "goto svc6-np-lb-2")}
    assert elements(plan, "svc_np_backend_ip6") == {(("tcp", 30080, 1), "fd01::1"), (("tcp", 30080, 2), "fd01::2")}
    assert elements(plan, "svc_np_backend_port6") == {(("tcp", 30080, 1), 8080), (("tcp", 30080, 2), 8080)}
    chain = plan.chain("svc6-np-lb-2")
    assert chain is not None and "16384" in chain.rules[0] and "@svc_np_backend_ip6" in chain.rules[-1]
    (snat6,) = [r for r in plan.chain("svc_postrouting").rules if "published port (IPv6)" in r]
    assert '"masquerade"' in snat6 and "ipv6" in snat6
    local = svc.model_copy(update={"external_traffic_policy": "Local", "session_affinity": "ClientIP"})
    lplan = compile_services([local], dual, [], "h1", ["198.18.0.1"])
    (name,) = [v.removeprefix("goto ") for _k, v in elements(lplan, "svc_nodeports6")]
    assert name.startswith("svc6-np-aff-") and name.endswith("-1-local")  # h1's own backend only
    assert not any("16384" in r for r in lplan.chain(name).rules)

    rep = Replica()
    rep.objects["Network"]["n"] = Network(name="n", subnets=[Subnet(cidr="10.1.0.0/16"), Subnet(cidr="fd01::/64")])
    for e in dual:
        rep.objects["Endpoint"][e.id] = e
    rep.objects["Service"]["default/np6"] = svc
    nat = compute_nft(rep, HostContext("h1", "eth0", 1500)).chain("prerouting_nat")
    order = [i for i, r in enumerate(nat.rules) for m in ("@svc_nodeports6", "@svc_nodeports\"") if m in r]
    assert len(order) == 2 and order == sorted(order)


def test_a_node_port_on_a_host_ip_is_published_on_that_address_only_in_its_family() -> None:
    """Docker's -p IP:port: the node port is looked up by address in the VIP map (not by port on every
    local address), and only host_ip's family is published; IPv6 as IPv4."""
    backends = [ServiceBackend(ip="10.1.0.1"), ServiceBackend(ip="fd01::1")]
    svc = Service(name="s", namespace="d", type="NodePort", ip_families=["IPv4", "IPv6"], host="h1",
                  host_ip="fd00:18::1", cluster_ips=["10.96.0.30", "fd96::30"], backends=backends,
                  ports=[ServicePort(port=80, node_port=8080)])
    plan = compile_services([svc], [], [], "h1", ["192.0.2.1"])
    assert (("fd00:18::1", "tcp", 8080), "goto svc6-np-lb-1") in elements(plan, "svc_vips6")
    assert not elements(plan, "svc_nodeports6") and not elements(plan, "svc_nodeports")
    assert {k for k, _ in elements(plan, "svc_vips")} == {("10.96.0.30", "tcp", 80)}  # no IPv4 node port
    four = svc.model_copy(update={"host_ip": "192.0.2.9"})
    plan = compile_services([four], [], [], "h1", ["192.0.2.1"])
    assert (("192.0.2.9", "tcp", 8080), "goto svc-np-lb-1") in elements(plan, "svc_vips")
    assert not elements(plan, "svc_nodeports") and not elements(plan, "svc_nodeports6")
