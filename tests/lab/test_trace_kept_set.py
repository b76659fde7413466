"""`tether trace --probe` on the kept set (issue 25): in one lab, at least 30 cases of every kind
(policy, security group, service VIP, node port, nat-outgoing, node-local DNS, a broken route,
another network, anti-spoofing) where the real packet must agree with the trace, and the trace must
name the step that stops it. A disagreement is fixed in the trace, never by dropping the case."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.fixtures.lab import unique
from tether.agent.dns import DNS_IP
from tether.lab.cluster import INET_IP, Lab, wait_for
from tether.model import (
    Network,
    NetworkPolicy,
    SecurityGroup,
    SecurityGroupRule,
    Service,
    ServicePort,
    Subnet,
)

pytestmark = pytest.mark.lab
NODE_PORT = 30481


def trace(lab: Lab, src: str, dst: str, *extra: str) -> dict:
    from typer.testing import CliRunner

    from tether.cli.main import app

    r = CliRunner().invoke(app, ["trace", src, dst, "--probe", "--lab", lab.name, "--timeout", "1", "-o", "json",
                                 *extra])
    assert r.exit_code in (0, 2), r.output
    return json.loads(r.output)


@pytest.fixture
def world(fresh_lab: Lab) -> Iterator[tuple[Lab, dict[str, str]]]:
    """Networks with and without nat_outgoing, pods on three hosts (h3 across an underlay router),
    policies, a security group, a service with a node port and one without backends."""
    lab = fresh_lab
    c = lab.client()
    n1, n2 = unique("k"), unique("o")
    ns, locked = unique("app"), unique("lk")
    c.create_network(Network(name=n1, subnets=[Subnet(cidr="10.81.0.0/16")], encap="vxlan", nat_outgoing=True))
    c.create_network(Network(name=n2, subnets=[Subnet(cidr="10.82.0.0/16")], encap="vxlan"))
    sg = SecurityGroup(name="ssh", rules=[SecurityGroupRule(direction="ingress", protocol="tcp", port_range_min=22,
                                                            port_range_max=22)])
    gid = c.request("POST", "/api/v1/securitygroups", content=sg.model_dump_json(exclude={"revision"}))["id"]
    pods = {"cli": ("h1", n1, ns, {}), "cli2": ("h1", n1, ns, {}), "srv": ("h2", n1, ns, {"app": "srv"}),
            "db": ("h2", n1, ns, {"app": "db"}), "far": ("h3", n1, ns, {"app": "far"}),
            "l": ("h1", n1, locked, {}), "o": ("h1", n2, ns, {}), "o2": ("h2", n2, ns, {})}
    for name, (host, net, space, labels) in pods.items():
        lab.run_pod(host, name, net, namespace=space, labels=labels)
    lab.run_pod("h2", "sg", n1, namespace=ns, security_groups=[gid])
    servers = [subprocess.Popen(["ip", "netns", "exec", lab.pod(ref).ns, sys.executable, "-m", "tether.lab.probe",
                                 "serve", "--ports", "80,22", "--control", f"/tmp/{lab.name}-{ref[3:]}.ctl"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for ref in ("h2/srv", "h2/db", "h3/far", "h1/cli2", "h2/o2", "h2/sg", "h1/o")]
    try:
        c.apply(Service(name="web", namespace=ns, selector={"app": "srv"},
                        ports=[ServicePort(port=80), ServicePort(port=80, protocol="UDP", name="u")]))
        c.apply(Service(name="np", namespace=ns, type="NodePort", selector={"app": "srv"},
                        ports=[ServicePort(port=8080, target_port=80, node_port=NODE_PORT)]))
        c.apply(Service(name="empty", namespace=ns, selector={"app": "nobody"}, ports=[ServicePort(port=80)]))
        c.apply(NetworkPolicy(name="deny-db", namespace=ns,
                              spec={"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}))
        c.apply(NetworkPolicy(name="lockdown", namespace=locked, spec={"podSelector": {}, "policyTypes": ["Egress"]}))
        for ref, to in (("h1/cli", "h2/srv"), ("h1/cli", "h3/far"), ("h1/o", "h2/o2")):
            wait_for(lambda ref=ref, to=to: lab.ping(ref, lab.pod(to).ips[0]), 20, f"{ref} -> {to}")
        yield lab, {"ns": ns, "locked": locked, "n1": n1}
    finally:
        for p in servers:
            p.kill()
            p.wait()


def test_trace_agrees_with_real_packets_on_the_kept_set(world: tuple[Lab, dict[str, str]]) -> None:
    lab, w = world
    ns, lk = w["ns"], w["locked"]
    h2 = lab.host("h2").ip
    # (source, destination, the step that stops it or None)
    cases = [
        # policy, across hosts and subnets, TCP and UDP, from pods and from hosts
        (f"{ns}/cli", f"{ns}/srv:80/tcp", None),
        (f"{ns}/cli", f"{ns}/srv:80/udp", None),
        (f"{ns}/cli", f"{ns}/cli2:80/tcp", None),
        (f"{ns}/cli", f"{ns}/far:80/tcp", None),
        (f"{ns}/far", f"{ns}/srv:22/tcp", None),
        (f"{ns}/cli", f"{ns}/db:80/tcp", "ingress policy"),
        (f"{ns}/cli", f"{ns}/db:80/udp", "ingress policy"),
        (f"{ns}/far", f"{ns}/db:22/tcp", "ingress policy"),
        ("host:h1", f"{ns}/db:80/tcp", "ingress policy"),
        ("host:h2", f"{ns}/db:80/tcp", None),
        (f"{lk}/l", f"{ns}/srv:80/tcp", "egress policy"),
        (f"{lk}/l", f"{ns}/far:80/udp", "egress policy"),
        # security group: only tcp/22 in
        (f"{ns}/cli", f"{ns}/sg:22/tcp", None),
        (f"{ns}/far", f"{ns}/sg:22/tcp", None),
        (f"{ns}/cli", f"{ns}/sg:80/tcp", "ingress policy"),
        (f"{ns}/cli", f"{ns}/sg:80/udp", "ingress policy"),
        # service VIP
        (f"{ns}/cli", f"svc:{ns}/web:80/tcp", None),
        (f"{ns}/cli", f"svc:{ns}/web:80/udp", None),
        (f"{ns}/far", f"svc:{ns}/web:80/tcp", None),
        (f"{ns}/cli", f"svc:{ns}/web:81/tcp", "service"),
        (f"{ns}/cli", f"svc:{ns}/empty:80/tcp", "service"),
        (f"{lk}/l", f"svc:{ns}/web:80/tcp", "egress policy"),
        (f"{ns}/o", f"svc:{ns}/web:80/tcp", "ingress policy"),
        # node port, on the backend's host and on another one
        (f"{ns}/cli", f"host:h2:{NODE_PORT}/tcp", None),
        (f"{ns}/far", f"host:h1:{NODE_PORT}/tcp", None),
        (f"{lk}/l", f"host:h2:{NODE_PORT}/tcp", "egress policy"),
        # nat-outgoing to the lab's internet
        (f"{ns}/cli", f"{INET_IP}:80/tcp", None),
        (f"{ns}/far", f"{INET_IP}:80/tcp", None),
        (f"{ns}/o", f"{INET_IP}:80/tcp", "nat-outgoing"),
        (f"{lk}/l", f"{INET_IP}:80/tcp", "egress policy"),
        # node-local DNS, exempt from egress deny-all
        (f"{lk}/l", f"{DNS_IP}:53/udp", None),
        (f"{lk}/l", f"{DNS_IP}:53/tcp", None),
        (f"{ns}/cli", f"{DNS_IP}:53/udp", None),
        # another network
        (f"{ns}/o", f"{ns}/srv:80/tcp", "ingress policy"),
        (f"{ns}/cli", f"{ns}/o:80/tcp", "ingress policy"),
        (f"{ns}/o", f"{ns}/o2:80/tcp", None),
        # an address of the network that no pod holds
        (f"{ns}/cli", "10.81.250.250:80/tcp", "route"),
        # the underlay address of a host
        (f"{ns}/cli", f"{h2}:1/tcp", None),
    ]
    wrong = []
    for src, dst, stops in cases:
        t = trace(lab, src, dst)
        if not t["probe"]["agrees"] or t["failed_step"] != stops:
            wrong.append((src, dst, stops, t["failed_step"], t["probe"], t["reason"]))
    # anti-spoofing: a datagram from an address that is not the pod's is dropped at its host
    spoofs = [(f"{ns}/cli", f"{ns}/srv:9999/udp", "10.81.251.1", "anti-spoofing"),
              (f"{ns}/cli", f"{ns}/far:9999/udp", "192.0.2.7", "anti-spoofing"),
              (f"{ns}/cli", f"{ns}/srv:9999/udp", lab.pod("h1/cli").ips[0], None)]
    for src, dst, addr, stops in spoofs:
        t = trace(lab, src, dst, "--from-address", addr)
        if not t["probe"]["agrees"] or t["failed_step"] != stops:
            wrong.append((src, dst, stops, t["failed_step"], t["probe"], t["reason"]))
    # a broken route: the underlay router stops carrying h1 <-> h3; path health sees it, trace says so
    ul = lab.ul
    h1, h3 = lab.host("h1").ip, lab.host("h3").ip
    table = unique("brk")
    rules = (f"table ip {table} {{\n chain f {{\n type filter hook forward priority 0;\n"
             f" ip saddr {h1} ip daddr {h3} drop\n ip saddr {h3} ip daddr {h1} drop\n }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", ul, "nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        c = lab.client()
        wait_for(lambda: not next((p for p in c.request("GET", "/api/v1/peers").get("h1", {}).get("peers", [])
                                   if p["peer"] == "h3"), {"underlay": {"ok": True}})["underlay"]["ok"], 40,
                 "h1's path health to see h3 down")
        broken = [(f"{ns}/cli", f"{ns}/far:80/tcp", "route"), (f"{ns}/far", f"{ns}/cli2:80/tcp", "route"),
                  (f"{ns}/cli", f"{ns}/srv:80/tcp", None)]
        for src, dst, stops in broken:
            t = trace(lab, src, dst)
            if not t["probe"]["agrees"] or t["failed_step"] != stops:
                wrong.append((src, dst, stops, t["failed_step"], t["probe"], t["reason"]))
            if stops == "route":
                assert "path health" in t["reason"], t
    finally:
        subprocess.run(["ip", "netns", "exec", ul, "nft", "delete", "table", "ip", table], check=False)
    assert len(cases) + len(spoofs) + len(broken) >= 30
    assert wrong == [], "\n".join(map(str, wrong))
