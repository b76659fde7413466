"""The Octavia API (/v2.0/lbaas) against the in-process server: each object's shape, the Tether
service a listener with a pool becomes (VIP, port, target port, backends = enabled members, VM
ports and pods alike), cascade delete, and refusals in Octavia's error shape that name the
attribute and leave the store as it was. Packets: tests/neutron/test_octavia_lab.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.fuzz.harness import InProcessServer

LB = "/v2.0/lbaas"


@pytest.fixture
def srv(tmp_path) -> Iterator[InProcessServer]:
    s = InProcessServer(str(tmp_path))
    try:
        yield s
    finally:
        s.close()


def ok(srv: InProcessServer, method: str, path: str, body: dict | None = None, status: int = 200) -> Any:
    r = srv.request(method, path, json=body)
    assert r.status_code == status, r.text
    return r.json() if r.content else None


def refused(srv: InProcessServer, method: str, path: str, body: dict, status: int = 400) -> str:
    """The request fails in Octavia's error shape and writes nothing; returns the fault string."""
    before = srv.state()
    r = srv.request(method, path, json=body)
    assert r.status_code == status, r.text
    fault = r.json()
    assert set(fault) == {"faultcode", "faultstring", "debuginfo"} and fault["faultcode"] == "Client", fault
    assert srv.state() == before, "a refused request changed the store"
    return fault["faultstring"]


@pytest.fixture
def net(srv: InProcessServer) -> dict[str, str]:
    n = ok(srv, "POST", "/v2.0/networks", {"network": {"name": "web"}}, 201)["network"]
    s = ok(srv, "POST", "/v2.0/subnets", {"subnet": {"network_id": n["id"], "cidr": "10.60.0.0/24",
                                                     "ip_version": 4}}, 201)["subnet"]
    vm = ok(srv, "POST", "/v2.0/ports", {"port": {"network_id": n["id"], "name": "vm1",
                                                  "fixed_ips": [{"ip_address": "10.60.0.11"}]}}, 201)["port"]
    return {"net": n["id"], "subnet": s["id"], "vm_port": vm["id"]}


def make_lb(srv: InProcessServer, net: dict[str, str], **extra: Any) -> dict:
    return ok(srv, "POST", f"{LB}/loadbalancers", {"loadbalancer": {"name": "lb1", "vip_subnet_id": net["subnet"],
                                                                    **extra}}, 201)["loadbalancer"]


def services(srv: InProcessServer) -> list[dict]:
    return [s for s in ok(srv, "GET", "/api/v1/services") if s.get("load_balancer")]


def full_lb(srv: InProcessServer, net: dict[str, str]) -> tuple[dict, dict, dict]:
    lb = make_lb(srv, net)
    lst = ok(srv, "POST", f"{LB}/listeners", {"listener": {"name": "l1", "protocol": "TCP", "protocol_port": 80,
                                                           "loadbalancer_id": lb["id"]}}, 201)["listener"]
    pool = ok(srv, "POST", f"{LB}/pools", {"pool": {"name": "p1", "protocol": "TCP", "lb_algorithm": "ROUND_ROBIN",
                                                    "listener_id": lst["id"]}}, 201)["pool"]
    return lb, lst, pool


def test_load_balancer_takes_its_vip_from_the_subnet_and_is_active_at_once(srv, net) -> None:
    lb = make_lb(srv, net, description="front")
    assert lb["provisioning_status"] == "ACTIVE" and lb["operating_status"] == "ONLINE"
    assert lb["vip_subnet_id"] == net["subnet"] and lb["vip_network_id"] == net["net"]
    assert lb["vip_address"].startswith("10.60.0.") and lb["description"] == "front"
    vip_port = ok(srv, "GET", f"/v2.0/ports/{lb['vip_port_id']}")["port"]
    assert [f["ip_address"] for f in vip_port["fixed_ips"]] == [lb["vip_address"]]
    assert vip_port["device_owner"] == "Octavia"
    assert ok(srv, "GET", f"{LB}/loadbalancers?name=lb1")["loadbalancers"][0]["id"] == lb["id"]
    assert ok(srv, "GET", f"{LB}/loadbalancers?name=other")["loadbalancers"] == []
    assert refused(srv, "POST", f"{LB}/loadbalancers", {"loadbalancer": {
        "vip_subnet_id": net["subnet"], "vip_address": lb["vip_address"]}}, 409)


