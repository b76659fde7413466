"""The tracked table's handling of connections whose verdict is not settled (calc.midstream_chains),
and when and for whom the agent marks conntrack entries for judging again (docs/ARCHITECTURE.md,
"What a policy change does to existing connections"). The lab test with real streams is
tests/lab/test_policy_continuity.py."""

from __future__ import annotations

import json

from tests.calc.test_host import CTX, replica
from tether.calc.host import (
    EPHEMERAL,
    PICKUP_GRACE,
    base_nft,
    compute_nft,
    pickup_grace,
    rejudge_needed,
    rejudge_scope,
)
from tether.calc.names import CT_DENIED, CT_PICKED, CT_REJUDGE
from tether.dataplane.conntrack import rejudge_commands
from tether.dataplane.nft import NftReport
from tether.model import NetworkPolicy

DENY_IN = NetworkPolicy(name="deny", namespace="default", spec={"podSelector": {}, "policyTypes": ["Ingress"]})


def chain(plan, name: str) -> list[dict]:
    return [json.loads(r) for r in next(c for c in plan.chains if c.name == name).rules]


def mark_test(r: dict) -> tuple[int, int] | None:
    """(bits, value) of a rule's `ct mark & bits == value`, if it has one."""
    for e in r["expr"]:
        m = e.get("match", {})
        left = m.get("left", {})
        if isinstance(left, dict) and "&" in left and left["&"][0] == {"ct": {"key": "mark"}}:
            return left["&"][1], m["right"]
    return None


def targets(r: dict) -> str | None:
    return next((e["goto"]["target"] for e in r["expr"] if "goto" in e), None)


def with_policy():
    r = replica()
    r.objects["NetworkPolicy"][DENY_IN.store_name()] = DENY_IN
    return r


def test_a_connection_marked_for_judging_again_leaves_before_the_established_accept() -> None:
    fwd = chain(base_nft(replica(), "h1"), "forward")
    assert mark_test(fwd[0]) == (CT_REJUDGE, CT_REJUDGE) and targets(fwd[0]) == "midstream"
    assert {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related",
                                                                              "untracked"]}} in fwd[1]["expr"]


def test_only_a_host_with_a_disabled_port_drops_what_is_forwarded_to_it_first() -> None:
    """No lookup on every forwarded packet of a host without one (a set lookup is ~4% of a round trip)."""
    r = replica()
    assert "port disabled" not in json.dumps(chain(base_nft(r, "h1"), "forward"))
    r.objects["Endpoint"]["e0"] = r.objects["Endpoint"]["e0"].model_copy(update={"admin_state_up": False})
    fwd = chain(base_nft(r, "h1"), "forward")
    assert fwd[0]["comment"] == "port disabled" and '"right": "tthe0"' in json.dumps(fwd[0])


def test_tcp_without_syn_to_or_from_a_newly_tracked_pod_is_marked_picked_up_and_judged_in_midstream() -> None:
    plan = base_nft(replica(), "h1")
    fwd = chain(plan, "forward")
    pickups = [r for r in fwd if r.get("comment") == "picked up mid-stream"]
    assert len(pickups) == 4  # source or destination, IPv4 or IPv6
    assert fwd.index(pickups[-1]) < next(i for i, r in enumerate(fwd) if "svc_reject" in json.dumps(r))
    for pickup in pickups:
        text = json.dumps(pickup)
        assert '"syn"' in text and '"new"' in text and targets(pickup) == "midstream"
        assert str(CT_PICKED | CT_REJUDGE) in text
    assert {r["expr"][2]["match"]["right"] for r in pickups} == {"@picked_grace", "@picked_grace6"}
    grace = {s.name: s for s in plan.sets if s.name.startswith("picked_grace")}
    assert {s.timeout for s in grace.values()} == {PICKUP_GRACE} and all("timeout" in s.flags for s in grace.values())


def test_newly_tracked_addresses_enter_the_grace_sets_in_the_applys_own_batch() -> None:
    cmds = pickup_grace(frozenset({"10.1.0.1", "fd00::1"}))
    assert [c["add"]["set"]["name"] for c in cmds] == ["picked_grace", "picked_grace6"]
    assert cmds[0]["add"]["set"]["elem"] == ["10.1.0.1"] and cmds[0]["add"]["set"]["timeout"] == PICKUP_GRACE
    assert pickup_grace(frozenset()) == []


def test_the_server_is_conntracks_reply_end_or_for_a_pickup_the_port_below_the_ephemeral_range() -> None:
    mid = chain(base_nft(replica(), "h1"), "midstream")
    assert mark_test(mid[0]) == (CT_PICKED, 0) and '"reply"' in json.dumps(mid[0])
    assert targets(mid[0]) == "midstream_from_server"
    assert mark_test(mid[1]) == (CT_PICKED, 0) and targets(mid[1]) == "midstream_judge"
    tcp = {"protocol": "tcp"}
    assert {"match": {"op": "<", "left": {"payload": {**tcp, "field": "sport"}}, "right": EPHEMERAL}} in mid[2]["expr"]
    assert {"match": {"op": ">=", "left": {"payload": {**tcp, "field": "dport"}}, "right": EPHEMERAL}} in mid[2]["expr"]
    assert targets(mid[2]) == "midstream_from_server" and targets(mid[3]) == "midstream_judge"


def test_packets_from_the_server_pass_until_one_towards_it_was_denied() -> None:
    rules = chain(base_nft(replica(), "h1"), "midstream_from_server")
    assert mark_test(rules[0]) == (CT_DENIED, CT_DENIED) and {"drop": None} in rules[0]["expr"]
    assert rules[-1]["expr"] == [{"accept": None}]


