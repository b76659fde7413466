"""`tether trace` end to end (issue 25): the kept set of cases. Each names the step that stops
the packet (or none): policy, security group, service VIP and node port, nat-outgoing, node-local
DNS under egress deny-all, a broken direct route, another network, anti-spoofing. The lab subset
(tests/lab/test_trace_probe.py) checks that real packets agree on a sample of the same kinds."""

from __future__ import annotations

import pytest

from tether.model import (
    Endpoint,
    Host,
    Network,
    NetworkPolicy,
    SecurityGroup,
    SecurityGroupRule,
    Service,
    ServicePort,
    Subnet,
)
from tether.policy_eval import World
from tether.trace import DNS_IP, trace


def ep(name: str, net: str, host: str, ip: str, ns: str = "default", **kw) -> Endpoint:
    return Endpoint(name=name, namespace=ns, network=net, host=host, ips=[ip], **kw)


SSH_ONLY = SecurityGroup(id="sg-ssh", name="ssh", rules=[
    SecurityGroupRule(direction="ingress", protocol="tcp", port_range_min=22, port_range_max=22)])
HOSTS = [Host(name="h1", underlay_ip="198.18.0.1", underlay_cidr="198.18.0.0/24"),
         Host(name="h2", underlay_ip="198.18.0.2", underlay_cidr="198.18.0.0/24"),
         Host(name="h3", underlay_ip="198.18.1.3", underlay_cidr="198.18.1.0/24")]
NETS = [Network(name="n1", subnets=[Subnet(cidr="10.1.0.0/16")], nat_outgoing=True),
        Network(name="n2", subnets=[Subnet(cidr="10.2.0.0/16")]),
        Network(name="n3", subnets=[Subnet(cidr="10.3.0.0/16")], encap="direct", nat_outgoing=True),
        Network(name="n4", subnets=[Subnet(cidr="10.4.0.0/16")], encap="auto", nat_outgoing=True)]
EPS = [ep("a", "n1", "h1", "10.1.0.1"), ep("a2", "n1", "h1", "10.1.0.2"), ep("b", "n1", "h2", "10.1.0.3"),
       ep("c", "n1", "h3", "10.1.0.4"), ep("db", "n1", "h2", "10.1.0.5", labels={"app": "db"}),
       ep("web-1", "n1", "h2", "10.1.0.6", labels={"app": "web"}),
       ep("web-2", "n1", "h3", "10.1.0.7", labels={"app": "web"}),
       ep("l", "n1", "h1", "10.1.0.8", ns="locked"), ep("s1", "n1", "h2", "10.1.0.9", security_groups=["sg-ssh"]),
       ep("d", "n2", "h1", "10.2.0.1"), ep("e", "n3", "h1", "10.3.0.1"), ep("f", "n3", "h3", "10.3.0.2"),
       ep("g", "n3", "h2", "10.3.0.3"), ep("x1", "n4", "h1", "10.4.0.1"), ep("x2", "n4", "h2", "10.4.0.2"),
       ep("x3", "n4", "h3", "10.4.0.3")]
