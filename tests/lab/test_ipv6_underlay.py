"""Hosts with only IPv6 underlay addresses (`lab.up(underlay="ipv6")`: h1, h2 on fd00:198:19:0::/64,
h3 on fd00:198:19:1::/64, no IPv4 on any host's eth0), with real packets: dual-stack pods reach
each other in both families across hosts tunnelled over IPv6 (vxlan), routed over IPv6 (direct:
IPv4 pod blocks via an IPv6 next hop) and both (auto: direct inside an underlay subnet, vxlan
across); the VTEP's MTU is the underlay's less the 70 bytes of VXLAN over IPv6."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import pytest

from tests.fixtures.lab import make_lab, unique
from tether.calc.names import VTEP_NAME
from tether.lab.cluster import Lab, nsx, wait_for
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab6() -> Iterator[Lab]:
    lab = make_lab(underlay="ipv6")
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def lab6_one_subnet() -> Iterator[Lab]:
    """h1 and h2 on one IPv6 underlay subnet: what `direct` needs."""
    lab = make_lab(hosts=2, underlay="ipv6")
    try:
        yield lab
    finally:
        lab.down()


def all_pairs_reach(lab: Lab, pods: list) -> list[str]:
    """Every (pod, address of another pod) that does not answer a ping, both families."""
    return [f"{p.host}/{p.name} -> {q.host}/{q.name} ({ip})" for p, q in itertools.product(pods, repeat=2)
            if p is not q for ip in q.ips if not lab.reaches(f"{p.host}/{p.name}", ip)]


def routes_of(lab: Lab, host: str, family: str) -> list[dict]:
    return json.loads(nsx(lab.host(host).ns, "ip", "-j", family, "route", "show", "proto", "201").stdout or "[]")


def test_the_hosts_have_no_ipv4_underlay_and_register_their_ipv6_one(lab6: Lab) -> None:
    for h in lab6.state.hosts:
        assert "inet " not in nsx(h.ns, "ip", "-4", "addr", "show", "dev", "eth0").stdout
    got = {h.name: (h.underlay_ip, h.underlay_cidr) for h in lab6.client().list("Host")}
    assert got["h1"] == ("fd00:198:19::1", "fd00:198:19::/64")
    assert got["h3"] == ("fd00:198:19:1::3", "fd00:198:19:1::/64")


@pytest.mark.parametrize("encap", ["vxlan", "auto"])
def test_dual_stack_pods_reach_each_other_across_an_ipv6_only_underlay(lab6: Lab, encap: str) -> None:
    n = 65 if encap == "vxlan" else 66
    net = unique("u6" + encap[:2])
    lab6.client().create_network(Network(name=net, subnets=[Subnet(cidr=f"10.{n}.0.0/16"), Subnet(cidr=f"fd{n}::/64")],
                                         encap=encap))
    pods = [lab6.run_pod(h, unique("p"), net) for h in ("h1", "h2", "h3")]
    assert all(len(p.ips) == 2 for p in pods)
    assert all_pairs_reach(lab6, pods) == []
    (vtep,) = json.loads(nsx(lab6.host("h1").ns, "ip", "-j", "-d", "link", "show", VTEP_NAME).stdout)
    assert vtep["linkinfo"]["info_data"]["local6"] == "fd00:198:19::1" and vtep["mtu"] == 1500 - 70
    assert json.loads(nsx(pods[0].ns, "ip", "-j", "link", "show", "eth0").stdout)[0]["mtu"] == 1500 - 70
    # auto: h2 shares h1's underlay subnet, so its IPv4 block is routed via an IPv6 next hop
    routed = [r for r in routes_of(lab6, "h1", "-4") if r.get("via") == {"family": "inet6", "host": "fd00:198:19::2"}]
    assert [r["dev"] for r in routed] == (["eth0"] if encap == "auto" else [])
    # h3 is on the other underlay subnet: tunnelled in both modes
    fdb = nsx(lab6.host("h1").ns, "bridge", "fdb", "show", "dev", VTEP_NAME).stdout
    assert "dst fd00:198:19:1::3" in fdb


def test_direct_routing_over_an_ipv6_underlay_carries_both_families(lab6_one_subnet: Lab) -> None:
    lab = lab6_one_subnet
    net = unique("u6di")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.67.0.0/16"), Subnet(cidr="fd67::/64")],
                                        encap="direct"))
    pods = [lab.run_pod(h, unique("p"), net) for h in ("h1", "h2", "h1", "h2")]
    assert all_pairs_reach(lab, pods) == []
    via = {r["dst"]: r for r in routes_of(lab, "h1", "-4")}
    assert any(r.get("via") == {"family": "inet6", "host": "fd00:198:19::2"} and r["dev"] == "eth0"
               for r in via.values()), via
    assert VTEP_NAME not in nsx(lab.host("h1").ns, "ip", "link", "show").stdout
    mtu = json.loads(nsx(pods[0].ns, "ip", "-j", "link", "show", "eth0").stdout)[0]["mtu"]
    assert mtu == 1500  # no encapsulation


def test_with_conntrack_the_tunnel_passes_only_from_ipv6_peers_and_pods_still_reach(lab6: Lab) -> None:
    """A nat-outgoing network makes every host's table stateful: VXLAN is then accepted untracked only
    from the peers' IPv6 underlay addresses (`vxlan_peers6`), and anything else to the port is dropped."""
    net = unique("u6st")
    lab6.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.68.0.0/16"), Subnet(cidr="fd68::/64")],
                                         encap="vxlan", nat_outgoing=True))
    pods = [lab6.run_pod(h, unique("p"), net) for h in ("h1", "h3")]
    assert all_pairs_reach(lab6, pods) == []
    peers = json.loads(nsx(lab6.host("h1").ns, "nft", "-j", "list", "set", "inet", "tether", "vxlan_peers6").stdout)
    elems = next(x["set"] for x in peers["nftables"] if "set" in x).get("elem", [])
    assert sorted(elems) == ["fd00:198:19:1::3", "fd00:198:19::2"]
    raw = nsx(lab6.host("h1").ns, "nft", "list", "chain", "inet", "tether", "raw_prerouting").stdout
    assert "ip6 daddr fd00:198:19::1 udp dport 4789 ip6 saddr @vxlan_peers6" in raw, raw


