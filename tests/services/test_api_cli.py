"""Services through the API, Kubernetes manifests and the CLI: VIPs from the service range, node
ports assigned and unique, and `tether service` / `tether dns lookup` against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.fixtures.server import ServerProc, start_server
from tether.client import ApiError
from tether.manifests import parse
from tether.model import Endpoint, Network, Service, ServicePort, Subnet

MANIFEST = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[ServerProc]:
    d = tmp_path_factory.mktemp("svc-server")
    s = start_server(f"sqlite://{d}/tether.db", str(d / "state"), "--service-cidr", "10.97.0.0/24")
    try:
        yield s
    finally:
        s.stop()


def cli(srv: ServerProc, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TETHER_SERVER": srv.url, "TETHER_TOKEN": srv.token}
    return subprocess.run([sys.executable, "-m", "tether.cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_kubernetes_service_manifest_gets_a_vip_from_the_range_and_node_ports(srv: ServerProc) -> None:
    c = srv.client()
    svc, = parse(MANIFEST)
    stored = c.apply(svc)
    assert isinstance(stored, Service) and stored.cluster_ip and stored.cluster_ip.startswith("10.97.0.")
    assert stored.session_affinity == "ClientIP" and stored.affinity_timeout == 300
    ports = {p.name: p for p in stored.ports}
    assert ports["http"].target_port == 8080 and ports["dns"].protocol == "UDP"
    assert all(30000 <= (p.node_port or 0) <= 32767 for p in stored.ports)
    again = c.apply(parse(MANIFEST)[0])
    assert again.cluster_ip == stored.cluster_ip and [p.node_port for p in again.ports] == [
        p.node_port for p in stored.ports], "an update keeps its VIP and node ports"


def test_node_port_conflicts_and_misuse_are_refused_with_a_reason(srv: ServerProc) -> None:
    c = srv.client()
    first = c.apply(Service(name="np1", type="NodePort", selector={"a": "b"}, ports=[ServicePort(port=80)]))
    taken = first.ports[0].node_port
    with pytest.raises(ApiError) as e:
        c.apply(Service(name="np2", type="NodePort", selector={"a": "b"},
                        ports=[ServicePort(port=80, node_port=taken)]))
    assert e.value.status == 409 and "already published" in e.value.detail
    with pytest.raises(ApiError) as e:
        c.apply(Service(name="np3", selector={"a": "b"}, ports=[ServicePort(port=80, node_port=31000)]))
    assert e.value.status == 400 and "NodePort" in e.value.detail
    with pytest.raises(ApiError) as e:
        c.apply(Service(name="np4", cluster_ip="10.200.0.1", selector={"a": "b"}, ports=[ServicePort(port=80)]))
    assert e.value.status == 400 and "service range" in e.value.detail


def test_host_published_node_ports_conflict_only_where_they_share_an_address(srv: ServerProc) -> None:
    """Docker's -p: the same port on two hosts is fine; on one host (or one of its addresses) it is a
    409 that says where; a cluster-wide node port conflicts with all of them."""
    c = srv.client()

    def pub(name: str, port: int, host: str | None = None, host_ip: str | None = None) -> Service:
        return c.apply(Service(name=name, type="NodePort", selector={"a": "b"}, host=host, host_ip=host_ip,
                               ports=[ServicePort(port=80, node_port=port)]))

    pub("hp1", 31801, "h1")
    pub("hp2", 31801, "h2")
    pub("hp3", 31802, "h1", "192.0.2.1")
    pub("hp4", 31802, "h1", "192.0.2.2")
    for args in (("hp5", 31801, "h1"), ("hp6", 31802, "h1"), ("hp7", 31801)):
        with pytest.raises(ApiError) as e:
            pub(*args)
        assert e.value.status == 409 and "already published" in e.value.detail, e.value.detail
    with pytest.raises(ApiError) as e:
        pub("hp8", 31802, "h1", "192.0.2.1")
    assert "on 192.0.2.1" in e.value.detail
    with pytest.raises(ValueError, match="needs host"):
        Service(name="x", type="NodePort", host_ip="192.0.2.1")
    r = cli(srv, "service", "create", "hpc", "--port", "80:80:31801", "--selector", "a=b", "--type", "NodePort",
            "--host", "h3", "--host-ip", "192.0.2.3", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["host"], json.loads(r.stdout)["host_ip"]) == ("h3", "192.0.2.3")
    for n in ("hp1", "hp2", "hp3", "hp4", "hpc"):
        c.delete("Service", f"default/{n}")


def test_service_cli_create_list_show_delete(srv: ServerProc) -> None:
    c = srv.client()
    c.create_network(Network(name="clinet", subnets=[Subnet(cidr="10.44.0.0/16")]))
    c.create_endpoint(Endpoint(name="be1", network="clinet", ips=["10.44.0.10"], labels={"app": "cli"}))
    r = cli(srv, "service", "create", "clisvc", "--port", "http=80:8080", "--port", "53/udp", "--selector", "app=cli",
            "-o", "json")
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert created["cluster_ip"].startswith("10.97.0.") and created["ports"][1]["protocol"] == "UDP"
    listed = json.loads(cli(srv, "service", "list", "-o", "json").stdout)
    assert "clisvc" in {s["name"] for s in listed}
    assert "clisvc" in cli(srv, "service", "list").stdout
    shown = json.loads(cli(srv, "service", "show", "clisvc", "-o", "json").stdout)
    assert shown["ready_backends"]["80/TCP"] == ["10.44.0.10:8080"]
    looked = json.loads(cli(srv, "dns", "lookup", "clisvc.default.svc.tether.local", "-o", "json").stdout)
    assert looked["rcode"] == "NOERROR" and [a["data"] for a in looked["answers"]] == [created["cluster_ip"]]
    r = cli(srv, "dns", "lookup", "10.44.0.10", "-o", "json")
    assert json.loads(r.stdout)["answers"][0]["data"] == "be1.clinet.tether.local."
    nx = json.loads(cli(srv, "dns", "lookup", "nobody.clinet.tether.local", "-o", "json").stdout)
    assert nx["rcode"] == "NXDOMAIN"
    bad = cli(srv, "service", "create", "x", "--port", "eighty", "--selector", "a=b")
    assert bad.returncode == 1 and "PORT" in bad.stderr
    assert cli(srv, "service", "delete", "clisvc").returncode == 0
    assert "clisvc" not in {s["name"] for s in json.loads(cli(srv, "service", "list", "-o", "json").stdout)}


def test_tether_apply_takes_a_kubernetes_service_manifest(srv: ServerProc, tmp_path) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text(MANIFEST.replace("name: web,", "name: applied,"))
    r = cli(srv, "apply", "-f", str(path))
    assert r.returncode == 0, r.stderr
    svc = srv.client().get("Service", "default/applied")
    assert isinstance(svc, Service) and svc.type == "NodePort" and svc.cluster_ip
    assert all(p.node_port for p in svc.ports)
