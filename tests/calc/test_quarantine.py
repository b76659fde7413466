"""One bad object in the replica never stops a host's plan: it is left out (quarantined), logged
once, counted and reported, while every other object is applied. The replicas are built by hand,
bypassing the server's validation (`model_construct`, raw dicts), as a store written by anyone
could hold them."""

from __future__ import annotations

import logging

import pytest

from tether.agent import quarantine_report
from tether.calc import quarantine, services
from tether.calc.dns_records import build
from tether.calc.host import HostContext, compute_plan
from tether.calc.names import VTEP_NAME
from tether.calc.plan import Quarantined, Route
from tether.calc.replica import Replica
from tether.model import (
    AddressPair,
    Block,
    Endpoint,
    Host,
    Network,
    Owner,
    SecurityGroup,
    SecurityGroupRule,
    Service,
    ServicePort,
    Subnet,
)

CTX = HostContext("h1", "eth0", 1500)


def replica() -> Replica:
    """Three hosts on one VXLAN network, one pod each, a security group on the pods (so the table
    has state and the policy compiler runs) and a service."""
    r = Replica()
    for i in (1, 2, 3):
        h = Host(name=f"h{i}", underlay_ip=f"198.18.0.{i}", underlay_cidr="198.18.0.0/24", vtep_ip=f"169.254.64.{i}")
        r.objects["Host"][h.name] = h
    r.objects["Network"]["n"] = Network(name="n", subnets=[Subnet(cidr="10.1.0.0/16")], encap="vxlan")
    sg = SecurityGroup(id="sg-ok", name="web", rules=[SecurityGroupRule(direction="ingress", protocol="tcp",
                                                                        port_range_min=80, port_range_max=80)])
    r.objects["SecurityGroup"][sg.id] = sg
    for i in (1, 2, 3):
        b = Block(name=f"n:10.1.{i}.0_26", network="n", cidr=f"10.1.{i}.0/26", host=f"h{i}")
        r.objects["Block"][b.store_name()] = b
        add_endpoint(r, Endpoint(id=f"e{i}", name=f"p{i}", network="n", host=f"h{i}", ips=[f"10.1.{i}.1"],
                                 interface=f"tthe{i}", owner=Owner(type="cni"), security_groups=["sg-ok"]))
    svc = Service(name="web", cluster_ip="10.96.0.10", ports=[ServicePort(port=80)], selector={"app": "web"})
    r.objects["Service"][svc.store_name()] = svc
    return r


def add_endpoint(r: Replica, ep: Endpoint) -> Endpoint:
    r.objects["Endpoint"][ep.id] = ep
    return ep


def bad_endpoint(**fields) -> Endpoint:
    base = dict(id="bad", name="bad", network="n", host="h1", ips=["10.1.1.9"], interface="tthbad",
                owner=Owner(type="cni"), security_groups=[], allowed_address_pairs=[], ports=[], labels={}, mac=None,
                parent=None, namespace="default")
    base.update(fields)
    return Endpoint.model_construct(**base)


def quarantined(plan) -> set[tuple[str, str]]:
    return {(q.kind, q.name) for q in plan.quarantined}


def good_pods_planned(plan) -> None:
    """The healthy objects are all there: the local pod's interface, route and ingress chain, and
    routes to both other hosts' blocks."""
    assert {i.name for i in plan.interfaces} == {"tthe1"}
    assert Route("10.1.1.1/32", "tthe1", scope="link") in plan.routes
    assert any(c.device == "tthe1" for c in plan.nft.chains)
    assert Route("10.1.3.0/26", VTEP_NAME, via="169.254.64.3", onlink=True) in plan.routes


@pytest.fixture(autouse=True)
def _fresh_log_state():
    quarantine_report.note((), "test")
    yield
    quarantine_report.note((), "test")


def test_an_address_pair_that_is_not_an_address_quarantines_its_endpoint_only() -> None:
    r = replica()
    add_endpoint(r, bad_endpoint(allowed_address_pairs=[AddressPair.model_construct(ip_address="garbage",
                                                                                     mac_address=None)]))
    plan = compute_plan(r, CTX)
    assert quarantined(plan) == {("Endpoint", "bad")}
    assert "garbage" in plan.quarantined[0].reason
    assert "tthbad" not in {i.name for i in plan.interfaces}
    good_pods_planned(plan)


