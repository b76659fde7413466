"""The DNS records kept change by change equal a cold build (issue 29): random sequences of changes
to endpoints (Docker containers, Neutron `dns_name`s, shared addresses and names), services
(cluster IPs, headless ones by selector and by listed endpoints) and networks go through one
long-lived `RecordBuilder`; after every change its delta, pickled as the agent sends it and
applied to the worker's copy of the records (`Records.apply`), must leave exactly the records of
`build` from the objects then (the oracle), and the Docker search paths those of `docker_search`."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.calc.dns_records import Delta, RecordBuilder, Records, build, docker_search
from tether.model import Endpoint, Network, Owner, Service, ServiceBackend, ServicePort, Subnet

EP_IDS = tuple(f"e{i}" for i in range(6))
NAMES = ("web", "db", "e2", "e3")  # fewer names than ids: two endpoints may share a name (and an owner)
SERVICE_NAMES = ("s1", "s2", "s3")
NAMESPACES = ("x", "y")
APPS = ("a", "b")


def _network(name: str, domain: str) -> Network:
    cidr = {"red": "10.1.0.0/16", "blue": "10.2.0.0/16"}[name]
    return Network(name=name, subnets=[Subnet(cidr=cidr), Subnet(cidr="fd00:1::/64")], dns_domain=domain)


NETS = {"red": _network("red", "tether.local"), "blue": _network("blue", "tether.local")}


@st.composite
def endpoints(draw: Any) -> Endpoint:
    ep_id = draw(st.sampled_from(EP_IDS))
    net = draw(st.sampled_from(("red", "red", "blue")))
    prefix = "10.1" if net == "red" else "10.2"
    ips = [f"{prefix}.0.{draw(st.integers(2, 5))}"]  # a few addresses: PTR owners get shared
    if draw(st.booleans()):
        ips.append(f"fd00:1::{draw(st.integers(2, 4))}")
    return Endpoint(id=ep_id, name=draw(st.sampled_from(NAMES)), network=net,
                    namespace=draw(st.sampled_from(NAMESPACES)), ips=ips,
                    labels={"app": draw(st.sampled_from(APPS))}, ready=draw(st.sampled_from((True, True, False))),
                    dns_name=draw(st.sampled_from((None, None, "www", "web"))),
                    owner=Owner(type=draw(st.sampled_from(("cni", "docker")))))


@st.composite
def services(draw: Any) -> Service:
    name = draw(st.sampled_from(SERVICE_NAMES))
    ports = [ServicePort(name="http", port=80)] + ([ServicePort(name="dns", port=53, protocol="UDP")]
                                                  if draw(st.booleans()) else [])
    common: dict[str, Any] = {"name": name, "namespace": draw(st.sampled_from(NAMESPACES)), "ports": ports,
                              "network": draw(st.sampled_from((None, "red")))}
    shape = draw(st.sampled_from(("cluster_ip", "selector", "backends")))
    if shape == "cluster_ip":
        return Service(**common, cluster_ip=f"10.96.0.{SERVICE_NAMES.index(name) + draw(st.integers(1, 2))}")
    if shape == "selector":
        return Service(**common, headless=True, selector={"app": draw(st.sampled_from(APPS))})
    chosen = draw(st.lists(st.sampled_from(EP_IDS), max_size=3, unique=True))
    return Service(**common, headless=True,
                   backends=[ServiceBackend(ip=f"10.1.0.{EP_IDS.index(e) + 2}", endpoint=e) for e in chosen])


networks = st.builds(_network, st.sampled_from(("red", "blue")), st.sampled_from(("tether.local", "example.internal")))
objects = st.one_of(endpoints(), endpoints(), endpoints(), endpoints(), services(), services(), networks)
events = st.tuples(st.sampled_from(("put", "put", "put", "delete")), objects)


def _store(objs: dict[str, dict[str, Any]], kind: str, obj: Any, put: bool) -> None:
    key = obj.store_name()
    if put:
        objs[kind][key] = obj
    else:
        objs[kind].pop(key, None)


def _assert_same(worker: Records, search: dict[str, tuple[str, ...]], objs: dict[str, dict[str, Any]],
                 serial: int, why: str) -> None:
    """`serial`: the revision of the last change the records show (others leave the SOA serial)."""
    cold = build(objs["Endpoint"].values(), objs["Service"].values(), objs["Network"].values(), serial=serial)
    assert worker.rrs == cold.rrs, f"records after {why}"
    assert worker.existing == cold.existing, f"names after {why}"
    assert (worker.zones, worker.reverse_nets, worker.soa, worker.serial) == \
        (cold.zones, cold.reverse_nets, cold.soa, cold.serial), f"zones after {why}"
    assert search == docker_search(objs["Endpoint"].values(), objs["Network"]), f"search paths after {why}"


@pytest.mark.parametrize("journal", [False, True], ids=["identity-pass", "journal"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=st.lists(events, min_size=3, max_size=40))
def test_records_patched_by_every_delta_equal_a_cold_build(journal: bool, seq: list) -> None:
    """`journal`: each update is told the key the event wrote (as the replica's journal tells the
    agent, plus a key that did not change) instead of finding it by a pass over every object."""
    objs: dict[str, dict[str, Any]] = {"Endpoint": {}, "Service": {}, "Network": dict(NETS)}
    builder = RecordBuilder()
    first = builder.update(objs["Endpoint"], objs["Service"], objs["Network"].values(), serial=1)
    assert first.base is None  # the first is a full set
    worker = pickle.loads(pickle.dumps(first.records()))
    search = dict(first.search)
    shown = 1  # the serial of the last change the records show
    for serial, (kind, obj) in enumerate(seq, start=2):
        _store(objs, obj.kind, obj, kind == "put")
        changed = {obj.kind: {obj.store_name()}, "Endpoint" if obj.kind != "Endpoint" else "Service": {"e0"}}
        delta = builder.update(objs["Endpoint"], objs["Service"], objs["Network"].values(), serial=serial,
                               changed=changed if journal else None)
        sent: Delta = pickle.loads(pickle.dumps(delta))  # as the worker gets it
        if sent.base == sent.generation:  # nothing DNS shows changed: the agent sends nothing
            assert not sent.rrs and not sent.added and not sent.search
        elif sent.base is None:  # the networks changed: a full set
            shown = serial
            worker = sent.records()
            search = dict(sent.search)  # type: ignore[arg-type]
        else:
            shown = serial
            assert worker.apply(sent), f"a delta that follows the worker's generation after {kind} {obj!r}"
            for ip, path in sent.search.items():
                if path is None:
                    search.pop(ip, None)
                else:
                    search[ip] = path
        assert worker.generation == builder.generation
        _assert_same(worker, search, objs, shown, f"{kind} {obj!r}")
        assert builder.search() == search


def test_a_change_to_one_endpoint_sends_only_its_names() -> None:
    """The delta of one endpoint added to many carries its owners and names, not the cluster's."""
    eps = {f"e{i}": Endpoint(id=f"e{i}", name=f"pod{i}", network="red", ips=[f"10.1.{i // 250}.{i % 250 + 2}"])
           for i in range(500)}
    builder = RecordBuilder()
    builder.update(eps, {}, NETS.values(), serial=1)
    eps["new"] = Endpoint(id="new", name="newpod", network="red", ips=["10.1.9.9"])
    delta = builder.update(eps, {}, NETS.values(), serial=2)
    assert delta.base == 1 and delta.generation == 2
    assert set(delta.rrs) == {"newpod.red.tether.local.", "9.9.1.10.in-addr.arpa."}
    assert delta.added == {"newpod.red.tether.local.", "9.9.1.10.in-addr.arpa.", "9.1.10.in-addr.arpa."}
    assert not delta.removed
    del eps["new"]
    gone = builder.update(eps, {}, NETS.values(), serial=3)
    assert gone.rrs == {"newpod.red.tether.local.": None, "9.9.1.10.in-addr.arpa.": None}
    assert gone.removed == {"newpod.red.tether.local.", "9.9.1.10.in-addr.arpa.", "9.1.10.in-addr.arpa."}


