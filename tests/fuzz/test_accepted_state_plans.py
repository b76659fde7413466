"""Whatever the API accepts, the agent can plan and the kernel would take: a property test.

Hypothesis writes a few objects (hosts, networks, endpoints, security groups, services, policies)
through the real API, with fields either plausible or poisonous (device names of the host, bad
addresses, protocols with nft syntax in them, long names); only what the server accepted stays.
The agent's own calculation (`compute_plan` on a replica loaded from /api/v1/snapshot, as the
agent loads it) must then succeed for every host, its nft table must pass `nft -c` in a scratch
namespace (with veths standing for the planned interfaces, as ingress chains need their
device), and every link, route, neighbour and FDB entry must be well formed: interface names of at
most 15 characters with the agent's prefix, valid prefixes, addresses and MACs. Root only."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import tempfile
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.fuzz.checks import finding
from tests.fuzz.harness import InProcessServer, examples
from tether.calc.host import HostContext, compute_plan
from tether.calc.names import LINK_PREFIX, VTEP_NAME
from tether.calc.plan import Plan
from tether.calc.replica import Replica
from tether.dataplane.nft import full_commands

EXAMPLES = 200
UNDERLAY = "fzul0"  # the underlay device of the planned hosts, a veth in the scratch namespace
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
POISON = st.sampled_from(["eth0", "lo", "a" * 50, "not-an-ip", "tcp; drop", "bogus", "x\ny", "*", "", "../x",
                          "10.1.0.0/33", "256.1.1.1", "not-a-mac", "tth" + "f" * 20, "\x00", "quote\"d"])


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(strategy, strategy, strategy, POISON)


HOSTS = st.sampled_from(["h1", "h2"])
IPS = st.sampled_from(["10.1.0.9", "10.1.0.70", "10.2.0.5", "fd00:1::9", "10.1.0.0/28"])
CIDRS = st.sampled_from(["10.2.0.0/24", "10.3.0.0/16", "fd00:2::/64", "0.0.0.0/0", "192.0.2.0/24", "10.1.0.0/24"])
MACS = st.sampled_from(["02:00:00:00:00:09", "FA:16:3E:00:00:01", "ff:ff:ff:ff:ff:ff", None])
PROTOCOLS = st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "sctp", "6", "17", None])
PORTS = st.integers(0, 65535)

RULE = st.fixed_dictionaries({"direction": st.sampled_from(["ingress", "egress"])}, optional={
    "ethertype": st.sampled_from(["IPv4", "IPv6"]), "protocol": maybe(PROTOCOLS),
    "port_range_min": PORTS, "port_range_max": PORTS, "remote_ip_prefix": maybe(CIDRS)})
PEER = st.one_of(st.fixed_dictionaries({"ipBlock": st.fixed_dictionaries({"cidr": maybe(CIDRS)}, optional={
    "except": st.lists(maybe(CIDRS), max_size=2)})}),
    st.fixed_dictionaries({"podSelector": st.fixed_dictionaries({"matchLabels": st.dictionaries(
        st.sampled_from(["app", "role"]), st.sampled_from(["a", "b"]), max_size=1)})}))
POLICY_PORT = st.fixed_dictionaries({}, optional={"protocol": maybe(st.sampled_from(["TCP", "UDP", "SCTP"])),
                                                  "port": st.one_of(PORTS, maybe(st.sampled_from(["http", "dns"]))),
                                                  "endPort": PORTS})

WRITES = st.one_of(
    st.tuples(st.just("PUT"), st.sampled_from(["/api/v1/hosts/h2"]), st.fixed_dictionaries(
        {"name": st.just("h2"), "underlay_ip": maybe(st.sampled_from(["198.18.0.2", "198.18.1.2", "fd00:18::2"]))},
        optional={"underlay_cidr": maybe(st.sampled_from(["198.18.0.0/24", "198.18.1.0/24"])),
                  "vtep_ip": maybe(st.sampled_from(["169.254.64.2", "169.254.64.1", "10.1.0.1"])),
                  "vtep_mac": maybe(MACS), "dns_ip": maybe(IPS)})),
    st.tuples(st.just("POST"), st.just("/api/v1/networks"), st.fixed_dictionaries(
        {"name": maybe(st.sampled_from(["blue", "green"])), "subnets": st.lists(st.fixed_dictionaries(
            {"cidr": maybe(CIDRS)}, optional={"gateway": maybe(IPS)}), min_size=1, max_size=2)},
        optional={"encap": st.sampled_from(["vxlan", "direct", "auto"]), "mtu": st.integers(576, 9000),
                  "nat_outgoing": st.booleans(), "dns_domain": maybe(st.sampled_from(["example.org", "x.y"])),
                  "block_size": st.integers(16, 32)})),
    st.tuples(st.just("POST"), st.just("/api/v1/endpoints"), st.fixed_dictionaries(
        {"name": maybe(st.sampled_from(["p1", "p2", "p3"])), "network": st.sampled_from(["red", "blue"]),
         "host": HOSTS},
        optional={"ips": st.lists(maybe(IPS), max_size=2), "mac": maybe(MACS),
                  "interface": maybe(st.sampled_from(["tth0123456789a", "tthx"])),
                  "labels": st.dictionaries(st.sampled_from(["app", "role"]), st.sampled_from(["a", "b"]), max_size=2),
                  "security_groups": st.lists(st.just("web"), max_size=1),
                  "allowed_address_pairs": st.lists(st.fixed_dictionaries(
                      {"ip_address": maybe(st.one_of(IPS, CIDRS))}, optional={"mac_address": maybe(MACS)}),
                      max_size=2),
                  "ports": st.lists(st.fixed_dictionaries({
                      "name": maybe(st.just("http")), "port": st.integers(1, 65535),
                      "protocol": st.sampled_from(["TCP", "UDP", "SCTP"])}), max_size=2),
                  "owner": st.fixed_dictionaries({"type": st.sampled_from(["cni", "vm", "api"])})})),
    st.tuples(st.just("PUT"), st.just("/api/v1/securitygroups/web"), st.fixed_dictionaries(
        {"id": st.just("web"), "name": st.just("web"), "rules": st.lists(RULE, max_size=3)})),
    st.tuples(st.just("PUT"), st.just("/api/v1/namespaces/default/services/s"), st.fixed_dictionaries(
        {"name": st.just("s"), "namespace": st.just("default")},
        optional={"ports": st.lists(st.fixed_dictionaries({"port": st.integers(1, 65535)}, optional={
            "protocol": st.sampled_from(["TCP", "UDP"]), "target_port": st.one_of(st.integers(1, 65535), maybe(
                st.just("http"))), "node_port": st.integers(1, 65535), "name": maybe(st.just("web"))}), max_size=2),
            "selector": st.dictionaries(st.just("app"), st.sampled_from(["a", "b"]), max_size=1),
            "backends": st.lists(st.fixed_dictionaries({"ip": maybe(IPS)}), max_size=2),
            "session_affinity": st.sampled_from(["None", "ClientIP"]), "type": st.sampled_from(["ClusterIP",
                                                                                              "NodePort"])})),
    st.tuples(st.just("PUT"), st.just("/api/v1/namespaces/default/networkpolicies/np"), st.fixed_dictionaries(
        {"name": st.just("np"), "namespace": st.just("default"), "spec": st.fixed_dictionaries(
            {"podSelector": st.just({})}, optional={
                "policyTypes": st.lists(st.sampled_from(["Ingress", "Egress"]), max_size=2, unique=True),
                "ingress": st.lists(st.fixed_dictionaries({}, optional={"from": st.lists(PEER, max_size=2),
                                                                         "ports": st.lists(POLICY_PORT, max_size=2)}),
                                    max_size=2),
                "egress": st.lists(st.fixed_dictionaries({}, optional={"to": st.lists(PEER, max_size=2),
                                                                        "ports": st.lists(POLICY_PORT, max_size=2)}),
                                   max_size=2)})})),
)

BASE = [
    ("PUT", "/api/v1/hosts/h1", {"name": "h1", "underlay_ip": "198.18.0.1", "underlay_cidr": "198.18.0.0/24"}),
    ("POST", "/api/v1/networks", {"name": "red", "subnets": [{"cidr": "10.1.0.0/16"}]}),
    ("POST", "/api/v1/endpoints", {"name": "p0", "network": "red", "host": "h1", "labels": {"app": "a"}}),
]


def well_formed_problems(plan: Plan, underlay: str) -> list[str]:
    """What in the plan the kernel would refuse or a host must never see."""
    problems = []

    def ip_ok(text: str, what: str) -> None:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            problems.append(f"{what}: {text!r} is not an address")

    names = {i.name for i in plan.interfaces}
    for i in plan.interfaces:
        if len(i.name) > 15 or not i.name.startswith(LINK_PREFIX) or not re.fullmatch(r"[A-Za-z0-9_.-]+", i.name):
            problems.append(f"interface {i.name!r}: not an agent-owned name of at most 15 characters")
        if i.mac and not MAC.match(i.mac):
            problems.append(f"interface {i.name!r}: MAC {i.mac!r} is malformed")
        if not 68 <= i.mtu <= 65535:
            problems.append(f"interface {i.name!r}: MTU {i.mtu}")
        for ip in i.ips:
            ip_ok(ip, f"interface {i.name!r} address")
    for r in plan.routes:
        try:
            ipaddress.ip_network(r.dst)
        except ValueError:
            problems.append(f"route {r}: destination is not a prefix")
        if r.dev not in names | {VTEP_NAME, underlay}:
            problems.append(f"route {r}: device {r.dev!r} is neither a planned interface, the VTEP nor the underlay")
        if r.via:
            ip_ok(r.via, f"route {r.dst} next hop")
    for n in plan.neighbours:
        ip_ok(n.ip, "neighbour")
        if not MAC.match(n.lladdr.lower()):
            problems.append(f"neighbour {n.ip}: MAC {n.lladdr!r} is malformed")
    for f in plan.fdb:
        ip_ok(f.dst, "FDB destination")
        if not MAC.match(f.lladdr.lower()):
            problems.append(f"FDB entry to {f.dst}: MAC {f.lladdr!r} is malformed")
    if plan.vtep is not None:
        ip_ok(plan.vtep.ip, "VTEP address")
        ip_ok(plan.vtep.local_ip, "VTEP local address")
        if not MAC.match(plan.vtep.mac.lower()):
            problems.append(f"VTEP MAC {plan.vtep.mac!r} is malformed")
    return problems


def nft_check(netns: str, plan: Plan) -> str:
    """`nft -c` of the whole table in the scratch namespace, with veths for the planned devices
    (removed afterwards); the error text, or "" when nft accepts it."""
    devices = sorted({i.name for i in plan.interfaces} | {c.device for c in plan.nft.chains if c.device})
    devices = [d for d in devices if d and "\n" not in d and " " not in d]
    batch = "".join(f"link add {d} type veth peer name fzp{i}\n" for i, d in enumerate(devices))
    if batch:
        subprocess.run(["ip", "-n", netns, "-force", "-batch", "-"], input=batch, text=True, capture_output=True,
                       timeout=30)
    try:
        r = subprocess.run(["ip", "netns", "exec", netns, "nft", "-c", "-j", "-f", "-"], text=True,
                           input=json.dumps({"nftables": full_commands(plan.nft)}), capture_output=True, timeout=60)
        return "" if r.returncode == 0 else r.stderr.strip()[:1500]
    finally:
        if batch:
            subprocess.run(["ip", "-n", netns, "-force", "-batch", "-"], text=True, capture_output=True, timeout=30,
                           input="".join(f"link del {d}\n" for d in devices))


def test_what_the_api_accepts_plans_cleanly_and_nft_accepts_the_table(netns) -> None:
    ns = netns()
    subprocess.run(["ip", "-n", ns, "link", "add", UNDERLAY, "type", "veth", "peer", "name", "fzul1"], check=True,
                   timeout=30)
    accepted: list[str] = []

    # no shrinking: each example is a fresh server and two nft runs, so shrinking took minutes, and the
    # message lists the few accepted writes anyway
    @settings(max_examples=examples(EXAMPLES), derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.reuse, Phase.generate])
    @given(writes=st.lists(WRITES, min_size=1, max_size=6))
    def prop(writes: list[tuple[str, str, dict[str, Any]]]) -> None:
        srv = InProcessServer(tempfile.mkdtemp(prefix="tether-fuzz-plan-"))
        try:
            for method, path, body in BASE:
                assert srv.request(method, path, json=body).status_code in (200, 201)
            accepted.clear()
            for method, path, body in writes:
                r = srv.request(method, path, json=body)
                if r.status_code >= 500:
                    finding("server error", f"{method} {path} {json.dumps(body)} -> {r.status_code} {r.text[:300]}")
                if r.status_code < 300:
                    accepted.append(f"{method} {path} {json.dumps(body)}")
            rep = Replica()
            rep.load_snapshot(srv.request("GET", "/api/v1/snapshot").json())
        finally:
            srv.close()
        what = "after the accepted writes:\n  " + "\n  ".join(accepted)
        for host in sorted(rep.hosts):
            try:
                plan = compute_plan(rep, HostContext(host, UNDERLAY, 1500))
            except Exception as e:  # noqa: BLE001 - the finding: an accepted object stops the host's applies
                finding("plan raised", f"compute_plan for {host} raised {type(e).__name__}: {e}; {what}")
                continue
            problems = well_formed_problems(plan, UNDERLAY)
            if problems:
                finding("malformed plan", f"plan for {host}: {problems}; {what}")
            error = nft_check(ns, plan)
            if error:
                finding("nft refused", f"nft -c refused {host}'s table: {error}; {what}")

    prop()