def test_a_security_group_rule_with_an_injected_protocol_quarantines_the_group_only() -> None:
    r = replica()
    sg = SecurityGroup.model_construct(id="sg-bad", name="evil", labels={}, description="", project=None, rules=[
        SecurityGroupRule.model_construct(id="r1", direction="ingress", ethertype="IPv4", protocol="tcp; drop",
                                          port_range_min=None, port_range_max=None, remote_ip_prefix=None,
                                          remote_group_id=None, description="")])
    r.objects["SecurityGroup"][sg.id] = sg
    add_endpoint(r, Endpoint(id="e9", name="p9", network="n", host="h1", ips=["10.1.1.5"], interface="tthe9",
                             owner=Owner(type="cni"), security_groups=["sg-bad"]))
    plan = compute_plan(r, CTX)
    assert quarantined(plan) == {("SecurityGroup", "sg-bad")}
    assert "tcp; drop" in plan.quarantined[0].reason
    assert {"tthe1", "tthe9"} <= {i.name for i in plan.interfaces}


def test_a_peer_host_whose_vtep_ip_is_not_an_address_leaves_every_other_peer_routed() -> None:
    r = replica()
    r.objects["Host"]["h2"] = r.hosts["h2"].model_copy(update={"vtep_ip": "not-an-ip"})
    plan = compute_plan(r, CTX)
    assert quarantined(plan) == {("Host", "h2")}
    assert not any(x.via == "not-an-ip" for x in plan.routes) and not any(n.ip == "not-an-ip" for n in plan.neighbours)
    good_pods_planned(plan)


@pytest.mark.parametrize("name", ["x" * 5000, 'web"; drop', "web\nnext", "*", "wéb"])
def test_a_service_with_a_name_that_is_not_a_dns_label_is_quarantined_and_dns_still_builds(name: str) -> None:
    r = replica()
    bad = Service.model_construct(**{**Service(name="tmp", cluster_ip="10.96.0.11", ports=[ServicePort(port=81)],
                                               selector={"app": "web"}).__dict__, "name": name})
    r.objects["Service"][bad.store_name()] = bad
    plan = compute_plan(r, CTX)
    assert quarantined(plan) == {("Service", f"default/{name}")}
    good_pods_planned(plan)
    rec = build(r.endpoints, r.services, r.networks.values())
    assert "web.default.svc.tether.local." in rec.existing
    assert "p2.n.tether.local." in rec.existing


def test_a_mac_that_is_not_one_quarantines_its_endpoint() -> None:
    r = replica()
    add_endpoint(r, bad_endpoint(mac="not-a-mac"))
    plan = compute_plan(r, CTX)
    assert quarantined(plan) == {("Endpoint", "bad")}
    good_pods_planned(plan)


def test_an_endpoint_naming_a_foreign_device_is_never_planned_on_it() -> None:
    """interface "eth0": no ingress chain, route, MTU or sysctl on eth0; the endpoint is reported."""
    r = replica()
    add_endpoint(r, bad_endpoint(interface="eth0"))
    plan = compute_plan(r, CTX)
    assert quarantined(plan) == {("Endpoint", "bad")}
    assert "eth0" not in {i.name for i in plan.interfaces}
    assert not any(x.dev == "eth0" and x.scope == "link" for x in plan.routes)
    assert not any(c.device == "eth0" for c in plan.nft.chains)
    assert "eth0" not in str(plan.nft.set("ep_in")) and "eth0" not in str(plan.nft.set("ep_out"))
    good_pods_planned(plan)


@pytest.mark.parametrize("iface", ["tth" + "x" * 20, "tth/../../x", "tap-anything", "veth0"])
def test_interface_names_outside_the_agents_own_pattern_are_quarantined(iface: str) -> None:
    r = replica()
    add_endpoint(r, bad_endpoint(interface=iface))
    assert quarantined(compute_plan(r, CTX)) == {("Endpoint", "bad")}


def test_another_hosts_endpoint_with_a_foreign_interface_does_not_concern_this_host() -> None:
    r = replica()
    add_endpoint(r, bad_endpoint(host="h2", interface="eth0", ips=["10.1.2.9"]))
    assert compute_plan(r, CTX).quarantined == ()


def test_a_vm_port_whose_netns_is_outside_the_runtime_directories_is_quarantined() -> None:
    r = replica()
    owner = Owner.model_construct(type="vm", netns="/proc/1/ns/net")  # the model refuses it now
    add_endpoint(r, bad_endpoint(interface="tap01234567-89", owner=owner))
    plan = compute_plan(r, CTX)
    assert quarantined(plan) == {("Endpoint", "bad")}
    assert "outside" in plan.quarantined[0].reason


