"""Neutron's security-group semantics with real packets and the real `openstack` CLI: VM ports on h1
and h2 (namespaces standing for the VMs, plugged by their agents as os-vif would) and a CNI pod on
h3, all on one network.

- Ports created without groups are in their project's `default` group: members reach each other,
  a non-member (the pod) reaches neither, and the members reach out (all egress, replies pass); a
  container that names `default` in its CNI configuration is a member like a port.
- `port set --no-security-group` leaves the port with port security and no group: nothing in,
  nothing out.
- Deleting a rule ends the established connection it allowed within a second (its conntrack entry
  is marked denied on the port's host and both directions are dropped), while a stream allowed by
  another rule of the same group carries on without a gap.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fixtures.lab import unique
from tests.fixtures.openstack import OpenStack
from tether.calc.names import CT_DENIED
from tether.lab.cluster import Lab, PodInfo, nsx, sh, wait_for
from tether.model import default_group_id

pytestmark = [pytest.mark.lab, pytest.mark.client]
STREAM = os.path.join(os.path.dirname(__file__), "..", "lab", "tcp_stream.py")
LISTENER = ("import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('0.0.0.0', 80)); s.listen(16)\nwhile True: s.accept()[0].close()")
CIDR = "10.73.0.0/24"


@dataclass
class Vm:
    ns: str
    port: dict
    ip: str
    listener: subprocess.Popen


@dataclass
class Cloud:
    lab: Lab
    os: OpenStack
    net: str
    v1: Vm  # on h1
    v2: Vm  # on h2
    pod: PodInfo  # a CNI pod on h3: no group, not a member of `default`


def ping(ns: str, ip: str) -> bool:
    return nsx(ns, "ping", "-c", "1", "-W", "1", ip, check=False).returncode == 0


def tcp(ns: str, ip: str, port: int = 80) -> bool:
    code = f"import socket; socket.create_connection(('{ip}', {port}), 1).close()"
    return nsx(ns, sys.executable, "-c", code, check=False).returncode == 0


def eventually(probe, want: bool, within: float = 15) -> bool:
    """True once `probe()` gives `want` (a write reaches the kernel a moment after the API answers)."""
    deadline = time.monotonic() + within
    while probe() != want:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def vm_port(lab: Lab, cloud: OpenStack, host: str, net: str, sub: str, ip: str, *extra: str) -> Vm:
    name = unique("sv")
    ns = f"{lab.name}-{name}"  # lab-prefixed: `lab.down` removes it whatever happens
    sh("ip", "netns", "add", ns)
    port = cloud.cli("port", "create", "--network", net, "--fixed-ip", f"subnet={sub},ip-address={ip}",
                     "--host", host, "--device-owner", "compute:nova", "--device", name,
                     "--binding-profile", f"netns=/var/run/netns/{ns}", *extra, name)
    tap = "tap" + port["id"][:11]
    wait_for(lambda: nsx(lab.host(host).ns, "ip", "link", "show", tap, check=False).returncode == 0, 20,
             f"{tap} on {host}")
    nsx(ns, "ip", "link", "set", "lo", "up")
    listener = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Vm(ns, port, ip, listener)


@pytest.fixture(scope="module")
def cloud(lab: Lab) -> Iterator[Cloud]:
    os_ = OpenStack(lab.server_url, lab.token)
    net, sub = unique("sgn"), unique("sgs")
    os_.cli("network", "create", net)
    os_.cli("subnet", "create", "--network", net, "--subnet-range", CIDR, sub)
    vms: list[Vm] = []
    try:
        vms.append(vm_port(lab, os_, "h1", net, sub, "10.73.0.11"))
        vms.append(vm_port(lab, os_, "h2", net, sub, "10.73.0.12"))
        pod = lab.run_pod("h3", unique("p"), net)
        yield Cloud(lab, os_, net, vms[0], vms[1], pod)
    finally:
        for vm in vms:
            vm.listener.kill()
            vm.listener.wait()
            sh("ip", "netns", "del", vm.ns, check=False)


def test_new_port_without_groups_accepts_traffic_only_from_other_members_of_default(cloud: Cloud) -> None:
    v1, v2, pod = cloud.v1, cloud.v2, cloud.pod
    default = default_group_id(None)  # the CLI's ports belong to no project here (no Keystone)
    assert v1.port["security_group_ids"] == [default] == v2.port["security_group_ids"]
    listed = cloud.os.cli("security", "group", "list")
    assert [g["ID"] for g in listed if g["Name"] == "default" and not g["Project"]] == [default]
    assert eventually(lambda: ping(v1.ns, v2.ip), True) and ping(v2.ns, v1.ip), "members of default do not meet"
    assert eventually(lambda: tcp(v1.ns, v2.ip), True) and tcp(v2.ns, v1.ip), "TCP between members is refused"
    assert not ping(pod.ns, v1.ip) and not ping(pod.ns, v2.ip), "a non-member pings a member of default"
    assert not tcp(pod.ns, v1.ip) and not tcp(pod.ns, v2.ip), "a non-member opens TCP to a member of default"
    assert ping(v1.ns, pod.ip) and ping(v2.ns, pod.ip), "default's egress rules should let members out"


def test_container_naming_default_is_a_member_like_a_port(cloud: Cloud) -> None:
    v1, pod = cloud.v1, cloud.pod
    member = cloud.lab.run_pod("h3", unique("m"), cloud.net, security_groups=["default"])
    try:
        assert eventually(lambda: ping(member.ns, v1.ip), True), "the container in default cannot reach a member"
        assert eventually(lambda: ping(v1.ns, member.ip), True), "a member of default cannot reach the container"
        assert not ping(pod.ns, member.ip), "a container outside default reaches one inside"
    finally:
        cloud.lab.rm_pod(f"h3/{member.name}")


def test_port_set_no_security_group_blocks_everything(cloud: Cloud) -> None:
    v1, v2, pod = cloud.v1, cloud.v2, cloud.pod
    assert eventually(lambda: ping(v1.ns, v2.ip), True)
    cloud.os.run("port", "set", "--no-security-group", v2.port["id"])
    try:
        assert cloud.os.cli("port", "show", v2.port["id"])["port_security_enabled"] is True
        assert eventually(lambda: ping(v1.ns, v2.ip), False), "a member still pings the port without groups"
        assert not tcp(v1.ns, v2.ip) and not tcp(pod.ns, v2.ip), "TCP still reaches the port without groups"
        assert not ping(pod.ns, v2.ip), "the pod pings the port without groups"
        assert not ping(v2.ns, v1.ip) and not ping(v2.ns, pod.ip), "the port without groups still gets out"
        assert not tcp(v2.ns, v1.ip) and not tcp(v2.ns, pod.ip), "the port without groups still opens TCP"
    finally:
        cloud.os.run("port", "set", "--security-group", default_group_id(None), v2.port["id"])
    assert eventually(lambda: ping(v1.ns, v2.ip), True), "back in default, the port is not reachable again"


@dataclass
class Flow:
    """A one-way TCP stream (tests/lab/tcp_stream.py) whose receiving end never sends a byte."""

    client: str  # namespace that connects
    server: str  # namespace that listens
    ip: str  # the server's address
    port: int
    server_pushes: bool  # True: the server writes to a silent client; False: the client writes


@dataclass
class Run:
    before: float  # when the change began
    after: float  # when the API had answered it
    end: float  # when the streams were due to end
    reports: list[dict]  # each flow's reader: lines, the time of the last one, gaps over 0.1 s
    marks: dict[int, list[int]]  # port -> ct marks of its entries on the server's host, after the change


def _py(ns: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, STREAM, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def ct_marks(host_ns: str, port: int) -> list[int]:
    out = nsx(host_ns, "conntrack", "-L", "-p", "tcp", "--orig-port-dst", str(port), check=False).stdout
    return [int(m) for m in re.findall(r"mark=(\d+)", out)]


def across(cloud: Cloud, flows: list[Flow], change, server_host: str, run: float = 10.0) -> Run:
    """Start the flows, make the change 1.5 s later, and read what each reader saw."""
    servers: list[subprocess.Popen] = []
    clients: list[subprocess.Popen] = []
    try:
        for f in flows:
            servers.append(_py(f.server, "push-serve" if f.server_pushes else "pull-serve", str(f.port), str(run)))
        time.sleep(0.5)
        for f in flows:
            clients.append(_py(f.client, "pull" if f.server_pushes else "push", f.ip, str(f.port), str(run)))
        end = time.time() + run
        time.sleep(1.5)
        before = time.time()
        change()
        after = time.time()
        time.sleep(1.5)
        host = cloud.lab.host(server_host).ns
        marks = {f.port: ct_marks(host, f.port) for f in flows}
        reports = []
        for f, server, client in zip(flows, servers, clients, strict=True):
            text, _ = (client if f.server_pushes else server).communicate(timeout=run + 15)
            reports.append(json.loads(text.strip().splitlines()[-1]) if text.strip() else
                           {"lines": 0, "last": 0, "gaps": []})
        return Run(before, after, end, reports, marks)
    finally:
        for p in [*servers, *clients]:
            p.kill()
            p.wait()


def stopped(r: Run, i: int) -> None:
    """Flow i ran until the change and stopped within a second of it."""
    got = r.reports[i]
    assert got["lines"] > 50 and got["last"] > r.before, f"flow {i} never ran or stopped early: {got}"
    assert got["last"] < r.after + 1.0, f"flow {i} went on {got['last'] - r.after:.2f} s after the change"


def carried_on(r: Run, i: int) -> None:
    """Flow i ran to its end without a stall."""
    got = r.reports[i]
    assert got["last"] > r.end - 2.5, f"flow {i} stopped too: {got}"
    assert not [g for g in got["gaps"] if g[1] > 0.5], f"flow {i} stalled: {got['gaps']}"


def denied(marks: list[int]) -> bool:
    return bool(marks) and all(m & CT_DENIED for m in marks)


def test_deleting_a_rule_ends_the_stream_it_allowed_within_a_second_and_no_other(cloud: Cloud) -> None:
    v1, v2 = cloud.v1, cloud.v2
    sg = unique("svc")
    cloud.os.cli("security", "group", "create", sg)
    rules = {p: cloud.os.cli("security", "group", "rule", "create", "--protocol", "tcp", "--dst-port", str(p), sg)
             for p in (7101, 7102)}
    cloud.os.run("port", "set", "--no-security-group", "--security-group", sg, v2.port["id"])
    try:
        assert eventually(lambda: ping(v1.ns, v2.ip), False), "the group has no ICMP rule, yet v2 answers pings"
        # 7101: v2 pushes to a silent client (only v1's acknowledgements go towards v2); 7102: v1 pushes
        r = across(cloud, [Flow(v1.ns, v2.ns, v2.ip, 7101, True), Flow(v1.ns, v2.ns, v2.ip, 7102, False)],
                   lambda: cloud.os.run("security", "group", "rule", "delete", rules[7101]["id"]), "h2")
    finally:
        cloud.os.run("port", "set", "--no-security-group", "--security-group", default_group_id(None),
                     v2.port["id"])
    stopped(r, 0)
    carried_on(r, 1)
    assert denied(r.marks[7101]), f"7101's entry on h2 is not marked denied: {r.marks[7101]}"
    assert r.marks[7102] and not denied(r.marks[7102]), f"7102's entry on h2 is marked denied: {r.marks[7102]}"


def test_removing_a_ports_groups_ends_its_connections_and_no_others(cloud: Cloud) -> None:
    v1, v2, pod = cloud.v1, cloud.v2, cloud.pod
    assert eventually(lambda: tcp(v1.ns, v2.ip), True), "members of default do not meet"
    try:
        # v1 -> v2 (members of default) ends when v2 leaves its groups; v1 -> the pod (default's egress) does not,
        # though v2's leaving changes the member set h1 judges v1's connections with
        r = across(cloud, [Flow(v1.ns, v2.ns, v2.ip, 7201, False), Flow(v1.ns, pod.ns, pod.ip, 7202, True)],
                   lambda: cloud.os.run("port", "set", "--no-security-group", v2.port["id"]), "h2")
    finally:
        cloud.os.run("port", "set", "--security-group", default_group_id(None), v2.port["id"])
    stopped(r, 0)
    carried_on(r, 1)
    assert denied(r.marks[7201]), f"7201's entry on h2 is not marked denied: {r.marks[7201]}"
