"""The incremental calculation equals the full one (issue 29): random sequences of watch events
(add, update and delete of hosts, networks, blocks, namespaces, endpoints, policies and services)
are fed one by one into a replica that long-lived `Planner`s (one per host, their memos and
indexes kept from one plan to the next, as in a running agent) plan after every event; after every
event each plan, and the DNS records built with long-lived memos, equal those computed cold from
scratch (a fresh `Planner`, fresh memos): the oracle the periodic reconcile also relies on."""

from __future__ import annotations

import re
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.calc import dns_records
from tether.calc.host import HostContext
from tether.calc.memos import Memos
from tether.calc.planner import Planner
from tether.calc.replica import Replica
from tether.dataplane import nft as nft_dp
from tether.model import (
    Block,
    Endpoint,
    Host,
    Namespace,
    Network,
    NetworkPolicy,
    Service,
    ServiceBackend,
    ServicePort,
    Subnet,
    key_of,
)

HOSTS = ("h1", "h2", "h3")
NETWORKS = {"red": ("10.1.0.0/16", "vxlan"), "blue": ("10.2.0.0/16", "direct"), "dual": ("10.4.0.0/16", "auto")}
NAMESPACES = ("x", "y")
APPS = ("a", "b", "c")
EP_IDS = tuple(f"e{i}" for i in range(5))
POLICY_NAMES = ("p1", "p2", "p3")
SERVICE_NAMES = ("s1", "s2")


def _host(i: int, v6: bool) -> Host:
    h = HOSTS[i]
    return Host(name=h, underlay_ip=f"198.18.0.{i + 1}", underlay_cidr="198.18.0.0/24",
                vtep_ip=f"169.254.0.{i + 1}", underlay_ip6=f"fd18::{i + 1}" if v6 else None)


def _network(name: str, nat: bool, v6: bool) -> Network:
    cidr, encap = NETWORKS[name]
    subnets = [Subnet(cidr=cidr)] + ([Subnet(cidr="fd44::/64")] if v6 and name == "dual" else [])
    return Network(name=name, subnets=subnets, encap=encap, nat_outgoing=nat, block_size=24)


def _block(net: str, slot: int, host: int | None) -> Block:
    base = NETWORKS[net][0].split(".")
    cidr = f"{base[0]}.{base[1]}.{slot}.0/24"
    return Block(name=f"{net}:{cidr.replace('/', '_')}", network=net, cidr=cidr,
                 host=HOSTS[host] if host is not None else None)


hosts = st.builds(_host, st.integers(0, 2), st.booleans())
networks = st.builds(_network, st.sampled_from(sorted(NETWORKS)), st.booleans(), st.booleans())
blocks = st.builds(_block, st.sampled_from(sorted(NETWORKS)), st.integers(0, 3),
                   st.one_of(st.none(), st.integers(0, 2)))
namespaces = st.builds(lambda n, team: Namespace(name=n, labels={"team": team}),
                       st.sampled_from(NAMESPACES), st.sampled_from(("t1", "t2")))
labels = st.fixed_dictionaries({}, optional={"app": st.sampled_from(APPS), "tier": st.sampled_from(("web", "db"))})


@st.composite
def endpoints(draw: Any) -> Endpoint:
    ep_id = draw(st.sampled_from(EP_IDS))
    i = EP_IDS.index(ep_id)
    # mostly the same network and host for one id: most events then update an endpoint in place
    net = draw(st.sampled_from([sorted(NETWORKS)[i % len(NETWORKS)]] * 3 + sorted(NETWORKS)))
    host = draw(st.sampled_from([HOSTS[i % 2]] * 3 + list(HOSTS)))
    base = NETWORKS[net][0].split(".")
    ips = [f"{base[0]}.{base[1]}.{draw(st.integers(0, 3))}.{draw(st.integers(2, 5))}"]
    if net == "dual" and draw(st.booleans()):
        ips.append(f"fd44::{draw(st.integers(2, 5))}")
    local = draw(st.sampled_from((True, True, True, False)))  # with an interface (a pod of its host)
    return Endpoint(id=ep_id, name=ep_id, network=net, host=host, namespace=draw(st.sampled_from(NAMESPACES)),
                    ips=ips, labels=draw(labels), interface=f"tth{ep_id:0>11}" if local else None,
                    mac=f"0a:58:00:00:00:0{EP_IDS.index(ep_id)}" if local else None,
                    ready=draw(st.booleans()), admin_state_up=draw(st.sampled_from((True, True, False))),
                    ports=[{"name": "http", "port": 8080}] if draw(st.booleans()) else [])


