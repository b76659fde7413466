"""Programming status with real packets (issue 25): a policy shows "enforced on N/N" only once
every host drops what it denies (not before: a host whose agent is frozen still passes the traffic
and the policy shows it pending), and a host whose agent is stopped shows as not programmed, then
down with its reason; `tether get` prints the line and `tether wait --for programmed` waits for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, stop_pid, wait_for
from tether.model import Network, NetworkPolicy, Subnet

pytestmark = pytest.mark.lab
DENY_OUT = {"podSelector": {"matchLabels": {"role": "client"}}, "policyTypes": ["Egress"]}


def cli(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tether.cli.main", *args, "--server", lab.server_url,
                           "--token", lab.token], capture_output=True, text=True, timeout=60)


def status(lab: Lab, name: str) -> dict:
    return lab.client().request("GET", f"/api/v1/programming/NetworkPolicy/default/{name}")


def test_a_policy_is_enforced_on_every_host_only_when_probes_confirm_it(fresh_lab: Lab) -> None:
    lab = fresh_lab
    c = lab.client()
    net = unique("n")
    c.create_network(Network(name=net, subnets=[Subnet(cidr="10.43.0.0/16")], encap="vxlan"))
    server = lab.run_pod("h1", "srv", net, labels={"role": "server"})
    clients = [f"{h}/c" for h in ("h1", "h2", "h3")]
    for ref in clients:
        lab.run_pod(ref.split("/")[0], "c", net, labels={"role": "client"})
    for ref in clients:
        assert lab.reaches(ref, server.ip), f"{ref} cannot reach the server before any policy"

    # h3's agent frozen: the policy is written, h1 and h2 enforce it, h3 does not and says so
    pid = lab.host("h3").agent_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        name = unique("deny")
        pol = c.apply(NetworkPolicy(name=name, namespace="default", spec=DENY_OUT))
        wait_for(lambda: status(lab, name)["done"] == 2, 15, "h1 and h2 to enforce the policy")
        st = status(lab, name)
        assert not st["programmed"] and st["revision"] == pol.revision
        assert "enforced on 2/3 hosts" in st["summary"] and "h3: pending" in st["summary"], st["summary"]
        assert lab.ping("h3/c", server.ip), "h3 enforces the policy it shows as pending"
        for ref in clients[:2]:
            assert not lab.ping(ref, server.ip), f"{ref} shown enforced but its ping went through"
    finally:
        os.kill(pid, signal.SIGCONT)

    r = cli(lab, "wait", f"networkpolicy/{name}", "--for", "programmed", "--timeout", "20")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "enforced on 3/3 hosts" in r.stdout and "ms after write" in r.stdout, r.stdout
    for ref in clients:
        assert not lab.ping(ref, server.ip), f"{ref} shown enforced but its ping went through"
    r = cli(lab, "get", "networkpolicy", name)
    assert r.returncode == 0 and "enforced on 3/3 hosts (revision" in r.stdout, r.stdout + r.stderr

    # h3's agent stopped: a new policy is not programmed there, and h3 shows down with why
    stop_pid(pid, signal.SIGKILL)
    lab.host("h3").agent_pid = None
    lab.save()
    other = unique("deny")
    c.apply(NetworkPolicy(name=other, namespace="default", spec=DENY_OUT))
    r = cli(lab, "wait", f"networkpolicy/{other}", "--timeout", "3")
    assert r.returncode == 1 and "not programmed" in r.stderr and "2/3" in r.stderr, r.stdout + r.stderr
    t0 = time.monotonic()
    wait_for(lambda: "h3: down" in status(lab, other)["summary"], 40, "h3 to show down once its lease expires")
    assert "no heartbeat" in status(lab, other)["summary"]
    assert time.monotonic() - t0 < 40
