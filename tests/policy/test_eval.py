"""The model evaluator (reference for the compiler and engine of `tether trace`) on the Kubernetes and
Neutron rules that are easy to get wrong."""

from __future__ import annotations

from tests.policy.world import make_replica, policy
from tether.model import Endpoint, SecurityGroup, SecurityGroupRule
from tether.policy_eval import World, decide, policy_types, selects


def world(*policies, groups=(), endpoints=None) -> World:
    r = make_replica()
    eps = list(endpoints or r.endpoints)
    return World(endpoints=eps, namespaces=list(r.namespaces), policies=list(policies),
                 security_groups=list(groups), networks=list(r.networks.values()), hosts=list(r.hosts.values()))


def ep(w: World, key: str) -> Endpoint:
    return next(e for e in w.endpoints if e.id == key)


def test_selector_operators() -> None:
    assert selects({}, {})
    assert selects({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {})
    assert selects({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"})
    assert not selects({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]},
                       {"a": "1"})


def test_policy_types_default_to_ingress_plus_egress_when_egress_rules_exist() -> None:
    assert policy_types({}) == ["Ingress"]
    assert policy_types({"egress": [{}]}) == ["Ingress", "Egress"]
    assert policy_types({"egress": []}) == ["Ingress"]
    assert policy_types({"policyTypes": ["Egress"], "ingress": [{}]}) == ["Egress"]


def test_peer_with_both_selectors_is_an_and_and_separate_peers_are_an_or() -> None:
    both = policy("p", "x", {"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    w = world(both)
    assert decide(w, ep(w, "yb"), ep(w, "xa")).allowed
    assert not decide(w, ep(w, "ya"), ep(w, "xa")).allowed
    assert not decide(w, ep(w, "zb"), ep(w, "xa")).allowed
    either = policy("p", "x", {"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}}, {"podSelector": {"matchLabels": {"pod": "b"}}}]}]})
    w = world(either)
    assert decide(w, ep(w, "ya"), ep(w, "xa")).allowed and decide(w, ep(w, "xb"), ep(w, "xa")).allowed
    assert not decide(w, ep(w, "zb"), ep(w, "xa")).allowed


def test_named_port_resolves_on_the_destination_and_must_match_its_protocol() -> None:
    p = policy("p", "x", {"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]})
    w = world(p)
    assert decide(w, ep(w, "ya"), ep(w, "xa"), 81, "UDP").allowed
    assert not decide(w, ep(w, "ya"), ep(w, "xa"), 81, "TCP").allowed


def test_decision_names_the_deciding_policy_and_rule() -> None:
    w = world(policy("web", "x", {"podSelector": {}, "ingress": [{}, {"ports": [{"port": 80}]}]}))
    d = decide(w, ep(w, "ya"), ep(w, "xa"))
    assert (d.allowed, d.policy, d.rule) == (True, "x/web", "ingress[0]")
    w = world(policy("deny", "x", {"podSelector": {}, "policyTypes": ["Egress"]}))
    d = decide(w, ep(w, "xa"), ep(w, "yb"))
    assert not d.allowed and d.policy == "x/deny" and "egress" in d.reason


def test_networks_are_isolated_unless_an_applicable_layer_allows() -> None:
    r = make_replica()
    other = Endpoint(id="m1", name="m1", network="m", host="h1", namespace="x", ips=["10.2.0.1"], labels={})
    w = world(endpoints=[*r.endpoints, other])
    assert not decide(w, other, ep(w, "xa")).allowed and not decide(w, ep(w, "xa"), other).allowed
    w = world(policy("p", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                "ingress": [{"from": [{"ipBlock": {"cidr": "10.2.0.0/16"}}]}]}),
              endpoints=[*r.endpoints, other])
    assert decide(w, other, ep(w, "xa")).allowed


def test_security_groups_and_network_policy_must_both_allow() -> None:
    r = make_replica()
    g = SecurityGroup(id="g", name="g", rules=[SecurityGroupRule(direction="ingress", protocol="tcp",
                                                                 port_range_min=80, port_range_max=81)])
    eps = [e.model_copy(update={"security_groups": ["g"]}) if e.id == "xa" else e for e in r.endpoints]
    w = world(policy("p", "x", {"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]}), groups=[g],
              endpoints=eps)
    assert decide(w, ep(w, "ya"), ep(w, "xa"), 81).allowed
    assert not decide(w, ep(w, "ya"), ep(w, "xa"), 80).allowed  # the group allows, the policy does not
    assert not decide(w, ep(w, "xa"), ep(w, "ya"), 80).allowed  # the group has no egress rule


def test_own_host_and_loopback_are_always_allowed() -> None:
    w = world(policy("deny", "x", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))
    xa = ep(w, "xa")
    assert decide(w, xa, xa).allowed
    assert decide(w, f"host:{xa.host}", xa).allowed
    assert not decide(w, "host:h2" if xa.host != "h2" else "host:h3", xa).allowed
