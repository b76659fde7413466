"""The server stopped for 60 s: pods keep talking; afterwards agents resync by themselves and new
pods work, including pods on a network created after the outage."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, wait_for
from tether.lab.inspect import kernel_state
from tether.model import Network, Subnet

pytestmark = [pytest.mark.lab, pytest.mark.slow]
OUTAGE = 60


def test_server_down_60s_traffic_unaffected_then_agents_resync(fresh_lab: Lab) -> None:
    lab = fresh_lab
    net = unique("n")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.43.0.0/16")], encap="auto"))
    a = lab.run_pod("h1", "a", net)
    b = lab.run_pod("h2", "b", net)
    c = lab.run_pod("h3", "c", net)
    assert lab.reaches("h1/a", b.ip) and lab.reaches("h1/a", c.ip)
    before = {h.name: kernel_state(h.ns) for h in lab.state.hosts}

    lab.stop_server()
    pings = [subprocess.Popen(["ip", "netns", "exec", a.ns, "ping", "-i", "0.5", "-w", str(OUTAGE), ip],
                              stdout=subprocess.PIPE, text=True) for ip in (b.ip, c.ip)]
    try:
        time.sleep(OUTAGE / 2)
        # mid-outage: the agents still answer the runtime (STATUS ok: they serve from their replica)
        assert lab.ping("h2/b", c.ip)
        outs = [p.communicate(timeout=OUTAGE + 30)[0] for p in pings]
    finally:
        for p in pings:
            if p.poll() is None:
                p.kill()
    for out in outs:
        sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())
        assert sent >= OUTAGE and received == sent, out
    assert {h.name: kernel_state(h.ns) for h in lab.state.hosts} == before, "the datapath changed while the " \
        "server was away"

    lab.start_server()
    for h in lab.state.hosts:
        lab.wait_agent(h.name, timeout=30)
    # new pods on an existing network and on a network created after the outage
    d = lab.run_pod("h3", "d", net)
    assert lab.reaches("h1/a", d.ip, within=15)
    net2 = unique("n")
    lab.client().create_network(Network(name=net2, subnets=[Subnet(cidr="10.44.0.0/16")], encap="vxlan"))
    lab.run_pod("h1", "e", net2)
    f = lab.run_pod("h2", "f", net2)
    wait_for(lambda: lab.ping("h1/e", f.ip), 5, "the new network to carry traffic")
    hosts = {h["name"]: h for h in lab.client().list_raw("Host")}
    assert all(hosts[h.name].get("alive") for h in lab.state.hosts)
