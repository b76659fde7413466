"""Octavia load balancers with the real `openstack loadbalancer` CLI and real packets: a VM port on
h1 (a namespace plugged by its agent as os-vif would) and a CNI pod on h2 are members of one pool
behind one VIP; a pod on h3 connecting to the VIP reaches both, and once a member is deleted, it
reaches only the other. The VM port as a client reaches both members too (itself by hairpin)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fixtures.lab import unique
from tests.fixtures.openstack import OpenStack
from tether.lab.cluster import Lab, PodInfo, nsx, sh, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.client]
CIDR = "10.74.0.0/24"
PORT = 8080


def answer(ns: str, word: str) -> subprocess.Popen:
    """A TCP server in `ns` on PORT that sends `word` to every client."""
    code = ("import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('0.0.0.0', {PORT})); s.listen(64)\n"
            f"while True:\n c = s.accept()[0]; c.sendall(b'{word}'); c.close()")
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ask(ns: str, ip: str, times: int) -> Counter[str]:
    """Open `times` connections from `ns` to ip:80 and count what they answered ('-' for a failure)."""
    code = ("import socket, sys\nfor _ in range(int(sys.argv[2])):\n"
            " try:\n  c = socket.create_connection((sys.argv[1], 80), 1)\n"
            "  print(c.recv(16).decode() or '-'); c.close()\n"
            " except OSError:\n  print('-')")
    out = nsx(ns, sys.executable, "-c", code, ip, str(times), check=False).stdout
    return Counter(line.strip() for line in out.splitlines() if line.strip())


@dataclass
class Cloud:
    lab: Lab
    os: OpenStack
    subnet: str
    vm_ns: str
    vm_ip: str
    pod: PodInfo  # a member on h2
    client: PodInfo  # on h3


@pytest.fixture(scope="module")
def cloud(lab: Lab) -> Iterator[Cloud]:
    os_ = OpenStack(lab.server_url, lab.token)
    net, sub, sg = unique("lbn"), unique("lbs"), unique("lbg")
    os_.cli("network", "create", net)
    subnet = os_.cli("subnet", "create", "--network", net, "--subnet-range", CIDR, sub)
    os_.cli("security", "group", "create", sg)
    os_.cli("security", "group", "rule", "create", "--ingress", "--protocol", "tcp", "--dst-port", str(PORT), sg)
    vm = unique("lbv")
    vm_ns = f"{lab.name}-{vm}"  # lab-prefixed: `lab.down` removes it whatever happens
    servers: list[subprocess.Popen] = []
    sh("ip", "netns", "add", vm_ns)
    try:
        port = os_.cli("port", "create", "--network", net, "--fixed-ip", f"subnet={sub},ip-address=10.74.0.11",
                       "--host", "h1", "--device-owner", "compute:nova", "--device", vm, "--security-group", sg,
                       "--binding-profile", f"netns=/var/run/netns/{vm_ns}", vm)
        tap = "tap" + port["id"][:11]
        wait_for(lambda: nsx(lab.host("h1").ns, "ip", "link", "show", tap, check=False).returncode == 0, 20,
                 f"{tap} on h1")
        nsx(vm_ns, "ip", "link", "set", "lo", "up")
        servers.append(answer(vm_ns, "vm"))
        pod = lab.run_pod("h2", unique("lbp"), net)
        servers.append(answer(pod.ns, "pod"))
        client = lab.run_pod("h3", unique("lbc"), net)
        yield Cloud(lab, os_, subnet["id"], vm_ns, "10.74.0.11", pod, client)
    finally:
        for s in servers:
            s.kill()
            s.wait()
        sh("ip", "netns", "del", vm_ns, check=False)


def test_a_vm_port_and_a_pod_in_one_pool_both_answer_the_vip_until_one_is_removed(cloud: Cloud) -> None:
    os_ = cloud.os
    lb_name, pool_name = unique("lb"), unique("pool")
    lb = os_.cli("loadbalancer", "create", "--name", lb_name, "--vip-subnet-id", cloud.subnet)
    try:
        assert lb["provisioning_status"] == "ACTIVE" and lb["vip_address"].startswith("10.74.0.")
        listener = os_.cli("loadbalancer", "listener", "create", "--protocol", "TCP", "--protocol-port", "80",
                           "--name", unique("l"), lb_name)
        os_.cli("loadbalancer", "pool", "create", "--lb-algorithm", "ROUND_ROBIN", "--listener", listener["id"],
                "--protocol", "TCP", "--name", pool_name)
        vm = os_.cli("loadbalancer", "member", "create", "--subnet-id", cloud.subnet, "--address", cloud.vm_ip,
                     "--protocol-port", str(PORT), pool_name)
        pod = os_.cli("loadbalancer", "member", "create", "--subnet-id", cloud.subnet, "--address", cloud.pod.ip,
                      "--protocol-port", str(PORT), pool_name)
        assert {m["address"] for m in os_.cli("loadbalancer", "member", "list", pool_name)} == {cloud.vm_ip,
                                                                                              cloud.pod.ip}
        vip = lb["vip_address"]
        deadline, seen = time.monotonic() + 20, Counter[str]()
        while time.monotonic() < deadline and not (seen["vm"] and seen["pod"]):
            seen += ask(cloud.client.ns, vip, 20)
        assert seen["vm"] and seen["pod"], f"the VIP {vip} did not reach both members: {dict(seen)}"
        answers = ask(cloud.client.ns, vip, 40)
        assert set(answers) == {"vm", "pod"}, f"connections failed or went astray: {dict(answers)}"
        from_vm = ask(cloud.vm_ns, vip, 30)  # a VM as the client, reaching the pod and (hairpin) itself
        assert set(from_vm) == {"vm", "pod"}, f"from the VM port: {dict(from_vm)}"

        os_.run("loadbalancer", "member", "delete", pool_name, pod["id"])
        wait_for(lambda: set(ask(cloud.client.ns, vip, 10)) == {"vm"}, 15, "the VIP to stop sending to the pod")
        answers = ask(cloud.client.ns, vip, 30)
        assert answers == Counter({"vm": 30}), f"after the pod's member was deleted: {dict(answers)}"
        assert vm["operating_status"] == "NO_MONITOR"
    finally:
        os_.run("loadbalancer", "delete", "--cascade", lb_name)
    assert lb_name not in {x["name"] for x in os_.cli("loadbalancer", "list")}
    assert ask(cloud.client.ns, lb["vip_address"], 3)["vm"] == 0, "the VIP still answers after cascade delete"