def test_a_delta_from_another_generation_changes_nothing() -> None:
    """A worker that missed a delta must not apply the next one: it keeps its records and asks for all."""
    web = Endpoint(id="w", name="web", network="red", ips=["10.1.0.5"])
    db = Endpoint(id="d", name="db", network="red", ips=["10.1.0.9"])
    builder = RecordBuilder()
    worker = builder.update({"w": web}, {}, NETS.values(), serial=1).records()
    builder.update({"w": web, "d": db}, {}, NETS.values(), serial=2)  # lost on its way
    later = builder.update({"d": db}, {}, NETS.values(), serial=3)
    before = (dict(worker.rrs), set(worker.existing), worker.generation)
    assert not worker.apply(later)
    assert (worker.rrs, worker.existing, worker.generation) == before


@pytest.mark.parametrize("headless_by", ["selector", "backends"])
def test_a_headless_service_follows_its_endpoints_ready_or_not(headless_by: str) -> None:
    web = Endpoint(id="w", name="web", network="red", namespace="x", labels={"app": "a"}, ips=["10.1.0.5"])
    svc = (Service(name="h", namespace="x", headless=True, selector={"app": "a"}) if headless_by == "selector"
           else Service(name="h", namespace="x", headless=True, backends=[ServiceBackend(ip="10.1.0.5", endpoint="w")]))
    builder = RecordBuilder()
    builder.update({"w": web}, {"x/h": svc}, NETS.values(), serial=1)
    delta = builder.update({"w": web.model_copy(update={"ready": False})}, {"x/h": svc}, NETS.values(), serial=2)
    assert delta.rrs["h.x.svc.tether.local."] is None  # no ready backend: the name answers NODATA
    assert "h.x.svc.tether.local." not in delta.removed
