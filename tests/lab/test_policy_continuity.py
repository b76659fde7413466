"""A policy change never touches a connection it still allows, and stops one it forbids.

Two pods on two hosts, x/a (namespace x, host h1) and y/b (namespace y, host h2), and four one-way
TCP streams between them whose receiving end never sends a byte: a server pushing to a silent
client and a client pushing to a silent server, each begun once by x/a and once by y/b. While they
run, a policy selects one end: every stream it still allows carries on with no gap over 200 ms;
every stream it forbids stops within two seconds. Both from the table without conntrack (the
first policy of the cluster: conntrack picks the streams up mid-stream) and from a tracked table
(a policy edited: its established connections are judged again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, PodInfo, nsx, wait_for
from tether.model import Network, NetworkPolicy, Subnet

pytestmark = pytest.mark.lab
STREAM = os.path.join(os.path.dirname(__file__), "tcp_stream.py")
MAX_STALL = 0.2
STOP_WITHIN = 2.0
RUN = 7.5  # seconds each stream runs (they start over ~1.2 s); the policy comes 1 s after the last
POLICY_FOR = 3.0  # and stays this long
_port = iter(range(7600, 7999))


@dataclass
class Stream:
    name: str
    began_by: str  # "x" or "y": whose pod connected
    reader: subprocess.Popen
    writer: subprocess.Popen


@dataclass
class Pods:
    lab: Lab
    x: str
    y: str
    xa: PodInfo
    yb: PodInfo


def _py(ns: str, *args: str, out: bool = False) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, STREAM, *args],
                            stdout=subprocess.PIPE if out else subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            text=True)


def tracking(lab: Lab) -> list[bool]:
    """Has each host the table with conntrack?"""
    return ["raw_prerouting" in nsx(lab.host(h).ns, "nft", "list", "table", "inet", "tether").stdout
            for h in ("h1", "h2")]


def start_streams(p: Pods, streams: list[Stream]) -> list[Stream]:
    """Server push with a silent client and client push to a silent server, begun by each end
    (appended to `streams` as they start, so a failure still finds them to stop)."""
    for began_by, client, server in (("x", p.xa, p.yb), ("y", p.yb, p.xa)):
        port = str(next(_port))
        writer = _py(server.ns, "push-serve", port, str(RUN))
        time.sleep(0.3)
        reader = _py(client.ns, "pull", server.ip, port, str(RUN), out=True)
        streams.append(Stream(f"server {server.namespace} pushes to client {client.namespace}", began_by,
                              reader, writer))
        port = str(next(_port))
        reader = _py(server.ns, "pull-serve", port, str(RUN), out=True)
        time.sleep(0.3)
        writer = _py(client.ns, "push", server.ip, port, str(RUN))
        streams.append(Stream(f"client {client.namespace} pushes to server {server.namespace}", began_by,
                              reader, writer))
    return streams


def results(streams: list[Stream]) -> list[dict]:
    out = []
    for s in streams:
        text, _ = s.reader.communicate(timeout=RUN + 15)
        s.writer.kill()
        s.writer.wait()
        out.append(json.loads(text.strip().splitlines()[-1]) if text.strip() else {"lines": 0, "last": 0, "gaps": []})
    return out


def invalid_count(lab: Lab, host: str) -> int:
    text = nsx(lab.host(host).ns, "conntrack", "-S", check=False).stdout
    return sum(int(w.split("=")[1]) for w in text.split() if w.startswith("invalid="))


@pytest.fixture(scope="module")
def pods(lab: Lab) -> Iterator[Pods]:
    net = unique("pc")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.76.0.0/16")], encap="vxlan"))
    x, y = unique("x"), unique("y")
    xa = lab.run_pod("h1", unique("a"), net, namespace=x, labels={"pod": "a"})
    yb = lab.run_pod("h2", unique("b"), net, namespace=y, labels={"pod": "b"})
    assert lab.reaches(f"h1/{xa.name}", yb.ip) and lab.reaches(f"h2/{yb.name}", xa.ip)
    yield Pods(lab, x, y, xa, yb)


DENY_IN = {"podSelector": {}, "policyTypes": ["Ingress"]}
DENY_OUT = {"podSelector": {}, "policyTypes": ["Egress"]}
ALLOW_ALL = {"podSelector": {}, "ingress": [{}], "egress": [{}], "policyTypes": ["Ingress", "Egress"]}


def from_ns(other: str) -> dict:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": other}}}


# (policy namespace, spec, who began the streams it forbids: "x", "y" or "")
CASES = {
    "deny-all-ingress-x": ("x", DENY_IN, "y"),
    "deny-all-egress-x": ("x", DENY_OUT, "x"),
    "deny-all-ingress-y": ("y", DENY_IN, "x"),
    "deny-all-egress-y": ("y", DENY_OUT, "y"),
    # namespace names "x" and "y" in a selector stand for the pods' namespaces (see `actual`)
    "ingress-x-from-y": ("x", {"podSelector": {}, "ingress": [{"from": [from_ns("y")]}]}, ""),
    "egress-y-to-x": ("y", {"podSelector": {}, "egress": [{"to": [from_ns("x")]}], "policyTypes": ["Egress"]}, ""),
    "deny-all-both-ways-x": ("x", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}, "xy"),
}


def actual(spec: dict, p: Pods) -> dict:
    """`spec` with the namespace names of its selectors replaced by the pods' unique ones."""
    return json.loads(json.dumps(spec).replace('.name": "x"', f'.name": "{p.x}"').replace('.name": "y"',
                                                                                            f'.name": "{p.y}"'))