@st.composite
def policies(draw: Any) -> NetworkPolicy:
    name = draw(st.sampled_from(POLICY_NAMES))
    peer: dict[str, Any] = {"podSelector": {"matchLabels": {"app": draw(st.sampled_from(APPS))}}}
    if draw(st.booleans()):
        peer["namespaceSelector"] = {"matchLabels": {"team": draw(st.sampled_from(("t1", "t2")))}}
    port = draw(st.sampled_from((80, 443, "http")))
    spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": draw(st.sampled_from(APPS))}}
                            if draw(st.booleans()) else {},
                            "ingress": [{"from": [peer], "ports": [{"port": port, "protocol": "TCP"}]}]}
    if draw(st.booleans()):
        spec["policyTypes"] = ["Ingress", "Egress"]
        spec["egress"] = [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]
    return NetworkPolicy(id=name, name=name, namespace=draw(st.sampled_from(NAMESPACES)), spec=spec)


@st.composite
def services(draw: Any) -> Service:
    name = draw(st.sampled_from(SERVICE_NAMES))
    ns = draw(st.sampled_from(NAMESPACES))
    port = ServicePort(name="web", port=80, target_port=draw(st.sampled_from((8080, "http"))),
                       node_port=draw(st.sampled_from((None, 30080))))
    common = {"name": name, "namespace": ns, "cluster_ip": f"10.96.0.{SERVICE_NAMES.index(name) + 1}",
              "ports": [port], "type": "NodePort" if port.node_port else "ClusterIP"}
    if draw(st.booleans()):
        return Service(**common, selector={"app": draw(st.sampled_from(APPS))})
    chosen = draw(st.lists(st.sampled_from(EP_IDS), max_size=3, unique=True))
    return Service(**common, backends=[ServiceBackend(ip=f"10.1.0.{EP_IDS.index(e) + 2}", endpoint=e)
                                       for e in chosen])


objects = st.one_of(hosts, networks, blocks, namespaces, endpoints(), endpoints(), endpoints(), endpoints(),
                    policies(), policies(), services(), services())
events = st.tuples(st.sampled_from(("put", "put", "put", "delete")), objects)


def _event(kind: str, obj: Any, revision: int) -> dict:
    return {"type": kind, "kind": obj.kind, "key": key_of(obj.kind, obj.store_name()), "revision": revision,
            "object": obj.model_dump(mode="json")}