def test_an_object_that_makes_a_compiler_raise_is_found_and_left_out(monkeypatch) -> None:
    """Past the checks: whatever still makes the plan raise is found by bisection."""
    r = replica()
    for i in range(20):
        s = Service(name=f"s{i}", cluster_ip=f"10.96.1.{i}", ports=[ServicePort(port=80)], selector={"app": "x"})
        r.objects["Service"][s.store_name()] = s
    real = services.compile

    def fragile(svcs, *a, **kw):
        if any(s.name == "s13" for s in svcs):
            raise ValueError("cannot compile s13")
        return real(svcs, *a, **kw)

    monkeypatch.setattr(services, "compile", fragile)
    plan = compute_plan(r, CTX)
    assert quarantined(plan) == {("Service", "default/s13")}
    assert "cannot compile s13" in plan.quarantined[0].reason
    good_pods_planned(plan)


def test_a_replica_survives_objects_the_model_refuses_in_a_snapshot_and_in_events() -> None:
    r = Replica()
    ok = Network(name="n", subnets=[Subnet(cidr="10.1.0.0/16")])
    r.load_snapshot({"revision": 5, "objects": [
        {"kind": "Network", "object": ok.model_dump(mode="json")},
        {"kind": "Endpoint", "object": {"id": "x", "name": "bad", "network": "n", "ips": "not-a-list"}},
        {"kind": "Host", "object": "not even a dict"},
    ]})
    assert set(r.networks) == {"n"}
    assert {(k, n) for k, n, _ in r.undecodable} == {("Endpoint", "x"), ("Host", "?")}
    assert r.apply_event({"type": "put", "kind": "Network", "key": "/tether/v1/networks/m", "revision": 6,
                          "object": {"name": "m", "mtu": "huge"}})
    assert "m" not in r.networks and ("Network", "m") in {(k, n) for k, n, _ in r.undecodable}
    plan = compute_plan(r, CTX)
    assert ("Network", "m") in quarantined(plan) and ("Endpoint", "x") in quarantined(plan)
    # a delete (or a good version) of the undecodable object clears it
    r.apply_event({"type": "delete", "kind": "Network", "key": "/tether/v1/networks/m", "revision": 7, "object": None})
    assert ("Network", "m") not in {(k, n) for k, n, _ in r.undecodable}


def test_each_quarantined_object_is_logged_once_not_on_every_retry(caplog) -> None:
    r = replica()
    add_endpoint(r, bad_endpoint(mac="not-a-mac"))
    with caplog.at_level(logging.WARNING, logger="tether.agent.quarantine"):
        for _ in range(3):
            quarantine_report.note(compute_plan(r, CTX).quarantined, "h1")
    assert len([x for x in caplog.records if "quarantined Endpoint 'bad'" in x.getMessage()]) == 1
    assert 'tether_agent_quarantined_objects{host="h1",kind="Endpoint"} 1' in quarantine_report.metrics("h1")


def test_a_clean_replica_has_nothing_quarantined_and_is_not_copied() -> None:
    r = replica()
    clean, bad = quarantine.screen(r, "h1")
    assert clean is r and bad == []
    assert compute_plan(r, CTX).quarantined == ()


def test_quarantined_objects_are_described_by_kind_name_and_reason() -> None:
    q = Quarantined("Endpoint", "bad", "mac 'x' is not a MAC address")
    assert (q.kind, q.name) == ("Endpoint", "bad")


def test_a_security_group_with_a_long_unicode_name_keeps_every_rule_comment_within_nfts_limit() -> None:
    """nft refuses a comment over 128 bytes, and the whole table with it: a group's name (free text,
    as in Neutron) cut at 120 characters was still 240 bytes in a two-byte script."""
    import json

    r = replica()
    r.objects["SecurityGroup"]["sg-ok"] = r.objects["SecurityGroup"]["sg-ok"].model_copy(update={"name": "é" * 200})
    plan = compute_plan(r, CTX)
    assert plan.quarantined == ()
    comments = [json.loads(x).get("comment", "") for c in plan.nft.chains for x in c.rules]
    assert any("éé" in c for c in comments) and all(len(c.encode()) <= 128 for c in comments)
