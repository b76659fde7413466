"""Routers and floating IPs through the real `openstack` CLI (and Neutron's HTTP shapes): what an
OpenStack user types works, what Tether does not implement is refused with a 400 naming it, and a
refused or failed request leaves nothing behind. Packets: tests/neutron/test_l3_lab.py."""

from __future__ import annotations

import pytest

from tests.fixtures.lab import unique
from tests.fixtures.openstack import CliError, OpenStack, neutron_http

pytestmark = pytest.mark.client


@pytest.fixture(scope="module")
def http(neutron_server):
    return neutron_http(neutron_server)


@pytest.fixture(scope="module")
def topo(openstack_client: OpenStack) -> dict:
    os_ = openstack_client
    ext, a, b = unique("ext"), unique("ta"), unique("tb")
    out = {"ext": os_.cli("network", "create", "--external", ext)}
    out["ext_sub"] = os_.cli("subnet", "create", "--network", ext, "--subnet-range", "198.19.128.0/24", "--no-dhcp",
                             unique("exts"))
    out["a"] = os_.cli("network", "create", a)
    out["a_sub"] = os_.cli("subnet", "create", "--network", a, "--subnet-range", "10.91.1.0/24", unique("as"))
    out["b"] = os_.cli("network", "create", b)
    out["b_sub"] = os_.cli("subnet", "create", "--network", b, "--subnet-range", "10.91.2.0/24", unique("bs"))
    return out


def snapshot(http) -> list:
    return sorted((o["kind"], o["object"]["id"], o["object"]["revision"])
                  for o in http.get("/api/v1/snapshot").json()["objects"])


def refused(os_: OpenStack, *args: str) -> str:
    with pytest.raises(CliError) as e:
        os_.run(*args)
    assert "400" in e.value.stderr or "BadRequest" in e.value.stderr, e.value.stderr
    return e.value.stderr


def test_router_create_gateway_add_and_remove_subnets_show_list_delete(openstack_client: OpenStack, topo) -> None:
    os_ = openstack_client
    name = f"My Router {unique('r')}"
    r = os_.cli("router", "create", "--description", "edge", name)
    assert r["name"] == name and r["description"] == "edge" and r["external_gateway_info"] is None
    os_.run("router", "set", "--external-gateway", topo["ext"]["id"], r["id"])
    os_.run("router", "add", "subnet", r["id"], topo["a_sub"]["id"])
    os_.run("router", "add", "subnet", r["id"], topo["b_sub"]["id"])
    shown = os_.cli("router", "show", r["id"])
    assert shown["external_gateway_info"]["network_id"] == topo["ext"]["id"]
    assert shown["external_gateway_info"]["enable_snat"] is True
    legs = {(i["subnet_id"], i["ip_address"]) for i in shown["interfaces_info"]}
    assert legs == {(topo["a_sub"]["id"], "10.91.1.1"), (topo["b_sub"]["id"], "10.91.2.1")}
    ports = os_.cli("port", "list", "--router", r["id"], "--long")
    assert {p["Fixed IP Addresses"][0]["ip_address"] for p in ports} == {"10.91.1.1", "10.91.2.1"}
    assert {p["Device Owner"] for p in ports} == {"network:router_interface"}
    assert r["id"] in [x["ID"] for x in os_.cli("router", "list")]
    # a subnet with a router interface, and a router with interfaces, cannot be deleted
    with pytest.raises(CliError):
        os_.run("subnet", "delete", topo["a_sub"]["id"])
    with pytest.raises(CliError):
        os_.run("router", "delete", r["id"])
    with pytest.raises(CliError):  # the interface port belongs to the router
        os_.run("port", "delete", ports[0]["ID"])
    os_.run("router", "set", "--disable-snat", "--external-gateway", topo["ext"]["id"], r["id"])
    assert os_.cli("router", "show", r["id"])["external_gateway_info"]["enable_snat"] is False
    os_.run("router", "remove", "subnet", r["id"], topo["a_sub"]["id"])
    os_.run("router", "remove", "subnet", r["id"], topo["b_sub"]["id"])
    os_.run("router", "unset", "--external-gateway", r["id"])
    assert os_.cli("router", "show", r["id"])["external_gateway_info"] is None
    os_.run("router", "delete", r["id"])
    assert r["id"] not in [x["ID"] for x in os_.cli("router", "list")]


