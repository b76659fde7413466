"""IPv6 with real packets: dual-stack and IPv6-only pods reach each other on one host and across
hosts, tunnelled (vxlan), routed (direct) and both (auto); a pod's DAD and MLD pass its
anti-spoofing while a spoofed IPv6 source is dropped; services by IPv6 VIP and IPv6 node port."""

from __future__ import annotations

import ipaddress
import itertools
import json
import subprocess
import sys
import time

import pytest

from tests.dns.test_dns_lab import QUERY, addrs
from tests.fixtures.lab import unique
from tests.services.probes import connect_many, start_server, stop
from tether.agent.dns import DNS_IP
from tether.dataplane.nft import counters
from tether.lab.cluster import INET_IP6, Lab, nsx, underlay6, wait_for
from tether.model import (
    Namespace,
    Network,
    NetworkPolicy,
    SecurityGroup,
    SecurityGroupRule,
    Service,
    ServicePort,
    Subnet,
)

pytestmark = pytest.mark.lab


def make_net(lab: Lab, cidrs: list[str], encap: str) -> str:
    name = unique("v6" + encap[:2])
    lab.client().create_network(Network(name=name, subnets=[Subnet(cidr=c) for c in cidrs], encap=encap))
    return name


def serving_pods(lab: Lab, net: str, app: str, hosts: tuple[str, ...], servers: list) -> list:
    """A pod labelled `app` on each host, each serving TCP and UDP on 8080 (its server appended to
    `servers`, which the caller stops), once both listeners are up."""
    pods = []
    for h in hosts:
        pod = lab.run_pod(h, unique("b"), net, labels={"app": app})
        servers.append(start_server(pod.ns, pod.name, 8080))
        pods.append(pod)
    for pod in pods:
        wait_for(lambda pod=pod: nsx(pod.ns, "ss", "-ltn").stdout.count(":8080") >= 2, 10, "the backend server")
    return pods


def v6(pod) -> str:
    return next(ip for ip in pod.ips if ":" in ip)


@pytest.mark.parametrize(("encap", "cidrs", "hosts", "which"), [
    ("vxlan", ["10.61.0.0/16", "fd61::/64"], ("h1", "h2", "h3"), "lab"),   # across both underlay subnets
    ("direct", ["10.62.0.0/16", "fd62::/64"], ("h1", "h2"), "one_subnet_lab"),  # via the peer's link-local
    ("auto", ["fd63::/64"], ("h1", "h2", "h3"), "lab"),                  # IPv6-only: direct h1<->h2, vxlan to h3
])
def test_every_pod_reaches_every_pod_over_ipv6(request, encap: str, cidrs: list[str], hosts: tuple[str, ...],
                                                which: str) -> None:
    lab: Lab = request.getfixturevalue(which)
    net = make_net(lab, cidrs, encap)
    pods = [lab.run_pod(h, unique("p"), net) for h in hosts for _ in range(2)]
    for p in pods:  # one address per family of the network, each in the CNI result with its default route
        assert len(p.ips) == len(cidrs)
        assert {"dst": "::/0", "gw": "fe80::1"} in p.result["routes"]
        assert any(i["address"] == f"{v6(p)}/128" and i.get("gateway") == "fe80::1" for i in p.result["ips"])
    failures = [f"{p.host}/{p.name} -> {q.host}/{q.name} ({v6(q)})" for p, q in itertools.product(pods, repeat=2)
                if not lab.reaches(f"{p.host}/{p.name}", v6(q))]
    assert failures == []


def test_a_dual_stack_pod_has_both_default_routes_and_the_host_a_route_to_each_address(lab: Lab) -> None:
    net = make_net(lab, ["10.64.0.0/16", "fd64::/64"], "vxlan")
    p = lab.run_pod("h1", unique("p"), net)
    routes6 = nsx(p.ns, "ip", "-6", "route", "show").stdout
    assert "default via fe80::1" in routes6
    host_routes = nsx(lab.host("h1").ns, "ip", "-6", "route", "show", "proto", "201").stdout
    wait_for(lambda: v6(p) in nsx(lab.host("h1").ns, "ip", "-6", "route", "show", "proto", "201").stdout, 10,
             "the host route to the pod's IPv6 address")
    assert json.dumps(p.result)  # the CNI result is JSON with both addresses
    assert sorted(":" in ip for ip in p.ips) == [False, True], host_routes


