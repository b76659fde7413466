"""Every option of the `openstack` CLI named in issue 27 either works or is refused with Neutron's
400 naming it, and a refused request leaves nothing behind. What changes traffic (a disabled port,
port security off) is proven with packets in tests/neutron/test_vm_ports_lab.py."""

from __future__ import annotations

import pytest

from tests.fixtures.lab import unique
from tests.fixtures.openstack import CliError, OpenStack

pytestmark = pytest.mark.client


def refused(os_: OpenStack, *args: str) -> str:
    """The command fails with a 400 whose message names what was refused; returns stderr."""
    with pytest.raises(CliError) as e:
        os_.run(*args)
    assert "400" in e.value.stderr or "BadRequest" in e.value.stderr, e.value.stderr
    return e.value.stderr


def names(os_: OpenStack, kind: str) -> set[str]:
    conn = os_.sdk()
    listing = {"network": conn.network.networks, "subnet": conn.network.subnets, "port": conn.network.ports,
               "security group": conn.network.security_groups}[kind]
    return {x.name for x in listing()}


def test_network_description_tags_and_free_text_names_are_stored_shown_and_renamed(openstack_client) -> None:
    os_ = openstack_client
    name = f"My Net {unique('x')}"
    net = os_.cli("network", "create", "--description", "the blue one", "--tag", "blue", "--tag", "team-a", name)
    assert net["name"] == name and net["description"] == "the blue one"
    shown = os_.cli("network", "show", net["id"])
    assert sorted(shown["tags"]) == ["blue", "team-a"] and shown["name"] == name
    assert [n["ID"] for n in os_.cli("network", "list", "--tags", "blue,team-a")] == [net["id"]]
    os_.run("network", "set", "--name", "private_net renamed", "--description", "", "--no-tag", "--tag", "red",
            net["id"])
    shown = os_.cli("network", "show", net["id"])
    assert shown["name"] == "private_net renamed" and shown["description"] == "" and shown["tags"] == ["red"]
    os_.run("network", "unset", "--tag", "red", net["id"])
    assert os_.cli("network", "show", net["id"])["tags"] == []
    os_.run("network", "delete", net["id"])


@pytest.mark.parametrize("option", [
    ("--share",),
    ("--provider-network-type", "vlan", "--provider-segment", "100"),
    ("--provider-network-type", "flat", "--provider-physical-network", "physnet1"),
    ("--availability-zone-hint", "nova"),
    ("--disable",),
])
def test_network_options_tether_does_not_implement_are_refused_and_create_nothing(openstack_client, option) -> None:
    os_ = openstack_client
    name = unique("refn")
    err = refused(os_, "network", "create", *option, name)
    assert any(word in err for word in ("shared", "provider:", "availability_zone", "admin_state_up")), err
    assert name not in names(os_, "network")


def test_subnet_dns_servers_host_routes_dhcp_description_and_tags_are_stored_and_updated(openstack_client) -> None:
    os_ = openstack_client
    net = os_.cli("network", "create", unique("sn"))
    sub = os_.cli("subnet", "create", "--network", net["id"], "--subnet-range", "10.62.0.0/24",
                  "--dns-nameserver", "10.62.0.53", "--dns-nameserver", "192.0.2.53",
                  "--host-route", "destination=10.99.0.0/16,gateway=10.62.0.254", "--no-dhcp",
                  "--description", "dhcp data", "--tag", "t1", "Subnet One")
    shown = os_.cli("subnet", "show", sub["id"])
    assert shown["name"] == "Subnet One" and shown["description"] == "dhcp data" and shown["tags"] == ["t1"]
    assert shown["dns_nameservers"] == ["10.62.0.53", "192.0.2.53"] and shown["enable_dhcp"] is False
    assert shown["host_routes"] == [{"destination": "10.99.0.0/16", "nexthop": "10.62.0.254"}]
    os_.run("subnet", "set", "--dhcp", "--no-dns-nameservers", "--dns-nameserver", "10.62.0.54", sub["id"])
    shown = os_.cli("subnet", "show", sub["id"])
    assert shown["enable_dhcp"] is True and shown["dns_nameservers"] == ["10.62.0.54"]
    # a bad route is refused and the subnet stays as it was
    refused(os_, "subnet", "set", "--host-route", "destination=nonsense,gateway=10.62.0.1", sub["id"])
    assert os_.cli("subnet", "show", sub["id"])["host_routes"] == shown["host_routes"]
    os_.run("network", "delete", net["id"])


