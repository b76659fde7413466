"""Flows with identity (issue 25), real packets in a lab: allowed TCP and UDP connections between
pods on two hosts, a connection to a service VIP (with the backend it went to) and a denied
connection all reach `tether flows` with both ends named and the deciding policy; the filters and
`-o json` work cluster-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, wait_for
from tether.model import Network, NetworkPolicy, Service, ServicePort, Subnet

pytestmark = pytest.mark.lab


def serve(lab: Lab, ref: str, ports: str) -> subprocess.Popen:
    ctl = f"/tmp/{lab.name}-{ref.replace('/', '-')}.ctl"
    return subprocess.Popen(["ip", "netns", "exec", lab.pod(ref).ns, sys.executable, "-m", "tether.lab.probe",
                             "serve", "--ports", ports, "--control", ctl], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def once(lab: Lab, ref: str, ip: str, port: int, proto: str) -> bool:
    r = lab.exec(ref, sys.executable, "-m", "tether.lab.probe", "once", ip, str(port), proto, "--timeout", "1")
    return bool(json.loads(r.stdout)["reached"])


def flows(lab: Lab, *args: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "tether.cli.main", "flows", "-o", "json", "--limit", "1000", *args,
                        "--server", lab.server_url, "--token", lab.token], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_allowed_and_denied_flows_name_both_ends_and_the_deciding_policy(fresh_lab: Lab) -> None:
    lab = fresh_lab
    c = lab.client()
    net = unique("n")
    c.create_network(Network(name=net, subnets=[Subnet(cidr="10.44.0.0/16")], encap="vxlan"))
    lab.run_pod("h1", "cli", net, labels={"app": "cli"})
    srv = lab.run_pod("h2", "srv", net, labels={"app": "srv"})
    guarded = lab.run_pod("h2", "db", net, labels={"app": "db"})
    servers = [serve(lab, "h2/srv", "8080,5353"), serve(lab, "h2/db", "5432")]
    try:
        svc = c.apply(Service(name=unique("web"), selector={"app": "srv"}, ports=[ServicePort(port=80,
                                                                                               target_port=8080)]))
        pol = unique("deny-db")
        c.apply(NetworkPolicy(name=pol, namespace="default",
                              spec={"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}))
        r = subprocess.run([sys.executable, "-m", "tether.cli.main", "wait", f"networkpolicy/{pol}", "--timeout",
                            "20", "--server", lab.server_url, "--token", lab.token], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: once(lab, "h1/cli", srv.ip, 8080, "TCP"), 15, "the server pod")
        assert once(lab, "h1/cli", srv.ip, 5353, "UDP")
        wait_for(lambda: once(lab, "h1/cli", svc.cluster_ip, 80, "TCP"), 15, "the service VIP")
        assert not once(lab, "h1/cli", guarded.ip, 5432, "TCP")

        def seen() -> bool:
            got = flows(lab, "--from", "default/cli")
            return {("tcp", srv.ip), ("udp", srv.ip), ("tcp", svc.cluster_ip)} <= {(f["proto"], f["dst"]) for f in got
                                                                                  if f["verdict"] == "allow"} and \
                any(f["verdict"] == "deny" and f["dst"] == guarded.ip for f in got)

        wait_for(seen, 20, "the flows in `tether flows`")
        got = flows(lab, "--from", "default/cli")
        tcp = next(f for f in got if f["verdict"] == "allow" and f["proto"] == "tcp" and f["dst"] == srv.ip)
        assert tcp["from"]["pod"] == "default/cli" and tcp["from"]["host"] == "h1" and tcp["from"]["network"] == net
        assert tcp["to"]["pod"] == "default/srv" and tcp["to"]["host"] == "h2" and tcp["dport"] == 8080
        udp = next(f for f in got if f["verdict"] == "allow" and f["proto"] == "udp" and f["dst"] == srv.ip)
        assert udp["to"]["pod"] == "default/srv" and udp["dport"] == 5353
        vip = next(f for f in got if f["verdict"] == "allow" and f["dst"] == svc.cluster_ip)
        assert vip["to"]["service"] == f"default/{svc.name}" and vip["backend"] == srv.ip
        assert vip["backend_of"]["pod"] == "default/srv"
        denied = next(f for f in got if f["verdict"] == "deny" and f["dst"] == guarded.ip)
        assert denied["to"]["pod"] == "default/db" and denied["policy"] == f"default/{pol}", denied
        assert denied["from"]["pod"] == "default/cli"

        # filters: by the service (VIP and backend), by verdict, by namespace; nothing spurious
        assert {f["dst"] for f in flows(lab, "--to", f"svc:default/{svc.name}")} == {svc.cluster_ip}
        assert all(f["verdict"] == "deny" for f in flows(lab, "--verdict", "deny"))
        assert not flows(lab, "--from", "nosuchns")
        assert not any(f["proto"] == "icmpv6" for f in flows(lab)), "DAD/MLD noise reached the flows"
        table = subprocess.run([sys.executable, "-m", "tether.cli.main", "flows", "--to", "default/db", "--server",
                                lab.server_url, "--token", lab.token], capture_output=True, text=True, timeout=60)
        assert "default/cli" in table.stdout and f"default/{pol}" in table.stdout and "TIME" in table.stdout
    finally:
        for p in servers:
            p.kill()
            p.wait()
