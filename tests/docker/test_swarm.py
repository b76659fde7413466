"""Docker Swarm over Tether, as a Swarm user types it: `tether lab up --swarm` makes a swarm of two
lab dockerds with the tether-swarm managed plugin; a swarm-scoped network made once on the manager
carries a service's tasks on both hosts, which reach each other (by the service name, dnsrr);
scaling keeps Tether's endpoints and Swarm's addresses the same; removing the service and the
network leaves nothing in Tether, and `tether lab down` nothing on the machine."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docker.cli_lab import docker_lab, tether
from tests.fixtures.lab import unique
from tether.lab.cluster import LAB_ROOT, Lab, alive, lab_namespaces, wait_for
from tether.lab.dockerd import IMAGE
from tether.lab.swarm import DRIVER

pytestmark = [pytest.mark.lab, pytest.mark.client]

SUBNET = "10.79.0.0/24"
FORWARDER = b"UNIX-CONNECT:/agent/tether.sock"  # the plugin's socat (its rootfs is dockerd's, not ours)



def pids_with(mark: bytes) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if mark in Path(f"/proc/{p}/cmdline").read_bytes():
                    out.append(int(p))
            except OSError:
                pass
    return out


@dataclass
class Swarm:
    name: str
    hosts: dict[str, str]  # lab host -> DOCKER_HOST

    @property
    def lab(self) -> Lab:
        return Lab(self.name)

    def docker(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "DOCKER_HOST": self.hosts[host]})
        assert not check or r.returncode == 0, f"docker {' '.join(args)} on {host}: {r.stderr}"
        return r

    def tasks(self, service: str) -> dict[str, list[tuple[str, str]]]:
        """Running task containers per host: (container name, address on the network)."""
        out: dict[str, list[tuple[str, str]]] = {}
        for h in self.hosts:
            label = f"label=com.docker.swarm.service.name={service}"
            ids = self.docker(h, "ps", "-q", "--filter", label).stdout.split()
            out[h] = []
            for cid in ids:
                fmt = "{{.Name}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
                name, ip = self.docker(h, "inspect", "-f", fmt, cid).stdout.split()
                out[h].append((name.lstrip("/"), ip))
        return out

    def endpoints(self, network: str) -> dict[str, list[str]]:
        """Tether's endpoints of a network per host: their addresses."""
        out: dict[str, list[str]] = {}
        for ep in self.lab.client().list("Endpoint", network=network):
            out.setdefault(ep.host, []).extend(ep.ips)
        return {h: sorted(v) for h, v in out.items()}


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    with docker_lab("--swarm") as (name, hosts):
        yield Swarm(name, hosts)


def test_service_tasks_on_two_hosts_reach_each_other_by_service_name(swarm: Swarm) -> None:
    net, svc = unique("sw"), unique("web")
    swarm.docker("h1", "network", "create", "-d", DRIVER, "--scope", "swarm", "--attachable", "--subnet", SUBNET, net)
    swarm.docker("h1", "service", "create", "--detach", "--no-resolve-image", "--name", svc, "--network", net,
                 "--replicas", "2", "--endpoint-mode", "dnsrr", IMAGE, "httpd", "-f", "-p", "80", "-h", "/www")
    wait_for(lambda: all(len(t) == 1 for t in swarm.tasks(svc).values()), 90, "one task of the service on each host")
    tasks = swarm.tasks(svc)
    (a, ip_a), (b, ip_b) = tasks["h1"][0], tasks["h2"][0]
    tnet = swarm.lab.client().get("Network", net)
    assert tnet.labels == {"tether.io/created-by": "docker", "tether.io/docker-scope": "swarm"}
    assert [s.cidr for s in tnet.subnets] == [SUBNET]
    wait_for(lambda: swarm.endpoints(net) == {"h1": [ip_a], "h2": [ip_b]}, 30, "a Tether endpoint per task")
    # the service's name answers both tasks (Swarm's resolver, dnsrr) and each reaches the other
    wait_for(lambda: {ip_a, ip_b} <= set(swarm.docker("h1", "exec", a, "nslookup", svc, check=False).stdout.split()),
             60, f"{svc} to resolve to both tasks")
    for host, me, other in (("h1", a, ip_b), ("h2", b, ip_a)):
        wait_for(lambda h=host, m=me, o=other: "hello from docker" in swarm.docker(
            h, "exec", m, "wget", "-qO-", f"http://{o}/", check=False).stdout, 30,
            f"{me} on {host} to fetch from {other}")
    r = swarm.docker("h2", "exec", b, "wget", "-qO-", f"http://{svc}/", check=False)
    assert "hello from docker" in r.stdout, r.stderr


