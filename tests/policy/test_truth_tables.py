"""NetworkPolicy truth tables with real packets: every ordered pair of 9 pods on TCP/UDP 80/81.

Each scenario changes the cluster through the API, then probes all 324 pairs until the datapath
agrees with `tether.policy_eval` (computed from the server's state, not from the compiler). Scenarios
follow the upstream Kubernetes netpol e2e suite and add changes made while traffic runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.lab import unique
from tests.policy.truth import Cluster, make_network, running_cluster
from tether.lab.cluster import Lab

pytestmark = pytest.mark.lab

ALL: dict = {}
Scenario = Callable[[Cluster], None]


def pol(ns: str, spec: dict, name: str = "p") -> Scenario:
    return lambda c: c.policy(ns, name, spec)


def both(*steps: Scenario) -> Scenario:
    def run(c: Cluster) -> None:
        for s in steps:
            s(c)
    return run


def sel(**labels: str) -> dict:
    return {"matchLabels": labels}


def expr(key: str, op: str, *values: str) -> dict:
    e: dict = {"key": key, "operator": op}
    if values:
        e["values"] = list(values)
    return {"matchExpressions": [e]}


DENY_INGRESS = {"podSelector": {}, "policyTypes": ["Ingress"]}
DENY_EGRESS = {"podSelector": {}, "policyTypes": ["Egress"]}
A = sel(pod="a")

SCENARIOS: dict[str, Scenario] = {
    "no-policy-allows-all": lambda c: None,
    "deny-all-ingress": pol("x", DENY_INGRESS),
    "deny-all-egress": pol("x", DENY_EGRESS),
    "deny-all-both": pol("x", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    "deny-all-every-namespace": both(pol("x", DENY_INGRESS), pol("y", DENY_INGRESS), pol("z", DENY_INGRESS)),
    "allow-all-ingress-unions-with-deny": both(pol("x", DENY_INGRESS, "deny"),
                                               pol("x", {"podSelector": {}, "ingress": [{}]}, "allow")),
    "allow-all-egress": pol("x", {"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]}),
    "ingress-from-same-namespace": pol("x", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    "ingress-to-a-from-pod-b": pol("x", {"podSelector": A, "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]}),
    "ingress-from-namespace-y": pol("x", {"podSelector": A,
                                          "ingress": [{"from": [{"namespaceSelector": sel(ns="y")}]}]}),
    "namespace-expression-notin": pol("x", {"podSelector": A, "ingress": [
        {"from": [{"namespaceSelector": expr("ns", "NotIn", "x", "y")}]}]}),
    "namespace-expression-exists": pol("x", {"podSelector": A, "ingress": [
        {"from": [{"namespaceSelector": expr("ns", "Exists")}]}]}),
    "namespace-selector-empty-selects-all": pol("x", {"podSelector": A, "ingress": [
        {"from": [{"namespaceSelector": {}, "podSelector": sel(pod="c")}]}]}),
    "pod-expression-in": pol("x", {"podSelector": A, "ingress": [
        {"from": [{"podSelector": expr("pod", "In", "b", "c")}]}]}),
    "pod-expression-doesnotexist": pol("x", {"podSelector": expr("pod", "In", "a", "b"), "ingress": [
        {"from": [{"podSelector": expr("role", "DoesNotExist")}]}]}),
    "target-expression-notin": pol("y", {"podSelector": expr("pod", "NotIn", "a"), "ingress": []}),
    "pod-and-namespace-in-one-peer-are-anded": pol("x", {"podSelector": A, "ingress": [
        {"from": [{"namespaceSelector": sel(ns="y"), "podSelector": sel(pod="b")}]}]}),
    "peers-are-ored": pol("x", {"podSelector": A, "ingress": [
        {"from": [{"namespaceSelector": sel(ns="y")}, {"podSelector": sel(pod="b")}]}]}),
    "ingress-tcp-80-only": pol("x", {"podSelector": A, "ingress": [{"ports": [{"port": 80}]}]}),
    "ingress-udp-81-only": pol("x", {"podSelector": A, "ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]}),
    "ingress-udp-any-port": pol("x", {"podSelector": A, "ingress": [{"ports": [{"protocol": "UDP"}]}]}),
    "ingress-endport-range": pol("x", {"podSelector": {}, "ingress": [
        {"from": [{"namespaceSelector": sel(ns="z")}], "ports": [{"port": 80, "endPort": 81}]}]}),
    "ingress-named-port-tcp": pol("x", {"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
    "ingress-named-port-udp": pol("x", {"podSelector": A, "ingress": [
        {"ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}]}),
    "ingress-sctp-only-denies-tcp-udp": pol("x", {"podSelector": A, "ingress": [
        {"ports": [{"port": 80, "protocol": "SCTP"}]}]}),
    "ports-and-peers-in-one-rule": pol("x", {"podSelector": A, "ingress": [
        {"from": [{"namespaceSelector": sel(ns="y")}], "ports": [{"port": 81, "protocol": "UDP"}]},
        {"from": [{"podSelector": sel(pod="c")}], "ports": [{"port": 80}]}]}),
    "ipblock-single-pod": lambda c: c.policy("x", "p", {"podSelector": A, "ingress": [
        {"from": [{"ipBlock": {"cidr": f"{c.pods['y/b'].ip}/32"}}]}]}),
    "ipblock-with-except": lambda c: c.policy("x", "p", {"podSelector": A, "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [f"{c.pods['z/c'].ip}/32",
                                                               f"{c.pods['x/b'].ip}/32"]}}]}]}),
    "egress-to-namespace-y": pol("x", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": sel(ns="y")}]}]}),
    "egress-to-pod-b-anywhere": pol("x", {"podSelector": A, "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": {}, "podSelector": sel(pod="b")}]}]}),
    "egress-tcp-80-only": pol("y", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"ports": [{"port": 80, "protocol": "TCP"}]}]}),
    "egress-ipblock": lambda c: c.policy("x", "p", {"podSelector": A, "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": f"{c.pods['z/c'].ip}/32"}}]}]}),
    "egress-named-port": pol("z", {"podSelector": sel(pod="b"), "policyTypes": ["Egress"], "egress": [
        {"ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}]}),
    "ingress-and-egress-in-one-policy": pol("x", {"podSelector": A, "policyTypes": ["Ingress", "Egress"],
                                                  "ingress": [{"from": [{"namespaceSelector": sel(ns="y")}]}],
                                                  "egress": [{"to": [{"namespaceSelector": sel(ns="z")}]}]}),
    "default-types-with-egress-rules-isolate-ingress-too": pol("x", {"podSelector": A, "egress": [{}]}),
    "explicit-egress-type-ignores-ingress-rules": pol("x", {"podSelector": A, "policyTypes": ["Egress"],
                                                            "ingress": [{}], "egress": []}),
    "policies-union": both(pol("x", {"podSelector": A, "ingress": [
        {"from": [{"namespaceSelector": sel(ns="y")}], "ports": [{"port": 80}]}]}, "p1"),
        pol("x", {"podSelector": A, "ingress": [{"from": [{"namespaceSelector": sel(ns="z")}],
                                                 "ports": [{"port": 81, "protocol": "UDP"}]}]}, "p2")),
    "policy-in-y-does-not-touch-x": pol("y", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    "selector-matching-nothing-has-no-effect": pol("x", {"podSelector": sel(pod="nobody"), "ingress": []}),
    "empty-from-list-allows-all-sources": pol("x", {"podSelector": A, "ingress": [{"from": [],
                                                                                  "ports": [{"port": 81}]}]}),
    "metadata-name-label-selects-namespace": lambda c: c.policy("x", "p", {"podSelector": A, "ingress": [
        {"from": [{"namespaceSelector": sel(**{"kubernetes.io/metadata.name": c.ns("z")})}]}]}),
}


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Iterator[Cluster]:
    with running_cluster(lab, unique("np"), unique("t"), "10.61.0.0/16") as c:
        yield c


@pytest.fixture
def clean(cluster: Cluster) -> Iterator[Cluster]:
    """Each scenario starts from no policy and the original labels."""
    try:
        yield cluster
    finally:
        cluster.clear_policies()
        for key in list(cluster.pods):
            if key in cluster.base:
                cluster.label_pod(key, {"pod": key.split("/")[1]})
            else:
                cluster.remove_pod(key)
        for n in ("x", "y", "z"):
            cluster.label_namespace(n, {"ns": n})


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_truth_table(clean: Cluster, name: str) -> None:
    SCENARIOS[name](clean)
    assert clean.converge() == []


# --- changes while traffic runs ----------------------------------------------------------------------

def test_pod_label_change_moves_it_in_and_out_of_a_policy(clean: Cluster) -> None:
    c = clean
    c.policy("x", "p", {"podSelector": A, "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]})
    assert c.converge() == []
    c.label_pod("x/c", {"pod": "b"})  # x/c now counts as a "b" peer
    assert c.converge() == []
    c.label_pod("x/a", {"pod": "z"})  # x/a leaves the policy: open again
    assert c.converge() == []


def test_namespace_label_change_updates_namespace_selectors(clean: Cluster) -> None:
    c = clean
    c.policy("x", "p", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": sel(team="blue")}]}]})
    assert c.converge() == []
    c.label_namespace("y", {"ns": "y", "team": "blue"})
    assert c.converge() == []
    c.label_namespace("y", {"ns": "y"})
    c.label_namespace("z", {"ns": "z", "team": "blue"})
    assert c.converge() == []


def test_added_pod_is_covered_at_once_and_removed_pod_leaves_no_access(clean: Cluster) -> None:
    c = clean
    c.policy("x", "p", {"podSelector": {}, "ingress": [{"from": [{"podSelector": sel(role="friend")}]}]})
    assert c.converge() == []
    c.add_pod("x", "d", "h2", {"pod": "d", "role": "friend"})
    c.add_pod("y", "e", "h3", {"pod": "e"})
    assert c.converge() == []
    c.remove_pod("x/d")
    assert c.converge() == []


def test_deleting_and_updating_policies_reopens_traffic(clean: Cluster) -> None:
    c = clean
    c.policy("x", "deny", DENY_INGRESS)
    c.policy("y", "deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    assert c.converge() == []
    c.policy("x", "deny", {"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]})  # updated in place
    assert c.converge() == []
    c.client.delete("NetworkPolicy", f"{c.ns('y')}/deny")
    assert c.converge() == []


def test_networks_are_isolated_unless_a_policy_allows(clean: Cluster, lab: Lab) -> None:
    c = clean
    other = make_network(lab, unique("np"), "10.62.0.0/16")
    c.add_pod("x", "m", "h1", {"pod": "m"}, network=other)
    c.add_pod("y", "n", "h2", {"pod": "n"}, network=other)
    assert c.converge() == []  # nothing crosses between the two networks
    c.policy("x", "p", {"podSelector": A, "ingress": [{"from": [{"ipBlock": {"cidr": "10.62.0.0/16"}}]}]})
    c.policy("y", "p", {"podSelector": sel(pod="n"), "ingress": [{"from": [{"namespaceSelector": sel(ns="z")}]}]})
    assert c.converge() == []


# --- tether trace and the flow log -----------------------------------------------------------------

def trace(c: Cluster, src: str, dst: str) -> dict:
    import json

    from typer.testing import CliRunner

    from tether.cli.main import app

    r = CliRunner().invoke(app, ["trace", src, dst, "--probe", "--lab", c.lab.name, "--timeout", "0.5",
                                 "-o", "json"])
    assert r.exit_code in (0, 2), r.output
    return json.loads(r.output)


def test_trace_agrees_with_the_probe_and_names_the_policy(clean: Cluster) -> None:
    c = clean
    c.policy("x", "deny", DENY_INGRESS)
    c.policy("x", "web", {"podSelector": A, "ingress": [{"from": [{"namespaceSelector": sel(ns="y")}],
                                                         "ports": [{"port": 80}]}]})
    c.policy("z", "out", {"podSelector": sel(pod="c"), "policyTypes": ["Egress"],
                          "egress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]})
    assert c.converge() == []
    disagree = []
    for src in ("z/c",):  # every truth-table case already goes through trace's engine (Cluster.expected)
        for dst in c.pods:
            for port in ("80/tcp", "81/udp"):
                t = trace(c, f"{c.ns(src[0])}/{c.prefix}{src.replace('/', '')}",
                          f"{c.ns(dst[0])}/{c.prefix}{dst.replace('/', '')}:{port}")
                if not t["probe"]["agrees"]:
                    disagree.append(f"{src} -> {dst} {port}: {t}")
    assert disagree == []
    allowed = trace(c, f"{c.ns('y')}/{c.prefix}ya", f"{c.ns('x')}/{c.prefix}xa:80/tcp")
    assert allowed["allowed"] and allowed["policy"] == f"{c.ns('x')}/web" and allowed["rule"] == "ingress[0]"
    denied = trace(c, f"{c.ns('z')}/{c.prefix}zc", f"{c.ns('y')}/{c.prefix}ya:80/tcp")
    assert not denied["allowed"] and denied["policy"] == f"{c.ns('z')}/out"
    host = c.pods["x/b"].host
    own = trace(c, f"host:{host}", f"{c.ns('x')}/{c.prefix}xb:81/tcp")
    assert own["allowed"] and own["probe"]["reached"], "traffic from the pod's own host is always allowed"


def test_denied_packets_are_logged_and_counted_per_policy(clean: Cluster) -> None:
    import os
    import socket as sk

    from tether.jsonline import query_flows as query

    c = clean
    c.policy("x", "deny", DENY_INGRESS)
    assert c.converge() == []
    xa = c.pods["x/a"]
    sock = os.path.join(c.lab.agent_dir(xa.host), "flows.sock")
    records = query(sock, limit=2000, denied=True)
    mine = [r for r in records if r.get("dst") == xa.ip and "deny in np" in r.get("reason", "")]
    assert mine, f"no flow-log record of the drops to x/a among {len(records)}"
    assert {"src", "dport", "proto", "interface"} <= set(mine[-1])
    with sk.socket(sk.AF_UNIX) as s:
        s.connect(sock)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        text = b""
        while chunk := s.recv(65536):
            text += chunk
    line = next(x for x in text.decode().splitlines() if f'policy="{c.ns("x")}/deny"' in x)
    assert int(line.rsplit(" ", 1)[1]) > 0
