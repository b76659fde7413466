"""The stateless fast path: traffic between two pods of one network that no policy, security group
or service needs to remember is not tracked by conntrack (a few percent of a round trip); as soon
as a policy selects a pod, or a service uses it as a backend, its traffic is tracked again on the
host that needs the state, and still flows."""

from __future__ import annotations

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, PodInfo, nsx, wait_for
from tether.model import Network, NetworkPolicy, Service, ServicePort, Subnet

pytestmark = pytest.mark.lab


def tracked(lab: Lab, host: str, a: PodInfo, b: PodInfo) -> bool:
    """Does `host` hold a conntrack entry between the two pods' addresses (either direction)?"""
    out = nsx(lab.host(host).ns, "conntrack", "-L", "-f", "ipv4", check=False).stdout
    return any({f"src={a.ip}", f"dst={b.ip}"} <= set(line.split()) or
               {f"src={b.ip}", f"dst={a.ip}"} <= set(line.split()) for line in out.splitlines())


def flush(lab: Lab, *hosts: str) -> None:
    for h in hosts:
        nsx(lab.host(h).ns, "conntrack", "-F", check=False)


def vxlan_tracked(lab: Lab, host: str) -> bool:
    out = nsx(lab.host(host).ns, "conntrack", "-L", "-p", "udp", check=False).stdout
    return "dport=4789" in out


def test_unselected_pods_are_untracked_until_a_policy_or_service_needs_state(lab: Lab) -> None:
    net = unique("sl")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.67.0.0/16")], encap="vxlan"))
    ns = unique("ns")
    a = lab.run_pod("h1", unique("a"), net, namespace=ns, labels={"app": "client"})
    b = lab.run_pod("h2", unique("b"), net, namespace=ns, labels={"app": "server"})
    assert lab.reaches(f"h1/{a.name}", b.ip)
    flush(lab, "h1", "h2")
    assert lab.ping(f"h1/{a.name}", b.ip, count=3)
    for h in ("h1", "h2"):
        assert not tracked(lab, h, a, b), f"{h} tracked traffic between two unselected pods"
        assert not vxlan_tracked(lab, h), f"{h} tracked the VXLAN underlay packets"

    # a policy selecting b: h2 (b's host) needs state for b; h1 (a's host) still does not
    pol = lab.client().apply(NetworkPolicy(name=unique("np"), namespace=ns, spec={
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}))
    wait_for(lambda: b.ip in nsx(lab.host("h2").ns, "nft", "list", "set", "inet", "tether", "stateful").stdout,
             15, "h2 to mark b's address stateful")
    flush(lab, "h1", "h2")
    assert lab.ping(f"h1/{a.name}", b.ip, count=3)
    assert tracked(lab, "h2", a, b)
    assert not tracked(lab, "h1", a, b)

    # the policy gone, b a service backend: every host that may translate for b keeps state
    lab.client().delete("NetworkPolicy", pol.store_name())
    lab.client().apply(Service(name=unique("svc"), namespace=ns, selector={"app": "server"},
                               ports=[ServicePort(port=80, target_port=80)]))
    wait_for(lambda: all(b.ip in nsx(lab.host(h).ns, "nft", "list", "set", "inet", "tether", "stateful").stdout
                         for h in ("h1", "h2")), 15, "both hosts to mark the backend stateful")
    flush(lab, "h1", "h2")
    assert lab.ping(f"h1/{a.name}", b.ip, count=3)
    assert tracked(lab, "h1", a, b) and tracked(lab, "h2", a, b)


def test_direct_routing_and_same_host_pods_are_untracked_and_spoofing_still_drops(one_subnet_lab: Lab) -> None:
    """The per-network stateless chains: a pod's packet reaches its network's chain from the
    anti-spoofing map, a routed packet to a local pod from `local_dst4`; neither is tracked.
    (`direct` needs hosts on one underlay subnet; a service that selects nothing gives the hosts
    the table with conntrack, whose stateless path this is.)"""
    lab = one_subnet_lab
    lab.client().apply(Service(name=unique("svc"), selector={"app": unique("nobody")}, ports=[ServicePort(port=80)]))
    wait_for(lambda: all("hook forward" in nsx(lab.host(h).ns, "nft", "list", "table", "inet", "tether").stdout
                         for h in ("h1", "h2")), 15, "both hosts to have the table with conntrack")
    net = unique("sd")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.68.0.0/16")], encap="direct"))
    a = lab.run_pod("h1", unique("a"), net)
    b = lab.run_pod("h2", unique("b"), net)
    c = lab.run_pod("h1", unique("c"), net)
    assert lab.reaches(f"h1/{a.name}", b.ip) and lab.reaches(f"h1/{a.name}", c.ip)
    flush(lab, "h1", "h2")
    assert lab.ping(f"h1/{a.name}", b.ip, count=3)
    assert lab.ping(f"h1/{a.name}", c.ip, count=3)
    for h in ("h1", "h2"):
        assert not tracked(lab, h, a, b), f"{h} tracked direct-routed traffic between two unselected pods"
    assert not tracked(lab, "h1", a, c), "h1 tracked traffic between two of its own unselected pods"
    # a packet from a's interface with c's source address misses the fast path and is dropped
    nsx(a.ns, "ip", "addr", "add", f"{c.ip}/32", "dev", "eth0")
    try:
        spoofed = nsx(a.ns, "ping", "-c", "2", "-W", "1", "-I", c.ip, b.ip, check=False)
        assert spoofed.returncode != 0, "a spoofed source address got through"
    finally:
        nsx(a.ns, "ip", "addr", "del", f"{c.ip}/32", "dev", "eth0", check=False)
