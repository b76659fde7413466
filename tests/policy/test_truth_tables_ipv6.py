"""The NetworkPolicy and security group truth tables repeated with IPv6 addresses, with real packets.

One dual-stack network (an IPv4 and an IPv6 subnet), the 9 pods of `tests.policy.truth` spread over
the lab's 3 hosts (so most pairs cross hosts over vxlan). Each scenario is written once for both
families (an ipBlock or a security group rule names its IPv4 and its IPv6 form), then every ordered
pair is probed on TCP/UDP 80/81 twice: to the pods' IPv4 and to their IPv6 addresses. Both rounds
must equal `tether.policy_eval`, and the IPv6 expectation must equal the IPv4 one pair for pair: the
same verdicts whichever family a pod uses. A small subset of the IPv4 tables, sized for CI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.lab import unique
from tests.policy.truth import Cluster, running_cluster
from tether.lab.cluster import Lab
from tether.model import SecurityGroup, SecurityGroupRule

pytestmark = pytest.mark.lab

V4, V6 = "10.76.0.0/16", "fd76::/64"


def sel(**labels: str) -> dict:
    return {"matchLabels": labels}


def both_families(c: Cluster, *keys: str) -> list[str]:
    """The /32 and /128 of each pod named."""
    return [f"{c.pods[k].ip}/32" for k in keys] + [f"{c.pods[k].address(6)}/128" for k in keys]


def group(c: Cluster, made: list[str], name: str, rules: list[SecurityGroupRule], gid: str | None = None) -> str:
    sg = SecurityGroup(name=name, rules=rules)
    if gid:
        sg.id = gid
    created = c.client.request("POST", "/api/v1/securitygroups", content=sg.model_dump_json(exclude={"revision"}))
    made.append(created["id"])
    return created["id"]


def dual(direction: str, prefix6: str | None = None, **kw) -> list[SecurityGroupRule]:
    """One rule per ethertype; the IPv6 one takes `prefix6` where the IPv4 one has remote_ip_prefix."""
    v6 = {**kw, "remote_ip_prefix": prefix6} if prefix6 else kw
    return [SecurityGroupRule(direction=direction, ethertype="IPv4", **kw),
            SecurityGroupRule(direction=direction, ethertype="IPv6", **v6)]


def deny_all_ingress(c: Cluster, _made: list[str]) -> None:
    c.policy("x", "p", {"podSelector": {}, "policyTypes": ["Ingress"]})


def ingress_to_a_from_pod_b(c: Cluster, _made: list[str]) -> None:
    c.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]})


def ingress_from_namespace_y_tcp_80(c: Cluster, _made: list[str]) -> None:
    c.policy("x", "p", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": sel(ns="y")}],
                                                        "ports": [{"port": 80}]}]})


def egress_to_namespace_y(c: Cluster, _made: list[str]) -> None:
    c.policy("z", "p", {"podSelector": {}, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"namespaceSelector": sel(ns="y")}]}]})


def ipblock_with_except(c: Cluster, _made: list[str]) -> None:
    """The network's block in each family, minus z/c and x/b (both of their addresses)."""
    ex = both_families(c, "z/c", "x/b")
    c.policy("x", "p", {"podSelector": sel(pod="a"), "ingress": [{"from": [
        {"ipBlock": {"cidr": V4, "except": [e for e in ex if ":" not in e]}},
        {"ipBlock": {"cidr": V6, "except": [e for e in ex if ":" in e]}}]}]})


def egress_ipblock_and_deny_egress(c: Cluster, _made: list[str]) -> None:
    """x/a may send only to z/c's addresses; y denies all egress."""
    c.policy("x", "p", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": cidr}} for cidr in both_families(c, "z/c")]}]})
    c.policy("y", "p", {"podSelector": {}, "policyTypes": ["Egress"]})


def security_group_ethertype_ipv6(c: Cluster, made: list[str]) -> None:
    """TCP/80 from anywhere (0.0.0.0/0 and ::/0), everything from z/c's addresses, UDP from the
    members of a remote group; egress open in both families."""
    egress = dual("egress")
    web = group(c, made, "web6", dual("ingress", protocol="tcp", port_range_min=80, port_range_max=80,
                                      remote_ip_prefix="0.0.0.0/0", prefix6="::/0") + egress)
    one = group(c, made, "one6", [SecurityGroupRule(direction="ingress", ethertype="IPv6" if ":" in p else "IPv4",
                                                    remote_ip_prefix=p) for p in both_families(c, "z/c")] + egress)
    gid = SecurityGroup(name="peers6").id
    peers = group(c, made, "peers6", dual("ingress", protocol="udp", remote_group_id=gid) + egress, gid=gid)
    c.set_groups("x/a", [web])
    c.set_groups("y/b", [one, peers])
    c.set_groups("z/c", [peers])
    c.set_groups("x/c", [peers])


SCENARIOS: dict[str, Callable[[Cluster, list[str]], None]] = {
    "no-policy-allows-all": lambda c, made: None,
    "deny-all-ingress": deny_all_ingress,
    "ingress-to-a-from-pod-b": ingress_to_a_from_pod_b,
    "ingress-from-namespace-y-tcp-80": ingress_from_namespace_y_tcp_80,
    "egress-to-namespace-y": egress_to_namespace_y,
    "ipblock-with-except": ipblock_with_except,
    "egress-ipblock-and-deny-egress": egress_ipblock_and_deny_egress,
    "security-group-ethertype-ipv6": security_group_ethertype_ipv6,
}


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Iterator[Cluster]:
    with running_cluster(lab, unique("np6"), unique("t"), V4, V6) as c:
        yield c


@pytest.fixture
def clean(cluster: Cluster) -> Iterator[tuple[Cluster, list[str]]]:
    """Each scenario starts from no policy and no security group."""
    made: list[str] = []
    try:
        yield cluster, made
    finally:
        cluster.clear_policies()
        for key in cluster.pods:
            cluster.set_groups(key, [], port_security=False)
        for gid in made:
            cluster.client.request("DELETE", f"/api/v1/securitygroups/{gid}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ipv6_truth_table_equals_the_ipv4_one(clean: tuple[Cluster, list[str]], name: str) -> None:
    c, made = clean
    assert all(p.ip6 for p in c.pods.values()), "every pod of a dual-stack network has an IPv6 address"
    SCENARIOS[name](c, made)
    assert c.converge(family=4) == []
    assert c.converge(family=6) == []
    want4, want6 = c.expected(family=4), c.expected(family=6)
    differ = [k for k in want4 if want4[k] != want6[k]]
    assert differ == [], f"IPv6 verdicts differ from IPv4 on {len(differ)} pairs, e.g. {differ[:3]}"
    if name != "no-policy-allows-all":
        assert not all(want6.values()), "the scenario must deny something"