def _start() -> Replica:
    """A small cluster to change: every host, network and namespace, and a block each."""
    rep = Replica()
    for i in range(len(HOSTS)):
        rep.apply_event(_event("put", _host(i, False), 1))
    for n in sorted(NETWORKS):
        rep.apply_event(_event("put", _network(n, n == "red", False), 1))
        for i in range(len(HOSTS)):
            rep.apply_event(_event("put", _block(n, i, i), 1))
    for ns in NAMESPACES:
        rep.apply_event(_event("put", Namespace(name=ns, labels={"team": "t1"}), 1))
    rep.synced = True
    return rep


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, min_size=5, max_size=30))
def test_plans_kept_up_event_by_event_equal_plans_computed_from_scratch(seq: list) -> None:
    rep = _start()
    contexts = [HostContext(h, "eth0", 1500) for h in HOSTS[:2]]
    planners = {c.name: Planner() for c in contexts}
    dns_memos = Memos()
    dataplanes = {c.name: nft_dp.NftDataplane("nowhere") for c in contexts}  # no kernel: see _no_kernel
    made: dict[int, frozenset] = {}  # token -> the elements it names
    with _no_kernel():
        for c in contexts:  # warm: what a running agent has planned before the events
            warm = planners[c.name].plan(rep.view(), c).nft
            _check_deltas(warm, made)
            dataplanes[c.name].apply(warm)
    for revision, (kind, obj) in enumerate(seq, start=2):
        rep.apply_event(_event(kind, obj, revision))
        view = rep.view()
        for c in contexts:
            plan = planners[c.name].plan(view, c)
            assert plan == Planner().plan(view, c), f"{c.name} after {kind} {obj!r}"
            _check_deltas(plan.nft, made)
            with _no_kernel():
                _check_dataplane(dataplanes[c.name], plan.nft)
        warm = dns_records.build(view.endpoints, view.services, view.networks.values(), serial=revision,
                                 memos=dns_memos)
        cold = dns_records.build(view.endpoints, view.services, view.networks.values(), serial=revision)
        assert warm == cold, f"DNS records after {kind} {obj!r}"


def _no_kernel() -> Any:
    return mock.patch.multiple(nft_dp, run_nft=lambda commands, netns=None: None,
                               run_elements=lambda sock, batch: None,
                               list_table=lambda netns=None, terse=False: None,
                               read_generation=lambda sock: None)


def _check_deltas(plan: Any, made: dict[int, frozenset]) -> None:
    """A token names one set of elements; a delta takes its base's elements to the set's (a base
    may be one no plan carried: a fragment's set merged into a plan's, whose token it then has)."""
    for s in plan.sets:
        if not s.token:
            assert s.delta is None
            continue
        assert made.setdefault(s.token, s.elements) == s.elements, s.name
        if s.delta is not None and s.delta.base in made:
            base = made[s.delta.base]
            assert s.delta.removed <= base and s.delta.added.isdisjoint(base), s.name
            assert (base - s.delta.removed) | s.delta.added == s.elements, s.name


def _check_dataplane(dp: Any, plan: Any) -> None:
    """The dataplane's element changes (by delta where the plan gives one) are exactly the
    difference, and its memory is the plan's elements as the kernel lists them."""
    before = {k: set(v) for k, v in (dp._elements or {}).items()}
    report = dp.apply(plan)
    for s in plan.sets:
        if not nft_dp.managed(s):
            continue
        want = {nft_dp.canon_mine(s, e) for e in s.elements}
        assert dp._elements[s.name] == want, s.name
        if report.full or s.name not in before:
            continue
        counts = re.search(rf"(?:^|; ){re.escape(s.name)}: \+(\d+) -(\d+)", "; ".join(report.changes))
        added, gone = len(want - before[s.name]), len(before[s.name] - want)  # a map's changed value: both
        assert (int(counts[1]), int(counts[2])) == (added, gone) if counts else not (added or gone), s.name


# --- the journal's other paths: batches, echoes, direct writes, overflow, lost journals ------------

def _status_only(h: Host, revision: int) -> Host:
    from tether.model import HostStatus

    return h.model_copy(update={"status": HostStatus(applied_revision=revision)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(events, st.sampled_from(("event", "event", "echo", "status", "direct", "plan_nft"))),
                min_size=5, max_size=30),
       st.integers(1, 4), st.sampled_from((4096, 8, 3)),
       st.lists(st.one_of(endpoints(), policies(), services()), max_size=8))