LISTEN6 = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
s.settimeout(0.1)
print("ready", flush=True)
end, seen = time.time() + float(sys.argv[2]), []
while time.time() < end:
    try:
        data, addr = s.recvfrom(100)
        seen.append(addr[0])
    except socket.timeout:
        pass
print(json.dumps(seen), flush=True)
"""
SEND6 = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for _ in range(3):
    s.sendto(b"x", (sys.argv[2], int(sys.argv[3])))
"""


def received6(sender, src: str, dst, port: int) -> list[str]:
    """Datagrams `dst` receives on its IPv6 address when `sender` sends three from source `src`."""
    listener = subprocess.Popen(["ip", "netns", "exec", dst.ns, sys.executable, "-c", LISTEN6, str(port), "1.5"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        nsx(sender.ns, sys.executable, "-c", SEND6, src, v6(dst), str(port))
        out, _ = listener.communicate(timeout=10)
    finally:
        if listener.poll() is None:
            listener.kill()
    return json.loads(out)


def spoof_drops(lab: Lab, host: str) -> int:
    return sum(n for key, n in counters(lab.host(host).ns).items()
               if key.split("/", 1)[1] == "spoofed source address")


def test_a_spoofed_ipv6_source_is_dropped_while_dad_and_mld_pass(lab: Lab) -> None:
    """A pod that adds an address IPAM did not give it runs duplicate address detection for it (a
    neighbour solicitation from `::`) and joins its solicited-node group (MLD): both reach the
    host, counted by a test-owned table after the pod's ingress chain, and no spoofing drop is
    counted (the drops are what the flow log reports). A datagram from that address is dropped
    and counted; one from the pod's own IPv6 address arrives."""
    net = make_net(lab, ["10.67.0.0/16", "fd67::/64"], "vxlan")
    before = spoof_drops(lab, "h1")
    a = lab.run_pod("h1", unique("a"), net)
    c = lab.run_pod("h2", unique("c"), net)
    host_if = a.result["interfaces"][0]["name"]
    ns, table = lab.host("h1").ns, unique("tdad")
    rules = (f"table inet {table} {{\n chain c {{\n type filter hook prerouting priority -400\n"
             f' iifname "{host_if}" ip6 saddr :: icmpv6 type nd-neighbor-solicit counter\n'
             f' iifname "{host_if}" icmpv6 type {{ mld-listener-report, mld2-listener-report }} counter\n }}\n}}\n')
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        assert lab.reaches(f"h1/{a.name}", v6(c))
        nsx(a.ns, "ip", "addr", "add", "fd67::ffff:99/128", "dev", "eth0")  # with DAD: not IPAM's

        def counted() -> list[int]:
            listed = json.loads(nsx(ns, "nft", "-j", "list", "table", "inet", table).stdout)["nftables"]
            return [r["rule"]["expr"][-1]["counter"]["packets"] for r in listed if "rule" in r]

        wait_for(lambda: min(counted()) > 0, 10, "the pod's DAD and MLD to reach its host")
        wait_for(lambda: "tentative" not in nsx(a.ns, "ip", "-6", "addr", "show", "dev", "eth0").stdout, 10,
                 "DAD to finish")
        assert spoof_drops(lab, "h1") == before, "DAD and MLD must not count as spoofed"
        assert received6(a, "fd67::ffff:99", c, 7101) == []
        assert spoof_drops(lab, "h1") >= before + 3
        assert received6(a, v6(a), c, 7102) == [v6(a)] * 3
    finally:
        nsx(ns, "nft", "delete", "table", "inet", table, check=False)


def denied(lab: Lab, ref: str, ip: str) -> bool:
    """Two pings in a row get no answer (call it after an allowed probe showed the agents converged)."""
    return not lab.ping(ref, ip, count=2, wait=1)


def test_ipv6_isolation_ipblock_with_except_and_a_security_group_for_icmpv6(lab: Lab) -> None:
    """A subset of the NetworkPolicy and security group truth tables with IPv6 addresses, across hosts:
    - isolation: a pod of another dual-stack network does not reach b over IPv6;
    - b admits ingress only from ipBlock fd70::/64 except a's /128: c reaches b over IPv6, a does
      not, and nobody over IPv4 (the block is IPv6 only);
    - e's security group admits ICMPv6 (ethertype IPv6) only: a pings e over IPv6, not over IPv4."""
    net = make_net(lab, ["10.70.0.0/16", "fd70::/64"], "vxlan")
    other = make_net(lab, ["10.71.0.0/16", "fd71::/64"], "vxlan")
    client = lab.client()
    ns = unique("v6ns")
    client.apply(Namespace(name=ns))
    a = lab.run_pod("h1", unique("a"), net, namespace=ns)
    b = lab.run_pod("h2", unique("b"), net, namespace=ns, labels={"role": "b"})
    c = lab.run_pod("h3", unique("c"), net, namespace=ns)
    d = lab.run_pod("h1", unique("d"), other, namespace=ns)
    ref = {p.name: f"{p.host}/{p.name}" for p in (a, b, c, d)}
    assert lab.reaches(ref[a.name], v6(b)) and lab.reaches(ref[c.name], v6(b))
    assert denied(lab, ref[d.name], v6(b)), "isolation between networks holds for IPv6"
    client.apply(NetworkPolicy(name=unique("np"), namespace=ns, spec={
        "podSelector": {"matchLabels": {"role": "b"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"ipBlock": {"cidr": "fd70::/64", "except": [f"{v6(a)}/128"]}}]}]}))
    wait_for(lambda: denied(lab, ref[a.name], v6(b)), 15, "the policy to deny a over IPv6")
    assert lab.reaches(ref[c.name], v6(b))
    assert denied(lab, ref[c.name], b.ips[0]) and denied(lab, ref[a.name], b.ips[0])
    assert denied(lab, ref[d.name], v6(b))

    sg = client.request("POST", "/api/v1/securitygroups", content=SecurityGroup(name=unique("icmp6"), rules=[
        SecurityGroupRule(direction="ingress", ethertype="IPv6", protocol="icmpv6"),
        SecurityGroupRule(direction="egress", ethertype="IPv6"),
        SecurityGroupRule(direction="egress", ethertype="IPv4")]).model_dump_json(exclude={"revision"}))
    e = lab.run_pod("h3", unique("e"), net, namespace=ns, security_groups=[sg["id"]])
    try:
        assert lab.reaches(ref[a.name], v6(e))
        assert denied(lab, ref[a.name], e.ips[0]), "the group admits ICMPv6 only, not ICMP"
    finally:
        lab.rm_pod(f"h3/{e.name}")
        client.request("DELETE", f"/api/v1/securitygroups/{sg['id']}")