POLICIES = [NetworkPolicy(name="deny-db", namespace="default",
                          spec={"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}),
            NetworkPolicy(name="lockdown", namespace="locked", spec={"podSelector": {}, "policyTypes": ["Egress"]})]
SERVICES = [Service(name="web", cluster_ip="10.96.0.10", selector={"app": "web"},
                    ports=[ServicePort(port=80, target_port=8080)]),
            Service(name="empty", cluster_ip="10.96.0.11", selector={"app": "none"}, ports=[ServicePort(port=80)]),
            Service(name="np", type="NodePort", cluster_ip="10.96.0.12", selector={"app": "web"},
                    ports=[ServicePort(port=80, target_port=8080, node_port=30080)])]
WORLD = World(endpoints=EPS, policies=POLICIES, security_groups=[SSH_ONLY], networks=NETS, hosts=HOSTS)
BY_NAME = {e.name: e for e in EPS}

# (source, destination, port, proto, the step that stops it or None, a word its detail must hold)
CASES = [
    ("a", "b", 80, "TCP", None, "vxlan"),
    ("a", "a2", 80, "TCP", None, "local"),
    ("b", "a", 53, "UDP", None, "vxlan"),
    ("a", "c", 443, "TCP", None, "198.18.1.3"),
    ("a", "db", 5432, "TCP", "ingress policy", "deny-db"),
    ("a", "db", 5432, "UDP", "ingress policy", "deny-db"),
    ("c", "db", 80, "TCP", "ingress policy", "deny-db"),
    ("host:h1", "db", 5432, "TCP", "ingress policy", "deny-db"),
    ("host:h2", "db", 5432, "TCP", None, "own host"),
    ("e", "f", 80, "TCP", "route", "different underlay subnets"),
    ("f", "e", 80, "TCP", "route", "different underlay subnets"),
    ("e", "g", 80, "TCP", None, "direct"),
    ("x1", "x2", 80, "TCP", None, "direct"),
    ("x1", "x3", 80, "TCP", None, "vxlan"),
    ("a", "d", 80, "TCP", "ingress policy", "isolation"),
    ("d", "a", 80, "TCP", "ingress policy", "isolation"),
    ("a", "8.8.8.8", 443, "TCP", None, "nat_outgoing"),
    ("d", "8.8.8.8", 443, "TCP", "nat-outgoing", "nat_outgoing off"),
    ("a", "svc:default/web", 80, "TCP", None, "load-balanced over 2"),
    ("a", "10.96.0.10", 80, "TCP", None, "8080"),
    ("a", "web", 80, "TCP", None, "default/web"),
    ("a", "10.96.0.10", 81, "TCP", "service", "no port 81"),
    ("a", "10.96.0.10", 80, "UDP", "service", "no port 80/UDP"),
    ("a", "svc:default/empty", 80, "TCP", "service", "no ready backend"),
    ("d", "svc:default/web", 80, "TCP", "ingress policy", "isolation"),
    ("a", "host:h2", 30080, "TCP", None, "node port 30080"),
    ("l", "b", 80, "TCP", "egress policy", "lockdown"),
    ("l", "8.8.8.8", 443, "TCP", "egress policy", "lockdown"),
    ("l", "svc:default/web", 80, "TCP", "egress policy", "lockdown"),
    ("l", DNS_IP, 53, "UDP", None, "exempt"),
    ("a", DNS_IP, 53, "TCP", None, "node-local DNS"),
    ("a", "s1", 22, "TCP", None, "security group ssh"),
    ("a", "s1", 80, "TCP", "ingress policy", "no ingress rule"),
    ("a", "10.1.250.250", 80, "TCP", "route", "no endpoint holds it"),
    ("a", "host:h3", 22, "TCP", None, "host h3"),
    ("b", "web-1", 8080, "TCP", None, "local"),
]


@pytest.mark.parametrize(("src", "dst", "port", "proto", "stops", "word"), CASES,
                         ids=[f"{s}->{d}:{p}/{q}" for s, d, p, q, *_ in CASES])
def test_trace_names_the_step_that_stops_the_packet(src: str, dst: str, port: int, proto: str, stops: str | None,
                                                    word: str) -> None:
    t = trace(WORLD, SERVICES, BY_NAME.get(src, src), BY_NAME.get(dst, dst), port, proto)
    failed = t.failed
    assert (failed.name if failed else None) == stops, [vars(s) for s in t.steps]
    text = " ".join(s.detail for s in t.steps)
    assert word in text, [vars(s) for s in t.steps]
    assert t.reached == (stops is None)
    if src in BY_NAME:
        assert t.steps[1].name == "anti-spoofing" and BY_NAME[src].ips[0] in t.steps[1].detail


def test_the_kept_set_has_at_least_thirty_cases_of_every_kind() -> None:
    assert len(CASES) >= 30
    kinds = {c[4] for c in CASES}
    assert {None, "ingress policy", "egress policy", "route", "service", "nat-outgoing"} <= kinds


def test_a_network_whose_packets_do_not_fit_the_path_is_named_with_the_mtu_to_set() -> None:
    from tether.agent.peers import mtu_problems

    nets = [Network(name="v", subnets=[Subnet(cidr="10.5.0.0/16")]),
            Network(name="d", subnets=[Subnet(cidr="10.6.0.0/16")], encap="direct"),
            Network(name="small", subnets=[Subnet(cidr="10.7.0.0/16")], mtu=1300)]
    assert mtu_problems(nets, "h3", 1500, 1500) == []
    got = mtu_problems(nets, "h3", 1400, 1500)
    assert len(got) == 2 and "network v sends 1500-byte packets" in got[0] and "mtu to 1350" in got[0]
    assert "network d sends 1500-byte packets" in got[1] and "mtu to 1400" in got[1]
    six = mtu_problems(nets, "h3", 1450, 1500, overhead=70)  # an IPv6 underlay: 70 bytes of VXLAN
    assert len(six) == 2 and "(MTU 1430 + 70 VXLAN)" in six[0] and "mtu to 1380" in six[0]


def test_a_peer_whose_underlay_is_of_the_other_family_is_named_with_what_to_do() -> None:
    from tether.agent.peers import unlike_underlays

    me = Host(name="h1", underlay_ip="fd00:18::1")
    msg = unlike_underlays(me, Host(name="h3", underlay_ip="198.18.1.3"))
    assert msg.startswith("h3 has an IPv4 underlay address (198.18.1.3) and this host an IPv6 one (fd00:18::1)")
    assert "no path between them" in msg and "one family" in msg


def test_a_node_port_is_subject_to_the_source_pods_egress_policy() -> None:
    t = trace(WORLD, SERVICES, BY_NAME["l"], "host:h2", 30080, "TCP")
    assert t.failed is not None and t.failed.name == "egress policy" and "198.18.0.2:30080" in t.failed.detail
    assert t.policy == "locked/lockdown"


def test_a_service_without_backends_refuses_at_once_rather_than_dropping() -> None:
    t = trace(WORLD, SERVICES, BY_NAME["a"], "svc:default/empty", 80, "TCP")
    assert t.refused and t.as_dict()["refused"]
    assert not trace(WORLD, SERVICES, BY_NAME["a"], "db", 5432, "TCP").refused


@pytest.mark.parametrize(("address", "stopped"), [("10.1.0.1", False), ("10.1.9.9", True), ("192.0.2.1", True),
                                                  ("10.1.200.5", False)])
def test_a_source_address_that_is_not_the_pods_stops_at_anti_spoofing(address: str, stopped: bool) -> None:
    from tether.model import AddressPair

    a = BY_NAME["a"].model_copy(update={"allowed_address_pairs": [AddressPair(ip_address="10.1.200.0/24")]})
    t = trace(WORLD, SERVICES, a, BY_NAME["b"], 80, "UDP", src_address=address)
    assert (t.failed.name if t.failed else None) == ("anti-spoofing" if stopped else None)
    if stopped:
        assert "spoofed source" in t.failed.detail and address in t.failed.detail


def test_a_path_that_path_health_reports_down_stops_the_route() -> None:
    health = {"h1": {"age_s": 3.0, "peers": [{"peer": "h3", "underlay_ip": "198.18.1.3", "underlay": {"ok": False}},
                                             {"peer": "h2", "underlay_ip": "198.18.0.2", "underlay": {"ok": True}}]}}
    t = trace(WORLD, SERVICES, BY_NAME["a"], BY_NAME["c"], 80, "TCP", health=health)
    assert t.failed is not None and t.failed.name == "route" and "h1's path health" in t.failed.detail
    back = trace(WORLD, SERVICES, BY_NAME["c"], BY_NAME["a"], 80, "TCP", health=health)
    assert back.failed is not None and back.failed.name == "route"  # the report of either end counts
    assert trace(WORLD, SERVICES, BY_NAME["a"], BY_NAME["b"], 80, "TCP", health=health).reached


def test_a_vxlan_path_whose_overlay_is_reported_down_stops_at_the_encapsulation() -> None:
    health = {"h1": {"age_s": 2.0, "peers": [{"peer": "h2", "underlay_ip": "198.18.0.2", "underlay": {"ok": True},
                                              "overlay": {"ok": False}}]}}
    t = trace(WORLD, SERVICES, BY_NAME["a"], BY_NAME["b"], 80, "TCP", health=health)
    assert t.failed is not None and t.failed.name == "encapsulation" and "UDP 4789" in t.failed.detail
    assert trace(WORLD, SERVICES, BY_NAME["e"], BY_NAME["g"], 80, "TCP", health=health).reached  # direct: no tunnel


def test_a_path_between_underlays_of_two_families_fails_at_the_route_with_what_to_do() -> None:
    """h3 moved to an IPv6 underlay: no route or tunnel joins it to the IPv4 hosts (calc.host.same_family);
    an IPv6 peer in its subnet is direct, with VXLAN over IPv6 costing 70 bytes."""
    h3 = Host(name="h3", underlay_ip="fd00:18::3", underlay_cidr="fd00:18::/64")
    h4 = Host(name="h4", underlay_ip="fd00:19::4", underlay_cidr="fd00:19::/64")
    x4 = ep("x4", "n1", "h4", "10.1.0.44")
    world = World(endpoints=[*EPS, x4], policies=POLICIES, security_groups=[SSH_ONLY], networks=NETS,
                  hosts=[*HOSTS[:2], h3, h4])
    t = trace(world, [], BY_NAME["a"], BY_NAME["c"], 80, "TCP")
    assert t.failed is not None and t.failed.name == "route" and "different families" in t.failed.detail
    assert "one family" in t.failed.detail
    six = trace(world, [], BY_NAME["c"], x4, 80, "TCP")
    assert six.failed is None and "70 bytes" in " ".join(s.detail for s in six.steps)
