"""A policy's drop counter never goes backwards (issue 25): applying another policy to the same
pods rebuilds their chains, which restarted the first policy's nft counter at 0, and the metric
fell with it."""

from __future__ import annotations

import re
import socket

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, wait_for
from tether.model import Network, NetworkPolicy, Subnet

pytestmark = pytest.mark.lab


def dropped(lab: Lab, host: str, policy: str) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(f"{lab.agent_dir(host)}/flows.sock")
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    m = re.search(rf'tether_policy_dropped_packets_total{{host="{host}",policy="{re.escape(policy)}"}} (\d+)',
                  out.decode())
    return int(m.group(1)) if m else 0


def test_a_policy_drop_counter_survives_another_policy_on_the_same_pods(fresh_lab: Lab) -> None:
    lab = fresh_lab
    c = lab.client()
    net = unique("n")
    c.create_network(Network(name=net, subnets=[Subnet(cidr="10.45.0.0/16")], encap="vxlan"))
    lab.run_pod("h1", "a", net)
    b = lab.run_pod("h2", "b", net, labels={"app": "b"})
    assert lab.reaches("h1/a", b.ip)
    deny = unique("deny")
    c.apply(NetworkPolicy(name=deny, namespace="default",
                          spec={"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}))
    wait_for(lambda: not lab.ping("h1/a", b.ip, wait=0.5), 15, "the deny policy")
    lab.ping("h1/a", b.ip, count=5, wait=1)
    before = dropped(lab, "h2", f"default/{deny}")
    assert before >= 5, before
    other = unique("other")  # selects the same pod: its chains are rebuilt
    c.apply(NetworkPolicy(name=other, namespace="default", spec={
        "podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"],
        "ingress": [{"ports": [{"port": 9999}]}]}))
    r = lab.exec("h1/a", "true")
    assert r.returncode == 0
    readings = []
    for _ in range(6):
        readings.append(dropped(lab, "h2", f"default/{deny}"))
        lab.ping("h1/a", b.ip, count=1, wait=0.3)
    assert all(x >= before for x in readings), (before, readings)
    assert readings == sorted(readings), readings