def test_a_dual_stack_service_answers_on_both_vips_and_dns_has_aaaa_and_ip6_arpa(lab: Lab) -> None:
    """ClusterIP with ip_families [IPv4, IPv6]: new TCP and UDP connections from pods on every host
    reach the backends through the IPv6 VIP (and still the IPv4 one); from a pod, the service's and a
    pod's names have AAAA records and the pod's IPv6 address a PTR under ip6.arpa."""
    net = make_net(lab, ["10.72.0.0/16", "fd72::/64"], "vxlan")
    app = unique("web6")
    servers = []
    try:
        pods = serving_pods(lab, net, app, ("h1", "h2"), servers)
        svc = lab.client().apply(Service(name=unique("s6"), selector={"app": app}, ip_families=["IPv4", "IPv6"],
                                         ports=[ServicePort(port=80, target_port=8080),
                                                ServicePort(name="u", port=81, target_port=8080, protocol="UDP")]))
        assert len(svc.cluster_ips) == 2 and ":" in svc.cluster_ips[1] and svc.cluster_ip == svc.cluster_ips[0]
        vip6 = svc.cluster_ips[1]
        clients = [lab.run_pod(h, unique("c"), net) for h in ("h1", "h2", "h3")]
        names = {p.name for p in pods}

        def answered(client, ip: str, port: int, proto: str) -> bool:
            r = connect_many(client.ns, ip, port, 6, proto)
            return r["failures"] == 0 and set(r["counts"]) <= names

        for c in clients:
            wait_for(lambda c=c: answered(c, vip6, 80, "tcp"), 20, f"{c.host} to reach the IPv6 VIP over TCP")
            assert answered(c, vip6, 81, "udp")
            assert answered(c, svc.cluster_ip, 80, "tcp")
        spread = connect_many(clients[0].ns, vip6, 80, 40)["counts"]
        assert set(spread) == names, spread

        svc_name = f"{svc.name}.default.svc.tether.local"
        res = ask_dns(clients[2], (svc_name, "AAAA"), (svc_name, "A"), (f"{pods[0].name}.{net}.tether.local", "AAAA"),
                      (ipaddress.ip_address(v6(pods[0])).reverse_pointer, "PTR"))
        assert addrs(res[0]) == [vip6], res[0]
        assert addrs(res[1]) == [svc.cluster_ip], res[1]
        assert addrs(res[2]) == [v6(pods[0])], res[2]
        assert addrs(res[3]) == [f"{pods[0].name}.{net}.tether.local."], res[3]
    finally:
        for s in servers:
            stop(s)