def test_path_health_checks_peers_over_ipv6_and_names_a_peer_of_the_other_family(lab6: Lab) -> None:
    """The agents ping each other's IPv6 underlay address and, through the tunnel, each other's VTEP
    (1430 bytes: 70 of VXLAN over IPv6); a host registered with an IPv4 underlay address has no path
    to these hosts, and each agent reports it with what to do."""
    net = unique("u6ph")
    lab6.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.69.0.0/16")], encap="vxlan"))
    for h in ("h1", "h3"):
        lab6.run_pod(h, unique("p"), net)
    assert lab6.client().request("PUT", "/api/v1/hosts/h9", json={"name": "h9", "underlay_ip": "198.18.0.9"})

    def report(src: str, dst: str) -> dict:
        r = lab6.client().request("GET", "/api/v1/peers").get(src) or {}
        return next((p for p in r.get("peers", []) if p["peer"] == dst), {})

    def seen() -> bool:
        return bool(report("h1", "h3").get("overlay")) and bool(report("h1", "h9").get("problems"))

    wait_for(seen, 40, "h1's report on h3 and h9")
    p = report("h1", "h3")
    assert p["path_mtu"] == 1500 and not p["problems"] and p["overlay"]["ok"] and p["overlay"]["size"] == 1430, p
    (problem,) = report("h1", "h9")["problems"]
    assert "h9 has an IPv4 underlay address (198.18.0.9)" in problem and "no path" in problem, problem


def test_a_pod_cannot_tunnel_a_spoofed_packet_to_a_peer_over_the_ipv6_underlay(lab6: Lab) -> None:
    """VXLAN a pod builds itself and sends to another host's IPv6 underlay address would be
    decapsulated there with any inner source: the pod's own ingress chain drops it (counted), with
    or without conntrack, while the pod still talks to the other host's pod."""
    from tests.policy.test_antispoofing import drops, inside, received, tunnelled

    net = unique("u6vx")
    lab6.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.70.0.0/16"), Subnet(cidr="fd70::/64")],
                                         encap="vxlan"))
    a, c = lab6.run_pod("h1", unique("a"), net), lab6.run_pod("h2", unique("c"), net)
    before = drops(lab6, "h1", "VXLAN from a pod")
    assert tunnelled(lab6, a.ns, "h2", inside(a, "250.2"), c, 7012) == []
    assert drops(lab6, "h1", "VXLAN from a pod") >= before + 3
    assert received(lab6, a, a.ip, c, 7013) == [a.ip] * 3
