"""The Docker quick start as a user types it: `tether lab up --docker` gives every lab host a dockerd
wired to its agent; a network made once with the docker CLI carries containers on two hosts that
reach each other by bare name; names resolve over TCP through Docker's embedded resolver (what
clients do with a truncated answer); `tether lab down` leaves no process, namespace, mount or file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docker.cli_lab import docker_lab, tether
from tests.fixtures.lab import unique
from tether.lab.cluster import LAB_ROOT, LOG_ROOT, Lab, alive, lab_namespaces, wait_for
from tether.lab.dockerd import IMAGE
from tether.model import Service, ServiceBackend

pytestmark = [pytest.mark.lab, pytest.mark.client]

SUBNET = "10.89.0.0/24"



@dataclass
class Quick:
    name: str
    hosts: dict[str, str]  # lab host -> DOCKER_HOST, as `tether lab docker HOST` prints it

    def docker(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "DOCKER_HOST": self.hosts[host]})
        assert not check or r.returncode == 0, f"docker {' '.join(args)} on {host}: {r.stderr}"
        return r

    def in_container(self, host: str, container: str, code: str, *args: str) -> subprocess.CompletedProcess:
        """Python (with dnspython) in a container's network namespace, as a client inside it would ask."""
        pid = self.docker(host, "inspect", "-f", "{{.State.Pid}}", container).stdout.strip()
        return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", code, *args],
                              capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def quick() -> Iterator[Quick]:
    with docker_lab("--docker") as (name, hosts):
        yield Quick(name, hosts)


def test_a_network_made_once_with_the_docker_cli_carries_containers_on_two_hosts_that_ping_by_name(
        quick: Quick) -> None:
    net = unique("qs")
    quick.docker("h1", "network", "create", "-d", "tether", "--ipam-driver", "tether", "--subnet", SUBNET, net)
    wait_for(lambda: net in quick.docker("h2", "network", "ls", "--format", "{{.Name}}").stdout.split(), 30,
             "the network made on h1 to appear in h2's dockerd")
    quick.docker("h1", "run", "-d", "--name", "qa", "--network", net, IMAGE, "sleep", "100000")
    quick.docker("h2", "run", "-d", "--name", "qb", "--network", net, IMAGE, "sleep", "100000")
    for host, me, other in (("h1", "qa", "qb"), ("h2", "qb", "qa")):  # no --dns: the lab's dockerd has it
        wait_for(lambda h=host, m=me, o=other: quick.docker(h, "exec", m, "ping", "-c", "1", "-W", "1", o,
                                                            check=False).returncode == 0,
                 30, f"{me} on {host} to ping {other} by name")


ASK = """import sys, dns.flags, dns.message, dns.query
proto, server, name = sys.argv[1:4]
r = getattr(dns.query, proto)(dns.message.make_query(name, "A"), server, timeout=5)
print("TC" if r.flags & dns.flags.TC else "whole", " ".join(sorted(rd.to_text() for rr in r.answer for rd in rr)))
"""


def test_names_resolve_over_tcp_through_dockers_embedded_resolver(quick: Quick) -> None:
    # qb is on h2: h1's embedded resolver does not know it and forwards the query, over TCP for a TCP
    # query, from qa's address, to the agent's DNS, which answers the bare name in qa's network
    ip_qb = quick.docker("h2", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                         "qb").stdout.strip()
    r = quick.in_container("h1", "qa", ASK, "tcp", "127.0.0.11", "qb")
    assert r.stdout.split() == ["whole", ip_qb], r.stderr
    # 40 addresses (a headless service) do not fit a 512-byte UDP answer: truncated over UDP, whole over TCP
    big = unique("big")
    Lab(quick.name).client().apply(Service(name=big, headless=True,
                                           backends=[ServiceBackend(ip=f"10.89.0.{i}") for i in range(100, 140)]))
    fqdn = f"{big}.default.svc.tether.local"
    wait_for(lambda: quick.in_container("h1", "qa", ASK, "tcp", "127.0.0.11", fqdn).stdout.startswith("whole 10."),
             20, f"{fqdn} to resolve")
    udp = quick.in_container("h1", "qa", ASK, "udp", "127.0.0.11", fqdn)
    assert udp.stdout.split() == ["TC"], udp.stderr
    tcp = quick.in_container("h1", "qa", ASK, "tcp", "127.0.0.11", fqdn).stdout.split()
    assert tcp[0] == "whole" and len(tcp) == 41


def test_lab_down_leaves_nothing_behind(quick: Quick) -> None:
    lab_dir = os.path.join(LAB_ROOT, quick.name)
    pids = [int((Path(lab_dir) / "dockerd" / h / "pids").read_text().split()[0]) for h in ("h1", "h2")]
    procs = [p for p in os.listdir("/proc") if p.isdigit()]
    ours = []
    for p in procs:  # containerd and the shims name the lab's directory on their command line
        try:
            if lab_dir.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                ours.append(int(p))
        except OSError:
            pass
    assert all(alive(p) for p in pids) and len(ours) >= 4  # 2 containerd, 2 shims at least
    tether("lab", "down", "--lab", quick.name)
    assert not [p for p in pids + ours if alive(p)]
    assert not lab_namespaces(quick.name)
    assert not os.path.exists(lab_dir)
    assert lab_dir not in Path("/proc/self/mountinfo").read_text()
    assert os.path.exists(os.path.join(LOG_ROOT, quick.name, "dockerd", "h1", "dockerd.log"))
