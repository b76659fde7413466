"""The replica applies watch events (an echo of what the agent already holds is not a change) and is
saved as text that loads back."""

from __future__ import annotations

import json

from tether.calc.replica import Replica
from tether.model import Endpoint, key_of


def event(ep: Endpoint, kind: str = "put", revision: int = 7) -> dict:
    return {"type": kind, "kind": "Endpoint", "key": key_of("Endpoint", ep.id), "revision": revision,
            "object": ep.model_dump(mode="json")}


def test_the_echo_of_a_local_write_changes_nothing_but_the_revision() -> None:
    r = Replica()
    ep = Endpoint(id="e1", name="p1", network="n", host="h1", ips=["10.1.0.1"], revision=7)
    r.objects["Endpoint"][ep.id] = ep  # what a CNI ADD puts in before the watch echoes it
    assert r.apply_event(event(ep)) is False
    assert r.revision == 7
    changed = ep.model_copy(update={"ready": not ep.ready, "revision": 8})
    assert r.apply_event(event(changed, revision=8)) is True
    assert r.objects["Endpoint"]["e1"] == changed
    assert r.apply_event(event(changed, "delete", 9)) is True
    assert r.apply_event(event(changed, "delete", 10)) is False


def test_the_saved_text_loads_back_after_objects_are_replaced_and_deleted() -> None:
    r = Replica()
    eps = [Endpoint(id=f"e{i}", name=f"p{i}", network="n", host="h1", ips=[f"10.1.0.{i}"], description="café ü")
           for i in range(3)]
    for ep in eps:
        r.objects["Endpoint"][ep.id] = ep
    r.revision = 9
    back = Replica()
    back.load_snapshot(json.loads(r.encoded()))
    assert back.objects == r.objects and back.revision == 9
    r.objects["Endpoint"]["e1"] = eps[1].model_copy(update={"ready": not eps[1].ready})
    del r.objects["Endpoint"]["e2"]
    back.load_snapshot(json.loads(r.encoded()))
    assert back.objects == r.objects


def test_a_consumed_snapshot_is_emptied_as_it_loads_and_gives_the_same_replica() -> None:
    """The agent drops each parsed object once its model is built (its peak memory at 10,000
    endpoints); other callers keep their snapshot as it was."""
    eps = [Endpoint(id=f"e{i}", name=f"p{i}", network="n", host="h1", ips=[f"10.1.0.{i}"]) for i in range(3)]
    snap = {"revision": 4, "objects": [{"kind": "Endpoint", "object": ep.model_dump(mode="json")} for ep in eps]}
    kept, consumed = Replica(), Replica()
    kept.load_snapshot(snap)
    assert all(snap["objects"]), "a snapshot not consumed must stay as it was"
    consumed.load_snapshot(snap, consume=True)
    assert consumed.objects == kept.objects and consumed.revision == 4
    assert not any(snap["objects"])


def bytes_per_endpoint(consume: bool) -> float:
    """What the replica holds per endpoint after loading a 2,000-endpoint snapshot as the server
    sends it (parsed JSON); `consume`: the agent's way, the parsed items dropped as decoded."""
    import gc
    import tracemalloc

    raw = [Endpoint(name=f"p{i}", network="n", host=f"h{i % 50}", namespace=f"ns{i % 20}",
                    ips=[f"10.1.{i >> 8}.{i & 255}"], mac=f"02:aa:00:00:{i >> 8:02x}:{i & 255:02x}",
                    labels={"app": f"a{i % 500}"}, interface=f"tth{i:08x}", status="active").model_dump(mode="json")
           for i in range(2000)]
    snap = json.loads(json.dumps({"revision": 1, "objects": [{"kind": "Endpoint", "object": r} for r in raw]}))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        r = Replica()
        r.load_snapshot(snap, consume=consume)
        gc.collect()
        per = (tracemalloc.get_traced_memory()[0] - before) / 2000
    finally:
        tracemalloc.stop()
    assert len(r.objects["Endpoint"]) == 2000
    return per


def test_a_replica_holds_an_endpoint_in_under_2_5_kb() -> None:
    """Issue 29: the agent's RSS at 10,000 endpoints. An endpoint decoded from the server's JSON took
    4.9 KB, 3 KB of it pydantic's per-instance sets of given field names (now shared)."""
    per = bytes_per_endpoint(consume=True)
    assert per < 2500, f"{per:.0f} bytes per endpoint"


def test_decoded_objects_are_the_models_pydantic_builds_in_less_memory() -> None:
    """Issue 29: the replica keeps each object compacted (fields in a dict of shared keys, repeated
    names interned, equal owners and ports one object); every object of every kind must still be
    equal to, of the class of, and serialise exactly as the model pydantic builds from the same JSON."""
    import os

    from tether.calc.replica import _compact
    from tether.model import KINDS

    for scenario in ("rich", "plain", "v6only"):
        with open(os.path.join(os.path.dirname(__file__), "fixtures", f"{scenario}.replica.json")) as f:
            snap = json.load(f)
        r = Replica()
        r.load_snapshot(json.loads(json.dumps(snap)))
        assert not r.undecodable
        for item in snap["objects"]:
            want = KINDS[item["kind"]].model_validate(item["object"])
            got = r.objects[item["kind"]][want.store_name()]
            assert type(got) is type(want) and got == want
            assert got.model_dump_json() == want.model_dump_json()
            assert got.model_dump() == want.model_dump()
            assert repr(got) == repr(want)
            changed = got.model_copy(update={"revision": got.revision + 1})
            assert changed.revision == got.revision + 1 and got == want  # a copy leaves the original alone
    ep = Endpoint(name="p", network="n", host="h1", ips=["10.1.0.1"], labels={"app": "a"})
    a, b = _compact(ep), _compact(ep.model_copy(update={"id": "other"}))
    assert a.owner is b.owner, "equal owners are one object"
    assert a.labels == b.labels and a.labels["app"] is b.labels["app"]


def test_a_replica_holds_an_endpoint_in_under_1_3_kb() -> None:
    """Issue 29: what the replica itself holds per endpoint decoded from the server's JSON (the
    parsed JSON kept aside): 1,960 bytes before the objects were compacted, 1,110 after."""
    per = bytes_per_endpoint(consume=False)
    assert per < 1300, f"{per:.0f} bytes per endpoint"
