"""`tether trace --probe` in a lab (issue 25): on a sample of the kept cases (tests/observe/
test_trace_cases.py: pod to pod across hosts, an ingress policy, a service VIP, egress deny-all,
another network) the real packet agrees with the trace, and the trace names the failing step;
when they disagree (the destination's agent frozen behind a new policy) the answer says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, wait_for
from tether.model import Network, NetworkPolicy, Service, ServicePort, Subnet

pytestmark = pytest.mark.lab


def trace(lab: Lab, src: str, dst: str) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, "-m", "tether.cli.main", "trace", src, dst, "--probe", "--lab", lab.name,
                        "--timeout", "1", "-o", "json"], capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 2), r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def test_trace_agrees_with_real_packets_and_names_the_failing_step(fresh_lab: Lab) -> None:
    lab = fresh_lab
    c = lab.client()
    n1, n2 = unique("n"), unique("m")
    c.create_network(Network(name=n1, subnets=[Subnet(cidr="10.46.0.0/16")], encap="vxlan"))
    c.create_network(Network(name=n2, subnets=[Subnet(cidr="10.47.0.0/16")], encap="vxlan"))
    lab.run_pod("h1", "cli", n1)
    lab.run_pod("h2", "srv", n1, labels={"app": "srv"})
    lab.run_pod("h2", "db", n1, labels={"app": "db"})
    lab.run_pod("h1", "l", n1, namespace="locked")
    lab.run_pod("h3", "o", n2)
    servers = [subprocess.Popen(["ip", "netns", "exec", lab.pod(ref).ns, sys.executable, "-m", "tether.lab.probe",
                                 "serve", "--ports", "80", "--control", f"/tmp/{lab.name}-{ref[3:]}.ctl"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for ref in ("h2/srv", "h2/db")]
    try:
        svc = c.apply(Service(name=unique("web"), selector={"app": "srv"}, ports=[ServicePort(port=80)]))
        c.apply(NetworkPolicy(name="deny-db", namespace="default",
                              spec={"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}))
        c.apply(NetworkPolicy(name="lockdown", namespace="locked", spec={"podSelector": {}, "policyTypes": ["Egress"]}))
        wait_for(lambda: lab.ping("h1/cli", lab.pod("h2/srv").ips[0]), 15, "the path")
        cases = [("default/cli", "default/srv:80/tcp", None),
                 ("default/cli", "default/db:80/tcp", "ingress policy"),
                 ("default/cli", f"svc:default/{svc.name}:80/tcp", None),
                 ("locked/l", "default/srv:80/tcp", "egress policy"),
                 ("default/o", "default/srv:80/tcp", "ingress policy")]
        for src, dst, stops in cases:
            code, t = trace(lab, src, dst)
            assert t["probe"]["agrees"] and code == 0, (src, dst, t)
            assert t["failed_step"] == stops, (src, dst, t)
        code, t = trace(lab, "default/cli", f"svc:default/{svc.name}:80/tcp")
        assert any(s["name"] == "service" for s in t["steps"]) and t["allowed"]

        # the destination's agent frozen: a new policy is in the model, not in the kernel
        pid = lab.host("h2").agent_pid
        os.kill(pid, signal.SIGSTOP)
        try:
            c.apply(NetworkPolicy(name="deny-srv", namespace="default",
                                  spec={"podSelector": {"matchLabels": {"app": "srv"}}, "policyTypes": ["Ingress"]}))
            code, t = trace(lab, "default/cli", "default/srv:80/tcp")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert code == 2 and not t["probe"]["agrees"] and t["failed_step"] == "ingress policy", t
        assert "got through" in t["probe"]["kernel"] and "programmed" in t["probe"]["kernel"], t
    finally:
        for p in servers:
            p.kill()
            p.wait()