def test_scaling_and_task_restarts_keep_tethers_endpoints_and_swarms_addresses_the_same(swarm: Swarm) -> None:
    net = next(n.name for n in swarm.lab.client().list("Network") if n.labels.get("tether.io/docker-scope"))
    svc = next(s for s in swarm.docker("h1", "service", "ls", "--format", "{{.Name}}").stdout.split())
    for replicas in (4, 1):
        swarm.docker("h1", "service", "scale", "--detach", f"{svc}={replicas}")

        def same(replicas: int = replicas) -> bool:
            tasks = swarm.tasks(svc)
            if sum(len(t) for t in tasks.values()) != replicas:
                return False
            want = {h: sorted(ip for _, ip in t) for h, t in tasks.items() if t}
            return swarm.endpoints(net) == want
        wait_for(same, 90, f"{replicas} tasks, each with its Tether endpoint on its host")
    # a task that dies is replaced by a new one (a new address, maybe on the other host): the same again
    host, (old, old_ip) = next((h, t[0]) for h, t in swarm.tasks(svc).items() if t)
    swarm.docker(host, "kill", old)
    wait_for(lambda: (all(name != old for t in swarm.tasks(svc).values() for name, _ in t)
                      and sum(len(t) for t in swarm.tasks(svc).values()) == 1 and same(1)),
             90, "the killed task's replacement, with its Tether endpoint, and the old one's gone")
    assert old_ip not in [ip for ips in swarm.endpoints(net).values() for ip in ips] or \
        any(ip == old_ip for t in swarm.tasks(svc).values() for _, ip in t)


def test_service_and_network_rm_leave_nothing_in_tether(swarm: Swarm) -> None:
    net = next(n.name for n in swarm.lab.client().list("Network") if n.labels.get("tether.io/docker-scope"))
    for svc in swarm.docker("h1", "service", "ls", "--format", "{{.Name}}").stdout.split():
        swarm.docker("h1", "service", "rm", svc)
    wait_for(lambda: not swarm.endpoints(net), 60, "the tasks' endpoints to go")
    swarm.docker("h1", "network", "rm", net)
    wait_for(lambda: net not in [n.name for n in swarm.lab.client().list("Network")], 60,
             "the Tether network to go with the Swarm network")


def test_the_local_driver_is_refused_for_swarm_networks_with_dockers_reason(swarm: Swarm) -> None:
    r = swarm.docker("h1", "network", "create", "-d", "tether", "--scope", "swarm", "--subnet", "10.79.1.0/24",
                     unique("legacy"), check=False)
    assert r.returncode != 0 and "legacy plugin tether" in r.stderr and "not supported in swarm mode" in r.stderr


def test_lab_down_stops_the_plugins_and_leaves_nothing(swarm: Swarm) -> None:
    lab_dir = os.path.join(LAB_ROOT, swarm.name)
    ours = pids_with(lab_dir.encode()) + pids_with(FORWARDER)
    assert len(pids_with(FORWARDER)) >= 2  # one plugin forwarder per dockerd
    tether("lab", "down", "--lab", swarm.name)
    assert not [p for p in ours if alive(p)]
    assert not lab_namespaces(swarm.name) and not os.path.exists(lab_dir)
