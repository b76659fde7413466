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


def test_the_saved_text_loads_back_and_encodes_only_replaced_objects() -> None:
    r = Replica()
    eps = [Endpoint(id=f"e{i}", name=f"p{i}", network="n", host="h1", ips=[f"10.1.0.{i}"]) for i in range(3)]
    for ep in eps:
        r.objects["Endpoint"][ep.id] = ep
    r.revision = 9
    back = Replica()
    back.load_snapshot(json.loads(r.encoded()))
    assert back.objects == r.objects and back.revision == 9
    before = dict(r._encoded)
    r.objects["Endpoint"]["e1"] = eps[1].model_copy(update={"ready": not eps[1].ready})
    del r.objects["Endpoint"]["e2"]
    back.load_snapshot(json.loads(r.encoded()))
    assert back.objects == r.objects
    assert r._encoded[("Endpoint", "e0")] is before[("Endpoint", "e0")]  # unchanged: not encoded again
    assert r._encoded[("Endpoint", "e1")] != before[("Endpoint", "e1")]
    assert ("Endpoint", "e2") not in r._encoded