def ask_dns(pod, *specs: tuple[str, str]) -> list[dict]:
    r = nsx(pod.ns, sys.executable, "-c", QUERY, DNS_IP, json.dumps(specs), check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_nat_outgoing_masquerades_ipv6_to_the_host_address(lab: Lab) -> None:
    """A dual-stack network with nat_outgoing: a pod's IPv6 datagram to an address outside every
    Tether network leaves with its host's IPv6 address as source. The lab's "internet" and h1 get
    test-owned IPv6 addresses on the underlay switch (removed afterwards)."""
    net = unique("v6nat")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.73.0.0/16"), Subnet(cidr="fd73::/64")],
                                        encap="vxlan", nat_outgoing=True))
    pod = lab.run_pod("h1", unique("p"), net)
    inet6, host6 = "fd99:73::1", "fd99:73::11"
    added = [(lab.inet, inet6), (lab.host("h1").ns, host6)]
    try:
        for ns, ip in added:
            nsx(ns, "ip", "addr", "add", f"{ip}/64", "dev", "eth0", "nodad")
        listener = subprocess.Popen(["ip", "netns", "exec", lab.inet, sys.executable, "-c", LISTEN6, "7301", "4"],
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
            time.sleep(0.5)
            nsx(pod.ns, sys.executable, "-c", SEND6, v6(pod), inet6, "7301")
            out, _ = listener.communicate(timeout=10)
        finally:
            if listener.poll() is None:
                listener.kill()
        assert json.loads(out) == [host6] * 3
    finally:
        for ns, ip in added:
            nsx(ns, "ip", "addr", "del", f"{ip}/64", "dev", "eth0", check=False)


def test_hairpin_a_backend_reaches_its_own_service_over_ipv6(lab: Lab) -> None:
    """The IPv6 VIP DNATed back to the pod that sent: source-NATed like IPv4's hairpin (to its
    gateway fe80::1), so the backend's answer goes back through the host and conntrack, not straight
    to itself from an address it never wrote to."""
    net = make_net(lab, ["10.75.0.0/16", "fd75::/64"], "vxlan")
    app = unique("hp6")
    servers: list = []
    try:
        (pod,) = serving_pods(lab, net, app, ("h2",), servers)
        svc = lab.client().apply(Service(name=unique("s6"), selector={"app": app}, ip_families=["IPv6"],
                                         ports=[ServicePort(port=80, target_port=8080)]))
        vip6 = svc.cluster_ip
        assert vip6 and ":" in vip6, svc
        wait_for(lambda: connect_many(pod.ns, vip6, 80, 2)["failures"] == 0, 20, "the pod to reach its own VIP")
        assert connect_many(pod.ns, vip6, 80, 10) == {"counts": {pod.name: 10}, "failures": 0, "errors": []}
    finally:
        for server in servers:
            stop(server)


WHO = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)
print(c.makefile().readline().strip())
"""


def seen(ns: str, ip: str, port: int) -> list[str]:
    """[backend name, the client address the backend saw] of one TCP connection from `ns`."""
    return nsx(ns, sys.executable, "-c", WHO, ip, str(port), timeout=20).stdout.split()


def test_a_dual_stack_node_port_answers_on_every_hosts_ipv6_address_from_outside(lab: Lab) -> None:
    """NodePort with ip_families [IPv4, IPv6]: from the lab's "internet" (outside every Tether
    network), new TCP and UDP connections to each host's IPv6 underlay address on the node port
    reach the backends, also through h3, which has none of its own (so they cross hosts, source-NATed
    to h3's IPv6 address, and the answers come back through h3); the IPv4 node port still works.
    externalTrafficPolicy Local: only the receiving host's backends, the client's address kept."""
    net = make_net(lab, ["10.74.0.0/16", "fd74::/64"], "vxlan")
    app = unique("np6")
    servers = []
    try:
        pods = serving_pods(lab, net, app, ("h1", "h2"), servers)
        svc = lab.client().apply(Service(name=unique("n6"), selector={"app": app}, type="NodePort",
                                         ip_families=["IPv4", "IPv6"],
                                         ports=[ServicePort(port=80, target_port=8080),
                                                ServicePort(name="u", port=81, target_port=8080, protocol="UDP")]))
        tcp, udp = (p.node_port for p in svc.ports)
        assert tcp and udp, svc
        names = {p.name for p in pods}

        def answered(ip: str, port: int, proto: str) -> bool:
            r = connect_many(lab.inet, ip, port, 6, proto)
            return r["failures"] == 0 and set(r["counts"]) <= names

        for h in ("h1", "h2", "h3"):
            ip6 = underlay6(lab.host(h).ip)
            wait_for(lambda ip6=ip6: answered(ip6, tcp, "tcp"), 20, f"the IPv6 node port on {h} ({ip6})")
            assert answered(ip6, udp, "udp"), f"UDP to the IPv6 node port on {h}"
        h3 = underlay6(lab.host("h3").ip)
        spread = connect_many(lab.inet, h3, tcp, 30)
        assert spread["failures"] == 0 and set(spread["counts"]) == names, spread
        assert answered(lab.host("h3").ip, tcp, "tcp"), "the IPv4 node port of the same service"
        assert {seen(lab.inet, h3, tcp)[1] for _ in range(6)} == {h3}, "source-NATed to the receiving host"

        local = lab.client().apply(svc.model_copy(update={"name": unique("l6"), "external_traffic_policy": "Local",
                                                          "cluster_ips": [], "cluster_ip": None,
                                                          "ports": [ServicePort(port=80, target_port=8080)]}))
        lport, h1 = local.ports[0].node_port, underlay6(lab.host("h1").ip)
        wait_for(lambda: answered(h1, lport, "tcp"), 20, "the Local IPv6 node port on h1")
        assert {tuple(seen(lab.inet, h1, lport)) for _ in range(6)} == {(pods[0].name, INET_IP6)}, \
            "Local: h1's own backend only, and the client's address kept"
        assert connect_many(lab.inet, h3, lport, 2)["failures"] == 2, "Local: h3 has no backend of its own"
    finally:
        for s in servers:
            stop(s)


def test_a_node_port_on_an_ipv6_host_ip_answers_on_that_address_only(lab: Lab) -> None:
    """Docker's `-p [IP]:port`: published on h1's IPv6 underlay address only: not on another host's
    address, and not in the other family (no IPv4 node port); an IPv4 host_ip likewise."""
    net = make_net(lab, ["10.175.0.0/16", "fd7f:175::/64"], "vxlan")  # the hairpin test's network stays
    app = unique("hip")
    servers = []
    try:
        serving_pods(lab, net, app, ("h1",), servers)
        h1 = underlay6(lab.host("h1").ip)
        svc = lab.client().apply(Service(name=unique("hi"), selector={"app": app}, type="NodePort",
                                         ip_families=["IPv4", "IPv6"], host="h1", host_ip=h1,
                                         ports=[ServicePort(port=80, target_port=8080)]))
        port = svc.ports[0].node_port
        assert port
        wait_for(lambda: connect_many(lab.inet, h1, port, 3)["failures"] == 0, 20, f"the node port on [{h1}]")
        assert connect_many(lab.inet, underlay6(lab.host("h2").ip), port, 2)["failures"] == 2, "h2 publishes nothing"
        assert connect_many(lab.inet, lab.host("h1").ip, port, 2)["failures"] == 2, "no IPv4 node port"
        # and an IPv4 host_ip the same way: by address, its family only (the first service goes: the
        # two may share a node port, being published on different addresses)
        lab.client().delete("Service", f"default/{svc.name}")
        four = lab.client().apply(Service(name=unique("h4"), selector={"app": app}, type="NodePort", host="h1",
                                          host_ip=lab.host("h1").ip, ports=[ServicePort(port=80, target_port=8080)]))
        port4 = four.ports[0].node_port
        assert port4
        wait_for(lambda: connect_many(lab.inet, lab.host("h1").ip, port4, 3)["failures"] == 0, 20,
                 "the IPv4 host_ip node port")
        assert connect_many(lab.inet, h1, port4, 2)["failures"] == 2, "no IPv6 node port for an IPv4 host_ip"
    finally:
        for s in servers:
            stop(s)
