"""A real VM on a Tether port: QEMU boots a tiny Linux (tests/fixtures/vm.py) on the tap that h1's agent
made for a port created with the `openstack` CLI (`binding:host_id` h1, no namespace: a real VM's
port), inside h1's namespace. The VM asks DHCP and gets from the host's dnsmasq its address, gateway,
the subnet's DNS servers, host routes (option 121) and MTU; it reaches a container on h2 by ping and
TCP and resolves its name; a security group on the port lets TCP 80 in from that container, refuses
ping and TCP 81 until a rule for 81 is added with the CLI; nothing on the underlay gets a DHCP answer;
a killed dnsmasq comes back and answers the VM again; a tap made before the port was bound is
adopted; through a router's external gateway and a floating IP, the lab's internet reaches the VM (once
its security group allows it) and sees the VM's requests come from the floating IP; the VM and a
container behind one Octavia load balancer both receive connections. One VM boot for the module (TCG:
~15 s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fixtures.lab import unique
from tests.fixtures.openstack import OpenStack
from tests.fixtures.vm import TinyVm
from tests.neutron.test_octavia_lab import ask
from tether.calc.names import VM_DHCP_SERVER, dhcp_dir
from tether.lab.cluster import INET_IP, Lab, PodInfo, nsx, sh, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.client]

CIDR, GATEWAY, VM_IP = "10.73.0.0/24", "10.73.0.1", "10.73.0.10"
DNS_SERVERS = ["169.254.20.10", "192.0.2.53"]  # the agent's (so names resolve) and one that is never asked
HOST_ROUTE = ("192.168.73.0/24", "10.73.0.254")
POD_PORT = 8080
LISTENER = ("import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('0.0.0.0', {POD_PORT})); s.listen(16)\n"
            "while True:\n    c = s.accept()[0]; c.sendall(b'pod\\n'); c.close()")


@dataclass
class Booted:
    vm: TinyVm
    lease: dict[str, str]
    port: dict
    net: str
    subnet: str
    sg: str
    pod: PodInfo


def lease_of(line: str) -> dict[str, str]:
    """`VM-LEASE ip=... mask=... dns=a b routes=d g d g ...` -> {"ip": ..., "dns": "a b", ...}."""
    out: dict[str, str] = {}
    key = None
    for word in line.split()[1:]:
        if "=" in word and word.split("=", 1)[0].isalpha():
            key, _, value = word.partition("=")
            out[key] = value
        elif key is not None:
            out[key] += " " + word
    return out


def tcp_connects(ns: str, ip: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(('{ip}', {port}), 2).close()"
    return nsx(ns, sys.executable, "-c", code, check=False).returncode == 0


def answers_ping(ns: str, ip: str) -> bool:
    return nsx(ns, "ping", "-c", "1", "-W", "1", ip, check=False).returncode == 0


@pytest.fixture(scope="module")
def booted(lab: Lab) -> Iterator[Booted]:
    cloud = OpenStack(lab.server_url, lab.token)
    net, sub, sg, name = unique("vmb"), unique("vmbs"), unique("vmsg"), unique("vm")
    cloud.cli("network", "create", net)
    cloud.cli("subnet", "create", "--network", net, "--subnet-range", CIDR, "--gateway", GATEWAY,
              *(a for d in DNS_SERVERS for a in ("--dns-nameserver", d)),
              "--host-route", f"destination={HOST_ROUTE[0]},gateway={HOST_ROUTE[1]}", sub)
    cloud.cli("security", "group", "create", sg)  # comes with Neutron's egress rules: the VM may go out
    pod = lab.run_pod("h2", unique("p"), net)
    cloud.cli("security", "group", "rule", "create", "--ingress", "--protocol", "tcp", "--dst-port", "80",
              "--remote-ip", f"{pod.ip}/32", sg)
    port = cloud.cli("port", "create", "--network", net, "--fixed-ip", f"subnet={sub},ip-address={VM_IP}",
                     "--host", "h1", "--device-owner", "compute:nova", "--device", name, "--security-group", sg, name)
    tap = "tap" + port["id"][:11]
    h1 = lab.host("h1").ns
    wait_for(lambda: nsx(h1, "ip", "link", "show", tap, check=False).returncode == 0, 20, f"{tap} on h1")
    listener = subprocess.Popen(["ip", "netns", "exec", pod.ns, sys.executable, "-c", LISTENER])
    started = time.monotonic()
    vm = TinyVm.boot(h1, tap, port["mac_address"], f"{lab.dir}/{name}")
    try:
        m = vm.wait_for(r"VM-LEASE [^\r\n]*(?=\r?\n)|VM-NO-LEASE", 120)  # the whole line, not a part read so far
        print(f"VM booted and leased in {time.monotonic() - started:.1f} s")
        assert m.group(0) != "VM-NO-LEASE", f"the VM got no DHCP answer; its console:\n{vm.output[-2000:]}"
        vm.wait_for(r"VM-READY", 30)
        vm.quiet()
        yield Booted(vm, lease_of(m.group(0)), port, net, sub, sg, pod)
    finally:
        vm.stop()
        listener.kill()
        listener.wait()


def test_vm_gets_its_address_gateway_dns_servers_host_routes_and_mtu_by_dhcp(lab: Lab, booted: Booted) -> None:
    lease = booted.lease
    assert (lease["ip"], lease["mask"], lease["router"]) == (VM_IP, "24", GATEWAY)
    assert lease["dns"].split() == DNS_SERVERS
    # option 121 with the default route in it (a client that takes 121 ignores option 3)
    assert lease["routes"].split() == [*HOST_ROUTE, "0.0.0.0/0", GATEWAY]
    h1_underlay_mtu = int(nsx(lab.host("h1").ns, "cat", "/sys/class/net/eth0/mtu").stdout)
    assert int(lease["mtu"]) == h1_underlay_mtu - 50  # a VXLAN network's MTU
    assert lease["domain"] == f"{booted.net}.tether.local"
    assert booted.vm.run("cat /sys/class/net/eth0/mtu")[1].strip() == lease["mtu"]
    rc, routes = booted.vm.run("ip route")
    assert rc == 0 and f"192.168.73.0/24 via {HOST_ROUTE[1]}" in routes and f"default via {GATEWAY}" in routes
    rc, resolv = booted.vm.run("cat /etc/resolv.conf")
    assert [ln.split()[1] for ln in resolv.splitlines() if ln.startswith("nameserver")] == DNS_SERVERS


def test_vm_reaches_a_container_on_another_host_by_ping_and_tcp_and_resolves_its_name(booted: Booted) -> None:
    pod = booted.pod
    rc, out = booted.vm.run(f"ping -c 3 -W 2 {pod.ip}", 30)
    assert rc == 0, f"the VM cannot ping the pod on h2: {out}"
    rc, out = booted.vm.run(f"nc -w 3 {pod.ip} {POD_PORT} </dev/null")
    assert rc == 0 and "pod" in out, f"the VM cannot open TCP {POD_PORT} on the pod: {out}"
    rc, out = booted.vm.run(f"nslookup {pod.name}.{booted.net}.tether.local")
    assert rc == 0 and pod.ip in out, f"the VM does not resolve the pod through the DNS server DHCP gave it: {out}"


def test_security_group_lets_tcp_80_in_and_refuses_ping_and_tcp_81_until_a_rule_allows_it(
        lab: Lab, booted: Booted) -> None:
    vm, pod = booted.vm, booted.pod
    for p in (80, 81):
        vm.run(f"(while :; do nc -l -p {p} -e echo vm{p}; done) >/dev/null 2>&1 &")
    wait_for(lambda: tcp_connects(pod.ns, VM_IP, 80), 15, "TCP 80 from the pod (allowed by the group) to the VM")
    assert not tcp_connects(pod.ns, VM_IP, 81), "TCP 81 is in no rule of the port's group but gets through"
    assert not answers_ping(pod.ns, VM_IP), "ICMP is in no rule of the port's group but gets through"
    cloud = OpenStack(lab.server_url, lab.token)
    cloud.cli("security", "group", "rule", "create", "--ingress", "--protocol", "tcp", "--dst-port", "81",
              "--remote-ip", f"{pod.ip}/32", booted.sg)
    wait_for(lambda: tcp_connects(pod.ns, VM_IP, 81), 15, "TCP 81 once a rule allows it")
    rc, out = vm.run(f"ping -c 1 -W 2 {pod.ip}")
    assert rc == 0, f"the group's egress rules should still let the VM out: {out}"


# the sources of the ICMP echo requests the pod receives (a raw socket gets a copy of each)
ECHO_SOURCES = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n"
                "s.settimeout(float(sys.argv[1]))\nseen = set()\ntry:\n    while True:\n"
                "        pkt, (src, _) = s.recvfrom(2000)\n"
                "        if pkt[(pkt[0] & 15) * 4] == 8: seen.add(src)\n"
                "except OSError: pass\nprint(' '.join(sorted(seen)))")


def test_the_vm_cannot_send_from_an_address_its_port_does_not_have(booted: Booted) -> None:
    """Anti-spoofing on the tap: the pod receives the VM's packets from its own address only."""
    spoofed = "10.73.0.99"
    sink = subprocess.Popen(["ip", "netns", "exec", booted.pod.ns, sys.executable, "-c", ECHO_SOURCES, "8"],
                            stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        booted.vm.run(f"ip addr add {spoofed}/32 dev eth0")
        for src in (spoofed, VM_IP):
            booted.vm.run(f"ping -c 2 -W 1 -I {src} {booted.pod.ip}")
        out, _ = sink.communicate(timeout=20)
    finally:
        sink.kill()
        sink.wait()
        booted.vm.run(f"ip addr del {spoofed}/32 dev eth0")
    assert out.split() == [VM_IP], f"the pod saw echo requests from {out.split()}"


def test_dhcp_is_not_served_on_the_underlay_even_to_the_vms_own_mac(lab: Lab, booted: Booted) -> None:
    """A machine on the underlay asking DHCP with the VM port's MAC gets nothing from h1's dnsmasq."""
    ns = f"{lab.name}-{unique('dh')}"  # lab-prefixed: `lab.down` removes it whatever happens
    peer = f"ud{unique('')}"[:15]
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", peer, "netns", lab.ul, "type", "veth", "peer", "name", "eth0", "netns", ns)
        nsx(lab.ul, "ip", "link", "set", peer, "master", "ul0", "up")
        nsx(ns, "ip", "link", "set", "eth0", "address", booted.port["mac_address"], "up")
        r = nsx(ns, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "3", "-T", "1", "-s", "/bin/true",
                check=False, timeout=30)
        assert r.returncode != 0 and "lease of" not in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        nsx(lab.ul, "ip", "link", "del", peer, check=False)
        sh("ip", "netns", "del", ns, check=False)


def test_a_tap_the_hypervisor_made_first_is_adopted_served_and_removed_with_its_port(lab: Lab, booted: Booted) -> None:
    """As Nova's libvirt driver does: the tap exists before the port is bound to the host."""
    cloud = OpenStack(lab.server_url, lab.token)
    port = cloud.cli("port", "create", "--network", booted.net, "--device-owner", "compute:nova", unique("vm"))
    tap = "tap" + port["id"][:11]
    h1 = lab.host("h1").ns
    nsx(h1, "ip", "tuntap", "add", tap, "mode", "tap")
    try:
        cloud.run("port", "set", "--host", "h1", port["id"])
        wait_for(lambda: f"tether-vm:{port['id']}" in nsx(h1, "ip", "-d", "link", "show", tap).stdout, 20,
                 f"h1's agent to adopt {tap}")
        assert f"inet {VM_DHCP_SERVER}/32 scope host" in nsx(h1, "ip", "-4", "addr", "show", "dev", tap).stdout
        ip = port["fixed_ips"][0]["ip_address"]
        wait_for(lambda: f"dev {tap}" in nsx(h1, "ip", "route", "show", ip).stdout, 20, f"the route to {ip}")
        hosts = f"{dhcp_dir('h1', lab.agent_dir('h1'))}/hosts"
        wait_for(lambda: f"{port['mac_address']},tag:{tap},{ip}," in open(hosts).read(), 20,
                 "h1's dnsmasq to serve the adopted port")
        wait_for(lambda: cloud.sdk().network.get_port(port["id"]).status == "ACTIVE", 20, "the port to be ACTIVE")
    finally:
        cloud.run("port", "delete", port["id"])
    wait_for(lambda: nsx(h1, "ip", "link", "show", tap, check=False).returncode != 0, 20,
             f"{tap} to be removed with its port")


def test_a_killed_dnsmasq_is_restarted_said_at_warning_and_serves_the_vm_again(lab: Lab, booted: Booted) -> None:
    pid_file = f"{dhcp_dir('h1', lab.agent_dir('h1'))}/dnsmasq.pid"

    def pid() -> int:
        with open(pid_file) as f:
            return int(f.read().strip() or 0)

    old = pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: pid() not in (0, old) and os.path.exists(f"/proc/{pid()}"), 30, "h1's agent to restart dnsmasq")
    with open(f"{lab.agent_dir('h1')}/agent.log", errors="replace") as f:
        assert any(f"dnsmasq (pid {old})" in line and "WARNING" in line and "restarting" in line for line in f)
    # the VM asks again, as at its lease's renewal: the new dnsmasq answers
    rc, out = booted.vm.run("udhcpc -i eth0 -n -q -t 5 -T 2 -O mtu -O staticroutes -O domain -s /lease.sh", 60)
    assert rc == 0 and f"VM-LEASE ip={VM_IP} mask=24 router={GATEWAY}" in out, out
    rc, out = booted.vm.run(f"ping -c 1 -W 2 {booted.pod.ip}")
    assert rc == 0, f"the VM lost the pod after a second lease: {out}"


