"""Errors come back as Neutron gives them: its status codes and its body
`{"NeutronError": {"type": ..., "message": ..., "detail": ""}}`, and a refused request changes nothing."""

from __future__ import annotations

import pytest

from tests.fixtures.lab import unique
from tests.fixtures.openstack import neutron_http

pytestmark = pytest.mark.client

MISSING = "4f6ba5c0-0000-4000-8000-000000000000"


@pytest.fixture(scope="module")
def http(neutron_server):
    return neutron_http(neutron_server)


@pytest.fixture(scope="module")
def net(http) -> dict:
    r = http.post("/v2.0/networks", json={"network": {"name": unique("err")}})
    assert r.status_code == 201, r.text
    net = r.json()["network"]
    r = http.post("/v2.0/subnets", json={"subnet": {"network_id": net["id"], "cidr": "10.64.0.0/24",
                                                    "ip_version": 4}})
    assert r.status_code == 201, r.text
    r = http.post("/v2.0/ports", json={"port": {"network_id": net["id"], "name": "taken",
                                                "fixed_ips": [{"ip_address": "10.64.0.5"}]}})
    assert r.status_code == 201, r.text
    return net


def neutron_error(r, status: int, type_: str, words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"NeutronError"}, body
    err = body["NeutronError"]
    assert set(err) == {"type", "message", "detail"} and err["detail"] == ""
    assert err["type"] == type_, err
    assert words.lower() in err["message"].lower(), err


def snapshot(http) -> list:
    return sorted((o["kind"], o["object"]["id"], o["object"]["revision"])
                  for o in http.get("/api/v1/snapshot").json()["objects"])


@pytest.mark.parametrize(("path", "type_"), [
    ("/v2.0/networks/" + MISSING, "NetworkNotFound"),
    ("/v2.0/subnets/" + MISSING, "SubnetNotFound"),
    ("/v2.0/ports/" + MISSING, "PortNotFound"),
    ("/v2.0/security-groups/" + MISSING, "SecurityGroupNotFound"),
    ("/v2.0/security-group-rules/" + MISSING, "SecurityGroupRuleNotFound"),
    ("/v2.0/routers/" + MISSING, "RouterNotFound"),
    ("/v2.0/floatingips/" + MISSING, "FloatingIPNotFound"),
    ("/v2.0/qos/policies", "HTTPNotFound"),
])
def test_unknown_id_is_404(http, path: str, type_: str) -> None:
    neutron_error(http.get(path), 404, type_, "")
    if "/qos" not in path:
        neutron_error(http.delete(path), 404, type_, MISSING)


def test_address_in_use_is_409_and_allocates_nothing(http, net) -> None:
    before = snapshot(http)
    r = http.post("/v2.0/ports", json={"port": {"network_id": net["id"], "fixed_ips": [{"ip_address": "10.64.0.5"}]}})
    neutron_error(r, 409, "IpAddressAlreadyAllocated", "IP address 10.64.0.5 already allocated in subnet")
    assert snapshot(http) == before


@pytest.mark.parametrize("cidr", ["10.64.1.0/33", "10.300.0.0/16", "banana", "10.64.1.1/24"])
def test_bad_cidr_is_400(http, net, cidr: str) -> None:
    before = snapshot(http)
    r = http.post("/v2.0/subnets", json={"subnet": {"network_id": net["id"], "cidr": cidr, "ip_version": 4}})
    neutron_error(r, 400, "HTTPBadRequest", "Invalid input for cidr")
    assert snapshot(http) == before


