"""Security groups with real packets, same method as the NetworkPolicy truth tables: every ordered
pair of 9 pods on TCP/UDP 80/81 against `tether.policy_eval`, including remote-group membership
changes, a pod that leaves its last group (port security on: it passes nothing), the combination
with NetworkPolicy (both must allow), and statefulness (replies pass)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.lab import unique
from tests.policy.truth import Cluster, make_network, running_cluster
from tether.lab.cluster import Lab
from tether.model import SecurityGroup, SecurityGroupRule

pytestmark = pytest.mark.lab


def rule(direction: str, **kw) -> SecurityGroupRule:
    return SecurityGroupRule(direction=direction, **kw)


EGRESS_ALL = rule("egress")


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Iterator[Cluster]:
    with running_cluster(lab, unique("sg"), unique("s"), "10.64.0.0/16") as c:
        yield c


@pytest.fixture
def sgs(cluster: Cluster) -> Iterator[tuple[Cluster, list[str]]]:
    """Groups made by a test are detached and deleted afterwards."""
    made: list[str] = []
    try:
        yield cluster, made
    finally:
        for key in cluster.pods:
            cluster.set_groups(key, [], port_security=False)
        cluster.clear_policies()
        for gid in made:
            cluster.client.request("DELETE", f"/api/v1/securitygroups/{gid}")


def group(c: Cluster, made: list[str], name: str, *rules: SecurityGroupRule, gid: str | None = None) -> str:
    sg = SecurityGroup(name=name, rules=list(rules))
    if gid:
        sg.id = gid
    created = c.client.request("POST", "/api/v1/securitygroups", content=sg.model_dump_json(exclude={"revision"}))
    made.append(created["id"])
    return created["id"]


def test_group_without_rules_denies_everything_both_ways(sgs) -> None:
    c, made = sgs
    c.set_groups("x/a", [group(c, made, "empty")])
    assert c.converge() == []


def test_ingress_tcp_port_from_anywhere_and_stateful_replies(sgs) -> None:
    c, made = sgs
    web = group(c, made, "web", rule("ingress", protocol="tcp", port_range_min=80, port_range_max=80,
                                     remote_ip_prefix="0.0.0.0/0"), EGRESS_ALL)
    c.set_groups("x/a", [web])
    c.set_groups("y/b", [web])
    assert c.converge() == []


def test_udp_port_range_and_single_address_prefix(sgs) -> None:
    c, made = sgs
    udp = group(c, made, "udp", rule("ingress", protocol="udp", port_range_min=80, port_range_max=81), EGRESS_ALL)
    one = group(c, made, "one", rule("ingress", remote_ip_prefix=f"{c.pods['z/c'].ip}/32"), EGRESS_ALL)
    c.set_groups("x/a", [udp])
    c.set_groups("x/b", [one])
    c.set_groups("x/c", [udp, one])  # groups are a union
    assert c.converge() == []


def test_restricted_egress(sgs) -> None:
    c, made = sgs
    out = group(c, made, "out", rule("egress", protocol="tcp", port_range_min=81, port_range_max=81),
                rule("ingress"))
    c.set_groups("y/a", [out])
    assert c.converge() == []


def test_remote_group_membership_changes_are_followed(sgs) -> None:
    c, made = sgs
    gid = SecurityGroup(name="peers").id
    peers = group(c, made, "peers", rule("ingress", remote_group_id=gid), EGRESS_ALL, gid=gid)
    for key in ("x/a", "y/b"):
        c.set_groups(key, [peers])
    assert c.converge() == []
    c.set_groups("z/c", [peers])  # joins: now reachable from and reaching members
    assert c.converge() == []
    c.set_groups("y/b", [])  # leaves its last group: no longer a member, and passes nothing (Neutron)
    assert c.converge() == []
    c.set_groups("y/b", [], port_security=False)  # port security off: open again
    assert c.converge() == []


def test_security_group_and_network_policy_must_both_allow(sgs) -> None:
    c, made = sgs
    wide = group(c, made, "wide", rule("ingress", protocol="tcp", port_range_min=80, port_range_max=81), EGRESS_ALL)
    c.set_groups("x/a", [wide])
    c.policy("x", "p", {"podSelector": {"matchLabels": {"pod": "a"}},
                        "ingress": [{"ports": [{"port": 80}, {"port": 80, "protocol": "UDP"}]}]})
    assert c.converge() == []  # only TCP/80 passes both


def test_security_group_lets_another_network_in(sgs, lab: Lab) -> None:
    c, made = sgs
    other = make_network(lab, unique("sg"), "10.65.0.0/16")
    try:
        c.add_pod("y", "o", "h3", {"pod": "o"}, network=other)
        assert c.converge() == []  # isolated by network
        cross = group(c, made, "cross", rule("ingress", remote_ip_prefix="10.65.0.0/16", protocol="udp"), EGRESS_ALL)
        c.set_groups("x/b", [cross])
        assert c.converge() == []
    finally:
        if "y/o" in c.pods:
            c.remove_pod("y/o")