EXTERNAL_CIDR = "198.19.131.0/24"  # the floating range: inside the lab's internet side, no other test's


def test_the_internet_reaches_the_vm_through_a_floating_ip_its_group_allows_and_sees_it_as_that_ip(
        lab: Lab, booted: Booted) -> None:
    """OpenStack's everyday path for a VM: router with an external gateway on the VM's subnet, a floating
    IP on its port. The lab's underlay router learns the floating address as an upstream router would
    (a /32 via the port's host, inside the lab only)."""
    cloud = OpenStack(lab.server_url, lab.token)
    ext = cloud.cli("network", "create", "--external", unique("vmext"))
    cloud.cli("subnet", "create", "--network", ext["id"], "--subnet-range", EXTERNAL_CIDR, "--no-dhcp",
              unique("vmexts"))
    router = cloud.cli("router", "create", unique("vmr"))
    cloud.run("router", "set", "--external-gateway", ext["id"], router["id"])
    cloud.run("router", "add", "subnet", router["id"], booted.subnet)
    fip = cloud.cli("floating", "ip", "create", "--port", booted.port["id"], ext["id"])
    address = fip["floating_ip_address"]
    nsx(lab.ul, "ip", "route", "add", f"{address}/32", "via", lab.host("h1").ip)
    rule = None
    try:
        assert not any(answers_ping(lab.inet, address) for _ in range(3)), \
            "the VM's group has no rule for the internet, yet it answers through its floating IP"
        rule = cloud.cli("security", "group", "rule", "create", "--ingress", "--protocol", "icmp",
                         "--remote-ip", f"{INET_IP}/32", booted.sg)
        wait_for(lambda: answers_ping(lab.inet, address), 15, f"the internet to ping the VM at {address}")
        # HTTP by hand: the VM's static busybox wget crashes here
        rc, out = booted.vm.run(f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {INET_IP} 80")
        assert rc == 0 and out.strip().splitlines()[-1] == address, \
            f"the internet should see the VM's request come from its floating IP {address}: {out!r}"
    finally:
        if rule is not None:
            cloud.run("security", "group", "rule", "delete", rule["id"])
        nsx(lab.ul, "ip", "route", "del", f"{address}/32", check=False)
        cloud.run("floating", "ip", "delete", fip["id"])
        cloud.run("router", "remove", "subnet", router["id"], booted.subnet)
        cloud.run("router", "delete", router["id"])


def test_a_booted_vm_and_a_container_in_one_load_balancer_pool_both_receive_connections(
        lab: Lab, booted: Booted) -> None:
    """Kuryr's promise with Octavia's commands: one VIP in front of a real VM and a container."""
    cloud = OpenStack(lab.server_url, lab.token)
    booted.vm.run(f"(while :; do nc -l -p {POD_PORT} -e echo vm; done) >/dev/null 2>&1 &")
    client = lab.run_pod("h3", unique("lbc"), booted.net)
    rule = cloud.cli("security", "group", "rule", "create", "--ingress", "--protocol", "tcp", "--dst-port",
                     str(POD_PORT), "--remote-ip", f"{client.ip}/32", booted.sg)
    subnet = cloud.cli("subnet", "show", booted.subnet)["id"]
    lb_name = unique("lb")
    lb = cloud.cli("loadbalancer", "create", "--name", lb_name, "--vip-subnet-id", subnet)
    try:
        listener = cloud.cli("loadbalancer", "listener", "create", "--protocol", "TCP", "--protocol-port", "80",
                             "--name", unique("l"), lb_name)
        pool = cloud.cli("loadbalancer", "pool", "create", "--lb-algorithm", "ROUND_ROBIN", "--listener",
                         listener["id"], "--protocol", "TCP", "--name", unique("pool"))
        for ip in (VM_IP, booted.pod.ip):
            cloud.cli("loadbalancer", "member", "create", "--subnet-id", subnet, "--address", ip,
                      "--protocol-port", str(POD_PORT), pool["id"])
        vip, seen = lb["vip_address"], Counter[str]()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (seen["vm"] and seen["pod"]):
            seen += ask(client.ns, vip, 10)
        assert seen["vm"] and seen["pod"], f"the VIP {vip} did not reach both the VM and the container: {dict(seen)}"
    finally:
        cloud.run("loadbalancer", "delete", "--cascade", lb_name)
        cloud.run("security", "group", "rule", "delete", rule["id"])
        lab.rm_pod(f"h3/{client.name}")
