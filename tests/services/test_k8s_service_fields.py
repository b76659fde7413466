"""Kubernetes Service manifests: what Tether does not implement is refused or warned about by name,
never dropped in silence. Headless services (`clusterIP: None`) are DNS-only: no virtual IP, and
the name answers the ready backends' addresses; `externalTrafficPolicy: Local` keeps node-port
traffic on the receiving host's backends without source NAT."""

from __future__ import annotations

from collections.abc import Iterator

import dns.message
import pytest
import yaml

from tests.calc.test_services import NET, ep, web
from tests.fixtures.server import ServerProc, start_server
from tether.calc.dns_records import answer, build
from tether.calc.services import compile as compile_services
from tether.manifests import ManifestError, parse
from tether.model import Service


def manifest(spec: dict, name: str = "web") -> str:
    base = {"selector": {"app": "web"}, "ports": [{"port": 80}]}
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": base | spec})


def one(spec: dict, warnings: list[str] | None = None) -> Service:
    (svc,) = parse(manifest(spec), warn=(warnings if warnings is not None else []).append)
    assert isinstance(svc, Service)
    return svc


def test_headless_manifest_is_a_service_without_a_virtual_ip() -> None:
    svc = one({"clusterIP": "None"})
    assert svc.headless and svc.cluster_ip is None


def test_external_traffic_policy_local_is_kept_and_refused_without_node_ports() -> None:
    assert one({"type": "NodePort", "externalTrafficPolicy": "Local"}).external_traffic_policy == "Local"
    with pytest.raises(ManifestError, match="Local applies to node ports"):
        one({"externalTrafficPolicy": "Local"})


@pytest.mark.parametrize("field,value", [
    ("externalIPs", ["192.0.2.1"]), ("loadBalancerIP", "192.0.2.2"), ("externalName", "example.com"),
    ("publishNotReadyAddresses", True), ("loadBalancerSourceRanges", ["0.0.0.0/0"]), ("healthCheckNodePort", 30001),
])
def test_fields_tether_does_not_implement_are_refused_by_name(field: str, value) -> None:
    with pytest.raises(ManifestError, match=f"spec.{field} is not supported"):
        one({field: value})


@pytest.mark.parametrize("spec,words", [
    ({"internalTrafficPolicy": "Local"}, "internalTrafficPolicy"),
    ({"ipFamilies": ["IPv5"]}, "give IPv4, IPv6 or both"),
    ({"ipFamilies": ["IPv4", "IPv6"]}, "with ipFamilyPolicy SingleStack"),
    ({"ipFamilyPolicy": "Whatever"}, "SingleStack, PreferDualStack or RequireDualStack"),
    ({"clusterIP": "10.96.0.6", "clusterIPs": ["10.96.0.5", "fd00::5"]}, "must start with spec.clusterIP"),
    ({"sessionAffinty": "ClientIP"}, "unknown field(s) spec.sessionAffinty"),
    ({"type": "LoadBalancer"}, "type 'LoadBalancer' is not supported"),
    ({"ports": [{"port": 80, "targetPrt": 8080}]}, "spec.ports[0].targetPrt"),
    ({"type": "NodePort", "clusterIP": "None"}, "headless service cannot be NodePort"),
])
def test_other_unsupported_settings_are_refused_with_the_field(spec: dict, words: str) -> None:
    with pytest.raises(ManifestError) as e:
        one(spec)
    assert words in str(e.value)


def test_accepted_but_unused_fields_are_warned_about() -> None:
    warnings: list[str] = []
    svc = one({"ports": [{"port": 80, "appProtocol": "http"}], "ipFamilies": ["IPv4"],
               "internalTrafficPolicy": "Cluster", "clusterIPs": ["10.96.0.7"]}, warnings)
    assert svc.cluster_ip == "10.96.0.7"
    assert warnings == ["Service web: spec.ports[0].appProtocol is ignored (informational: Tether balances "
                        "connections whatever the protocol)"]


def test_headless_name_answers_the_ready_backends_addresses() -> None:
    svc = web(cluster_ip=None, headless=True)
    rec = build([ep(1), ep(2), ep(3, ready=False), ep(4, labels={"app": "db"})], [svc], [NET])
    msg = dns.message.from_wire(answer(rec, dns.message.make_query("web.default.svc.tether.local", "A").to_wire()))
    assert sorted(rd.to_text() for rrset in msg.answer for rd in rrset) == ["10.1.0.1", "10.1.0.2"]
    ptr = dns.message.from_wire(answer(rec, dns.message.make_query("1.0.1.10.in-addr.arpa", "PTR").to_wire()))
    assert [rd.to_text() for rrset in ptr.answer for rd in rrset] == ["p1.n.tether.local."]  # still the pod's


def test_headless_service_gets_no_load_balancing() -> None:
    plan = compile_services([web(cluster_ip=None, headless=True)], [ep(1)], [NET], "h1", [])
    assert not plan.set("svc_vips").elements and not plan.set("svc_backend_ip").elements


def test_local_node_port_goes_to_local_backends_without_source_nat() -> None:
    svc = web(type="NodePort", external_traffic_policy="Local",
              ports=[web().ports[0].model_copy(update={"node_port": 30080})])
    plan = compile_services([svc], [ep(1, host="h1"), ep(2, host="h2")], [NET], "h1", ["198.18.0.1"])
    assert plan.set("svc_nodeports").elements == {(("tcp", 30080), "goto svc-lb-1")}  # not svc-np-: no SNAT mark
    assert (("198.18.0.1", "tcp", 30080, 1), "10.1.0.1") in plan.set("svc_backend_ip").elements
    cluster = compile_services([svc.model_copy(update={"external_traffic_policy": "Cluster"})],
                               [ep(1, host="h1"), ep(2, host="h2")], [NET], "h1", ["198.18.0.1"])
    assert cluster.set("svc_nodeports").elements == {(("tcp", 30080), "goto svc-np-lb-2")}


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[ServerProc]:
    d = tmp_path_factory.mktemp("headless-server")
    s = start_server(f"sqlite://{d}/tether.db", str(d / "state"), "--service-cidr", "10.98.0.0/24")
    try:
        yield s
    finally:
        s.stop()


def test_the_server_gives_a_headless_service_no_virtual_ip(srv: ServerProc) -> None:
    c = srv.client()
    (svc,) = parse(manifest({"clusterIP": "None"}, name="hl"))
    made = c.apply(svc)
    assert isinstance(made, Service) and made.headless and made.cluster_ip is None
    (vip,) = parse(manifest({}, name="hl"))
    assert c.apply(vip).cluster_ip  # made a normal service again: it gets a VIP
    assert c.apply(svc).cluster_ip is None  # and headless again releases it
