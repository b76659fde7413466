"""In a lab, pods resolve cluster names the way Kubernetes pods do: their resolv.conf (from the CNI
result) names the host's Tether DNS with the search path, so `web` from a pod in namespace shop is
the service web there, a headless service answers its backends' addresses, and `curl web` reaches a
backend. Endpoints become `active` once their host programmed them; heartbeats are visible; running
a pod twice says so."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.fixtures.lab import unique
from tests.services.probes import stop
from tether.lab.cluster import NETNS_ETC, Lab, nsx, wait_for
from tether.model import Namespace, Network, Service, ServicePort, Subnet

PORT = 8080


@pytest.fixture(scope="module")
def world(lab: Lab):
    """Network, namespace shop, a backend pod on h2 serving HTTP on PORT, a client pod on h1, services web
    (VIP) and hl (headless) in shop, and web in default (to prove the namespace comes first)."""
    c = lab.client()
    net = unique("dns")
    c.create_network(Network(name=net, subnets=[Subnet(cidr="10.62.0.0/16")]))
    c.apply(Namespace(name="shop"))
    backend = lab.run_pod("h2", unique("b"), net, namespace="shop", labels={"app": "web"})
    client = lab.run_pod("h1", unique("c"), net, namespace="shop")
    server = subprocess.Popen(["ip", "netns", "exec", backend.ns, sys.executable, "-m", "tether.lab.echo_web",
                               "--port", str(PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    port = [ServicePort(port=80, target_port=PORT)]
    web = c.apply(Service(name="web", namespace="shop", selector={"app": "web"}, ports=port))
    other = c.apply(Service(name="web", namespace="default", selector={"app": "nothing"}, ports=port))
    c.apply(Service(name="hl", namespace="shop", selector={"app": "web"}, ports=port, headless=True))
    try:
        yield {"net": net, "backend": backend, "client": client, "web": web, "other": other}
    finally:
        stop(server)
        for ref in (f"h1/{client.name}", f"h2/{backend.name}"):
            lab.rm_pod(ref)
        for svc in ("shop/web", "default/web", "shop/hl"):
            c.delete("Service", svc)


def resolve(ns: str, name: str) -> list[str]:
    """What the pod's own resolver (glibc, reading the pod's resolv.conf) answers."""
    r = nsx(ns, "getent", "ahostsv4", name, check=False, timeout=30)
    return sorted({line.split()[0] for line in r.stdout.splitlines()})


def test_the_pod_resolv_conf_is_tethers(lab: Lab, world) -> None:
    text = nsx(world["client"].ns, "cat", "/etc/resolv.conf").stdout
    assert "nameserver 169.254.20.10" in text
    assert f"search shop.svc.tether.local svc.tether.local {world['net']}.tether.local tether.local" in text
    assert "options ndots:5" in text


def test_a_short_name_from_a_pod_is_the_service_in_its_namespace(lab: Lab, world) -> None:
    ns = world["client"].ns
    wait_for(lambda: resolve(ns, "web") == [world["web"].cluster_ip], 15, "web to resolve")
    assert resolve(ns, "web.default") == [world["other"].cluster_ip]
    assert resolve(ns, world["backend"].name) == world["backend"].ips  # a pod on the same network


def test_a_headless_service_answers_its_backends_addresses(lab: Lab, world) -> None:
    wait_for(lambda: resolve(world["client"].ns, "hl") == world["backend"].ips, 15, "hl to resolve")


def test_curl_web_reaches_a_backend(lab: Lab, world) -> None:
    def fetched() -> bool:
        r = nsx(world["client"].ns, "curl", "-s", "-m", "3", "http://web/", check=False, timeout=30)
        return r.returncode == 0 and r.stdout.strip() == world["client"].ips[0]  # echo_web answers the caller
    wait_for(fetched, 20, "curl http://web/ to answer")


def test_pod_endpoints_become_active_and_heartbeats_move(lab: Lab, world) -> None:
    c = lab.client()

    def states() -> set[str]:
        return {e["status"] for e in c.list_raw("Endpoint", network=world["net"])}
    wait_for(lambda: states() == {"active"}, 20, "the pods' endpoints to become active")
    first = {h["name"]: h["heartbeat"] for h in c.list_raw("Host")}
    assert all(first.values()), first
    time.sleep(6)  # agents beat every ttl/3 = 5 s
    later = {h["name"]: h["heartbeat"] for h in c.list_raw("Host")}
    assert all(later[h] > first[h] for h in first), (first, later)


def test_running_the_same_pod_twice_says_so(lab: Lab, world) -> None:
    b = world["backend"]
    with pytest.raises(RuntimeError, match=f"pod h2/{b.name} already runs"):
        lab.run_pod("h2", b.name, world["net"])


def test_removing_a_pod_removes_its_resolv_conf(lab: Lab, world) -> None:
    pod = lab.run_pod("h1", unique("t"), world["net"])
    assert os.path.exists(os.path.join(NETNS_ETC, pod.ns, "resolv.conf"))
    lab.rm_pod(f"h1/{pod.name}")
    assert not os.path.exists(os.path.join(NETNS_ETC, pod.ns))
