"""Anti-spoofing with real packets: a pod that sends from another address or another MAC is dropped
at its own host, before conntrack, and counted; allowed address pairs widen what it may send."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.lab import unique
from tests.policy.truth import make_network
from tether.agent.dns import DNS_IP
from tether.dataplane.nft import counters
from tether.lab.cluster import INET_IP, Lab, PodInfo, nsx, wait_for
from tether.model import NetworkPolicy

pytestmark = pytest.mark.lab

LISTEN = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.1)
print("ready", flush=True)
end, seen = time.time() + float(sys.argv[2]), []
while time.time() < end:
    try:
        data, addr = s.recvfrom(100)
        seen.append(addr[0])
    except socket.timeout:
        pass
print(json.dumps(seen), flush=True)
"""
SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for _ in range(3):
    s.sendto(b"x", (sys.argv[2], int(sys.argv[3])))
"""

TUNNEL = r"""
import socket, struct, sys
underlay, vni, vtep_mac, inner_src, inner_dst, port = sys.argv[1:7]
udp = struct.pack("!HHHH", 40000, int(port), 9, 0) + b"x"  # checksum 0: none, valid in IPv4
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(inner_src),
                 socket.inet_aton(inner_dst))
words = struct.unpack("!10H", ip)
total = sum(words)
total = (total >> 16) + (total & 0xFFFF)
ip = ip[:10] + struct.pack("!H", ~(total + (total >> 16)) & 0xFFFF) + ip[12:]
frame = bytes.fromhex(vtep_mac.replace(":", "")) + bytes.fromhex("02aabbccddee") + b"\x08\x00" + ip + udp
s = socket.socket(socket.AF_INET6 if ":" in underlay else socket.AF_INET, socket.SOCK_DGRAM)  # IPv6 underlays too
for _ in range(3):
    s.sendto(struct.pack("!II", 0x08000000, int(vni) << 8) + frame, (underlay, 4789))
"""


def inside(pod: PodInfo, rest: str) -> str:
    """An address in the pod's network (its /16) that no pod has: `inside(a, "250.1")`."""
    return ".".join(pod.ip.split(".")[:2]) + "." + rest


def stateful(lab: Lab, host: str) -> bool:
    """Does `host`'s table have conntrack (calc.needs_state)?"""
    return "raw_prerouting" in nsx(lab.host(host).ns, "nft", "list", "table", "inet", "tether").stdout


@pytest.fixture(scope="module", params=["without conntrack", "with conntrack"])
def pods(lab: Lab, request: pytest.FixtureRequest) -> Iterator[tuple[Lab, PodInfo, PodInfo, PodInfo]]:
    """Three pods, in each kind of table: without conntrack (nothing needs state) and with it (a
    policy that selects no pod is enough); the anti-spoofing is the same pods' ingress chains."""
    net = make_network(lab, unique("as"), "10.66.0.0/16" if request.param == "without conntrack" else "10.65.0.0/16")
    a = lab.run_pod("h1", unique("a"), net)
    b = lab.run_pod("h1", unique("b"), net)
    c = lab.run_pod("h2", unique("c"), net)
    pol = None
    if request.param == "with conntrack":
        pol = lab.client().apply(NetworkPolicy(name=unique("np"), namespace="default", spec={
            "podSelector": {"matchLabels": {"selects": "nothing"}}}))
    wait_for(lambda: all(stateful(lab, h) == (pol is not None) for h in ("h1", "h2")), 15, "the kind of table")
    assert lab.reaches(f"h1/{a.name}", b.ip) and lab.reaches(f"h1/{a.name}", c.ip)
    yield lab, a, b, c
    if pol is not None:
        lab.client().delete("NetworkPolicy", pol.store_name())


