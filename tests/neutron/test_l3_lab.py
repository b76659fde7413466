"""Routers and floating IPs made with the real `openstack` CLI, proven with packets in the lab: a
router joins two subnets (a third stays isolated), its external gateway source-NATs to the host's
address towards the lab's internet, and a floating IP makes a pod reachable from the internet (and
its traffic leave as the floating IP) until `floating ip unset --port`; a VM port's security group
filters what comes through its floating IP.

The lab's underlay router (namespace `<lab>-ul`, the internet's next hop) learns the way to a floating
IP as an upstream router would: a /32 route via the host of the port, added inside the lab only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fixtures.lab import unique
from tests.fixtures.openstack import OpenStack
from tether.lab.cluster import INET_IP, Lab, PodInfo, nsx, sh

pytestmark = [pytest.mark.lab, pytest.mark.client]


@dataclass
class L3:
    cloud: OpenStack
    ext: dict
    nets: dict[str, dict]  # a, b, c -> network
    subnets: dict[str, dict]
    pods: dict[str, PodInfo]  # a on h1, b on h2, c on h3, fip (net a) on h2


def ping(ns: str, ip: str) -> bool:
    return nsx(ns, "ping", "-c", "1", "-W", "1", ip, check=False).returncode == 0


def eventually(check, within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def stays_false(check, seconds: float = 3) -> bool:
    """The check fails now and keeps failing (a refused path is not a slow one)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return False
    return True


def seen_by_internet(pod: PodInfo) -> str | None:
    """The source address the internet's web server saw for the pod's request (None: no answer)."""
    r = nsx(pod.ns, "curl", "-s", "-m", "3", f"http://{INET_IP}/", check=False)
    return r.stdout.strip() if r.returncode == 0 else None


@pytest.fixture(scope="module")
def l3(lab: Lab) -> Iterator[L3]:
    cloud = OpenStack(lab.server_url, lab.token)
    ext = cloud.cli("network", "create", "--external", unique("ext"))
    cloud.cli("subnet", "create", "--network", ext["id"], "--subnet-range", "198.19.128.0/24", "--no-dhcp",
              unique("exts"))
    nets, subnets = {}, {}
    for i, k in enumerate("abc", start=1):
        nets[k] = cloud.cli("network", "create", unique(f"l3{k}"))
        subnets[k] = cloud.cli("subnet", "create", "--network", nets[k]["id"], "--subnet-range", f"10.92.{i}.0/24",
                               unique(f"l3s{k}"))
    pods = {"a": lab.run_pod("h1", unique("pa"), nets["a"]["name"]),
            "b": lab.run_pod("h2", unique("pb"), nets["b"]["name"]),
            "c": lab.run_pod("h3", unique("pc"), nets["c"]["name"]),
            "fip": lab.run_pod("h2", unique("pf"), nets["a"]["name"])}
    yield L3(cloud, ext, nets, subnets, pods)


def test_a_router_joins_two_subnets_and_a_third_stays_isolated(l3: L3) -> None:
    a, b, c = l3.pods["a"], l3.pods["b"], l3.pods["c"]
    assert stays_false(lambda: ping(a.ns, b.ip)), "networks a and b talk without a router"
    r = l3.cloud.cli("router", "create", unique("join"))
    l3.cloud.run("router", "add", "subnet", r["id"], l3.subnets["a"]["id"])
    l3.cloud.run("router", "add", "subnet", r["id"], l3.subnets["b"]["id"])
    try:
        assert eventually(lambda: ping(a.ns, b.ip)), "a cannot reach b through the router"
        assert eventually(lambda: ping(b.ns, a.ip)), "b cannot reach a through the router"
        assert stays_false(lambda: ping(a.ns, c.ip)), "a reaches c, which is on no router"
        assert stays_false(lambda: ping(c.ns, b.ip)), "c reaches b, which is on no router of c's"
        l3.cloud.run("router", "remove", "subnet", r["id"], l3.subnets["b"]["id"])
        assert eventually(lambda: not ping(a.ns, b.ip)) and stays_false(lambda: ping(a.ns, b.ip)), \
            "a still reaches b after `router remove subnet`"
    finally:
        l3.cloud.run("router", "remove", "subnet", r["id"], l3.subnets["a"]["id"])
        l3.cloud.run("router", "delete", r["id"])


def test_the_routers_external_gateway_source_nats_to_the_hosts_address(lab: Lab, l3: L3) -> None:
    a = l3.pods["a"]
    r = l3.cloud.cli("router", "create", unique("gw"))
    l3.cloud.run("router", "add", "subnet", r["id"], l3.subnets["a"]["id"])
    try:
        assert seen_by_internet(a) is None, "without a gateway the internet has no way back to the pod"
        l3.cloud.run("router", "set", "--external-gateway", l3.ext["id"], r["id"])
        assert eventually(lambda: seen_by_internet(a) == lab.host("h1").ip), seen_by_internet(a)
        l3.cloud.run("router", "unset", "--external-gateway", r["id"])
        assert eventually(lambda: seen_by_internet(a) is None), "SNAT stayed after `router unset --external-gateway`"
    finally:
        l3.cloud.run("router", "remove", "subnet", r["id"], l3.subnets["a"]["id"])
        l3.cloud.run("router", "delete", r["id"])