@pytest.mark.parametrize("option", [("--ha",), ("--disable",), ("--centralized",),
                                    ("--availability-zone-hint", "nova")])
def test_router_options_tether_does_not_implement_are_refused_and_create_nothing(
        openstack_client: OpenStack, http, option) -> None:
    before = snapshot(http)
    name = unique("rr")
    err = refused(openstack_client, "router", "create", *option, name)
    assert any(w in err for w in ("ha", "admin_state_up", "distributed", "availability_zone")), err
    assert snapshot(http) == before


def test_gateway_with_a_fixed_address_and_a_gateway_on_a_tenant_network_are_refused(
        openstack_client: OpenStack, http, topo) -> None:
    os_ = openstack_client
    r = os_.cli("router", "create", unique("rg"))
    before = snapshot(http)
    err = refused(os_, "router", "set", "--external-gateway", topo["ext"]["id"], "--fixed-ip",
                  f"subnet={topo['ext_sub']['id']},ip-address=198.19.128.9", r["id"])
    assert "external_fixed_ips" in err
    assert "not an external network" in refused(os_, "router", "set", "--external-gateway", topo["a"]["id"], r["id"])
    assert snapshot(http) == before
    os_.run("router", "delete", r["id"])


def test_floating_ip_create_set_unset_show_list_delete(openstack_client: OpenStack, http, topo) -> None:
    os_ = openstack_client
    r = os_.cli("router", "create", unique("rf"))
    port = os_.cli("port", "create", "--network", topo["a"]["id"], unique("fp"))
    fixed = port["fixed_ips"][0]["ip_address"]
    # not reachable yet: the port's subnet is on no router with this gateway (Neutron's 404), nothing made
    before = snapshot(http)
    with pytest.raises(CliError) as e:
        os_.run("floating", "ip", "create", "--port", port["id"], topo["ext"]["id"])
    assert "not reachable" in e.value.stderr
    assert snapshot(http) == before
    os_.run("router", "set", "--external-gateway", topo["ext"]["id"], r["id"])
    os_.run("router", "add", "subnet", r["id"], topo["a_sub"]["id"])
    fip = os_.cli("floating", "ip", "create", "--port", port["id"], "--description", "web", topo["ext"]["id"])
    assert fip["floating_ip_address"].startswith("198.19.128.") and fip["fixed_ip_address"] == fixed
    assert fip["port_id"] == port["id"] and fip["router_id"] == r["id"] and fip["description"] == "web"
    listed = os_.cli("floating", "ip", "list")
    assert {(x["Floating IP Address"], x["Fixed IP Address"]) for x in listed} >= {(fip["floating_ip_address"],
                                                                                    fixed)}
    os_.run("floating", "ip", "unset", "--port", fip["id"])
    shown = os_.cli("floating", "ip", "show", fip["floating_ip_address"])
    assert shown["port_id"] is None and shown["fixed_ip_address"] is None and shown["status"] == "DOWN"
    os_.run("floating", "ip", "set", "--port", port["id"], fip["id"])
    assert os_.cli("floating", "ip", "show", fip["id"])["fixed_ip_address"] == fixed
    # a second floating IP with a chosen address; then the first one is deleted and its address freed
    chosen = os_.cli("floating", "ip", "create", "--floating-ip-address", "198.19.128.77", topo["ext"]["id"])
    assert chosen["floating_ip_address"] == "198.19.128.77" and chosen["port_id"] is None
    with pytest.raises(CliError):  # the address is taken
        os_.run("floating", "ip", "create", "--floating-ip-address", "198.19.128.77", topo["ext"]["id"])
    with pytest.raises(CliError):  # the router interface is needed by the floating IP
        os_.run("router", "remove", "subnet", r["id"], topo["a_sub"]["id"])
    os_.run("floating", "ip", "delete", fip["id"], chosen["id"])
    assert fip["id"] not in [x["ID"] for x in os_.cli("floating", "ip", "list")]
    fip_ports = os_.cli("port", "list", "--device-owner", "network:floatingip")
    assert not [p for p in fip_ports if "198.19.128.77" in str(p)]
    os_.run("port", "delete", port["id"])
    os_.run("router", "remove", "subnet", r["id"], topo["a_sub"]["id"])
    os_.run("router", "delete", r["id"])


