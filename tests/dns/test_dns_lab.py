"""The agent's DNS from inside pods, with real packets: every record type, shuffling, TTLs,
NXDOMAIN vs NODATA, forwarding with a cache, the server stopped, an agent restart, and parallel
A/AAAA queries from one socket. One lab for the module."""

from __future__ import annotations

import ipaddress
import json
import sys
import time

import pytest

from tests.fixtures.lab import unique
from tether.agent.dns import DNS_IP
from tether.lab.cluster import Lab, PodInfo, nsx, wait_for
from tether.model import Endpoint, Network, Service, ServicePort, Subnet

pytestmark = pytest.mark.lab

QUERY = r'''
import json, sys, dns.message, dns.query, dns.rcode
server, out = sys.argv[1], []
for spec in json.loads(sys.argv[2]):
    name, rtype = spec
    q = dns.message.make_query(name, rtype)
    try:
        r = dns.query.udp(q, server, timeout=2)
    except Exception as e:
        out.append({"error": repr(e)}); continue
    out.append({"rcode": dns.rcode.to_text(r.rcode()), "aa": bool(r.flags & 0x400),
                "answers": [[rrset.ttl, [rd.to_text() for rd in rrset]] for rrset in r.answer],
                "authority": [[rrset.ttl, dns.rdatatype.to_text(rrset.rdtype)] for rrset in r.authority]})
print(json.dumps(out))
'''

PARALLEL = r'''
import json, socket, sys, time, dns.message
server, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((server, 53)); s.settimeout(1.0)
lost, slow = 0, 0
for i in range(rounds):
    a, aaaa = dns.message.make_query(name, "A"), dns.message.make_query(name, "AAAA")
    t = time.monotonic()
    s.send(a.to_wire()); s.send(aaaa.to_wire())  # same socket, same 5-tuple, back to back (like glibc)
    want = {a.id, aaaa.id}
    try:
        while want:
            want.discard(dns.message.from_wire(s.recv(4096)).id)
    except socket.timeout:
        lost += 1
    if time.monotonic() - t > 0.5:
        slow += 1
print(json.dumps({"lost": lost, "slow": slow}))
'''


