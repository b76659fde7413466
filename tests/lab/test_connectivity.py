"""Every pod reaches every other pod, with real pings, for each encapsulation; egress NAT is real."""

from __future__ import annotations

import ipaddress
import itertools
import json
import subprocess

import pytest

from tests.fixtures.lab import make_lab, unique
from tether.lab.cluster import INET_IP, Lab, nsx, wait_for
from tether.model import Network, Subnet

pytestmark = pytest.mark.lab


def make_net(lab: Lab, cidr: str, encap: str, nat: bool = False) -> str:
    name = unique(encap[:3])
    lab.client().create_network(Network(name=name, subnets=[Subnet(cidr=cidr)], encap=encap, nat_outgoing=nat))
    return name


def all_pairs_ping(lab: Lab, pods) -> list[str]:
    """Every ordered pair, including a pod to itself; each given time for the agents to converge."""
    failures = []
    for p, q in itertools.product(pods, repeat=2):
        ref = f"{p.host}/{p.name}"
        if not lab.reaches(ref, q.ip):
            failures.append(f"{ref} ({p.ip}) -> {q.host}/{q.name} ({q.ip})")
    return failures


@pytest.mark.parametrize(("encap", "cidr", "hosts", "which"), [
    ("vxlan", "10.31.0.0/16", ("h1", "h2", "h3"), "lab"),              # across both underlay subnets, tunnelled
    ("direct", "10.32.0.0/16", ("h1", "h2"), "one_subnet_lab"),        # one underlay subnet: routes via the peer
    ("auto", "10.33.0.0/16", ("h1", "h2", "h3"), "lab"),               # direct h1<->h2, vxlan to h3
])
def test_every_pod_reaches_every_pod(request, encap: str, cidr: str, hosts: tuple[str, ...], which: str) -> None:
    lab: Lab = request.getfixturevalue(which)
    net = make_net(lab, cidr, encap)
    pods = [lab.run_pod(h, unique("p"), net) for h in hosts for _ in range(2)]
    assert all_pairs_ping(lab, pods) == []


def test_auto_uses_routes_inside_a_subnet_and_vxlan_across(lab: Lab) -> None:
    net = make_net(lab, "10.34.0.0/16", "auto")
    a, b, c = (lab.run_pod(h, unique("p"), net) for h in ("h1", "h2", "h3"))

    def block_route(ip: str) -> str | None:
        """h1's route (proto 201) for the IPAM block that holds `ip`."""
        out = nsx(lab.host("h1").ns, "ip", "route", "show", "proto", "201").stdout
        for line in out.splitlines():
            dst = line.split()[0]
            if "/" in dst and ipaddress.ip_address(ip) in ipaddress.ip_network(dst):
                return line
        return None

    wait_for(lambda: block_route(b.ip) and block_route(c.ip), 10, "h1 to learn the new blocks")
    b_block, c_block = block_route(b.ip) or "", block_route(c.ip) or ""
    assert "via 198.18.0.2" in b_block and "eth0" in b_block
    assert "tth.vxlan" in c_block
    assert "onlink" in c_block
    assert lab.reaches(f"{a.host}/{a.name}", c.ip)


def test_direct_network_carries_pod_addresses_unencapsulated(one_subnet_lab: Lab) -> None:
    """The underlay switch sees the pods' own addresses on the wire (no VXLAN header, no NAT).

    A test-owned nft table on h2 counts a->b packets by the device they arrive on; the VTEP's own
    link counters are not used because other networks in the shared lab may tunnel meanwhile."""
    lab = one_subnet_lab
    net = make_net(lab, "10.35.0.0/16", "direct")
    a, b = lab.run_pod("h1", unique("p"), net), lab.run_pod("h2", unique("p"), net)
    assert lab.reaches(f"h1/{a.name}", b.ip)
    ns, table = lab.host("h2").ns, unique("tcount")
    flow = f"ip saddr {a.ip} ip daddr {b.ip} icmp type echo-request"
    rules = (f"table inet {table} {{\n chain c {{\n type filter hook prerouting priority -400\n"
             f' iifname "eth0" {flow} counter\n iifname "tth.vxlan" {flow} counter\n }}\n}}\n')
    sh_nft(ns, rules)
    try:
        assert lab.ping(f"h1/{a.name}", b.ip, count=3)
        listed = nsx(ns, "nft", "-j", "list", "table", "inet", table).stdout
        counts = [r["rule"]["expr"][-1]["counter"]["packets"] for r in json.loads(listed)["nftables"] if "rule" in r]
        assert counts[0] >= 3, f"pings should arrive on the underlay device, unencapsulated: {counts}"
        assert counts[1] == 0, f"no a->b packet may come through the VTEP: {counts}"
    finally:
        nsx(ns, "nft", "delete", "table", "inet", table, check=False)


def sh_nft(ns: str, ruleset: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset, text=True, check=True)


def test_nat_outgoing_masquerades_to_the_host_address(lab: Lab) -> None:
    net = make_net(lab, "10.36.0.0/16", "vxlan", nat=True)
    pod = lab.run_pod("h2", unique("p"), net)
    seen = lab.exec(f"h2/{pod.name}", "curl", "-s", "-m", "5", f"http://{INET_IP}/")
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.strip() == lab.host("h2").ip


def test_without_nat_outgoing_the_far_end_sees_the_pod_address(lab: Lab) -> None:
    net = make_net(lab, "10.37.0.0/16", "vxlan", nat=False)
    pod = lab.run_pod("h1", unique("p"), net)
    # the underlay router learns the way back to this one pod, as a routed data centre would
    nsx(lab.ul, "ip", "route", "add", f"{pod.ip}/32", "via", lab.host("h1").ip)
    try:
        seen = lab.exec(f"h1/{pod.name}", "curl", "-s", "-m", "5", f"http://{INET_IP}/")
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout.strip() == pod.ip
    finally:
        nsx(lab.ul, "ip", "route", "del", f"{pod.ip}/32", check=False)


def test_pods_get_the_mtu_of_the_underlay_minus_the_encapsulation(lab: Lab, one_subnet_lab: Lab) -> None:
    vx = make_net(lab, "10.38.0.0/16", "vxlan")
    dr = make_net(one_subnet_lab, "10.39.0.0/16", "direct")
    a, b = lab.run_pod("h1", unique("p"), vx), one_subnet_lab.run_pod("h1", unique("p"), dr)
    assert "mtu 1450" in lab.exec(f"h1/{a.name}", "ip", "link", "show", "eth0").stdout
    assert "mtu 1500" in one_subnet_lab.exec(f"h1/{b.name}", "ip", "link", "show", "eth0").stdout
    c = lab.run_pod("h3", unique("p"), vx)
    # a full-size packet crosses the tunnel without fragmentation
    assert lab.reaches(f"h1/{a.name}", c.ip)
    assert lab.exec(f"h1/{a.name}", "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1422", c.ip).returncode == 0


def test_a_lab_on_the_etcd_store_connects_pods_across_hosts() -> None:
    lab = make_lab(hosts=2, store="etcd")
    try:
        net = make_net(lab, "10.40.0.0/16", "vxlan")
        a, b = lab.run_pod("h1", "a", net), lab.run_pod("h2", "b", net)
        assert lab.reaches("h1/a", b.ip) and lab.reaches("h2/b", a.ip)
    finally:
        lab.down()