def test_a_listener_with_a_pool_is_a_service_on_the_vip_whose_backends_are_the_members(srv, net) -> None:
    lb, lst, pool = full_lb(srv, net)
    [svc] = services(srv)
    assert svc["cluster_ip"] == lb["vip_address"] and svc["load_balancer"] == lb["id"]
    assert svc["ports"][0]["port"] == 80 and svc["backends"] == []
    vm = ok(srv, "POST", f"{LB}/pools/{pool['id']}/members", {"member": {
        "address": "10.60.0.11", "protocol_port": 8080, "subnet_id": net["subnet"]}}, 201)["member"]
    pod = ok(srv, "POST", f"{LB}/pools/{pool['id']}/members", {"member": {
        "address": "10.60.0.12", "protocol_port": 8080}}, 201)["member"]
    assert vm["operating_status"] == "NO_MONITOR" and vm["provisioning_status"] == "ACTIVE"
    [svc] = services(srv)
    assert svc["ports"][0]["target_port"] == 8080
    assert {b["ip"]: b["endpoint"] for b in svc["backends"]} == {"10.60.0.11": net["vm_port"], "10.60.0.12": None}
    ok(srv, "PUT", f"{LB}/pools/{pool['id']}/members/{pod['id']}", {"member": {"admin_state_up": False}})
    assert [b["ip"] for b in services(srv)[0]["backends"]] == ["10.60.0.11"]
    ok(srv, "DELETE", f"{LB}/pools/{pool['id']}/members/{vm['id']}", status=204)
    assert services(srv)[0]["backends"] == []
    shown = ok(srv, "GET", f"{LB}/listeners/{lst['id']}")["listener"]
    assert shown["default_pool_id"] == pool["id"] and shown["loadbalancers"] == [{"id": lb["id"]}]
    assert ok(srv, "GET", f"{LB}/pools/{pool['id']}")["pool"]["listeners"] == [{"id": lst["id"]}]


def test_two_listeners_share_the_vip_and_source_ip_is_client_affinity(srv, net) -> None:
    lb, _, _ = full_lb(srv, net)
    lst = ok(srv, "POST", f"{LB}/listeners", {"listener": {"protocol": "UDP", "protocol_port": 53,
                                                           "loadbalancer_id": lb["id"]}}, 201)["listener"]
    ok(srv, "POST", f"{LB}/pools", {"pool": {"protocol": "UDP", "lb_algorithm": "SOURCE_IP",
                                             "listener_id": lst["id"]}}, 201)
    svcs = {s["ports"][0]["protocol"]: s for s in services(srv)}
    assert svcs["TCP"]["cluster_ip"] == svcs["UDP"]["cluster_ip"] == lb["vip_address"]
    assert svcs["UDP"]["session_affinity"] == "ClientIP" and svcs["TCP"]["session_affinity"] == "None"


def test_delete_refuses_a_load_balancer_with_children_unless_cascade_which_removes_everything(srv, net) -> None:
    lb, _, pool = full_lb(srv, net)
    ok(srv, "POST", f"{LB}/pools/{pool['id']}/members", {"member": {"address": "10.60.0.11",
                                                                      "protocol_port": 8080}}, 201)
    assert "has children" in refused(srv, "DELETE", f"{LB}/loadbalancers/{lb['id']}", {})
    ok(srv, "DELETE", f"{LB}/loadbalancers/{lb['id']}?cascade=true", status=204)
    assert services(srv) == [] and ok(srv, "GET", f"{LB}/loadbalancers")["loadbalancers"] == []
    assert ok(srv, "GET", f"{LB}/pools")["pools"] == [] and ok(srv, "GET", f"{LB}/listeners")["listeners"] == []
    assert srv.request("GET", f"/v2.0/ports/{lb['vip_port_id']}").status_code == 404
    assert srv.request("GET", f"{LB}/loadbalancers/{lb['id']}").json()["faultcode"] == "Client"


def test_deleting_a_pool_stops_its_listeners_service_and_removes_its_members(srv, net) -> None:
    _, lst, pool = full_lb(srv, net)
    ok(srv, "POST", f"{LB}/pools/{pool['id']}/members", {"member": {"address": "10.60.0.11",
                                                                      "protocol_port": 8080}}, 201)
    ok(srv, "DELETE", f"{LB}/pools/{pool['id']}", status=204)
    assert services(srv) == []
    assert ok(srv, "GET", f"{LB}/listeners/{lst['id']}")["listener"]["default_pool_id"] is None


