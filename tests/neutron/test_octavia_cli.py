"""The real `openstack loadbalancer` CLI (python-octaviaclient) and openstacksdk against a Tether
server without Keystone: the commands an OpenStack user types work, by name or id, and what Tether
does not do fails with a 400 naming it and creates nothing. Packets: test_octavia_lab.py."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.lab import unique
from tests.fixtures.openstack import CliError, OpenStack

pytestmark = pytest.mark.client


@pytest.fixture(scope="module")
def subnet(openstack_client: OpenStack) -> str:
    net = unique("lbn")
    openstack_client.cli("network", "create", net)
    return openstack_client.cli("subnet", "create", "--network", net, "--subnet-range", "10.64.0.0/24",
                                unique("lbs"))["id"]


def fails(os_: OpenStack, *args: str) -> str:
    with pytest.raises(CliError) as e:
        os_.run(*args)
    return e.value.stderr


def test_loadbalancer_listener_pool_member_commands_work_by_name_and_set_changes_them(openstack_client,
                                                                                    subnet) -> None:
    os_ = openstack_client
    lb_name, l_name, p_name = unique("lb"), unique("l"), unique("p")
    lb = os_.cli("loadbalancer", "create", "--name", lb_name, "--vip-subnet-id", subnet, "--wait")
    assert lb["provisioning_status"] == "ACTIVE" and lb["vip_address"].startswith("10.64.0.")
    os_.cli("loadbalancer", "listener", "create", "--protocol", "TCP", "--protocol-port", "80", "--name", l_name,
            lb_name)
    pool = os_.cli("loadbalancer", "pool", "create", "--lb-algorithm", "ROUND_ROBIN", "--listener", l_name,
                   "--protocol", "TCP", "--name", p_name)
    member = os_.cli("loadbalancer", "member", "create", "--subnet-id", subnet, "--address", "10.64.0.20",
                     "--protocol-port", "8080", "--name", "web1", p_name)
    assert member["operating_status"] == "NO_MONITOR"
    os_.run("loadbalancer", "set", "--description", "front door", lb_name)
    os_.run("loadbalancer", "pool", "set", "--lb-algorithm", "SOURCE_IP", p_name)
    os_.run("loadbalancer", "member", "set", "--disable", p_name, "web1")
    assert os_.cli("loadbalancer", "show", lb_name)["description"] == "front door"
    assert os_.cli("loadbalancer", "pool", "show", p_name)["lb_algorithm"] == "SOURCE_IP"
    assert os_.cli("loadbalancer", "member", "show", p_name, "web1")["operating_status"] == "OFFLINE"
    status = json.loads(os_.run("loadbalancer", "status", "show", lb_name))  # always JSON, no -f
    assert status["loadbalancer"]["operating_status"] == "ONLINE"
    assert status["loadbalancer"]["listeners"][0]["pools"][0]["id"] == pool["id"]
    assert lb_name in {x["name"] for x in os_.cli("loadbalancer", "list")}

    conn = os_.sdk()
    assert [m.address for m in conn.load_balancer.members(pool["id"])] == ["10.64.0.20"]
    assert conn.load_balancer.find_load_balancer(lb_name).vip_address == lb["vip_address"]

    assert "has children" in fails(os_, "loadbalancer", "delete", lb_name)
    os_.run("loadbalancer", "delete", "--cascade", lb_name)
    assert lb_name not in {x["name"] for x in os_.cli("loadbalancer", "list")}
    assert lb["vip_port_id"] not in {p["ID"] for p in os_.cli("port", "list")}


@pytest.mark.parametrize(("args", "named"), [
    (("loadbalancer", "listener", "create", "--protocol", "HTTP", "--protocol-port", "80"), "protocol"),
    (("loadbalancer", "listener", "create", "--protocol", "TERMINATED_HTTPS", "--protocol-port", "443",
      "--default-tls-container-ref", "http://barbican/c1"), "TLS"),
    (("loadbalancer", "listener", "create", "--protocol", "TCP", "--protocol-port", "80", "--allowed-cidr",
      "10.0.0.0/8"), "allowed_cidrs"),
    (("loadbalancer", "pool", "create", "--lb-algorithm", "SOURCE_IP_PORT", "--protocol", "TCP", "--loadbalancer"),
     "lb_algorithm"),
    (("loadbalancer", "pool", "create", "--lb-algorithm", "LEAST_CONNECTIONS", "--protocol", "TCP",
      "--loadbalancer"), "lb_algorithm"),
    (("loadbalancer", "pool", "create", "--lb-algorithm", "ROUND_ROBIN", "--protocol", "TCP",
      "--session-persistence", "type=SOURCE_IP", "--loadbalancer"), "session_persistence"),
])
def test_what_tether_does_not_do_is_refused_naming_it_and_creates_nothing(openstack_client, subnet, args,
                                                                          named) -> None:
    os_ = openstack_client
    lb = unique("lbr")
    os_.cli("loadbalancer", "create", "--name", lb, "--vip-subnet-id", subnet)
    try:
        before = (os_.cli("loadbalancer", "listener", "list"), os_.cli("loadbalancer", "pool", "list"))
        err = fails(os_, *args, lb)
        assert "400" in err and (named in err or named.lower() in err.lower()), err
        assert (os_.cli("loadbalancer", "listener", "list"), os_.cli("loadbalancer", "pool", "list")) == before
    finally:
        os_.run("loadbalancer", "delete", "--cascade", lb)


def test_health_monitors_weights_and_stats_are_refused_in_words(openstack_client, subnet) -> None:
    os_ = openstack_client
    lb, pool = unique("lbh"), unique("ph")
    os_.cli("loadbalancer", "create", "--name", lb, "--vip-subnet-id", subnet)
    try:
        os_.cli("loadbalancer", "pool", "create", "--lb-algorithm", "ROUND_ROBIN", "--protocol", "TCP",
                "--loadbalancer", lb, "--name", pool)
        err = fails(os_, "loadbalancer", "healthmonitor", "create", "--delay", "5", "--timeout", "3",
                    "--max-retries", "2", "--type", "TCP", pool)
        assert "400" in err and "Health monitors are not implemented" in err, err
        assert os_.cli("loadbalancer", "healthmonitor", "list") == []
        err = fails(os_, "loadbalancer", "member", "create", "--address", "10.64.0.30", "--protocol-port", "80",
                    "--weight", "5", pool)
        assert "weight" in err and os_.cli("loadbalancer", "member", "list", pool) == []
        err = fails(os_, "loadbalancer", "stats", "show", lb)
        assert "not implemented" in err, err
    finally:
        os_.run("loadbalancer", "delete", "--cascade", lb)