@pytest.mark.parametrize(("path", "body", "status", "type_", "words"), [
    ("/v2.0/networks", {"network": {"name": "x", "colour": "blue"}}, 400, "HTTPBadRequest", "Unrecognized attribute"),
    ("/v2.0/networks", {"net": {}}, 400, "HTTPBadRequest", "Unable to find 'network'"),
    ("/v2.0/ports", {"port": {"network_id": MISSING}}, 404, "NetworkNotFound", MISSING),
    ("/v2.0/ports", {"port": {"network_id": "NET", "fixed_ips": [{"ip_address": "10.99.0.1"}]}}, 400,
     "HTTPBadRequest", "outside network"),
    ("/v2.0/ports", {"port": {"network_id": "NET", "fixed_ips": True}}, 400, "HTTPBadRequest", "list of dictionaries"),
    ("/v2.0/ports", {"port": {"network_id": "NET", "fixed_ips": ["10.64.0.9"]}}, 400, "HTTPBadRequest",
     "list of dictionaries"),
    ("/v2.0/ports", {"port": {"network_id": "NET", "security_groups": [MISSING]}}, 404, "SecurityGroupNotFound",
     MISSING),
    ("/v2.0/security-group-rules", {"security_group_rule": {"security_group_id": MISSING, "direction": "ingress"}},
     404, "SecurityGroupNotFound", MISSING),
    # found by the Neutron fuzz: a null pool was a 500
    ("/v2.0/subnets", {"subnet": {"network_id": "NET", "cidr": "10.65.0.0/24", "ip_version": 4,
                                  "allocation_pools": [None]}}, 400, "HTTPBadRequest", "allocation_pools"),
    ("/v2.0/subnets", {"subnet": {"network_id": "NET", "cidr": "10.65.0.0/24", "ip_version": 4,
                                  "allocation_pools": [{"start": "10.65.0.9"}]}}, 400, "HTTPBadRequest",
     "allocation_pools"),
])
def test_bad_request_gets_neutron_status_and_type(http, net, path, body, status, type_, words) -> None:
    kind = next(iter(body))
    if isinstance(body[kind], dict) and body[kind].get("network_id") == "NET":
        body = {kind: {**body[kind], "network_id": net["id"]}}
    before = snapshot(http)
    neutron_error(http.post(path, json=body), status, type_, words)
    assert snapshot(http) == before


def test_network_with_ports_is_in_use(http, net) -> None:
    neutron_error(http.delete(f"/v2.0/networks/{net['id']}"), 409, "NetworkInUse", net["id"])


def test_security_group_rule_checks(http) -> None:
    sg = http.post("/v2.0/security-groups", json={"security_group": {"name": unique("e")}}).json()["security_group"]
    rule = {"security_group_id": sg["id"], "direction": "ingress", "protocol": "tcp", "port_range_min": 22,
            "port_range_max": 22, "remote_ip_prefix": "10.0.0.0/8"}
    assert http.post("/v2.0/security-group-rules", json={"security_group_rule": rule}).status_code == 201
    neutron_error(http.post("/v2.0/security-group-rules", json={"security_group_rule": rule}), 409,
                  "SecurityGroupRuleExists", "already exists")
    bad = {**rule, "port_range_min": 80, "port_range_max": 22}
    neutron_error(http.post("/v2.0/security-group-rules", json={"security_group_rule": bad}), 400,
                  "SecurityGroupInvalidPortRange", "port_range_min")
    bad = {**rule, "remote_group_id": sg["id"]}
    neutron_error(http.post("/v2.0/security-group-rules", json={"security_group_rule": bad}), 400,
                  "SecurityGroupRemoteGroupAndRemoteIpPrefix", "Only remote_ip_prefix or remote_group_id")
    bad = {**rule, "protocol": "gre-ish"}
    neutron_error(http.post("/v2.0/security-group-rules", json={"security_group_rule": bad}), 400,
                  "SecurityGroupRuleInvalidProtocol", "not supported")


def test_missing_token_is_401_in_neutron_shape(neutron_server) -> None:
    neutron_error(neutron_server.http(token=None).get("/v2.0/networks"), 401, "HTTPUnauthorized", "token")
    h = neutron_server.http(token=None)
    h.headers["X-Auth-Token"] = "wrong"
    neutron_error(h.get("/v2.0/ports"), 401, "HTTPUnauthorized", "token")


def test_version_document_and_extensions(neutron_server, http) -> None:
    root = neutron_server.http(token=None).get("/").json()
    assert root["versions"][0]["id"] == "v2.0" and root["versions"][0]["links"][0]["href"].endswith("/v2.0/")
    aliases = {e["alias"] for e in http.get("/v2.0/extensions").json()["extensions"]}
    assert {"security-group", "binding", "allowed-address-pairs"} <= aliases
    assert http.get("/v2.0/extensions/binding").json()["extension"]["alias"] == "binding"
    neutron_error(http.get("/v2.0/extensions/nope"), 404, "HTTPNotFound", "nope")