@pytest.mark.parametrize(("path", "body", "named"), [
    ("loadbalancers", {"flavor_id": "f1"}, "flavor_id"),
    ("loadbalancers", {"vip_qos_policy_id": "q"}, "vip_qos_policy_id"),
    ("loadbalancers", {"bogus": 1}, "bogus"),
    ("listeners", {"protocol": "HTTP", "protocol_port": 80}, "protocol"),
    ("listeners", {"protocol": "TERMINATED_HTTPS", "protocol_port": 443}, "protocol"),
    ("listeners", {"protocol": "TCP", "protocol_port": 80, "default_tls_container_ref": "x"},
     "default_tls_container_ref"),
    ("listeners", {"protocol": "TCP", "protocol_port": 80, "connection_limit": 10}, "connection_limit"),
    ("listeners", {"protocol": "TCP", "protocol_port": 80, "allowed_cidrs": ["10.0.0.0/8"]}, "allowed_cidrs"),
    ("listeners", {"protocol": "TCP", "protocol_port": 80, "insert_headers": {"X-Forwarded-For": "true"}},
     "insert_headers"),
    ("listeners", {"protocol": "TCP", "protocol_port": 0}, "protocol_port"),
    ("pools", {"protocol": "TCP", "lb_algorithm": "SOURCE_IP_PORT"}, "lb_algorithm"),
    ("pools", {"protocol": "TCP", "lb_algorithm": "LEAST_CONNECTIONS"}, "lb_algorithm"),
    ("pools", {"protocol": "PROXY", "lb_algorithm": "ROUND_ROBIN"}, "protocol"),
    ("pools", {"protocol": "TCP", "lb_algorithm": "ROUND_ROBIN", "session_persistence": {"type": "SOURCE_IP"}},
     "session_persistence"),
    ("pools", {"protocol": "TCP", "lb_algorithm": "ROUND_ROBIN", "tls_enabled": True}, "tls_enabled"),
])
def test_what_tether_does_not_do_is_refused_naming_the_attribute(srv, net, path, body, named) -> None:
    lb = make_lb(srv, net)
    key = {"loadbalancers": "loadbalancer", "listeners": "listener", "pools": "pool"}[path]
    body = {**body, **({"vip_subnet_id": net["subnet"]} if path == "loadbalancers" else {"loadbalancer_id": lb["id"]})}
    assert named in refused(srv, "POST", f"{LB}/{path}", {key: body})


def test_member_options_tether_does_not_do_and_mixed_ports_are_refused(srv, net) -> None:
    _, _, pool = full_lb(srv, net)
    path = f"{LB}/pools/{pool['id']}/members"
    for extra, named in (({"weight": 5}, "weight"), ({"backup": True}, "backup"),
                         ({"monitor_port": 9000}, "monitor_port")):
        assert named in refused(srv, "POST", path, {"member": {"address": "10.60.0.11", "protocol_port": 8080,
                                                               **extra}})
    ok(srv, "POST", path, {"member": {"address": "10.60.0.11", "protocol_port": 8080}}, 201)
    assert "protocol_port" in refused(srv, "POST", path, {"member": {"address": "10.60.0.12", "protocol_port": 9090}})
    refused(srv, "POST", path, {"member": {"address": "10.60.0.11", "protocol_port": 8080}}, 409)


def test_health_monitors_and_l7_policies_are_refused_and_list_empty(srv, net) -> None:
    _, _, pool = full_lb(srv, net)
    assert "Health monitors are not implemented" in refused(srv, "POST", f"{LB}/healthmonitors", {
        "healthmonitor": {"pool_id": pool["id"], "type": "TCP", "delay": 5, "timeout": 3, "max_retries": 2}})
    assert "L7 policies" in refused(srv, "POST", f"{LB}/l7policies", {"l7policy": {"action": "REJECT"}})
    assert ok(srv, "GET", f"{LB}/healthmonitors")["healthmonitors"] == []


def test_a_service_cannot_claim_a_load_balancer_it_was_not_made_by(srv, net) -> None:
    lb = make_lb(srv, net)
    body = {"name": "sneaky", "namespace": "default", "cluster_ip": "10.60.0.200", "load_balancer": lb["id"],
            "ports": [{"port": 80}]}
    r = srv.request("PUT", "/api/v1/namespaces/default/services/sneaky", json=body)
    assert r.status_code == 400 and "Octavia API" in r.text, r.text


