"""The policy compiler is pure: shapes of its nft fragment, scaling, and which changes stay element-only."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.policy import world
from tests.policy.world import add, policy
from tether.calc import policy as compiler
from tether.calc.host import HostContext, compute_nft
from tether.calc.memos import Memos
from tether.dataplane.nft import NftDataplane, structure_hash
from tether.model import Endpoint, SecurityGroup, SecurityGroupRule

CTX = HostContext("h1", "eth0", 1500)


def make_replica(extra_networks: bool = True):
    """The world with a policy that selects nothing (namespace `zz` has no pods): the table then
    has conntrack and the policy fragment (calc.needs_state), which these tests are about."""
    r = world.make_replica(extra_networks)
    add(r, policy("unrelated", "zz", {"podSelector": {}}))
    return r


def rules(plan) -> int:
    return sum(len(c.rules) for c in plan.chains)


def test_every_local_endpoint_is_dispatched_to_a_chain_and_remote_ones_are_not() -> None:
    plan = compute_nft(make_replica(), CTX)
    local = {e.interface for e in make_replica().endpoints if e.host == "h1"}
    for name in ("ep_out", "ep_in"):
        entries = dict(plan.set(name).elements)
        assert set(entries) == local
        assert all(v.startswith("goto ") and plan.chain(v[5:]) is not None for v in entries.values())


def test_without_policies_a_network_only_drops_other_tether_networks() -> None:
    plan = compute_nft(make_replica(), CTX)
    target = dict(plan.set("ep_in").elements)["tthxa"][5:]
    body = "\n".join(plan.chain(target).rules)
    assert "@others-n" in body and body.endswith('"expr":[{"accept":null}]}')
    assert plan.set("others-n").elements == frozenset({"10.2.0.0/16"})


def test_policy_chains_are_shared_and_endpoints_with_the_same_layers_share_a_dispatch_chain() -> None:
    r = make_replica()
    add(r, policy("deny", "x", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    plan = compute_nft(r, CTX)
    ep_in = dict(plan.set("ep_in").elements)
    assert ep_in["tthxa"] != ep_in["tthyc"]  # x/a is isolated, y/c is not
    assert [c.name for c in plan.chains if c.name.startswith("npi-")] == ["npi-polxdeny"]


def test_rule_count_grows_with_policies_plus_endpoints_not_their_product() -> None:
    def build(n_pols: int, n_eps: int) -> int:
        r = make_replica(extra_networks=False)
        r.objects["Endpoint"].clear()
        for i in range(n_eps):
            ep = Endpoint(id=f"e{i}", name=f"e{i}", network="n", host="h1", namespace="x", ips=[f"10.1.{i // 250}."
                          f"{i % 250 + 1}"], interface=f"tth{i:08d}", labels={"app": f"a{i % n_pols}", "tier": "t"})
            r.objects["Endpoint"][ep.id] = ep
        for j in range(n_pols):
            peer = {"podSelector": {"matchLabels": {"app": f"a{(j + 1) % n_pols}"}}}
            add(r, policy(f"p{j}", "x", {"podSelector": {"matchLabels": {"app": f"a{j}"}},
                                         "ingress": [{"from": [peer], "ports": [{"port": 80}]}]}))
        plan = compute_nft(r, CTX)
        ingress = [c for c in plan.chains if c.hook == "ingress"]
        assert len(ingress) == n_eps and len({len(c.rules) for c in ingress}) == 1  # one per pod, alike
        return rules(plan) - sum(len(c.rules) for c in ingress)

    base = build(10, 100)
    more_eps = build(10, 1000) - base
    more_pols = build(100, 100) - base
    both = build(100, 1000) - base
    assert more_eps == 0  # beside each pod's own ingress chain, endpoints are set elements and map entries
    assert both <= more_eps + more_pols + 10


def test_a_label_change_within_known_layers_or_a_new_remote_pod_changes_only_elements() -> None:
    r = make_replica()
    add(r, policy("p", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                             "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "db"}}}]}]}))
    before = compute_nft(r, CTX)
    r.objects["Endpoint"]["xb"] = r.objects["Endpoint"]["xb"].model_copy(update={"labels": {"pod": "b",
                                                                                             "role": "db"}})
    r.objects["Endpoint"]["new"] = Endpoint(id="new", name="new", network="n", host="h2", namespace="x",
                                            ips=["10.1.9.9"], labels={"role": "db"}, interface="tthnew")
    after = compute_nft(r, CTX)
    assert structure_hash(after) == structure_hash(before)
    sel = next(s for s in after.sets if s.name.startswith("sel-"))
    assert {"10.1.0.2", "10.1.9.9"} <= sel.elements


def test_remote_group_members_are_a_set_and_groups_compile_to_one_chain_each() -> None:
    r = make_replica()
    sg = SecurityGroup(id="g1", name="web", rules=[
        SecurityGroupRule(direction="ingress", protocol="tcp", port_range_min=80, port_range_max=81,
                          remote_group_id="g1"),
        SecurityGroupRule(direction="ingress", protocol="icmp", port_range_min=8),
        SecurityGroupRule(direction="egress")])
    add(r, sg)
    for key in ("xa", "yb"):
        r.objects["Endpoint"][key] = r.objects["Endpoint"][key].model_copy(update={"security_groups": ["g1"]})
    plan = compute_nft(r, CTX)
    members = plan.set("sgm-g1")
    assert members.elements == {"10.1.0.1/32", "10.1.1.2/32"}
    body = "\n".join(plan.chain("sgi-g1").rules)
    assert '"range":[80,81]' in body and '"icmp"' in body


def test_named_ports_resolve_per_endpoint_through_sets() -> None:
    r = make_replica()
    add(r, policy("p", "x", {"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80"}]}]}))
    plan = compute_nft(r, CTX)
    assert ("tthxa", "tcp", 80) in plan.set("pn-in-serve-80").elements


def test_drop_comments_name_their_owners() -> None:
    assert compiler.drop_owners("deny in np x/a y/b") == ["x/a", "y/b"]
    assert compiler.drop_owners("deny out sg web db") == ["sg:web", "sg:db"]
    assert compiler.drop_owners("spoofed source MAC") == ["antispoof"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a scratch network namespace")
@pytest.mark.root  # a network namespace
def test_the_kernel_accepts_the_table_and_a_second_apply_changes_nothing() -> None:
    r = make_replica()
    add(r, policy("p", "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
        {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y"]}]}},
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.2.0/24"]}}],
        "ports": [{"port": 80, "endPort": 90}, {"port": "serve-81-udp", "protocol": "UDP"}, {"protocol": "SCTP"}]}],
        "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "serve-80"}]}]}))
    add(r, SecurityGroup(id="g1", name="web", rules=[SecurityGroupRule(direction="ingress", remote_group_id="g1")]))
    r.objects["Endpoint"]["xa"] = r.objects["Endpoint"]["xa"].model_copy(update={"security_groups": ["g1"]})
    plan = compute_nft(r, CTX)
    ns = f"tpc{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        assert NftDataplane(ns).apply(plan).full
        again = NftDataplane(ns)
        assert again.verify(plan) and again.apply(plan).changed == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _rich_replica():
    """Every kind of layer: selector, namespace and ipBlock peers with except, named and ranged
    ports, egress, default deny, matchExpressions, security groups alone and with others."""
    r = make_replica()
    add(r, policy("np1", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}},
                              {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {}},
                              {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.2.0/24"]}}],
                     "ports": [{"port": "serve-80"}, {"port": 81, "protocol": "UDP"},
                               {"port": 1000, "endPort": 2000}]}],
        "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}, {}]}))
    add(r, policy("deny", "y", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    add(r, policy("allns", "z", {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In",
                                                                        "values": ["a", "c"]}]},
                                 "ingress": [{"from": [{"namespaceSelector": {}}]}]}))
    add(r, SecurityGroup(id="sg1", name="web", rules=[
        SecurityGroupRule(id="r1", direction="ingress", protocol="tcp", port_range_min=80, port_range_max=90,
                          remote_group_id="sg1"),
        SecurityGroupRule(id="r2", direction="egress"),
        SecurityGroupRule(id="r3", direction="ingress", protocol="icmp", remote_ip_prefix="10.0.0.0/8")]))
    add(r, SecurityGroup(id="sg2", name="db"))
    for key, groups in (("xa", ["sg1"]), ("yb", ["sg1", "sg2"]), ("zc", ["sg2"])):
        r.objects["Endpoint"][key] = r.objects["Endpoint"][key].model_copy(update={"security_groups": groups})
    return r


@pytest.mark.parametrize("host", ["h1", "h2", "h3"])
def test_a_compile_from_the_memos_equals_a_cold_one(host: str) -> None:
    """The encoded policy and dispatch chains are reused across plans (only their sets are made
    again): a plan built from those memos must be exactly the plan built without them."""
    ctx = HostContext(host, "eth0", 1500)
    memos = Memos()
    cold = compute_nft(_rich_replica(), ctx, memos)
    assert memos.policy_rules and memos.dispatch_rules
    warm = compute_nft(_rich_replica(), ctx, memos)
    assert warm == cold
    # a changed member of a selector still reaches the reused chain's set
    r = _rich_replica()
    r.objects["Endpoint"]["xb"] = r.objects["Endpoint"]["xb"].model_copy(update={"ips": ["10.1.0.99"]})
    changed = compute_nft(r, ctx, memos)
    assert changed == compute_nft(r, ctx)  # cold
