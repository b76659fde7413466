"""Neutron's semantics for endpoints that use security groups, in the pure parts: the model's port
security flag, the default group, the compiler's layer for a port with port security and no group,
the evaluator's verdict for it, and when a table needs conntrack for groups at all."""

from __future__ import annotations

from tests.policy.world import add, make_replica
from tether.calc.host import HostContext, compute_nft, needs_state
from tether.model import (
    Endpoint,
    SecurityGroup,
    SecurityGroupRule,
    default_group_id,
    default_security_group,
    is_default_group,
)
from tether.policy_eval import World, decide

CTX = HostContext("h1", "eth0", 1500)


def secure(r, key: str, groups: list[str] | None = None) -> None:
    """Port security on (as the Neutron API sets it), with these groups (none by default)."""
    r.objects["Endpoint"][key] = Endpoint.model_validate(
        {**r.objects["Endpoint"][key].model_dump(), "port_security": True, "security_groups": groups or []})


def dispatch(plan, mapname: str, iface: str) -> str:
    return "\n".join(plan.chain(dict(plan.set(mapname).elements)[iface][5:]).rules)


def world_of(r) -> World:
    return World(endpoints=list(r.endpoints), namespaces=list(r.namespaces), security_groups=list(r.security_groups),
                 networks=list(r.networks.values()), hosts=list(r.hosts.values()))


def test_naming_a_group_turns_port_security_on_and_removing_the_groups_keeps_it() -> None:
    ep = Endpoint(name="a", network="n", security_groups=["g"])
    assert ep.port_security
    emptied = Endpoint.model_validate({**ep.model_dump(), "security_groups": []})
    assert emptied.port_security and not Endpoint(name="b", network="n").port_security


def test_default_group_has_neutrons_rules_and_an_id_that_follows_from_its_project() -> None:
    sg = default_security_group("p1")
    assert sg.id == default_group_id("p1") != default_group_id("p2") and default_group_id(None) == default_group_id("")
    assert (sg.name, sg.description, sg.project) == ("default", "Default security group", "p1")
    assert sorted((r.direction, r.ethertype, r.remote_group_id, r.protocol, r.remote_ip_prefix) for r in sg.rules) == [
        ("egress", "IPv4", None, None, None), ("egress", "IPv6", None, None, None),
        ("ingress", "IPv4", sg.id, None, None), ("ingress", "IPv6", sg.id, None, None)]
    assert is_default_group(sg) and not is_default_group(SecurityGroup(name="default", project="p1"))


def test_port_security_without_groups_compiles_to_a_layer_that_denies_both_ways() -> None:
    r = make_replica()
    secure(r, "xa")
    plan = compute_nft(r, CTX)
    ingress, egress = dispatch(plan, "ep_in", "tthxa"), dispatch(plan, "ep_out", "tthxa")
    assert "sgi-nogroups" in ingress and "deny in sg no-groups" in ingress
    assert "sge-nogroups" in egress and "deny out sg no-groups" in egress
    assert plan.chain("sgi-nogroups").rules == () and plan.chain("sge-nogroups").rules == ()
    assert "10.1.0.1" in plan.set("stateful").elements  # tracked: its established connections are judged again
    assert "no-groups" not in dispatch(plan, "ep_in", "tthyc")  # y/c uses no group: open as before


def test_an_endpoint_that_leaves_its_last_group_gets_a_new_dispatch_chain() -> None:
    r = make_replica()
    add(r, SecurityGroup(id="g1", name="web", rules=[SecurityGroupRule(direction="ingress")]))
    secure(r, "xa", ["g1"])
    before = dict(compute_nft(r, CTX).set("ep_in").elements)["tthxa"]
    secure(r, "xa", [])
    plan = compute_nft(r, CTX)
    after = dict(plan.set("ep_in").elements)["tthxa"]
    assert after != before and "sgi-nogroups" in dispatch(plan, "ep_in", "tthxa")


def test_evaluator_denies_both_ways_for_port_security_without_groups() -> None:
    r = make_replica()
    secure(r, "xa")
    w = world_of(r)
    xa, ya = (next(e for e in w.endpoints if e.id == k) for k in ("xa", "ya"))
    into, out = decide(w, ya, xa), decide(w, xa, ya)
    assert not into.allowed and not out.allowed and into.policy == "sg:no-groups"
    assert decide(w, f"host:{xa.host}", xa).allowed  # its own host, as for every endpoint
    assert decide(w, ya, next(e for e in w.endpoints if e.id == "yb")).allowed  # the others stay open


def test_conntrack_is_needed_for_groups_endpoints_use_not_for_groups_alone() -> None:
    r = make_replica()
    add(r, default_security_group(None))
    assert needs_state(r) == ""  # a default group no port uses filters nothing
    assert compute_nft(r, CTX).chain("raw_prerouting") is None  # the table without conntrack
    secure(r, "yb")
    assert needs_state(r) == "security groups"
