"""Every project has Neutron's `default` security group, made on first use, and ports use it as
Neutron's do: a port created without groups is put in it, an explicit empty list or port security
off leaves it out, and the group cannot be deleted or renamed. Through the API (Neutron's status
codes and error types), the real `openstack` CLI, and `/api/v1` for containers that name it."""

from __future__ import annotations

import pytest

from tests.fixtures.lab import unique
from tests.fixtures.openstack import OpenStack, neutron_http
from tether.model import Endpoint, Network, Subnet, default_group_id

pytestmark = pytest.mark.client


@pytest.fixture(scope="module")
def http(neutron_server):
    return neutron_http(neutron_server)


def ok(r, status: int = 200) -> dict:
    assert r.status_code == status, r.text
    return r.json()


def error(r, status: int, type_: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["NeutronError"]["type"] == type_, r.text


def network(http, project: str, cidr: str) -> dict:
    net = ok(http.post("/v2.0/networks", json={"network": {"name": unique("dn"), "project_id": project}}), 201)
    ok(http.post("/v2.0/subnets", json={"subnet": {"network_id": net["network"]["id"], "cidr": cidr}}), 201)
    return net["network"]


def port(http, net: dict, **body) -> dict:
    return ok(http.post("/v2.0/ports", json={"port": {"network_id": net["id"], **body}}), 201)["port"]


def defaults(http) -> dict[str, dict]:
    """Project -> its default group, as the group list shows them."""
    groups = ok(http.get("/v2.0/security-groups"))["security_groups"]
    return {g["project_id"]: g for g in groups if g["name"] == "default"}


def test_a_projects_first_network_makes_its_default_group_with_neutrons_rules(http) -> None:
    project = unique("proj")
    network(http, project, "10.81.0.0/24")
    sg = defaults(http)[project]
    assert sg["id"] == default_group_id(project) and sg["description"] == "Default security group"
    rules = {(r["direction"], r["ethertype"], r["remote_group_id"], r["protocol"], r["remote_ip_prefix"])
             for r in sg["security_group_rules"]}
    assert rules == {("ingress", "IPv4", sg["id"], None, None), ("ingress", "IPv6", sg["id"], None, None),
                     ("egress", "IPv4", None, None, None), ("egress", "IPv6", None, None, None)}


def test_listing_groups_makes_the_listed_projects_default_group_once(http) -> None:
    project = unique("lst")
    listed = ok(http.get("/v2.0/security-groups", params={"project_id": project}))["security_groups"]
    assert [(g["name"], g["project_id"]) for g in listed] == [("default", project)]
    again = ok(http.get("/v2.0/security-groups", params={"project_id": project}))["security_groups"]
    assert [g["id"] for g in again] == [listed[0]["id"]]
    assert "" in defaults(http)  # the caller's project: none without Keystone


def test_port_without_groups_is_in_its_projects_default_group(http) -> None:
    project = unique("prt")
    net = network(http, project, "10.82.0.0/24")
    p = port(http, net)
    assert p["security_groups"] == [default_group_id(project)] and p["port_security_enabled"] is True
    none = port(http, net, security_groups=[])
    assert none["security_groups"] == [] and none["port_security_enabled"] is True  # passes nothing
    off = port(http, net, port_security_enabled=False)
    assert off["security_groups"] == [] and off["port_security_enabled"] is False
    dhcp = port(http, net, device_owner="network:dhcp")  # Neutron's own ports are not filtered
    assert dhcp["security_groups"] == [] and dhcp["port_security_enabled"] is False


def test_port_security_off_and_groups_do_not_go_together(http) -> None:
    net = network(http, unique("psec"), "10.83.0.0/24")
    sg = ok(http.post("/v2.0/security-groups", json={"security_group": {"name": unique("g")}}), 201)
    gid = sg["security_group"]["id"]
    error(http.post("/v2.0/ports", json={"port": {"network_id": net["id"], "port_security_enabled": False,
                                                  "security_groups": [gid]}}), 400,
          "PortSecurityAndIPRequiredForSecurityGroups")
    p = port(http, net, security_groups=[gid])
    error(http.put(f"/v2.0/ports/{p['id']}", json={"port": {"port_security_enabled": False}}), 409,
          "PortSecurityPortHasSecurityGroup")
    off = ok(http.put(f"/v2.0/ports/{p['id']}", json={"port": {"port_security_enabled": False,
                                                                "security_groups": []}}))["port"]
    assert off["port_security_enabled"] is False and off["security_groups"] == []
    on = ok(http.put(f"/v2.0/ports/{p['id']}", json={"port": {"security_groups": [gid]}}))["port"]
    assert on["port_security_enabled"] is True  # naming a group turns port security on
    error(http.put(f"/v2.0/ports/{p['id']}", json={"port": {"port_security_enabled": "maybe"}}), 400,
          "HTTPBadRequest")


def test_default_group_cannot_be_deleted_renamed_or_made_twice(http) -> None:
    project = unique("keep")
    network(http, project, "10.84.0.0/24")
    gid = default_group_id(project)
    error(http.delete(f"/v2.0/security-groups/{gid}"), 409, "SecurityGroupCannotRemoveDefault")
    error(http.put(f"/v2.0/security-groups/{gid}", json={"security_group": {"name": "mine"}}), 409,
          "SecurityGroupCannotUpdateDefault")
    described = ok(http.put(f"/v2.0/security-groups/{gid}", json={"security_group": {"description": "ours"}}))
    assert described["security_group"]["description"] == "ours"
    error(http.post("/v2.0/security-groups", json={"security_group": {"name": "default", "project_id": project}}),
          409, "SecurityGroupDefaultAlreadyExists")
    other = ok(http.post("/v2.0/security-groups", json={"security_group": {"name": unique("g")}}), 201)
    error(http.put(f"/v2.0/security-groups/{other['security_group']['id']}",
                   json={"security_group": {"name": "Default"}}), 409, "SecurityGroupDefaultAlreadyExists")
    assert http.delete(f"/api/v1/securitygroups/{gid}").status_code == 409  # nor through Tether's own API
    assert defaults(http)[project]["id"] == gid


def test_container_naming_default_joins_its_networks_projects_default_group(neutron_server) -> None:
    c = neutron_server.client()
    project, name = unique("ctr"), unique("cn")
    c.create_network(Network(name=name, project=project, subnets=[Subnet(cidr="10.85.0.0/24")]))
    gid = default_group_id(project)
    ep = c.create_endpoint(Endpoint(name="web", network=name, security_groups=["default"]))
    assert ep.security_groups == [gid] and ep.port_security
    assert c.request("GET", f"/api/v1/securitygroups/{gid}")["name"] == "default"  # made by that write
    plain = c.create_endpoint(Endpoint(name="plain", network=name))
    assert plain.security_groups == [] and not plain.port_security  # a container naming no group stays open


def test_refused_port_leaves_no_default_group_behind(http, neutron_server) -> None:
    c = neutron_server.client()
    project, name = unique("ref"), unique("rn")
    c.create_network(Network(name=name, project=project, subnets=[Subnet(cidr="10.86.0.0/24")]))
    net_id = next(n["id"] for n in ok(http.get("/v2.0/networks", params={"name": name}))["networks"])
    r = http.post("/v2.0/ports", json={"port": {"network_id": net_id, "fixed_ips": [{"ip_address": "10.99.0.5"}]}})
    assert r.status_code == 400, r.text
    assert http.get(f"/api/v1/securitygroups/{default_group_id(project)}").status_code == 404
    p = port(http, {"id": net_id})
    assert p["security_groups"] == [default_group_id(project)]  # the port's own write made the group


def test_cli_lists_default_per_project_and_puts_a_new_port_in_it(openstack_client: OpenStack) -> None:
    conn = openstack_client.sdk()
    projects = [unique("pa"), unique("pb")]
    for project in projects:
        conn.network.create_network(name=unique("cn"), project_id=project)
    listed = openstack_client.cli("security", "group", "list")
    rows = {(g["Project"], g["Name"], g["Description"]) for g in listed}
    for project in projects:
        assert (project, "default", "Default security group") in rows
    assert sum(1 for g in listed if g["Name"] == "default" and g["Project"] in projects) == 2
    net, sub = unique("cn"), unique("cs")
    openstack_client.cli("network", "create", net)
    openstack_client.cli("subnet", "create", "--network", net, "--subnet-range", "10.87.0.0/24", sub)
    made = openstack_client.cli("port", "create", "--network", net, unique("cp"))
    assert made["security_group_ids"] == [default_group_id(None)] and made["port_security_enabled"] is True
    bare = openstack_client.cli("port", "create", "--network", net, "--no-security-group", unique("cp"))
    assert bare["security_group_ids"] == []
