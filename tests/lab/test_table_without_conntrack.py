"""While nothing in the cluster needs state (no service, policy, security group or nat-outgoing
network: calc.needs_state), the hosts' tables have no conntrack at all and isolate networks at the
sender; a service switches every host to the table with conntrack and back when it goes, and a TCP
connection between pods on two hosts survives both switches."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.fixtures.lab import unique
from tether.dataplane.nft import counters
from tether.lab.cluster import Lab, PodInfo, nsx, wait_for
from tether.model import Network, Service, ServicePort, Subnet

pytestmark = pytest.mark.lab
STREAM = os.path.join(os.path.dirname(__file__), "tcp_stream.py")
HOSTS = ("h1", "h2")


def table(lab: Lab, host: str) -> str:
    return nsx(lab.host(host).ns, "nft", "list", "table", "inet", "tether").stdout


def stateful(lab: Lab) -> list[bool]:
    return ["raw_prerouting" in table(lab, h) for h in HOSTS]


def isolation_drops(lab: Lab, host: str, network: str) -> int:
    return sum(n for key, n in counters(lab.host(host).ns).items()
               if key.split("/", 1)[1] == f"deny out isolation {network}")


def tracked(lab: Lab, host: str, pod: PodInfo) -> bool:
    out = nsx(lab.host(host).ns, "conntrack", "-L", "-f", "ipv4", check=False).stdout
    return f"src={pod.ip}" in out


def test_no_conntrack_until_a_service_needs_it_and_networks_stay_isolated(lab: Lab) -> None:
    c = lab.client()
    net_a, net_b = unique("la"), unique("lb")
    c.create_network(Network(name=net_a, subnets=[Subnet(cidr="10.73.0.0/16")], encap="vxlan"))
    c.create_network(Network(name=net_b, subnets=[Subnet(cidr="10.74.0.0/16")], encap="vxlan"))
    a1 = lab.run_pod("h1", unique("a1"), net_a)
    a2 = lab.run_pod("h2", unique("a2"), net_a, labels={"app": "echo"})
    b2 = lab.run_pod("h2", unique("b2"), net_b)
    assert lab.reaches(f"h1/{a1.name}", a2.ip)
    assert stateful(lab) == [False, False]
    for h in HOSTS:
        assert " ct " not in table(lab, h) and "notrack" not in table(lab, h) and "nat" not in table(lab, h)
        nsx(lab.host(h).ns, "conntrack", "-F", check=False)
    assert lab.ping(f"h1/{a1.name}", a2.ip, count=3)
    assert not tracked(lab, "h1", a1) and not tracked(lab, "h2", a1), "conntrack saw a packet"
    # another network's pod: dropped where it is sent, counted
    before = isolation_drops(lab, "h1", net_a)
    assert not lab.ping(f"h1/{a1.name}", b2.ip, count=2)
    assert isolation_drops(lab, "h1", net_a) >= before + 2

    server = subprocess.Popen(["ip", "netns", "exec", a2.ns, sys.executable, STREAM, "serve", "7400"])
    client = None
    try:
        time.sleep(0.5)
        client = subprocess.Popen(["ip", "netns", "exec", a1.ns, sys.executable, STREAM, "send", a2.ip, "7400", "12"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)
        svc = c.apply(Service(name=unique("svc"), namespace="default", selector={"app": "echo"},
                              ports=[ServicePort(port=80, target_port=7400)]))
        wait_for(lambda: stateful(lab) == [True, True], 15, "every host to switch to the table with conntrack")
        time.sleep(1)
        assert not lab.ping(f"h1/{a1.name}", b2.ip, count=1)  # isolated by the receiver now
        c.delete("Service", svc.store_name())
        wait_for(lambda: stateful(lab) == [False, False], 15, "every host to switch back")
        out, _ = client.communicate(timeout=30)
        assert client.returncode == 0, f"the TCP connection broke across the switches: {out}"
        assert out.startswith("ok ")
    finally:
        for p in (client, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert lab.ping(f"h1/{a1.name}", a2.ip, count=2)