def test_plans_from_the_journal_equal_cold_plans_when_planned_in_batches_with_echoes_and_direct_writes(
        seq: list, every: int, limit: int, seed: list) -> None:
    """Plans every `every` events (one plan reads several changes), events that change nothing
    (the echo of an object already there, a host's status report), writes straight into the
    replica (the CNI front end's endpoint, put before the watch echoes it), a plan of the nft table
    alone in between, and a journal of `limit` entries that overflows between plans; from a
    cluster that already has some of the endpoints, policies and services (`seed`)."""
    from tether.calc.replica import Journal

    saved = Journal.LIMIT
    Journal.LIMIT = limit
    try:
        rep = _start()
        for obj in seed:
            rep.apply_event(_event("put", obj, 1))
        c = HostContext("h1", "eth0", 1500)
        planner = Planner()
        planner.plan(rep.view(), c)
        for revision, ((kind, obj), how) in enumerate(seq, start=2):
            if how == "echo":  # the same object again: nothing changes
                current = rep.objects[obj.kind].get(obj.store_name())
                if current is not None:
                    assert not rep.apply_event(_event("put", current, revision))
            elif how == "status" and isinstance(obj, Host) and obj.name in rep.objects["Host"]:
                assert not rep.apply_event(_event("put", _status_only(rep.objects["Host"][obj.name], revision),
                                                  revision))
            elif how == "direct" and kind == "put":
                rep.objects[obj.kind][obj.store_name()] = obj
            elif how == "direct":
                rep.objects[obj.kind].pop(obj.store_name(), None)
            else:
                rep.apply_event(_event(kind, obj, revision))
            if how == "plan_nft":
                view = rep.view()
                assert planner.nft(view, c) == Planner().nft(view, c)
            if revision % every == 0:
                view = rep.view()
                assert planner.plan(view, c) == Planner().plan(view, c), f"after {kind} {obj!r} ({how})"
        view = rep.view()
        assert planner.plan(view, c) == Planner().plan(view, c)
    finally:
        Journal.LIMIT = saved


def test_a_block_changing_hands_moves_the_route_to_an_address_borrowed_from_it() -> None:
    """An endpoint's address in another host's block needs a /32 route; when the block moves to the
    endpoint's own host (or away from it) that route comes or goes, though the endpoint did not change."""
    rep = _start()
    planners = {h: Planner() for h in HOSTS}
    contexts = {h: HostContext(h, "eth0", 1500) for h in HOSTS}
    ep = Endpoint(id="e9", name="e9", network="red", host="h1", namespace="x", ips=["10.1.1.7"])
    steps = [("put", ep), ("put", _block("red", 1, 0)), ("put", _block("red", 1, 2)), ("delete", _block("red", 1, 2)),
             ("put", _block("red", 1, 1)), ("put", _host(2, True)), ("delete", _host(1, False)),
             ("put", _host(1, False))]
    for revision, (kind, obj) in enumerate(steps, start=2):
        rep.apply_event(_event(kind, obj, revision))
        view = rep.view()
        for h in HOSTS:
            warm = planners[h].plan(view, contexts[h])
            assert warm == Planner().plan(view, contexts[h]), f"{h} after {kind} {obj!r}"
    borrowed = [r for r in Planner().plan(rep.view(), contexts["h2"]).routes if r.dst == "10.1.1.7/32"]
    assert borrowed  # the block is h2's again: the endpoint on h1 borrows its address


