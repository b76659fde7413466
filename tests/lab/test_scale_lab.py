"""The scale lab at CI size: many lean hosts, a generated population registered through the API, and
real pods on sampled hosts proving reachability and policy with real packets.

Size: TETHER_SCALE_HOSTS (default 20) hosts, TETHER_SCALE_ENDPOINTS (default 1,000) endpoints,
a tenth as many NetworkPolicies and a twentieth as many services (tether.lab.scale's shape); about
1.5 minutes on two cores at the default (20 hosts and 2,000 endpoints: 5 min on a
busy machine). bench/scale.py measures the same lab's figures at full size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.fixtures.lab import lab_name, require_root_tools
from tether.lab.cluster import Lab, port_open, wait_for
from tether.lab.scale import NETWORK, Size, objects, populate
from tether.model import NetworkPolicy

pytestmark = pytest.mark.lab

HOSTS = int(os.environ.get("TETHER_SCALE_HOSTS", "20"))
ENDPOINTS = int(os.environ.get("TETHER_SCALE_ENDPOINTS", "1000"))


def sampled(lab: Lab, n: int = 3) -> list[str]:
    """The second host, one in the middle and the last: both underlay subnets, far apart in the list."""
    names = [h.name for h in lab.state.hosts]
    return sorted({names[1], names[len(names) // 2], names[-1]}, key=names.index)[:n]


def all_applied(lab: Lab, revision: int) -> bool:
    c = lab.client()
    try:
        hosts = c.list_raw("Host")
    finally:
        c.close()
    return len(hosts) == HOSTS and all((h.get("status") or {}).get("applied_revision", 0) >= revision for h in hosts)


@pytest.fixture(scope="module")
def scale_lab() -> Iterator[Lab]:
    require_root_tools()
    lab = Lab(lab_name())
    try:
        lab.up(hosts=HOSTS, lean=True, progress=lambda _m: None)
        size = Size(HOSTS, ENDPOINTS, ENDPOINTS // 10, ENDPOINTS // 20)
        populate(lab.server_url, lab.token, objects(size, [h.name for h in lab.state.hosts]))
        yield lab
    finally:
        lab.down()


def test_every_host_programs_the_generated_population(scale_lab: Lab) -> None:
    lab = scale_lab
    c = lab.client()
    try:
        eps = c.list_raw("Endpoint", network=NETWORK)
        revision = c.apply(NetworkPolicy(name="mark", namespace="default",
                                         spec={"podSelector": {"matchLabels": {"none": "x"}}})).revision
    finally:
        c.close()
    assert len(eps) == ENDPOINTS and all(e["ips"] for e in eps)
    assert {e["host"] for e in eps} == {h.name for h in lab.state.hosts}
    wait_for(lambda: all_applied(lab, revision), 60, f"all {HOSTS} hosts to apply revision {revision}")


def test_pods_on_sampled_hosts_reach_a_new_pod_on_h1(scale_lab: Lab) -> None:
    lab = scale_lab
    probes = [lab.run_pod(h, "reach", NETWORK, labels={"role": "reach"}) for h in sampled(lab)]
    new = lab.run_pod("h1", "fresh", NETWORK, labels={"role": "fresh"})
    for p in probes:
        assert lab.reaches(f"{p.host}/reach", new.ip, within=10), f"{p.host} cannot reach the new pod on h1"


def test_a_policy_admits_only_its_peers_across_hosts(scale_lab: Lab) -> None:
    lab = scale_lab
    first, *others = sampled(lab)
    guarded = lab.run_pod("h1", "guarded", NETWORK, labels={"role": "guarded"})
    friend = lab.run_pod(first, "friend", NETWORK, labels={"role": "friend"})
    strangers = [lab.run_pod(h, "stranger", NETWORK, labels={"role": "stranger"}) for h in others]
    assert all(lab.reaches(f"{p.host}/{p.name}", guarded.ip) for p in [friend, *strangers])
    c = lab.client()
    try:
        c.apply(NetworkPolicy(name="guard", namespace="default", spec={
            "podSelector": {"matchLabels": {"role": "guarded"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "friend"}}}]}]}))
    finally:
        c.close()
    for p in strangers:  # blocked within moments on h1, whichever host the stranger is on
        wait_for(lambda p=p: not lab.ping(f"{p.host}/stranger", guarded.ip, wait=0.2), 10,
                 f"the policy to block the stranger on {p.host}")
        assert not lab.ping(f"{p.host}/stranger", guarded.ip), f"a stranger on {p.host} still reaches the guarded pod"
    assert lab.ping(f"{first}/friend", guarded.ip, count=3), f"the friend on {first} no longer reaches the guarded pod"


def test_a_generated_policy_is_enforced_on_a_real_pod_of_its_app(scale_lab: Lab) -> None:
    """np0 (generated) selects app a0 of scale-0 and admits only app a1 on TCP 8080: a real pod of a0
    on h1 takes TCP 8080 from a real a1 pod on another host, and neither ICMP from it nor TCP 8080
    from a pod of an app no policy names."""
    lab = scale_lab
    first, *_ = sampled(lab)
    a0 = lab.run_pod("h1", "app0", NETWORK, namespace="scale-0", labels={"app": "a0"})
    a1 = lab.run_pod(first, "app1", NETWORK, namespace="scale-0", labels={"app": "a1"})
    zz = lab.run_pod(first, "appzz", NETWORK, namespace="scale-0", labels={"app": "zz"})
    web = subprocess.Popen(["ip", "netns", "exec", a0.ns, sys.executable, "-m", "http.server", "8080"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ":8080" in lab.exec("h1/app0", "ss", "-Hltn").stdout, 10, "the web server in app0")
        wait_for(lambda: port_open(a1.ns, a0.ip, 8080), 10, "app a1 to connect to app a0 on TCP 8080")
        assert not port_open(zz.ns, a0.ip, 8080), "np0 admits app a1 only"
        assert not lab.ping(f"{first}/app1", a0.ip, count=2), "np0 admits app a1 on TCP 8080 only, not ICMP"
    finally:
        web.kill()
        web.wait()