def test_judging_clears_the_marks_then_dispatches_like_a_new_connection() -> None:
    plan = base_nft(replica(), "h1")
    judge, fwd = chain(plan, "midstream_judge"), chain(plan, "forward")
    cleared = judge[0]["expr"][0]["mangle"]["value"]["&"][1]
    assert cleared & (CT_REJUDGE | CT_DENIED) == 0 and cleared & CT_PICKED
    assert judge[1:-1] == fwd[-4:]  # the same vmap lookups and unknown-interface drops
    assert judge[-1]["expr"] == [{"accept": None}]


def test_policy_drops_mark_the_connection_denied_and_anti_spoofing_does_not() -> None:
    plan = compute_nft(with_policy(), CTX)
    drops = [json.loads(r) for c in plan.chains if c.name.startswith("in-") for r in c.rules
             if "deny in np" in r]
    assert drops, "no policy drop"
    for d in drops:
        mangles = [e["mangle"] for e in d["expr"] if "mangle" in e]
        assert mangles and mangles[0]["value"]["|"][1] == CT_REJUDGE | CT_DENIED
    ingress = [r for c in plan.chains if c.name.startswith("ing-") for r in c.rules]
    assert ingress and not any("mangle" in r for r in ingress), "ct mark in a chain without conntrack"


def test_the_table_without_conntrack_has_no_midstream_chains() -> None:
    plan = compute_nft(replica(), CTX)
    assert not any(c.name.startswith("midstream") for c in plan.chains)


def test_only_changes_that_may_narrow_a_verdict_ask_for_judging_again() -> None:
    assert rejudge_needed(NftReport(full=True))
    assert rejudge_needed(NftReport(chains_replaced=["npi-0123456789ab"]))
    assert rejudge_needed(NftReport(chains_removed=["in-0123456789ab"]))
    assert rejudge_needed(NftReport(changes=["sel-0123456789ab: +0 -1"]))
    assert rejudge_needed(NftReport(changes=["ep_in: +1 -1"]))
    assert not rejudge_needed(NftReport(changes=["ep_in: +1 -0", "sel-0123456789ab: +2 -0"]))  # a new pod
    assert not rejudge_needed(NftReport(changes=["stateful: +1 -0", "svc_vips: +0 -1"]))
    assert not rejudge_needed(NftReport(chains_replaced=["ing-tthe0", "st-0123456789ab", "svc_reject"]))


def test_the_scope_is_this_hosts_tracked_pods_addresses() -> None:
    r = with_policy()
    assert rejudge_scope(r, "h1", compute_nft(r, CTX)) == {"10.1.0.1"}
    assert rejudge_scope(replica(), "h1", compute_nft(replica(), CTX)) == frozenset()


def test_entries_are_marked_by_either_end_and_newly_tracked_ones_as_picked_up() -> None:
    cmds = rejudge_commands(["10.1.0.1"])
    assert cmds == [["conntrack", "-U", "--orig-src", "10.1.0.1", "--mark", f"{CT_REJUDGE:#x}/{CT_REJUDGE:#x}"],
                    ["conntrack", "-U", "--reply-src", "10.1.0.1", "--mark", f"{CT_REJUDGE:#x}/{CT_REJUDGE:#x}"]]
    value, mask = (int(x, 16) for x in rejudge_commands(["10.1.0.1"], picked=True)[0][-1].split("/"))
    assert value == CT_REJUDGE | CT_PICKED and mask == CT_REJUDGE | CT_PICKED | CT_DENIED


def test_many_addresses_are_marked_per_subnet_and_the_rest_per_address() -> None:
    many = [f"10.1.0.{i}" for i in range(1, 40)] + ["192.0.2.7"]
    cmds = rejudge_commands(many, subnets=["10.1.0.0/16", "10.9.0.0/16"])
    assert [c[2:4] for c in cmds] == [["--orig-src", "10.1.0.0/16"], ["--orig-dst", "10.1.0.0/16"],
                                      ["--orig-src", "192.0.2.7"], ["--reply-src", "192.0.2.7"]]


def test_the_agent_marks_newly_tracked_pods_as_picked_up_and_the_rest_only_after_a_narrowing_change(
        monkeypatch) -> None:
    from types import SimpleNamespace

    from tether.agent.main import Agent
    from tether.dataplane import conntrack

    calls: list[tuple[frozenset, bool]] = []
    monkeypatch.setattr(conntrack, "rejudge", lambda a, picked=False, subnets=(): calls.append((frozenset(a), picked)))
    agent = SimpleNamespace(host="h1", _judged=frozenset())
    lean, tracked = replica(), with_policy()

    def apply(rep, report: NftReport) -> list[tuple[frozenset, bool]]:
        calls.clear()
        Agent._rejudge(agent, rep, rejudge_scope(rep, "h1", compute_nft(rep, CTX)), report)
        return list(calls)

    # the first policy: the table is replaced, the pod is tracked from now on
    assert apply(tracked, NftReport(full=True)) == [(frozenset({"10.1.0.1"}), True)]
    # a pod added elsewhere: nothing to judge again
    assert apply(tracked, NftReport(changes=["ep_in: +1 -0"])) == []
    # the policy edited: its pods' connections are judged again, their direction known
    assert apply(tracked, NftReport(chains_replaced=["npi-0123456789ab"])) == [(frozenset({"10.1.0.1"}), False)]
    # the last policy gone: judged again once more (nothing tracked any longer)
    assert apply(lean, NftReport(full=True)) == [(frozenset({"10.1.0.1"}), False)]
    assert agent._judged == frozenset()