def test_a_plan_reads_the_journal_and_falls_back_to_a_full_one_when_it_cannot_tell() -> None:
    """The planner recomputes only the objects the journal names; another replica, objects in
    dicts that do not journal, a snapshot loaded or a journal that overflowed make the next plan
    a full one, whose result is the same as a cold plan."""
    from tether.calc.replica import Journal, JournaledDict

    rep = _start()
    c = HostContext("h1", "eth0", 1500)
    planner = Planner()
    planner.plan(rep.view(), c)
    rep.apply_event(_event("put", Endpoint(id="e1", name="e1", network="red", host="h2", namespace="x",
                                           ips=["10.1.1.9"]), 2))
    planner.plan(rep.view(), c)
    assert planner.memos.changed == {"Endpoint": {"e1"}}
    planner.plan(rep.view(), c)
    assert planner.memos.changed == {}  # nothing since
    other = _start()  # another replica: its journal says nothing of this one
    assert planner.plan(other.view(), c) == Planner().plan(other.view(), c) and planner.memos.changed is None
    planner.plan(rep.view(), c)
    assert planner.memos.changed is None
    rep.objects["Endpoint"] = dict(rep.objects["Endpoint"])  # not journaled: its writes are not noted
    rep.objects["Endpoint"].pop("e1")
    assert planner.plan(rep, c) == Planner().plan(rep, c) and planner.memos.changed is None
    rep.objects["Endpoint"] = JournaledDict("Endpoint", rep.journal, rep.objects["Endpoint"])
    planner.plan(rep.view(), c)
    for i in range(Journal.LIMIT + 1):  # overflow between two plans
        rep.objects["Namespace"]["x"] = Namespace(name="x", labels={"team": f"t{i % 2}"})
    view = rep.view()
    assert planner.plan(view, c) == Planner().plan(view, c) and planner.memos.changed is None
    snapshot = {"revision": 9, "objects": [{"kind": k, "object": o.model_dump(mode="json")}
                                           for k, objs in rep.objects.items() for o in objs.values()]}
    rep.load_snapshot(snapshot)
    view = rep.view()
    assert planner.plan(view, c) == Planner().plan(view, c) and planner.memos.changed is None
    planner.plan(rep.view(), c)
    assert planner.memos.changed == {}


def test_a_selectors_set_follows_its_peers_added_relabelled_and_deleted() -> None:
    """A selector's members are the last plan's changed for the changed endpoints (old version out,
    new in): each step's plan, and its `sel-` set, equal a cold plan's."""
    rep = _start()
    c = HostContext("h1", "eth0", 1500)
    planner = Planner()
    pol = NetworkPolicy(id="p", name="p", namespace="x", spec={
        "podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}},
                                                 {"namespaceSelector": {"matchLabels": {"team": "t2"}}}]}]})

    def ep(i: int, host: str, app: str, ns: str = "x", ip: str = "") -> Endpoint:
        return Endpoint(id=f"e{i}", name=f"e{i}", network="red", host=host, namespace=ns,
                        ips=[ip or f"10.1.0.{i + 2}"], labels={"app": app},
                        interface=f"tth{i:011x}" if host == "h1" else None)

    steps = [("put", pol), ("put", ep(0, "h1", "b")), ("put", ep(1, "h2", "a")), ("put", ep(2, "h3", "a", "y")),
             ("put", ep(1, "h2", "b")), ("put", ep(1, "h2", "a", ip="10.1.0.99")), ("put", ep(3, "h2", "a")),
             ("delete", ep(3, "h2", "a")), ("put", Namespace(name="y", labels={"team": "t2"})),
             ("put", ep(2, "h3", "c", "y")), ("delete", ep(1, "h2", "a")), ("put", ep(0, "h1", "a"))]
    for revision, (kind, obj) in enumerate(steps, start=2):
        rep.apply_event(_event(kind, obj, revision))
        view = rep.view()
        warm, cold = planner.plan(view, c), Planner().plan(view, c)
        assert warm == cold, f"after {kind} {obj!r}"
        assert [s for s in warm.nft.sets if s.name.startswith("sel")] == \
            [s for s in cold.nft.sets if s.name.startswith("sel")]


def test_a_host_registering_again_unchanged_is_not_journaled_but_a_moved_host_is() -> None:
    """An agent that reconnects registers again: only `heartbeat` (and the revision) change, which no
    plan reads, so no agent plans for it; a new underlay address is planned."""
    from datetime import UTC, datetime

    rep = _start()
    c = HostContext("h1", "eth0", 1500)
    planner = Planner()
    planner.plan(rep.view(), c)
    h2 = rep.objects["Host"]["h2"]
    before = len(rep.journal.entries)
    again = h2.model_copy(update={"heartbeat": datetime(2030, 1, 1, tzinfo=UTC)})
    assert not rep.apply_event(_event("put", again, 50))
    assert len(rep.journal.entries) == before and rep.objects["Host"]["h2"].heartbeat == again.heartbeat
    moved = again.model_copy(update={"underlay_ip": "198.18.9.9"})
    assert rep.apply_event(_event("put", moved, 51)) and len(rep.journal.entries) == before + 1
    view = rep.view()
    assert planner.plan(view, c) == Planner().plan(view, c)


