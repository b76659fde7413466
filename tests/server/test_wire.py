"""Objects as agents receive them (tether.server.wire), over both stores: GET /api/v1/snapshot joins
bytes encoded once per (key, mod_revision), and says exactly what the old encoding said (a decode and
a dict per object per request), values the model refuses included."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tether.model import PREFIX, Endpoint, Router, SecurityGroup, encode, key_of, kind_of_key
from tether.server.app import create_app
from tether.server.wire import Body, Wire, wire_object

NET = {"name": "red", "subnets": [{"cidr": "10.61.0.0/16"}]}


async def old_snapshot(store) -> dict:
    """The snapshot as the server encoded it before: every stored value decoded and dumped."""
    listed = await store.list(PREFIX)
    return {"revision": listed.revision, "objects": [
        {"kind": kind_of_key(kv.key), "object": wire_object(kv.key, kv.value, kv.mod_revision)}
        for kv in listed.items if kind_of_key(kv.key) is not None]}


def old_event(ev) -> dict:
    obj = wire_object(ev.key, ev.value, ev.revision) if ev.value is not None else None
    return {"type": ev.type, "kind": kind_of_key(ev.key), "key": ev.key, "object": obj, "revision": ev.revision}


@pytest.fixture
async def api(store) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(store, token=None, gc_interval=0)  # no GC: nothing writes but the test
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://tether") as client:
        yield client


async def populate(api: httpx.AsyncClient, store) -> None:
    """A little of every kind through the API (hosts, blocks, internal index keys, ...), and values
    the model refuses written around it: one that is JSON, one that is not."""
    async def ok(r) -> None:
        r = await r
        assert r.status_code < 300, r.text

    await ok(api.post("/api/v1/networks", json=NET))
    await ok(api.put("/api/v1/namespaces/ns1", json={"name": "ns1", "labels": {"team": "blue"}}))
    for h in range(2):
        await ok(api.put(f"/api/v1/hosts/h{h}", json={"name": f"h{h}", "underlay_ip": f"198.18.0.{h + 1}"}))
    for i in range(6):
        await ok(api.post("/api/v1/endpoints", json={"name": f"ep{i}", "network": "red", "host": f"h{i % 2}",
                                                     "namespace": "ns1", "labels": {"app": f"a{i % 3}"}}))
    await ok(api.put("/api/v1/namespaces/ns1/networkpolicies/p", json={
        "name": "p", "namespace": "ns1", "spec": {"podSelector": {"matchLabels": {"app": "a0"}},
                                                  "policyTypes": ["Ingress"], "ingress": [{}]}}))
    await ok(api.put("/api/v1/namespaces/ns1/services/s", json={
        "name": "s", "namespace": "ns1", "network": "red", "selector": {"app": "a1"},
        "ports": [{"port": 80, "target_port": 8080}]}))
    await ok(api.post("/api/v1/securitygroups", json={"name": "web", "description": "café ☕"}))
    router = Router(name="r")
    await store.put(key_of("Router", router.store_name()), encode(router))
    bad = {"id": "old", "name": "old", "rules": [{"id": "r", "direction": "ingress", "protocol": "tcp; drop"}]}
    await store.put(key_of("SecurityGroup", "old"), json.dumps(bad).encode())
    await store.put(key_of("SecurityGroup", "garbled"), b"{not json")


async def test_the_snapshot_says_what_the_old_encoding_said_refused_values_included(api, store) -> None:
    await populate(api, store)
    r = await api.get("/api/v1/snapshot")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    got, want = r.json(), await old_snapshot(store)
    assert got == want
    kinds = {o["kind"] for o in got["objects"]}
    assert {"Host", "Network", "Block", "Namespace", "Endpoint", "NetworkPolicy", "SecurityGroup", "Service",
            "Router"} <= kinds, kinds
    objects = {(o["kind"], (o["object"] or {}).get("name")) for o in got["objects"]}
    assert ("SecurityGroup", "old") in objects and ("SecurityGroup", None) in objects  # as stored; null
    again = await api.get("/api/v1/snapshot")  # from the cache this time
    assert again.content == r.content


class CountedStore:
    """The store, its listings counted (and each answered `delay` seconds after it was read)."""

    def __init__(self, store, delay: float = 0) -> None:
        self.inner, self.lists, self.delay = store, 0, delay

    async def revision(self) -> int:
        return await self.inner.revision()

    async def list(self, prefix: str):
        self.lists += 1
        listed = await self.inner.list(prefix)
        await asyncio.sleep(self.delay)
        return listed


async def snap(wire: Wire) -> dict:
    body = await wire.snapshot()
    return json.loads(b"".join([c async for c in body.chunks()]))


async def test_an_object_is_encoded_once_again_when_it_changes_and_a_deleted_one_leaves(api, store) -> None:
    await populate(api, store)
    wire = Wire(store)
    first = await snap(wire)
    n = len(first["objects"])
    assert wire.encoded == n
    assert await snap(wire) == first and wire.encoded == n

    eps = (await store.list(key_of("Endpoint", ""))).items
    changed, deleted = eps[0], eps[1]
    ep = Endpoint.model_validate_json(changed.value)
    ep.labels = {"app": "changed"}
    rev = await store.update(changed.key, encode(ep), changed.mod_revision)
    await store.delete(deleted.key)
    second = await snap(wire)
    assert wire.encoded == n + 1, "only the changed object is encoded again"
    assert second == await old_snapshot(store)
    by_id = {o["object"]["id"]: o["object"] for o in second["objects"] if o["kind"] == "Endpoint"}
    assert by_id[ep.id]["labels"] == {"app": "changed"} and by_id[ep.id]["revision"] == rev
    assert Endpoint.model_validate_json(deleted.value).id not in by_id
    assert deleted.key not in wire.entries, "a deleted object's bytes are not kept"


async def test_the_same_revision_is_sent_the_same_body_without_listing_again(api, store) -> None:
    await populate(api, store)
    counted = CountedStore(store)
    wire = Wire(counted)
    bodies = await asyncio.gather(*(wire.snapshot() for _ in range(10)))  # agents starting at once
    assert counted.lists == 1 and all(b is bodies[0] for b in bodies)
    assert await wire.snapshot() is bodies[0] and counted.lists == 1
    await api.put("/api/v1/namespaces/ns2", json={"name": "ns2"})
    moved = await wire.snapshot()
    assert moved.revision > bodies[0].revision and counted.lists == 2, "a write is seen by the next list"
    assert b'"ns2"' in b"".join(moved.parts)


async def test_requests_after_a_write_share_one_new_listing_and_see_the_write(api, store) -> None:
    await populate(api, store)
    counted = CountedStore(store, delay=0.5)
    wire = Wire(counted)
    early = asyncio.gather(*(wire.snapshot() for _ in range(3)))
    await asyncio.sleep(0.2)  # their listing was read, its answer is on its way
    await api.put("/api/v1/namespaces/ns2", json={"name": "ns2"})
    late = await asyncio.gather(*(wire.snapshot() for _ in range(5)))
    before = await early
    assert counted.lists == 2, "one listing for the early requests, one for all the late ones"
    assert all(b is before[0] for b in before) and all(b is late[0] for b in late)
    assert b'"ns2"' not in b"".join(before[0].parts) and b'"ns2"' in b"".join(late[0].parts)


async def test_an_event_encoded_for_the_watch_is_not_encoded_again_for_the_snapshot(api, store) -> None:
    await populate(api, store)
    wire = Wire(store)
    head = (await wire.snapshot()).revision
    encoded = wire.encoded
    await api.put("/api/v1/namespaces/ns2", json={"name": "ns2"})
    sg = SecurityGroup(name="web2", id="web2")
    await store.put(key_of("SecurityGroup", sg.store_name()), encode(sg))
    await store.delete(key_of("SecurityGroup", "old"))
    events = []
    async with asyncio.timeout(10):
        async for ev in store.watch(PREFIX, head):
            if ev.type != "progress":
                events.append(ev)
            if ev.type == "delete":
                break
    for ev in events:
        line = wire.event_line(ev)
        if kind_of_key(ev.key) is None:
            assert line is None
        else:
            assert json.loads(line) == old_event(ev) and line.endswith(b"\n")
            assert wire.event_line(ev) is line
    assert wire.encoded == encoded + 2  # the namespace and the group
    assert key_of("SecurityGroup", "old") not in wire.entries
    assert await snap(wire) == await old_snapshot(store)
    assert wire.encoded == encoded + 2, "the snapshot used the watch's bytes"


async def test_the_encoded_objects_are_dropped_when_no_snapshot_is_asked_for(api, store) -> None:
    await populate(api, store)
    wire = Wire(store, idle=0.2)
    await wire.snapshot()
    assert wire.entries and wire.last is not None
    await asyncio.sleep(0.5)
    assert not wire.entries and wire.last is None
    rev = await store.put(key_of("SecurityGroup", "late"), encode(SecurityGroup(name="late", id="late")))
    async with asyncio.timeout(10), contextlib.aclosing(store.watch(PREFIX, rev - 1)) as events:
        ev = await anext(e async for e in events if e.type != "progress")
    assert json.loads(wire.event_line(ev)) == old_event(ev)
    assert not wire.entries, "the watch does not fill the cache while nobody asks for snapshots"


async def test_a_body_sent_in_pieces_is_the_body() -> None:
    body = Body(7, [b"x" * n for n in (1, 50, 120, 3, 300, 2)], 476)
    pieces = [c async for c in body.chunks(size=100)]
    assert b"".join(pieces) == b"".join(body.parts) and len(pieces) == 3