def test_an_ipv6_vip_makes_an_ipv6_service(srv) -> None:
    n = ok(srv, "POST", "/v2.0/networks", {"network": {"name": "six"}}, 201)["network"]
    s = ok(srv, "POST", "/v2.0/subnets", {"subnet": {"network_id": n["id"], "cidr": "fd00:64::/64",
                                                     "ip_version": 6}}, 201)["subnet"]
    lb = ok(srv, "POST", f"{LB}/loadbalancers", {"loadbalancer": {"vip_subnet_id": s["id"]}}, 201)["loadbalancer"]
    lst = ok(srv, "POST", f"{LB}/listeners", {"listener": {"protocol": "TCP", "protocol_port": 80,
                                                           "loadbalancer_id": lb["id"]}}, 201)["listener"]
    pool = ok(srv, "POST", f"{LB}/pools", {"pool": {"protocol": "TCP", "lb_algorithm": "ROUND_ROBIN",
                                                    "listener_id": lst["id"]}}, 201)["pool"]
    assert "protocol_port" not in refused(srv, "POST", f"{LB}/pools/{pool['id']}/members", {
        "member": {"address": "10.0.0.1", "protocol_port": 80}})  # not the VIP's IP version
    ok(srv, "POST", f"{LB}/pools/{pool['id']}/members", {"member": {"address": "fd00:64::20",
                                                                      "protocol_port": 80}}, 201)
    [svc] = services(srv)
    assert ":" in lb["vip_address"] and svc["cluster_ips"] == [lb["vip_address"]] and svc["ip_families"] == ["IPv6"]


def test_bad_vips_and_a_second_default_pool_are_refused_and_write_nothing(srv, net) -> None:
    assert "not in subnet" in refused(srv, "POST", f"{LB}/loadbalancers", {"loadbalancer": {
        "vip_subnet_id": net["subnet"], "vip_address": "10.61.0.5"}})
    assert "vip_port_id" in refused(srv, "POST", f"{LB}/loadbalancers", {"loadbalancer": {"vip_port_id": "x"}})
    assert "VIP must contain" in refused(srv, "POST", f"{LB}/loadbalancers", {"loadbalancer": {"name": "x"}})
    _, lst, _ = full_lb(srv, net)
    refused(srv, "POST", f"{LB}/pools", {"pool": {"protocol": "TCP", "lb_algorithm": "ROUND_ROBIN",
                                                  "listener_id": lst["id"]}}, 409)
    refused(srv, "POST", f"{LB}/listeners", {"listener": {"protocol": "TCP", "protocol_port": 80,
                                                          "loadbalancer_id": lst["loadbalancer_id"]}}, 409)


def test_a_pool_made_on_the_load_balancer_serves_once_a_listener_takes_it_as_default(srv, net) -> None:
    lb = make_lb(srv, net)
    pool = ok(srv, "POST", f"{LB}/pools", {"pool": {"protocol": "TCP", "lb_algorithm": "ROUND_ROBIN",
                                                    "loadbalancer_id": lb["id"]}}, 201)["pool"]
    lst = ok(srv, "POST", f"{LB}/listeners", {"listener": {"protocol": "TCP", "protocol_port": 443,
                                                           "loadbalancer_id": lb["id"]}}, 201)["listener"]
    assert services(srv) == []
    ok(srv, "PUT", f"{LB}/listeners/{lst['id']}", {"listener": {"default_pool_id": pool["id"]}})
    [svc] = services(srv)
    assert svc["ports"][0]["port"] == 443
    ok(srv, "PUT", f"{LB}/loadbalancers/{lb['id']}", {"loadbalancer": {"admin_state_up": False}})
    assert services(srv)[0]["backends"] == [] and ok(srv, "GET", f"{LB}/loadbalancers/{lb['id']}")[
        "loadbalancer"]["operating_status"] == "OFFLINE"
    ok(srv, "DELETE", f"{LB}/listeners/{lst['id']}", status=204)
    assert services(srv) == []


def test_a_member_made_before_its_port_is_tied_to_the_port_on_the_next_write(srv, net) -> None:
    lb, _, pool = full_lb(srv, net)
    ok(srv, "POST", f"{LB}/pools/{pool['id']}/members", {"member": {"address": "10.60.0.30",
                                                                      "protocol_port": 8080}}, 201)
    assert services(srv)[0]["backends"] == [{"ip": "10.60.0.30", "endpoint": None}]
    port = ok(srv, "POST", "/v2.0/ports", {"port": {"network_id": net["net"], "name": "late",
                                                    "fixed_ips": [{"ip_address": "10.60.0.30"}]}}, 201)["port"]
    ok(srv, "PUT", f"{LB}/loadbalancers/{lb['id']}", {"loadbalancer": {"name": "renamed"}})
    assert services(srv)[0]["backends"] == [{"ip": "10.60.0.30", "endpoint": port["id"]}]


def test_a_vip_network_without_a_subnet_id_takes_the_address_from_its_subnet(srv, net) -> None:
    lb = ok(srv, "POST", f"{LB}/loadbalancers", {"loadbalancer": {"vip_network_id": net["net"]}}, 201)["loadbalancer"]
    assert lb["vip_subnet_id"] == net["subnet"] and lb["vip_address"].startswith("10.60.0.")