def test_a_blocks_allocations_are_not_planned_but_a_block_changing_hands_is() -> None:
    """Every pod added writes its block's allocations (the server's IPAM record), which no plan
    reads: every agent keeps the new block without planning again; a block given to another host
    is planned (and the plan equals a cold one)."""
    rep = _start()
    c = HostContext("h1", "eth0", 1500)
    planner = Planner()
    planner.plan(rep.view(), c)
    name, block = next((n, b) for n, b in rep.objects["Block"].items() if b.host == "h2")
    before = len(rep.journal.entries)
    used = block.model_copy(update={"allocations": {block.cidr.split("/")[0][:-1] + "5": "e1"}})
    assert not rep.apply_event(_event("put", used, 50))
    assert len(rep.journal.entries) == before and rep.objects["Block"][name].allocations == used.allocations
    moved = used.model_copy(update={"host": "h3"})
    assert rep.apply_event(_event("put", moved, 51)) and len(rep.journal.entries) == before + 1
    view = rep.view()
    assert planner.plan(view, c) == Planner().plan(view, c)


def test_the_planner_names_this_hosts_endpoints_only_for_the_replica_it_planned_last() -> None:
    """`Planner.local_endpoints` (read by `rejudge_scope` and the agent's pending check instead of
    every endpoint) answers for the view planned last, quarantined endpoints included, else None."""
    from tether.calc.host import rejudge_scope

    rep = _start()
    c = HostContext("h1", "eth0", 1500)
    planner = Planner()
    rep.apply_event(_event("put", NetworkPolicy(id="p", name="p", namespace="x", spec={"podSelector": {}}), 2))
    for i, (host, link) in enumerate((("h1", "tth00000000e0"), ("h2", None), ("h1", "eth9"))):  # eth9: quarantined
        rep.apply_event(_event("put", Endpoint(id=f"e{i}", name=f"e{i}", network="red", host=host, namespace="x",
                                               ips=[f"10.1.0.{i + 2}"], interface=link), i + 3))
    view = rep.view()
    plan = planner.plan(view, c)
    assert [q.name for q in plan.quarantined] == ["e2"]
    mine = planner.local_endpoints(view)
    assert mine is not None and sorted(mine) == ["e0", "e2"]
    assert rejudge_scope(view, "h1", plan.nft, mine) == rejudge_scope(view, "h1", plan.nft) == {"10.1.0.2"}
    rep.apply_event(_event("delete", Endpoint(id="e0", name="e0", network="red", host="h1", namespace="x"), 9))
    assert planner.local_endpoints(rep.view()) is None  # not what it planned


def test_a_hosts_status_report_is_not_journaled_and_its_next_plan_is_not_a_full_one() -> None:
    """Every host reports its status every few seconds; the report replaces the host's object but
    changes nothing a plan reads, so the routes kept from the last plan stay (a new object for this
    host made every plan after a report a full one)."""
    rep = _start()
    c = HostContext("h1", "eth0", 1500)
    planner = Planner()
    planner.plan(rep.view(), c)
    remote = planner.memos.remote
    for revision, h in enumerate(("h1", "h2"), start=2):
        before = len(rep.journal.entries)
        assert not rep.apply_event(_event("put", _status_only(rep.objects["Host"][h], revision), revision))
        assert len(rep.journal.entries) == before
    view = rep.view()
    assert planner.plan(view, c) == Planner().plan(view, c)
    assert planner.memos.changed == {} and planner.memos.remote is remote