def test_subnet_options_tether_does_not_implement_are_refused_and_create_nothing(openstack_client) -> None:
    os_ = openstack_client
    net = os_.cli("network", "create", unique("sn"))
    sub = unique("refs")
    err = refused(os_, "subnet", "create", "--network", net["id"], "--subnet-range", "10.63.0.0/24",
                  "--service-type", "network:floatingip", sub)
    assert "service_types" in err
    assert sub not in names(os_, "subnet") and os_.cli("network", "show", net["id"])["subnets"] == []
    os_.run("network", "delete", net["id"])


def test_port_description_tags_dns_name_two_fixed_ips_disable_and_free_text_name(openstack_client) -> None:
    os_ = openstack_client
    net = os_.cli("network", "create", unique("pn"))
    sub = os_.cli("subnet", "create", "--network", net["id"], "--subnet-range", "10.64.0.0/24", unique("ps"))
    port = os_.cli("port", "create", "--network", net["id"], "--fixed-ip", f"subnet={sub['id']},ip-address=10.64.0.10",
                   "--fixed-ip", "ip-address=10.64.0.11", "--description", "two addresses", "--tag", "web",
                   "--dns-name", "www1", "--disable", "--disable-port-security", "Web Port #1")
    shown = os_.cli("port", "show", port["id"])
    assert shown["name"] == "Web Port #1" and shown["description"] == "two addresses" and shown["tags"] == ["web"]
    assert sorted(f["ip_address"] for f in shown["fixed_ips"]) == ["10.64.0.10", "10.64.0.11"]
    assert shown["dns_name"] == "www1" and shown["admin_state_up"] in (False, "DOWN")
    assert shown["port_security_enabled"] is False
    os_.run("port", "set", "--enable", "--name", "web_port", "--no-tag", port["id"])
    shown = os_.cli("port", "show", port["id"])
    assert shown["admin_state_up"] in (True, "UP") and shown["name"] == "web_port" and shown["tags"] == []
    os_.run("port", "delete", port["id"])
    os_.run("network", "delete", net["id"])


@pytest.mark.parametrize("option", [
    ("--vnic-type", "direct"),
    ("--dns-name", "not a label"),
])
def test_port_options_tether_does_not_implement_are_refused_and_create_nothing(openstack_client, option) -> None:
    os_ = openstack_client
    net = os_.cli("network", "create", unique("pn"))
    name = unique("refp")
    err = refused(os_, "port", "create", "--network", net["id"], *option, name)
    assert any(word in err for word in ("binding:vnic_type", "dns_name")), err
    assert name not in names(os_, "port")
    os_.run("network", "delete", net["id"])


def test_a_subnet_only_fixed_ip_that_cannot_be_honoured_is_refused_not_dropped(openstack_client) -> None:
    os_ = openstack_client
    net = os_.cli("network", "create", unique("pn"))
    sub = os_.cli("subnet", "create", "--network", net["id"], "--subnet-range", "10.65.0.0/24", unique("ps"))
    name = unique("refp")
    err = refused(os_, "port", "create", "--network", net["id"], "--fixed-ip", "ip-address=10.65.0.10",
                  "--fixed-ip", f"subnet={sub['id']}", name)
    assert "fixed_ips" in err and name not in names(os_, "port")
    os_.run("network", "delete", net["id"])


def test_security_group_tags_and_stateless_refused(openstack_client) -> None:
    os_ = openstack_client
    sg = os_.cli("security", "group", "create", "--tag", "ops", "--description", "ops group", unique("sg"))
    assert os_.cli("security", "group", "show", sg["id"])["tags"] == ["ops"]
    name = unique("refg")
    err = refused(os_, "security", "group", "create", "--stateless", name)
    assert "stateful" in err and name not in names(os_, "security group")
    os_.run("security", "group", "delete", sg["id"])