def test_floating_ip_on_a_tenant_network_or_with_dns_name_is_refused_and_takes_no_address(
        openstack_client: OpenStack, http, topo) -> None:
    before = snapshot(http)
    assert "external" in refused(openstack_client, "floating", "ip", "create", topo["a"]["id"])
    assert "dns_name" in refused(openstack_client, "floating", "ip", "create", "--dns-name", "web",
                                 "--dns-domain", "example.org.", topo["ext"]["id"])
    assert snapshot(http) == before


def test_l3_resources_answer_in_neutrons_shapes(http, topo) -> None:
    r = http.post("/v2.0/routers", json={"router": {"name": unique("rh"), "routes": [{"destination": "10.0.0.0/8",
                                                                                      "nexthop": "10.91.1.5"}]}})
    assert r.status_code == 400 and r.json()["NeutronError"]["type"] == "HTTPBadRequest" and "routes" in r.text
    r = http.put("/v2.0/routers/4f6ba5c0-0000-4000-8000-000000000000/add_router_interface",
                 json={"subnet_id": topo["a_sub"]["id"]})
    assert r.status_code == 404 and r.json()["NeutronError"]["type"] == "RouterNotFound"
    r = http.get("/v2.0/floatingips/4f6ba5c0-0000-4000-8000-000000000000")
    assert r.status_code == 404 and r.json()["NeutronError"]["type"] == "FloatingIPNotFound"
    assert "router" in [e["alias"] for e in http.get("/v2.0/extensions").json()["extensions"]]
    r = http.get("/v2.0/qos/policies")
    assert r.status_code == 404 and "routers" in r.json()["NeutronError"]["message"]


def test_router_add_port_takes_the_ports_address_and_remove_port_deletes_it(openstack_client: OpenStack, topo) -> None:
    os_ = openstack_client
    r = os_.cli("router", "create", unique("rp"))
    port = os_.cli("port", "create", "--network", topo["b"]["id"], "--fixed-ip", "ip-address=10.91.2.254",
                   unique("rport"))
    os_.run("router", "add", "port", r["id"], port["id"])
    shown = os_.cli("port", "show", port["id"])
    assert shown["device_owner"] == "network:router_interface" and shown["device_id"] == r["id"]
    legs = os_.cli("router", "show", r["id"])["interfaces_info"]
    assert legs == [{"port_id": port["id"], "ip_address": "10.91.2.254", "subnet_id": topo["b_sub"]["id"]}]
    with pytest.raises(CliError):  # a router's port is removed through the router
        os_.run("port", "delete", port["id"])
    os_.run("router", "remove", "port", r["id"], port["id"])
    assert port["id"] not in [p["ID"] for p in os_.cli("port", "list")]
    assert os_.cli("router", "show", r["id"])["interfaces_info"] == []
    os_.run("router", "delete", r["id"])


def test_ipv6_and_external_subnets_cannot_be_router_legs_and_leave_the_router_as_it_was(http, topo) -> None:
    r = http.post("/v2.0/routers", json={"router": {"name": unique("r6")}}).json()["router"]
    v6 = http.post("/v2.0/subnets", json={"subnet": {"network_id": topo["b"]["id"], "cidr": "fd91:2::/64",
                                                     "ip_version": 6}}).json()["subnet"]
    before = snapshot(http)
    for subnet, words in ((v6["id"], "IPv6"), (topo["ext_sub"]["id"], "external")):
        resp = http.put(f"/v2.0/routers/{r['id']}/add_router_interface", json={"subnet_id": subnet})
        assert resp.status_code == 400 and words in resp.json()["NeutronError"]["message"], resp.text
    resp = http.put(f"/v2.0/routers/{r['id']}/add_router_interface", json={"subnet_id": v6["id"], "port_id": "x"})
    assert resp.status_code == 400 and "Either subnet_id or port_id" in resp.text
    assert snapshot(http) == before
    assert http.delete(f"/v2.0/subnets/{v6['id']}").status_code == 204
    assert http.delete(f"/v2.0/routers/{r['id']}").status_code == 204
