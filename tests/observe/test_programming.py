"""Programming status (issue 25): an object counts as in effect on a host only once that host's
agent reported an applied revision at least the object's, without quarantining it or failing
kernel operations; a host whose lease expired shows as down with why; and an agent reports a new
applied revision for real changes but never for other hosts' status reports (no report loop)."""

from __future__ import annotations

from datetime import timedelta

from tether.calc.replica import Replica
from tether.model import Endpoint, Host, HostStatus, NetworkPolicy, Problem, now
from tether.server.programming import DOWN, FAILING, PENDING, PROGRAMMED, QUARANTINED, programming


def host(name: str, applied: int, **kw) -> Host:
    st = HostStatus(applied_revision=applied, updated_at=now(), **kw)
    return Host(name=name, underlay_ip="198.18.0.1", status=st)


def policy(rev: int) -> NetworkPolicy:
    return NetworkPolicy(name="deny-db", namespace="default", revision=rev)


def test_a_policy_is_enforced_only_when_every_host_applied_its_revision() -> None:
    pol = policy(40)
    hosts = [host("h1", 41), host("h2", 40), host("h3", 39)]
    p = programming(pol, hosts, {"h1", "h2", "h3"}, written_at=now() - timedelta(milliseconds=150))
    assert [h.state for h in p.hosts] == [PROGRAMMED, PROGRAMMED, PENDING]
    assert not p.programmed
    assert p.summary().startswith("enforced on 2/3 hosts (revision 40)")
    assert "h3: pending (applied revision 39 < 40)" in p.summary()
    hosts[2] = host("h3", 45)
    p = programming(pol, hosts, {"h1", "h2", "h3"}, written_at=now() - timedelta(milliseconds=150))
    assert p.programmed and p.summary().startswith("enforced on 3/3 hosts (revision 40, ")
    assert p.summary().endswith(" ms after write)")


def test_a_stopped_agent_shows_down_with_its_reason() -> None:
    p = programming(policy(40), [host("h1", 40), host("h2", 12)], {"h1"})
    assert p.hosts[1].state == DOWN and "no heartbeat" in p.hosts[1].reason
    assert p.as_dict()["done"] == 1 and p.as_dict()["total"] == 2


def test_a_quarantined_object_or_failing_host_is_not_programmed() -> None:
    q = Problem(kind="NetworkPolicy", name="default/deny-db", reason="selector refused")
    f = Problem(kind="operation", name="nft add rule", reason="No such file")
    p = programming(policy(40), [host("h1", 50, problems=[q]), host("h2", 50, failed_ops=[f])], {"h1", "h2"})
    assert [h.state for h in p.hosts] == [QUARANTINED, FAILING]
    assert "selector refused" in p.hosts[0].reason and "nft add rule" in p.hosts[1].reason


def test_an_endpoint_needs_only_its_own_host() -> None:
    ep = Endpoint(name="web", network="n1", host="h2", revision=9)
    p = programming(ep, [host("h1", 1), host("h2", 9)], {"h1", "h2"})
    assert [h.host for h in p.hosts] == ["h2"] and p.programmed
    assert p.summary().startswith("programmed on 1/1 hosts")


def event(obj, rev: int) -> dict:
    return {"type": "put", "kind": obj.kind, "key": obj.key(), "revision": rev,
            "object": obj.model_dump(mode="json")}


def test_other_hosts_status_reports_do_not_advance_what_an_agent_reports() -> None:
    r = Replica()
    r.load_snapshot({"revision": 5, "objects": []})
    h = Host(name="h2", underlay_ip="198.18.0.2")
    assert r.apply_event(event(h, 6)) and r.acted == 6
    reported = h.model_copy(update={"status": HostStatus(applied_revision=6)})
    assert not r.apply_event(event(reported, 7)), "a status report is nothing to apply"
    assert r.acted == 6 and r.revision == 7
    assert r.apply_event(event(policy(0), 8)) and r.acted == 8
    assert r.apply_event({"type": "delete", "kind": "NetworkPolicy", "key": policy(0).key(), "revision": 9})
    assert r.acted == 9 and r.view().acted == 9