def received(lab: Lab, sender: PodInfo, src: str, dst: PodInfo, port: int) -> list[str]:
    """Datagrams `dst` receives when `sender` sends three from source address `src`."""
    listener = subprocess.Popen(["ip", "netns", "exec", dst.ns, sys.executable, "-c", LISTEN, str(port), "1.5"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        nsx(sender.ns, sys.executable, "-c", SEND, src, dst.ip, str(port))
        out, _ = listener.communicate(timeout=10)
    finally:
        if listener.poll() is None:
            listener.kill()
    return json.loads(out)


def tunnelled(lab: Lab, sender_ns: str, via_host: str, src: str, dst: PodInfo, port: int, to: str = "") -> list[str]:
    """Datagrams `dst` receives when network namespace `sender_ns` wraps three (inner source `src`)
    in VXLAN itself and sends them to `via_host`'s underlay address (or its address `to`), with that
    host's VTEP MAC and VNI inside."""
    ns = lab.host(via_host).ns
    link = nsx(ns, "ip", "-d", "link", "show", "tth.vxlan").stdout.split()
    vni, mac = link[link.index("id") + 1], link[link.index("link/ether") + 1]
    listener = subprocess.Popen(["ip", "netns", "exec", dst.ns, sys.executable, "-c", LISTEN, str(port), "1.5"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        nsx(sender_ns, sys.executable, "-c", TUNNEL, to or lab.host(via_host).ip, vni, mac, src, dst.ip, str(port))
        out, _ = listener.communicate(timeout=10)
    finally:
        if listener.poll() is None:
            listener.kill()
    return json.loads(out)


def drops(lab: Lab, host: str, comment: str) -> int:
    """Packets dropped by `host`'s rules with this comment, in any chain (each pod's ingress chain
    has its own anti-spoofing rules)."""
    return sum(n for key, n in counters(lab.host(host).ns).items() if key.split("/", 1)[1] == comment)


def spoof_drops(lab: Lab, host: str, what: str) -> int:
    return drops(lab, host, f"spoofed source {what}")


def test_another_source_address_is_dropped_and_counted(pods) -> None:
    lab, a, b, c = pods
    nsx(a.ns, "ip", "addr", "add", f"{c.ip}/32", "dev", "eth0")  # a claims c's address
    nsx(a.ns, "ip", "addr", "add", f"{inside(a, '250.1')}/32", "dev", "eth0")  # and one nobody has
    try:
        before = spoof_drops(lab, "h1", "address")
        assert received(lab, a, a.ip, b, 7001) == [a.ip] * 3, "the pod's own address must pass"
        assert received(lab, a, c.ip, b, 7002) == []
        assert received(lab, a, inside(a, "250.1"), b, 7003) == []
        assert spoof_drops(lab, "h1", "address") >= before + 6
    finally:
        nsx(a.ns, "ip", "addr", "del", f"{c.ip}/32", "dev", "eth0", check=False)
        nsx(a.ns, "ip", "addr", "del", f"{inside(a, '250.1')}/32", "dev", "eth0", check=False)


def test_another_source_mac_is_dropped_and_counted(pods) -> None:
    lab, a, b, c = pods
    real = nsx(a.ns, "cat", "/sys/class/net/eth0/address").stdout.strip()
    before = spoof_drops(lab, "h1", "MAC")
    nsx(a.ns, "ip", "link", "set", "eth0", "address", "02:66:66:66:66:66")
    try:
        assert received(lab, a, a.ip, c, 7004) == []
        assert spoof_drops(lab, "h1", "MAC") >= before + 3
    finally:
        nsx(a.ns, "ip", "link", "set", "eth0", "address", real)
    assert received(lab, a, a.ip, c, 7005) == [a.ip] * 3


def test_allowed_address_pairs_may_be_sent_from(pods) -> None:
    lab, a, b, c = pods
    nsx(a.ns, "ip", "addr", "add", f"{inside(a, '251.0')}/32", "dev", "eth0", check=False)
    ep = next(e for e in lab.client().list_raw("Endpoint") if e["name"] == a.name)
    lab.client().request("PATCH", f"/api/v1/endpoints/{ep['id']}",
                         json={"allowed_address_pairs": [{"ip_address": f"{inside(a, '251.0')}/28"}]})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if received(lab, a, inside(a, "251.0"), c, 7006):
            break
    else:
        pytest.fail("a source inside the allowed address pair is still dropped")


def test_a_pod_cannot_tunnel_a_spoofed_packet_through_a_vtep(pods) -> None:
    """VXLAN that a pod builds itself would be decapsulated by a host with any inner source.
    - With conntrack: to another host (where it may be masqueraded to its host's address) its
      ingress chain drops it; to its own host, input refuses it (not from a peer host), as it
      refuses a machine on the underlay that is not a Tether host.
    - Without conntrack no host checks the outer source (no base chain at all): the pod's ingress
      chain drops its UDP 4789 to anything outside its network, any host included.
    All counted; the pod itself still talks across hosts."""
    lab, a, b, c = pods
    refused = "VXLAN from a pod or an unknown host"
    before, in_before = drops(lab, "h1", "VXLAN from a pod"), drops(lab, "h1", refused)
    assert tunnelled(lab, a.ns, "h2", inside(a, "250.2"), c, 7007) == []
    assert tunnelled(lab, a.ns, "h1", inside(a, "250.3"), b, 7008) == []
    # any address of a host decapsulates: here its resolver's, which every pod reaches
    assert tunnelled(lab, a.ns, "h1", inside(a, "250.5"), b, 7011, to=DNS_IP) == []
    if stateful(lab, "h1"):
        assert drops(lab, "h1", "VXLAN from a pod") >= before + 3
        assert drops(lab, "h1", refused) >= in_before + 6
    else:
        assert drops(lab, "h1", "VXLAN from a pod") >= before + 9
    assert received(lab, a, a.ip, c, 7009) == [a.ip] * 3
    if stateful(lab, "h2"):
        in_before = drops(lab, "h2", refused)
        assert tunnelled(lab, lab.inet, "h2", inside(a, "250.4"), c, 7010) == []
        assert drops(lab, "h2", refused) >= in_before + 3


def test_a_pods_udp_4789_outside_the_cluster_goes_out_only_with_conntrack(pods) -> None:
    """With conntrack only the hosts that would decapsulate a pod's VXLAN are out of its reach on port
    4789: its own tunnel to a machine outside the cluster (here the lab's "internet") goes out,
    uncounted. Without, every host's addresses are out of reach (the resolver's and VTEP's too), so
    anything outside the pod's network is: dropped at the sender, counted. (Without conntrack there is
    no masquerade, so only an underlay that routes pod subnets would bring an answer back.)"""
    lab, a, _b, _c = pods
    before = drops(lab, "h1", "VXLAN from a pod")
    outside = PodInfo("inet", "", lab.inet, "", "", "", [INET_IP])
    if stateful(lab, "h1"):
        assert received(lab, a, a.ip, outside, 4789) == [a.ip] * 3
        assert drops(lab, "h1", "VXLAN from a pod") == before
    else:
        assert received(lab, a, a.ip, outside, 4789) == []
        assert drops(lab, "h1", "VXLAN from a pod") >= before + 3