def ask(lab: Lab, pod: PodInfo, *specs: tuple[str, str]) -> list[dict]:
    r = nsx(pod.ns, sys.executable, "-c", QUERY, DNS_IP, json.dumps(specs), check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def reverse(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


def addrs(res: dict) -> list[str]:
    return [x for _ttl, rds in res.get("answers", []) for x in rds]


@pytest.fixture(scope="module")
def world(lab: Lab):
    """A dual-stack network, two pods, a multi-address endpoint and a service."""
    net, net6 = unique("dns"), unique("dnsv")
    c = lab.client()
    c.create_network(Network(name=net, subnets=[Subnet(cidr="10.71.0.0/16")]))
    # IPv6 names live on an IPv6-only network (IPAM cannot yet allocate on dual-stack networks)
    c.create_network(Network(name=net6, subnets=[Subnet(cidr="fd00:71::/64")]))
    a = lab.run_pod("h1", unique("a"), net)
    b = lab.run_pod("h2", unique("b"), net, labels={"app": "dnsweb"})
    multi = c.create_endpoint(Endpoint(name=unique("multi"), network=net,
                                       ips=["10.71.200.1", "10.71.200.2", "10.71.200.3", "10.71.200.4"]))
    v6 = c.create_endpoint(Endpoint(name=multi.name, network=net6, ips=["fd00:71::200", "fd00:71::201"]))
    svc = c.apply(Service(name=unique("web"), selector={"app": "dnsweb"},
                          ports=[ServicePort(name="http", port=80), ServicePort(name="dns", port=53, protocol="UDP")]))
    probe = lab.run_pod("h3", unique("p"), net)  # joins after the others: the replicas have them all
    wait_for(lambda: addrs(ask(lab, probe, (f"{svc.name}.default.svc.tether.local", "A"))[0]) == [svc.cluster_ip],
             15, "the service name")
    return {"net": net, "net6": net6, "a": a, "b": b, "multi": multi, "v6": v6, "svc": svc, "probe": probe}


def test_pods_get_the_resolver_and_search_domains_from_cni(world) -> None:
    dns_cfg = world["a"].result["dns"]
    assert dns_cfg["nameservers"] == [DNS_IP]
    assert f"{world['net']}.tether.local" in dns_cfg["search"] and "svc.tether.local" in dns_cfg["search"]


def test_every_record_type_from_a_pod_on_every_host(lab: Lab, world) -> None:
    net, a, b, multi, svc = world["net"], world["a"], world["b"], world["multi"], world["svc"]
    svc_name = f"{svc.name}.default.svc.tether.local"
    for pod in (a, b, world["probe"]):
        res = ask(lab, pod, (f"{a.name}.{net}.tether.local", "A"),
                  (f"{multi.name}.{world['net6']}.tether.local", "AAAA"),
                  (svc_name, "A"), (f"_http._tcp.{svc_name}", "SRV"), (reverse("fd00:71::200"), "PTR"),
                  (reverse(b.ip), "PTR"), (reverse(svc.cluster_ip), "PTR"))
        assert addrs(res[0]) == [a.ip], res[0]
        assert sorted(addrs(res[1])) == ["fd00:71::200", "fd00:71::201"], res[1]
        assert addrs(res[2]) == [svc.cluster_ip]
        assert addrs(res[3]) == [f"0 100 80 {svc_name}."]
        assert addrs(res[4]) == [f"{multi.name}.{world['net6']}.tether.local."], res[4]
        assert addrs(res[5]) == [f"{b.name}.{net}.tether.local."]
        assert addrs(res[6]) == [f"{svc_name}."]
        assert all(r.get("aa") for r in (res[0], res[2], res[3], res[5]))


def test_several_addresses_are_shuffled_with_correct_ttls(lab: Lab, world) -> None:
    name = f"{world['multi'].name}.{world['net']}.tether.local"
    res = ask(lab, world["probe"], *[(name, "A")] * 20)
    orders = {tuple(addrs(r)) for r in res}
    assert all(sorted(o) == ["10.71.200.1", "10.71.200.2", "10.71.200.3", "10.71.200.4"] for o in orders)
    assert len(orders) >= 4
    assert {r["answers"][0][0] for r in res} == {30}


def test_nxdomain_and_nodata_differ(lab: Lab, world) -> None:
    net, a = world["net"], world["a"]
    nx, nodata, ent = ask(lab, world["probe"], (f"nobody.{net}.tether.local", "A"),
                          (f"{a.name}.{net}.tether.local", "AAAA"), (f"{net}.tether.local", "A"))
    assert nx["rcode"] == "NXDOMAIN" and nx["authority"] == [[5, "SOA"]]
    assert nodata["rcode"] == "NOERROR" and not nodata["answers"] and nodata["authority"] == [[5, "SOA"]]
    assert ent["rcode"] == "NOERROR" and not ent["answers"]


def test_other_names_are_forwarded_upstream_and_cached(lab: Lab, world) -> None:
    first, = ask(lab, world["probe"], ("www.example.test", "A"))
    assert addrs(first) == ["198.19.255.81"] and first["answers"][0][0] <= 60
    time.sleep(2.2)
    second, missing = ask(lab, world["probe"], ("www.example.test", "A"), ("nothing.invalid", "A"))
    assert addrs(second) == ["198.19.255.81"]
    assert second["answers"][0][0] <= first["answers"][0][0] - 2, "served from the cache, TTL counted down"
    assert missing["rcode"] in ("NXDOMAIN", "REFUSED", "SERVFAIL")


def test_parallel_a_and_aaaa_from_one_socket_are_both_answered(lab: Lab, world) -> None:
    for name in (f"{world['multi'].name}.{world['net']}.tether.local", "example.test"):
        r = nsx(world["a"].ns, sys.executable, "-c", PARALLEL, DNS_IP, name, "300", check=False, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"lost": 0, "slow": 0}, name


def test_answers_with_the_server_stopped_and_across_an_agent_restart(lab: Lab, world) -> None:
    net, a = world["net"], world["a"]
    name = f"{a.name}.{net}.tether.local"
    pod_on_h2 = world["b"]
    lab.stop_server()
    try:
        assert addrs(ask(lab, pod_on_h2, (name, "A"))[0]) == [a.ip]
        lab.kill_agent("h2")
        lab.start_agent("h2", wait=False)
        deadline = time.monotonic() + 20
        got: list[str] = []
        while time.monotonic() < deadline and got != [a.ip]:
            res = ask(lab, pod_on_h2, (name, "A"))[0]
            got = addrs(res)
            time.sleep(0.2)
        assert got == [a.ip], "the restarted agent answers from its saved replica without the server"
    finally:
        lab.start_server()
        lab.wait_agent("h2")
    assert addrs(ask(lab, pod_on_h2, (name, "A"))[0]) == [a.ip]


def test_tcp_queries_and_the_cli_asking_one_host(lab: Lab, world) -> None:
    import os
    import subprocess

    net, a = world["net"], world["a"]
    name = f"{a.name}.{net}.tether.local"
    tcp = nsx(world["b"].ns, sys.executable, "-c",
              "import sys, dns.message, dns.query; r = dns.query.tcp(dns.message.make_query(sys.argv[1], 'A'), "
              "sys.argv[2], timeout=3); print(r.answer[0][0].to_text())", name, DNS_IP, check=False)
    assert tcp.stdout.strip() == a.ip, tcp.stderr
    env = {**os.environ, "TETHER_SERVER": lab.server_url, "TETHER_TOKEN": lab.token}
    for args in (["--host", "h3"], []):
        r = subprocess.run([sys.executable, "-m", "tether.cli.main", "dns", "lookup", name, *args, "-o", "json"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert [x["data"] for x in out["answers"]] == [a.ip] and out["rcode"] == "NOERROR"
    r = subprocess.run([sys.executable, "-m", "tether.cli.main", "dns", "lookup", "example.test", "--host", "h1",
                        "-o", "json"], capture_output=True, text=True, env=env, timeout=60)
    assert [x["data"] for x in json.loads(r.stdout)["answers"]] == ["198.19.255.80"], r.stderr


BIG = r'''
import sys, dns.flags, dns.message, dns.query
name, server = sys.argv[1], sys.argv[2]
udp = dns.query.udp(dns.message.make_query(name, "A"), server, timeout=3)  # no EDNS: 512 bytes at most
tcp = dns.query.tcp(dns.message.make_query(name, "A"), server, timeout=3)
print(bool(udp.flags & dns.flags.TC), sum(len(a) for a in udp.answer), bool(tcp.flags & dns.flags.TC),
      sum(len(a) for a in tcp.answer))
'''


def test_an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp(lab: Lab, world) -> None:
    from tether.model import ServiceBackend

    svc = lab.client().apply(Service(name=unique("big"), headless=True,
                                     backends=[ServiceBackend(ip=f"10.71.202.{i}") for i in range(1, 41)]))
    name = f"{svc.name}.default.svc.tether.local"
    # what glibc and musl do with TC set: ask again over TCP, which answers all 40 addresses
    wait_for(lambda: nsx(world["b"].ns, sys.executable, "-c", BIG, name, DNS_IP, check=False).stdout.split()
             == ["True", "0", "False", "40"], 15, f"{name}: truncated over UDP, whole over TCP")
