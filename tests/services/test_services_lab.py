"""Services with real packets: VIPs from every host, even balancing, affinity, backend removal and
scaling under traffic, hairpin, published ports from the internet, and refusal without backends.
One lab for the module; every service and pod has a unique name."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from tests.fixtures.lab import unique
from tests.services.probes import connect_many, start_client, start_server, stop
from tether.lab.cluster import Lab, PodInfo, nsx, wait_for
from tether.model import Network, Service, ServicePort, Subnet

pytestmark = pytest.mark.lab
PORT = 8080


@pytest.fixture(scope="module")
def net(lab: Lab) -> str:
    name = unique("svc")
    lab.client().create_network(Network(name=name, subnets=[Subnet(cidr="10.61.0.0/16")], encap="vxlan"))
    return name


@pytest.fixture(scope="module")
def servers():
    procs = []
    yield procs
    for p in procs:
        stop(p)


def backend(lab: Lab, servers: list, host: str, net: str, app: str) -> PodInfo:
    """A pod that answers with its name on PORT (tcp and udp), serving before it carries the label."""
    pod = lab.run_pod(host, unique("b"), net, labels={"role": "backend"})
    servers.append(start_server(pod.ns, pod.name, PORT))
    wait_for(lambda: nsx(pod.ns, "ss", "-ltn").stdout.count(f":{PORT}") > 0, 10, "the backend server")
    set_endpoint(lab, pod, labels={"role": "backend", "app": app})
    return pod


def endpoint_id(lab: Lab, pod: PodInfo) -> str:
    eps = lab.client().list_raw("Endpoint", owner_container_id=pod.container_id)
    return eps[0]["id"]


def set_endpoint(lab: Lab, pod: PodInfo, **changes) -> None:
    lab.client().request("PATCH", f"/api/v1/endpoints/{endpoint_id(lab, pod)}", json=changes)


def service(lab: Lab, app: str, **kw) -> Service:
    ports = kw.pop("ports", [ServicePort(port=80, target_port=PORT)])
    return lab.client().apply(Service(name=unique("s"), selector={"app": app}, ports=ports, **kw))  # type: ignore


def backends_on(lab: Lab, host: str, ip: str, port: int, proto: str = "tcp") -> set[str]:
    out = nsx(lab.host(host).ns, "nft", "-j", "list", "map", "inet", "tether", "svc_backend_ip").stdout
    found = set()
    for item in json.loads(out)["nftables"]:
        for key, value in item.get("map", {}).get("elem", []):
            k = key["concat"]
            if k[0] == ip and k[1] == proto and k[2] == port:
                found.add(value)
    return found


def wait_backends(lab: Lab, ip: str, port: int, want: set[str], hosts=("h1", "h2", "h3")) -> None:
    for h in hosts:
        wait_for(lambda h=h: backends_on(lab, h, ip, port) == want, 15, f"{h} to balance {ip}:{port} over {want}")


@pytest.fixture(scope="module")
def three(lab: Lab, net: str, servers: list) -> tuple[Service, list[PodInfo]]:
    """A service over three backends, one per host."""
    app = unique("web")
    pods = [backend(lab, servers, h, net, app) for h in ("h1", "h2", "h3")]
    svc = service(lab, app)
    assert svc.cluster_ip
    wait_backends(lab, svc.cluster_ip, 80, {p.ip for p in pods})
    return svc, pods


def test_vip_answers_from_every_pod_on_every_host(lab: Lab, net: str, three) -> None:
    svc, backends = three
    clients = [lab.run_pod(h, unique("c"), net) for h in ("h1", "h2", "h3")]
    for pod in clients + backends:
        r = connect_many(pod.ns, svc.cluster_ip, 80, 12)
        assert r["failures"] == 0, (pod.host, pod.name, r)
        assert sum(r["counts"].values()) == 12


def test_3000_new_connections_are_spread_evenly(lab: Lab, net: str, three) -> None:
    svc, backends = three
    client = lab.run_pod("h1", unique("c"), net)
    r = connect_many(client.ns, svc.cluster_ip, 80, 3000)
    assert r["failures"] == 0, r
    counts = r["counts"]
    assert set(counts) == {b.name for b in backends}
    for name, n in counts.items():  # each share within 5 points of an even third (binomial sd ~0.9 points)
        assert abs(n / 3000 - 1 / 3) <= 0.05, (name, counts)


def test_client_ip_affinity_keeps_a_client_on_one_backend(lab: Lab, net: str, three) -> None:
    _, backends = three
    app = backends[0].labels.get("app") or lab.client().list_raw(
        "Endpoint", owner_container_id=backends[0].container_id)[0]["labels"]["app"]
    svc = service(lab, app, session_affinity="ClientIP", affinity_timeout=600)
    wait_backends(lab, svc.cluster_ip, 80, {p.ip for p in backends})
    seen = set()
    for h in ("h1", "h2", "h3"):
        client = lab.run_pod(h, unique("c"), net)
        r = connect_many(client.ns, svc.cluster_ip, 80, 40)
        assert r["failures"] == 0 and len(r["counts"]) == 1, r
        seen |= set(r["counts"])
    assert seen


def test_removed_backend_gets_no_new_connections(lab: Lab, net: str, servers: list) -> None:
    app = unique("rm")
    pods = [backend(lab, servers, h, net, app) for h in ("h1", "h2", "h3")]
    svc = service(lab, app)
    wait_backends(lab, svc.cluster_ip, 80, {p.ip for p in pods})
    client = lab.run_pod("h2", unique("c"), net)
    assert set(connect_many(client.ns, svc.cluster_ip, 80, 60)["counts"]) == {p.name for p in pods}
    set_endpoint(lab, pods[1], ready=False)
    wait_backends(lab, svc.cluster_ip, 80, {pods[0].ip, pods[2].ip})
    r = connect_many(client.ns, svc.cluster_ip, 80, 300)
    assert r["failures"] == 0 and pods[1].name not in r["counts"], r
    set_endpoint(lab, pods[1], labels={"role": "backend"})  # ready again, but no longer selected
    set_endpoint(lab, pods[1], ready=True)
    time.sleep(0.5)
    assert pods[1].name not in connect_many(client.ns, svc.cluster_ip, 80, 150)["counts"]


def test_scaling_from_1_to_10_backends_under_traffic_loses_no_connection(lab: Lab, net: str, servers: list) -> None:
    app = unique("sc")
    first = backend(lab, servers, "h1", net, app)
    svc = service(lab, app)
    wait_backends(lab, svc.cluster_ip, 80, {first.ip})
    client = lab.run_pod("h3", unique("c"), net)
    traffic = start_client(client.ns, svc.cluster_ip, 80, 100000, interval=0.002)
    try:
        added = [backend(lab, servers, ("h1", "h2", "h3")[i % 3], net, app) for i in range(9)]
        wait_backends(lab, svc.cluster_ip, 80, {p.ip for p in [first, *added]})
        time.sleep(1.0)  # traffic over the full set
    finally:
        os.kill(traffic.pid, signal.SIGINT)
        out, err = traffic.communicate(timeout=20)
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    assert result is not None, err[-2000:]
    assert result["failures"] == 0, result
    assert len(result["counts"]) == 10, result


def test_hairpin_a_backend_reaches_its_own_service(lab: Lab, net: str, servers: list) -> None:
    app = unique("hp")
    pod = backend(lab, servers, "h2", net, app)
    svc = service(lab, app)
    wait_backends(lab, svc.cluster_ip, 80, {pod.ip})
    r = connect_many(pod.ns, svc.cluster_ip, 80, 10)
    assert r == {"counts": {pod.name: 10}, "failures": 0, "errors": []}


def test_published_port_is_reachable_from_the_internet_on_every_host(lab: Lab, net: str, three) -> None:
    _, backends = three
    app = lab.client().list_raw("Endpoint", owner_container_id=backends[0].container_id)[0]["labels"]["app"]
    svc = service(lab, app, type="NodePort")
    node_port = svc.ports[0].node_port
    assert node_port and 30000 <= node_port <= 32767
    for h in lab.state.hosts:
        wait_for(lambda h=h: backends_on(lab, h.name, h.ip, node_port) == {b.ip for b in backends}, 15, "node port")
        r = connect_many(lab.inet, h.ip, node_port, 30)
        assert r["failures"] == 0, (h.name, r)
        assert len(r["counts"]) >= 2, (h.name, r)  # balanced across hosts, replies come back through h


def test_udp_service_and_a_service_without_backends_is_refused_at_once(lab: Lab, net: str, three) -> None:
    _, backends = three
    app = lab.client().list_raw("Endpoint", owner_container_id=backends[0].container_id)[0]["labels"]["app"]
    udp = service(lab, app, ports=[ServicePort(port=53, target_port=PORT, protocol="UDP")])
    client = lab.run_pod("h1", unique("c"), net)
    wait_for(lambda: backends_on(lab, "h1", udp.cluster_ip, 53, "udp") == {b.ip for b in backends}, 15, "udp svc")
    r = connect_many(client.ns, udp.cluster_ip, 53, 30, "udp")
    assert r["failures"] == 0 and len(r["counts"]) >= 2, r
    empty = service(lab, unique("nobody"))
    time.sleep(1)
    t = time.monotonic()
    r = connect_many(client.ns, empty.cluster_ip, 80, 1)
    assert r["failures"] == 1 and "refused" in r["errors"][0].lower(), r
    assert time.monotonic() - t < 3


def caller_seen(lab: Lab, ip: str, port: int) -> str | None:
    """One TCP connection from the lab's internet namespace; the backend answers with the caller address."""
    code = ("import socket,sys\ns=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)\n"
            "print(s.recv(200).decode().split()[1])")
    r = nsx(lab.inet, sys.executable, "-c", code, ip, str(port), check=False, timeout=30)
    return r.stdout.strip() if r.returncode == 0 else None


def test_local_traffic_policy_keeps_the_client_address_and_uses_only_local_backends(lab: Lab, net: str,
                                                                                     servers: list) -> None:
    app = unique("loc")
    backend(lab, servers, "h2", net, app)
    local = service(lab, app, type="NodePort", external_traffic_policy="Local")
    cluster = service(lab, app, type="NodePort")
    h1, h2 = lab.host("h1"), lab.host("h2")
    wait_for(lambda: caller_seen(lab, h2.ip, cluster.ports[0].node_port) is not None, 15, "the node ports")
    assert caller_seen(lab, h2.ip, cluster.ports[0].node_port) == h2.ip  # Cluster: source-NATed to the host
    seen = caller_seen(lab, h2.ip, local.ports[0].node_port)
    assert seen is not None and seen not in {h.ip for h in lab.state.hosts}, seen  # Local: the client's own
    assert caller_seen(lab, h1.ip, local.ports[0].node_port) is None  # h1 has no local backend
    assert caller_seen(lab, h1.ip, cluster.ports[0].node_port) == h1.ip