def test_a_floating_ip_reaches_the_port_from_the_internet_until_it_is_unset(lab: Lab, l3: L3) -> None:
    pod = l3.pods["fip"]
    port = l3.cloud.cli("port", "list", "--fixed-ip", f"ip-address={pod.ip}")[0]
    r = l3.cloud.cli("router", "create", unique("fr"))
    l3.cloud.run("router", "set", "--external-gateway", l3.ext["id"], r["id"])
    l3.cloud.run("router", "add", "subnet", r["id"], l3.subnets["a"]["id"])
    fip = l3.cloud.cli("floating", "ip", "create", "--port", port["ID"], l3.ext["id"])
    address = fip["floating_ip_address"]
    nsx(lab.ul, "ip", "route", "add", f"{address}/32", "via", lab.host("h2").ip)
    try:
        assert eventually(lambda: ping(lab.inet, address)), f"the internet cannot reach the floating IP {address}"
        assert eventually(lambda: seen_by_internet(pod) == address), seen_by_internet(pod)
        l3.cloud.run("floating", "ip", "unset", "--port", fip["id"])
        assert eventually(lambda: not ping(lab.inet, address)) and stays_false(lambda: ping(lab.inet, address)), \
            "the floating IP still reaches the port after `floating ip unset --port`"
        # the port now leaves through the router's SNAT, as its host
        assert eventually(lambda: seen_by_internet(pod) == lab.host("h2").ip), seen_by_internet(pod)
        l3.cloud.run("floating", "ip", "set", "--port", port["ID"], fip["id"])
        assert eventually(lambda: ping(lab.inet, address)), "the floating IP does not come back after `set --port`"
    finally:
        nsx(lab.ul, "ip", "route", "del", f"{address}/32", check=False)
        l3.cloud.run("floating", "ip", "delete", fip["id"])
        l3.cloud.run("router", "remove", "subnet", r["id"], l3.subnets["a"]["id"])
        l3.cloud.run("router", "delete", r["id"])


def test_a_floating_ip_to_a_vm_port_is_filtered_by_its_security_group(lab: Lab, l3: L3) -> None:
    """A VM port (plugged by h1's agent into a namespace standing for the VM) in a group without an
    ingress rule is not reachable through its floating IP; a rule for ICMP from anywhere opens it."""
    cloud = l3.cloud
    sg = cloud.cli("security", "group", "create", unique("fipsg"))
    name = unique("vm")
    ns = f"{lab.name}-{name}"  # lab-prefixed: `lab.down` removes it whatever happens
    sh("ip", "netns", "add", ns)
    port = cloud.cli("port", "create", "--network", l3.nets["a"]["id"], "--host", "h1", "--device-owner",
                     "compute:nova", "--device", name, "--binding-profile", f"netns=/var/run/netns/{ns}",
                     "--security-group", sg["id"], name)
    r = cloud.cli("router", "create", unique("vr"))
    cloud.run("router", "set", "--external-gateway", l3.ext["id"], r["id"])
    cloud.run("router", "add", "subnet", r["id"], l3.subnets["a"]["id"])
    fip = cloud.cli("floating", "ip", "create", "--port", port["id"], l3.ext["id"])
    address = fip["floating_ip_address"]
    nsx(lab.ul, "ip", "route", "add", f"{address}/32", "via", lab.host("h1").ip)
    try:
        assert eventually(lambda: nsx(ns, "ip", "-4", "addr", "show", "dev", "eth0", check=False).stdout.count(
            port["fixed_ips"][0]["ip_address"]) == 1, 20), "the VM port was not plugged"
        assert stays_false(lambda: ping(lab.inet, address), 4), "the group has no ingress rule, yet the VM answers"
        cloud.cli("security", "group", "rule", "create", "--protocol", "icmp", "--remote-ip", "0.0.0.0/0", sg["id"])
        assert eventually(lambda: ping(lab.inet, address)), "an ICMP rule from anywhere does not open the VM"
    finally:
        nsx(lab.ul, "ip", "route", "del", f"{address}/32", check=False)
        cloud.run("floating", "ip", "delete", fip["id"])
        cloud.run("port", "delete", port["id"])
        cloud.run("router", "remove", "subnet", r["id"], l3.subnets["a"]["id"])
        cloud.run("router", "delete", r["id"])
        sh("ip", "netns", "del", ns, check=False)