def check(streams: list[Stream], got: list[dict], forbidden_by: str, policy_at: float, gone_at: float) -> list[str]:
    problems = []
    for s, r in zip(streams, got, strict=True):
        if forbidden_by and s.began_by in forbidden_by:
            # stopped: no line from STOP_WITHIN after the policy until it went
            stopped = r["last"] <= policy_at + STOP_WITHIN or any(
                t - g <= policy_at + STOP_WITHIN and t >= gone_at for t, g in r["gaps"])
            if not stopped:
                problems.append(f"{s.name} (begun by {s.began_by}): forbidden, but it kept flowing "
                                f"(gaps {[(round(t - policy_at, 1), round(g, 1)) for t, g in r['gaps']]})")
            continue
        stalls = [f"{g:.2f}s at +{t - policy_at:.1f}s" for t, g in r["gaps"] if g > MAX_STALL]
        if stalls or r["lines"] < RUN / 0.02:
            problems.append(f"{s.name} (begun by {s.began_by}): allowed, but stalled {stalls} ({r['lines']} lines)")
    return problems


def run_case(p: Pods, ns: str, spec: dict, forbidden_by: str, edit_from: dict | None = None) -> None:
    """Streams start; a second later the policy is written (or `edit_from` edited to it), and
    POLICY_FOR later deleted (or edited back)."""
    c = p.lab.client()
    target = p.x if ns == "x" else p.y
    spec = actual(spec, p)
    name = unique("np")
    if edit_from is not None:
        c.apply(NetworkPolicy(name=name, namespace=target, spec=edit_from))
    # the first policy of the cluster switches the table; an edit finds its pods tracked already
    wait_for(lambda: tracking(p.lab) == [edit_from is not None] * 2, 15, "both hosts' tables")
    time.sleep(1)
    invalid = {h: invalid_count(p.lab, h) for h in ("h1", "h2")}
    streams: list[Stream] = []
    try:
        streams = start_streams(p, streams)
        time.sleep(1.0)
        policy_at = time.time()
        c.apply(NetworkPolicy(name=name, namespace=target, spec=spec))
        time.sleep(POLICY_FOR)
        gone_at = time.time()
        if edit_from is not None:
            c.apply(NetworkPolicy(name=name, namespace=target, spec=edit_from))
        else:
            c.delete("NetworkPolicy", f"{target}/{name}")
        got = results(streams)
    finally:
        for s in streams:
            for proc in (s.reader, s.writer):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if edit_from is not None:
            c.delete("NetworkPolicy", f"{target}/{name}")
    problems = check(streams, got, forbidden_by, policy_at, gone_at)
    rose = {h: invalid_count(p.lab, h) - n for h, n in invalid.items()}
    assert not problems, f"{problems} (conntrack invalid rose {rose})"


@pytest.mark.parametrize("case", list(CASES))
def test_the_first_policy_stops_only_the_streams_it_forbids(pods: Pods, case: str) -> None:
    """From the table without conntrack: the streams are picked up mid-stream."""
    ns, spec, forbidden_by = CASES[case]
    run_case(pods, ns, spec, forbidden_by)


@pytest.mark.parametrize("case", ["deny-all-ingress-x", "deny-all-egress-x", "deny-all-ingress-y",
                                  "deny-all-egress-y"])
def test_an_edited_policy_stops_only_the_established_streams_it_now_forbids(pods: Pods, case: str) -> None:
    """From a tracked table: an allow-all policy on the namespace becomes a default deny."""
    ns, spec, forbidden_by = CASES[case]
    run_case(pods, ns, spec, forbidden_by, edit_from=ALLOW_ALL)


RAW = os.path.join(os.path.dirname(__file__), "raw_tcp.py")


def forged_ack_arrives(p: Pods, text: str) -> bool:
    """A bare ACK with a payload, of no connection, from x/a's port 80 to y/b's port 40000: would
    pass as a server's packet picked up mid-stream."""
    listener = _py_raw(p.yb.ns, "expect", "40000", text, "3")
    time.sleep(0.5)
    nsx(p.xa.ns, sys.executable, RAW, "send", p.xa.ip, "80", p.yb.ip, "40000", "A", text)
    out, _ = listener.communicate(timeout=10)
    return out.strip() == "got"


def _py_raw(ns: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, RAW, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def test_after_the_pickup_grace_a_pod_cannot_send_through_its_default_deny_egress_without_a_syn(pods: Pods) -> None:
    from tether.calc.host import PICKUP_GRACE

    p = pods
    c = p.lab.client()
    wait_for(lambda: tracking(p.lab) == [False, False], 15, "both hosts' tables without conntrack")
    assert forged_ack_arrives(p, "before-any-policy"), "the probe does not work: nothing arrives without policies"
    name = unique("np")
    c.apply(NetworkPolicy(name=name, namespace=p.x, spec=DENY_OUT))
    try:
        wait_for(lambda: tracking(p.lab) == [True, True], 15, "both hosts to track")
        time.sleep(PICKUP_GRACE + 2)
        assert not forged_ack_arrives(p, "after-the-grace"), "a non-SYN segment left through default-deny egress"
    finally:
        c.delete("NetworkPolicy", f"{p.x}/{name}")
