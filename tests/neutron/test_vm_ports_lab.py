"""VM ports in the lab: a "VM" (a namespace standing for it) gets its port through the `openstack` CLI,
host h1's agent plugs it as os-vif would (`tap<11 chars of the port id>`), and it talks to a CNI pod on
h2; a security group made with the CLI restricts it; nested containers inside the VM (macvlan
children of its interface, Kuryr's nested mode) reach a pod on another host and are isolated from
each other by a NetworkPolicy."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fixtures.lab import unique
from tests.fixtures.openstack import OpenStack
from tether.lab.cluster import Lab, PodInfo, nsx, sh, wait_for
from tether.model import Namespace, NetworkPolicy
from tether.nested import add_nested

pytestmark = [pytest.mark.lab, pytest.mark.client]

@dataclass
class Vm:
    ns: str
    port: dict
    tap: str
    net: str
    pod: PodInfo  # a CNI pod on h2, same network

    @property
    def ip(self) -> str:
        return self.port["fixed_ips"][0]["ip_address"]


def ping(ns: str, ip: str) -> bool:
    return nsx(ns, "ping", "-c", "1", "-W", "1", ip, check=False).returncode == 0


def reaches(ns: str, ip: str, within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while not ping(ns, ip):
        if time.monotonic() > deadline:
            return False
    return True


def blocked(ns: str, ip: str, within: float = 15) -> bool:
    """True once `ip` stops answering (policy reaches the kernel a moment after the API write)."""
    deadline = time.monotonic() + within
    while ping(ns, ip):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return not ping(ns, ip)


def tcp_connects(ns: str, ip: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(('{ip}', {port}), 2).close()"
    return nsx(ns, sys.executable, "-c", code, check=False).returncode == 0


@pytest.fixture(scope="module")
def cloud(lab: Lab) -> OpenStack:
    return OpenStack(lab.server_url, lab.token)


@pytest.fixture(scope="module")
def vm(lab: Lab, cloud: OpenStack) -> Iterator[Vm]:
    net, sub, port_name = unique("vmn"), unique("vms"), unique("vm")
    cloud.cli("network", "create", net)
    cloud.cli("subnet", "create", "--network", net, "--subnet-range", "10.71.0.0/24", sub)
    ns = f"{lab.name}-{port_name}"  # lab-prefixed: `lab.down` removes it whatever happens
    sh("ip", "netns", "add", ns)
    # port security off: open to the pod (with it, the port would be in `default`, which the pod is not in;
    # tests/neutron/test_security_groups_lab.py covers that)
    port = cloud.cli("port", "create", "--network", net, "--fixed-ip", f"subnet={sub},ip-address=10.71.0.10",
                     "--host", "h1", "--device-owner", "compute:nova", "--device", port_name,
                     "--binding-profile", f"netns=/var/run/netns/{ns}", "--disable-port-security", port_name)
    tap = "tap" + port["id"][:11]
    h1 = lab.host("h1").ns
    wait_for(lambda: nsx(h1, "ip", "link", "show", tap, check=False).returncode == 0, 20, f"{tap} on h1")
    pod = lab.run_pod("h2", unique("p"), net)
    try:
        yield Vm(ns, port, tap, net, pod)
    finally:
        sh("ip", "netns", "del", ns, check=False)


def test_vm_port_from_the_cli_is_plugged_on_its_host_and_talks_to_a_pod(lab: Lab, vm: Vm, cloud: OpenStack) -> None:
    assert vm.port["binding_host_id"] == "h1" and vm.port["binding_profile"] == {"netns": f"/var/run/netns/{vm.ns}"}
    addr = nsx(vm.ns, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert "10.71.0.10/32" in addr
    mac = nsx(vm.ns, "cat", "/sys/class/net/eth0/address").stdout.strip()
    assert mac == vm.port["mac_address"]
    route = nsx(lab.host("h1").ns, "ip", "route", "show", "10.71.0.10").stdout
    assert f"dev {vm.tap}" in route
    assert reaches(vm.ns, vm.pod.ip), "the VM cannot reach the pod on h2"
    assert lab.reaches(f"{vm.pod.host}/{vm.pod.name}", vm.ip), "the pod on h2 cannot reach the VM"
    wait_for(lambda: cloud.sdk().network.get_port(vm.port["id"]).status == "ACTIVE", 10, "the port to be ACTIVE")


def resolve(ns: str, name: str, server: str = "169.254.20.10") -> list[str]:
    code = ("import dns.resolver, sys; r = dns.resolver.Resolver(configure=False); r.nameservers = [sys.argv[2]]; "
            "r.lifetime = 2; print(' '.join(a.address for a in r.resolve(sys.argv[1], 'A')))")
    out = nsx(ns, sys.executable, "-c", code, name, server, check=False)
    return out.stdout.split() if out.returncode == 0 else []


def test_vm_resolves_pods_and_pods_resolve_the_vm_through_the_agents_dns(lab: Lab, vm: Vm) -> None:
    pod_name = f"{vm.pod.name}.{vm.net}.tether.local"
    vm_name = f"{vm.port['name']}.{vm.net}.tether.local"
    wait_for(lambda: resolve(vm.ns, pod_name) == [vm.pod.ip], 10, f"the VM to resolve {pod_name}")
    wait_for(lambda: resolve(vm.pod.ns, vm_name) == [vm.ip], 10, f"the pod to resolve {vm_name}")


def test_security_group_made_with_the_cli_restricts_the_vm(lab: Lab, vm: Vm, cloud: OpenStack) -> None:
    other = lab.run_pod("h3", unique("p"), vm.net)
    listener = subprocess.Popen(
        ["ip", "netns", "exec", vm.ns, sys.executable, "-c",
         "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
         "s.bind(('0.0.0.0', 22)); s.listen(16)\nwhile True: s.accept()[0].close()"])
    sg = unique("sg")
    try:
        wait_for(lambda: tcp_connects(vm.pod.ns, vm.ip, 22), 10, "the VM's TCP 22 listener")
        assert reaches(vm.pod.ns, vm.ip) and tcp_connects(other.ns, vm.ip, 22)
        cloud.cli("security", "group", "create", sg)
        cloud.cli("security", "group", "rule", "create", "--protocol", "tcp", "--dst-port", "22",
                  "--remote-ip", f"{vm.pod.ip}/32", sg)
        cloud.run("port", "set", "--security-group", sg, vm.port["id"])  # turns port security on

        assert blocked(vm.pod.ns, vm.ip), "ping is not in the group's rules but still reaches the VM"
        assert tcp_connects(vm.pod.ns, vm.ip, 22), "TCP 22 from the allowed prefix is refused"
        assert not tcp_connects(other.ns, vm.ip, 22), "TCP 22 from outside the allowed prefix gets through"
        assert reaches(vm.ns, vm.pod.ip), "the group's default egress rules should let the VM out"
    finally:
        listener.kill()
        listener.wait()
        conn = cloud.sdk()  # without groups a port with port security passes nothing: turn it off again
        conn.network.update_port(vm.port["id"], security_group_ids=[], port_security_enabled=False)
        found = conn.network.find_security_group(sg)
        if found is not None:
            conn.network.delete_security_group(found)
    assert reaches(vm.pod.ns, vm.ip), "removing the group and port security did not restore access"


@pytest.fixture(scope="module")
def nested(lab: Lab, vm: Vm) -> tuple[str, list]:
    c = lab.client()
    kns = unique("nest")
    c.apply(Namespace(name=kns, labels={"kubernetes.io/metadata.name": kns}))
    out = []
    for name in ("c1", "c2"):
        netns = f"{vm.ns}-{name}"
        sh("ip", "netns", "add", netns)
        ep = add_nested(c, vm_port_id=vm.port["id"], name=unique(name), vm_netns=vm.ns, netns=netns,
                        namespace=kns, labels={"app": "nested", "name": name})
        out.append((netns, ep))
    return kns, out


def test_nested_containers_get_macvlans_address_pairs_and_reach_a_pod_on_another_host(
        lab: Lab, vm: Vm, nested, cloud: OpenStack) -> None:
    _, containers = nested
    port = cloud.sdk().network.get_port(vm.port["id"])
    pairs = {p["ip_address"] for p in port.allowed_address_pairs}
    assert pairs == {ep.ips[0] for _, ep in containers}
    for netns, ep in containers:
        link = nsx(netns, "ip", "-d", "link", "show", "eth0").stdout
        assert "macvlan" in link and ep.mac in link
        assert ep.parent == vm.port["id"] and ep.host == "h1"
        assert reaches(netns, vm.pod.ip), f"nested {ep.name} cannot reach the pod on h2"
        assert lab.reaches(f"{vm.pod.host}/{vm.pod.name}", ep.ips[0]), f"the pod cannot reach nested {ep.name}"
    (ns1, ep1), (ns2, ep2) = containers
    assert reaches(ns1, ep2.ips[0]) and reaches(ns2, ep1.ips[0]), "nested siblings do not reach each other"


def test_network_policy_isolates_nested_containers_from_each_other(lab: Lab, vm: Vm, nested) -> None:
    kns, containers = nested
    (ns1, ep1), (ns2, ep2) = containers
    lab.client().apply(NetworkPolicy(name="only-the-pod", namespace=kns, spec={
        "podSelector": {"matchLabels": {"app": "nested"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"ipBlock": {"cidr": f"{vm.pod.ip}/32"}}]}]}))
    assert blocked(ns1, ep2.ips[0]) and blocked(ns2, ep1.ips[0]), "nested siblings still reach each other"
    assert reaches(ns1, vm.pod.ip) and reaches(ns2, vm.pod.ip), "egress to the pod should stay open"
    assert lab.reaches(f"{vm.pod.host}/{vm.pod.name}", ep1.ips[0]), "the allowed pod cannot reach nested c1"
    assert reaches(vm.ns, vm.pod.ip), "the VM itself is not selected by the policy and keeps its access"


def test_a_disabled_port_passes_no_traffic_until_enabled_again(lab: Lab, vm: Vm, cloud: OpenStack) -> None:
    assert reaches(vm.ns, vm.pod.ip) and reaches(vm.pod.ns, vm.ip)
    cloud.run("port", "set", "--disable", vm.port["id"])
    try:
        assert blocked(vm.ns, vm.pod.ip), "the disabled port still reaches the pod"
        assert blocked(vm.pod.ns, vm.ip), "the pod still gets answers from the disabled port"
        assert not tcp_connects(vm.pod.ns, vm.ip, 22)
        # nothing reaches it either: a datagram from the pod is dropped before the port, not just its answer
        assert sources_seen(vm.ns, vm.pod.ns, [vm.pod.ip], vm.ip) == set(), "a datagram reached the disabled port"
        assert cloud.sdk().network.get_port(vm.port["id"]).status == "DOWN"
    finally:
        cloud.run("port", "set", "--enable", vm.port["id"])
    assert reaches(vm.ns, vm.pod.ip) and reaches(vm.pod.ns, vm.ip), "enabling the port did not restore traffic"
    assert sources_seen(vm.ns, vm.pod.ns, [vm.pod.ip], vm.ip) == {vm.pod.ip}


UDP_SINK = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 5599))\n"
            "s.settimeout(float(sys.argv[1]))\nseen = set()\ntry:\n    while True: seen.add(s.recvfrom(100)[1][0])\n"
            "except OSError: pass\nprint(' '.join(sorted(seen)))")


def sources_seen(receiver_ns: str, sender_ns: str, sources: list[str], dst: str) -> set[str]:
    """The source addresses of UDP datagrams from `sources` (bound in `sender_ns`) that reach `dst`."""
    sink = subprocess.Popen(["ip", "netns", "exec", receiver_ns, sys.executable, "-c", UDP_SINK, "4"],
                            stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        code = ("import socket, sys, time\nfor _ in range(10):\n    for src in sys.argv[2:]:\n"
                "        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((src, 0))\n"
                "        s.sendto(b'x', (sys.argv[1], 5599)); s.close()\n    time.sleep(0.1)")
        nsx(sender_ns, sys.executable, "-c", code, dst, *sources)
        out, _ = sink.communicate(timeout=15)
    finally:
        sink.kill()
        sink.wait()
    return set(out.split())


def test_port_security_off_means_no_anti_spoofing_and_on_checks_sources_again(
        lab: Lab, vm: Vm, cloud: OpenStack) -> None:
    """As in Neutron: with port security off the port may send from any address; with it on (a group
    that allows everything), only from its own."""
    spoofed = "10.71.0.99"  # allocated to nobody
    nsx(vm.ns, "ip", "addr", "add", f"{spoofed}/32", "dev", "eth0")
    sg = unique("open")
    try:
        seen = sources_seen(vm.pod.ns, vm.ns, [vm.ip, spoofed], vm.pod.ip)
        assert seen == {vm.ip, spoofed}, f"with port security off the pod should see both sources, saw {seen}"
        cloud.cli("security", "group", "create", sg)
        cloud.cli("security", "group", "rule", "create", "--ingress", "--remote-ip", "0.0.0.0/0", sg)
        cloud.run("port", "set", "--security-group", sg, vm.port["id"])  # turns port security on
        wait_for(lambda: sources_seen(vm.pod.ns, vm.ns, [vm.ip, spoofed], vm.pod.ip) == {vm.ip}, 20,
                 "only the port's own source to reach the pod with port security on")
    finally:
        nsx(vm.ns, "ip", "addr", "del", f"{spoofed}/32", "dev", "eth0", check=False)
        conn = cloud.sdk()
        conn.network.update_port(vm.port["id"], security_group_ids=[], port_security_enabled=False)
        found = conn.network.find_security_group(sg)
        if found is not None:
            conn.network.delete_security_group(found)


def test_a_second_fixed_ip_added_with_the_cli_is_reachable_and_gone_once_removed(
        lab: Lab, vm: Vm, cloud: OpenStack) -> None:
    second = "10.71.0.11"
    subnet = vm.port["fixed_ips"][0]["subnet_id"]
    nsx(vm.ns, "ip", "addr", "add", f"{second}/32", "dev", "eth0")  # as the VM's own configuration would
    try:
        assert not reaches(vm.pod.ns, second, within=2), "an address the port does not have is reachable"
        cloud.run("port", "set", "--fixed-ip", f"ip-address={second}", vm.port["id"])
        assert reaches(vm.pod.ns, second), "the pod cannot reach the port's second fixed IP"
        assert reaches(vm.pod.ns, vm.ip), "the first fixed IP stopped working"
        cloud.run("port", "unset", "--fixed-ip", f"subnet={subnet},ip-address={second}", vm.port["id"])
        assert blocked(vm.pod.ns, second), "a removed fixed IP is still reachable"
    finally:
        nsx(vm.ns, "ip", "addr", "del", f"{second}/32", "dev", "eth0", check=False)