def test_through_the_sdk_each_unimplemented_attribute_is_a_400_naming_it_and_nothing_is_created(
        openstack_client) -> None:
    """What the CLI has no option for (or refuses itself, e.g. extra DHCP options without the
    extension), sent by openstacksdk as a program would."""
    from openstack import exceptions

    conn = openstack_client.sdk()
    net = conn.network.create_network(name=unique("sdkn"))
    cases = [
        (conn.network.create_port,
         {"network_id": net.id, "extra_dhcp_opts": [{"opt_name": "mtu", "opt_value": "1400"}]}, "extra_dhcp_opts"),
        (conn.network.create_port, {"network_id": net.id, "qos_policy_id": "q1"}, "qos_policy_id"),
        (conn.network.create_port, {"network_id": net.id, "propagate_uplink_status": True}, "propagate_uplink_status"),
        (conn.network.create_subnet, {"network_id": net.id, "cidr": "10.66.0.0/24", "ip_version": 4,
                                      "subnetpool_id": "p1"}, "subnetpool_id"),
        (conn.network.create_subnet, {"network_id": net.id, "cidr": "10.66.0.0/24", "ip_version": 4,
                                      "segment_id": "s1"}, "segment_id"),
        (conn.network.create_network, {"is_default": True}, "is_default"),
        (conn.network.create_network, {"port_security_enabled": False}, "port_security_enabled"),
    ]
    for create, attrs, word in cases:
        name = unique("sdk")
        with pytest.raises(exceptions.BadRequestException) as e:
            create(name=name, **attrs)
        assert word in str(e.value), (word, str(e.value))
    assert not [p for p in conn.network.ports(network_id=net.id)]
    assert not [s for s in conn.network.subnets(network_id=net.id)]
    assert not [n for n in conn.network.networks() if n.name.startswith("sdk") and n.id != net.id]
    sg = conn.network.create_security_group(name=unique("sdkg"))
    with pytest.raises(exceptions.BadRequestException) as e:
        conn.network.create_security_group_rule(security_group_id=sg.id, direction="ingress",
                                                remote_address_group_id="ag1")
    assert "remote_address_group_id" in str(e.value)
    assert len(conn.network.get_security_group(sg.id).security_group_rules) == 2  # its two egress rules only
    conn.network.delete_security_group(sg)
    conn.network.delete_network(net)


def test_fixed_ips_of_a_port_are_added_removed_and_a_taken_address_changes_nothing(openstack_client) -> None:
    os_ = openstack_client
    net = os_.cli("network", "create", unique("fn"))
    sub = os_.cli("subnet", "create", "--network", net["id"], "--subnet-range", "10.67.0.0/24", unique("fs"))
    a = os_.cli("port", "create", "--network", net["id"], "--fixed-ip", "ip-address=10.67.0.10", unique("fa"))
    b = os_.cli("port", "create", "--network", net["id"], "--fixed-ip", "ip-address=10.67.0.20", unique("fb"))

    def ips(port: dict) -> list[str]:
        return sorted(f["ip_address"] for f in os_.cli("port", "show", port["id"])["fixed_ips"])

    os_.run("port", "set", "--fixed-ip", "ip-address=10.67.0.11", a["id"])
    assert ips(a) == ["10.67.0.10", "10.67.0.11"]
    os_.run("port", "unset", "--fixed-ip", f"subnet={sub['id']},ip-address=10.67.0.10", a["id"])
    assert ips(a) == ["10.67.0.11"]
    with pytest.raises(CliError) as e:  # b's address: 409, and a keeps what it had
        os_.run("port", "set", "--fixed-ip", "ip-address=10.67.0.20", "--description", "changed", a["id"])
    assert "already allocated" in e.value.stderr
    assert ips(a) == ["10.67.0.11"] and os_.cli("port", "show", a["id"])["description"] == ""
    # the released address is free again: another port takes it
    c = os_.cli("port", "create", "--network", net["id"], "--fixed-ip", "ip-address=10.67.0.10", unique("fc"))
    assert ips(c) == ["10.67.0.10"]
    for p in (a, b, c):
        os_.run("port", "delete", p["id"])
    os_.run("network", "delete", net["id"])


def test_a_subnet_or_port_in_another_project_than_its_network_is_refused(openstack_client) -> None:
    from openstack import exceptions

    conn = openstack_client.sdk()
    net = conn.network.create_network(name=unique("pjn"), project_id="proj-a")
    for create, attrs in ((conn.network.create_subnet, {"cidr": "10.68.0.0/24", "ip_version": 4}),
                          (conn.network.create_port, {})):
        with pytest.raises(exceptions.BadRequestException) as e:
            create(network_id=net.id, project_id="proj-b", **attrs)
        assert "project_id" in str(e.value)
    assert not list(conn.network.subnets(network_id=net.id)) and not list(conn.network.ports(network_id=net.id))
    conn.network.create_port(network_id=net.id, project_id="proj-a")  # its own project is fine
    for p in conn.network.ports(network_id=net.id):
        conn.network.delete_port(p)
    conn.network.delete_network(net)
