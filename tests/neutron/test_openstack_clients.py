"""The real `openstack` CLI and openstacksdk drive Tether's /v2.0 API without Keystone, and what they
make is the same object `tether get` shows (and the other way round).

The CLI costs ~2.5 s a command to start, so it runs a representative set (every create the issue
names, one list/show/delete of each kind) and the SDK covers the rest in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fixtures.lab import unique
from tests.fixtures.openstack import OpenStack
from tether.model import Endpoint, Network, Subnet

pytestmark = pytest.mark.client


def tether_get(server, kind: str) -> list[dict]:
    tether = os.path.join(os.path.dirname(sys.executable), "tether")
    r = subprocess.run([tether, "get", kind, "-o", "json", "--server", server.url, "--token", server.token],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [{**d["spec"], **d["metadata"]} for d in json.loads(r.stdout)["items"]]  # documents, flattened


def test_cli_creates_network_subnet_port_and_security_group_that_tether_sees(
        openstack_client: OpenStack, neutron_server) -> None:
    os_ = openstack_client
    net_name, sub_name, port_name, sg_name = unique("osn"), unique("oss"), unique("osp"), unique("osg")
    net = os_.cli("network", "create", net_name)
    sub = os_.cli("subnet", "create", "--network", net_name, "--subnet-range", "10.61.0.0/24", sub_name)
    port = os_.cli("port", "create", "--network", net_name, "--fixed-ip", f"subnet={sub_name},ip-address=10.61.0.10",
                   port_name)
    sg = os_.cli("security", "group", "create", sg_name)
    ssh = os_.cli("security", "group", "rule", "create", "--protocol", "tcp", "--dst-port", "22",
                  "--remote-ip", "192.0.2.0/24", sg_name)
    peer = os_.cli("security", "group", "rule", "create", "--protocol", "tcp", "--dst-port", "80",
                   "--remote-group", sg_name, sg_name)

    assert sub["network_id"] == net["id"] and sub["cidr"] == "10.61.0.0/24" and sub["gateway_ip"] == "10.61.0.1"
    assert port["fixed_ips"] == [{"subnet_id": sub["id"], "ip_address": "10.61.0.10"}]
    assert port["mac_address"].startswith("fa:16:3e:")
    assert (ssh["protocol"], ssh["port_range_min"], ssh["port_range_max"], ssh["remote_ip_prefix"]) == \
        ("tcp", 22, 22, "192.0.2.0/24")
    assert peer["remote_group_id"] == sg["id"] and peer["direction"] == "ingress"

    # list and show through the CLI (in parallel: each command is a fresh Python start)
    with ThreadPoolExecutor(4) as pool:
        nets, subs, ports, shown = pool.map(lambda a: os_.cli(*a), [
            ("network", "list"), ("subnet", "list", "--network", net_name),
            ("port", "list", "--network", net_name), ("port", "show", port_name)])
    assert {"ID": net["id"], "Name": net_name, "Subnets": [sub["id"]]} in nets
    assert [s["Subnet"] for s in subs] == ["10.61.0.0/24"]
    assert [p["Name"] for p in ports] == [port_name]
    assert shown["id"] == port["id"] and shown["network_id"] == net["id"]

    # the same objects, through `tether get`
    t_net = next(n for n in tether_get(neutron_server, "networks") if n["name"] == net_name)
    assert t_net["id"] == net["id"] and [s["cidr"] for s in t_net["subnets"]] == ["10.61.0.0/24"]
    t_ep = next(e for e in tether_get(neutron_server, "endpoints") if e["id"] == port["id"])
    assert t_ep["name"] == port_name and t_ep["network"] == net_name and t_ep["ips"] == ["10.61.0.10"]
    t_sg = next(s for s in tether_get(neutron_server, "securitygroups") if s["id"] == sg["id"])
    rules = {(r["protocol"], r["port_range_min"], r["remote_ip_prefix"], r["remote_group_id"]) for r in t_sg["rules"]}
    assert {("tcp", 22, "192.0.2.0/24", None), ("tcp", 80, None, sg["id"])} <= rules

    os_.run("port", "delete", port_name)
    os_.run("network", "delete", net_name)
    assert not [n for n in tether_get(neutron_server, "networks") if n["name"] == net_name]


def test_objects_made_with_tether_are_seen_by_openstack(openstack_client: OpenStack, neutron_server) -> None:
    c = neutron_server.client()
    name = unique("tn")
    c.create_network(Network(name=name, subnets=[Subnet(cidr="10.62.0.0/24", gateway="10.62.0.1")]))
    ep = c.create_endpoint(Endpoint(name="web", network=name, ips=["10.62.0.7"]))
    with ThreadPoolExecutor(2) as pool:
        shown, ports = pool.map(lambda a: openstack_client.cli(*a), [
            ("network", "show", name), ("port", "list", "--network", name, "--long")])
    assert shown["name"] == name and len(shown["subnets"]) == 1
    assert [(p["ID"], p["Name"]) for p in ports] == [(ep.id, "web")]
    assert ports[0]["Fixed IP Addresses"][0]["ip_address"] == "10.62.0.7"


def test_sdk_round_trip_with_filters_fields_updates_and_deletes(openstack_client: OpenStack) -> None:
    conn = openstack_client.sdk()
    net = conn.network.create_network(name=unique("sdk"))
    sub = conn.network.create_subnet(network_id=net.id, cidr="10.63.0.0/24", ip_version=4, name="s1",
                                     gateway_ip=None, allocation_pools=[{"start": "10.63.0.10", "end": "10.63.0.20"}])
    assert sub.gateway_ip is None and sub.allocation_pools == [{"start": "10.63.0.10", "end": "10.63.0.20"}]
    assert conn.network.find_network(net.name).subnet_ids == [sub.id]

    a = conn.network.create_port(network_id=net.id, name="a")
    assert a.fixed_ips[0]["subnet_id"] == sub.id and a.fixed_ips[0]["ip_address"] == "10.63.0.10"
    sg = conn.network.create_security_group(name=unique("g"))
    assert {(r["direction"], r["ethertype"]) for r in sg.security_group_rules} == {("egress", "IPv4"),
                                                                                   ("egress", "IPv6")}
    b = conn.network.create_port(network_id=net.id, name="b", fixed_ips=[{"ip_address": "10.63.0.15"}],
                                 security_group_ids=[sg.id], device_owner="compute:nova", device_id="vm-1",
                                 allowed_address_pairs=[{"ip_address": "10.63.0.200"}])
    assert b.security_group_ids == [sg.id] and b.device_owner == "compute:nova"
    assert b.allowed_address_pairs == [{"ip_address": "10.63.0.200", "mac_address": b.mac_address}]

    assert [p.name for p in conn.network.ports(network_id=net.id, device_id="vm-1")] == ["b"]
    assert [p.name for p in conn.network.ports(fixed_ips="ip_address=10.63.0.10")] == ["a"]
    assert sorted(p.name for p in conn.network.ports(network_id=net.id)) == ["a", "b"]
    raw = conn.network.get(f"/ports?network_id={net.id}&fields=id&fields=name").json()["ports"]
    assert sorted(raw, key=lambda p: p["name"]) == [{"id": a.id, "name": "a"}, {"id": b.id, "name": "b"}]

    pairs = [{"ip_address": "10.63.0.200"}, {"ip_address": "10.63.0.201", "mac_address": "fa:16:3e:00:00:01"}]
    b = conn.network.update_port(b, allowed_address_pairs=pairs, security_group_ids=[])
    assert [p["ip_address"] for p in b.allowed_address_pairs] == ["10.63.0.200", "10.63.0.201"]
    assert b.security_group_ids == []

    rule = conn.network.create_security_group_rule(security_group_id=sg.id, direction="ingress", protocol="udp",
                                                   port_range_min=53, port_range_max=53,
                                                   remote_ip_prefix="10.63.0.0/24")
    assert conn.network.get_security_group_rule(rule.id).port_range_max == 53
    conn.network.delete_security_group_rule(rule)
    conn.network.delete_security_group(sg)
    for p in (a, b):
        conn.network.delete_port(p)
    conn.network.delete_subnet(sub)
    conn.network.delete_network(net)
    assert conn.network.find_network(net.name) is None


def test_cli_creates_an_ipv6_subnet_and_a_port_on_it_and_slaac_is_refused(
        openstack_client: OpenStack, neutron_server) -> None:
    """`openstack subnet create --ip-version 6 --ipv6-address-mode dhcpv6-stateful`: a dual-stack
    network whose port gets an IPv6 fixed IP from Tether's IPAM; SLAAC (which needs router
    advertisements Tether does not send) is refused with a message, not accepted and ignored."""
    from tests.fixtures.openstack import CliError

    os_ = openstack_client
    net_name, v4_name, v6_name = unique("os6n"), unique("os4s"), unique("os6s")
    os_.cli("network", "create", net_name)
    os_.cli("subnet", "create", "--network", net_name, "--subnet-range", "10.58.0.0/24", v4_name)
    sub6 = os_.cli("subnet", "create", "--network", net_name, "--ip-version", "6", "--subnet-range", "fd62::/64",
                   "--ipv6-address-mode", "dhcpv6-stateful", v6_name)
    assert (sub6["ip_version"], sub6["cidr"], sub6["ipv6_address_mode"]) == (6, "fd62::/64", "dhcpv6-stateful")
    port = os_.cli("port", "create", "--network", net_name, unique("os6p"))
    assert sorted(":" in f["ip_address"] for f in port["fixed_ips"]) == [False, True], port["fixed_ips"]
    with pytest.raises(CliError) as refused:
        os_.cli("subnet", "create", "--network", net_name, "--ip-version", "6", "--subnet-range", "fd63::/64",
                "--ipv6-address-mode", "slaac", unique("os6x"))
    assert "SLAAC" in str(refused.value) or "slaac" in str(refused.value)
    t_net = next(n for n in tether_get(neutron_server, "networks") if n["name"] == net_name)
    assert [s["cidr"] for s in t_net["subnets"]] == ["10.58.0.0/24", "fd62::/64"]
    os_.run("port", "delete", port["id"])
    os_.run("network", "delete", net_name)
