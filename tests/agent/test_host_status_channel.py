"""The status channel from agents to the server (issue 22, item 5): an agent writes its host's
`status` (quarantined objects, failed kernel operations) through PUT /api/v1/hosts/{name}/status,
which changes only that field; a host's re-registration keeps it; and an object the model refuses,
written around the API, reaches agents as stored (they quarantine it) instead of failing every
agent's snapshot and watch."""

from __future__ import annotations

import asyncio
import json
import os

import httpx

from tests.fixtures.server import ServerProc
from tether.calc.replica import Replica
from tether.model import Host
from tether.store.sqlite import SqliteStore


def test_the_agent_reports_its_problems_on_its_host_and_nothing_else_changes(sqlite_server: ServerProc) -> None:
    http = sqlite_server.http()
    host = Host(name="h1", underlay_ip="198.18.0.1").model_dump(mode="json", exclude={"revision"})
    assert http.put("/api/v1/hosts/h1", json=host).status_code in (200, 201)
    before = http.get("/api/v1/hosts/h1").json()
    status = {"problems": [{"kind": "Endpoint", "name": "e1", "reason": "mac 'x' is not a MAC address"}],
              "failed_ops": [{"kind": "operation", "name": "route 10.1.0.0/26 via 198.18.1.3 dev eth0",
                              "reason": "Network is unreachable"}], "applied_revision": 7}
    r = http.put("/api/v1/hosts/h1/status", json=status)
    assert r.status_code == 200, r.text
    after = http.get("/api/v1/hosts/h1").json()
    assert after["status"]["problems"][0]["reason"] == "mac 'x' is not a MAC address"
    assert after["status"]["failed_ops"][0]["reason"] == "Network is unreachable"
    assert {k: v for k, v in after.items() if k not in ("status", "revision")} == \
        {k: v for k, v in before.items() if k not in ("status", "revision")}
    # the agent registers again (a restart): what it reported stays until it reports again
    assert http.put("/api/v1/hosts/h1", json=host).status_code == 200
    assert http.get("/api/v1/hosts/h1").json()["status"]["problems"][0]["name"] == "e1"
    assert http.put("/api/v1/hosts/nope/status", json=status).status_code == 404
    assert http.put("/api/v1/hosts/h1/status", json={"problems": "x"}).status_code == 422


def test_an_object_the_model_refuses_reaches_agents_as_stored(sqlite_server: ServerProc) -> None:
    http = sqlite_server.http()

    async def poison() -> None:
        store = SqliteStore(os.path.join(sqlite_server.state_dir, "tether.db"))
        try:
            await store.put("/tether/v1/networks/bad", json.dumps({"name": "bad", "mtu": "huge"}).encode())
        finally:
            await store.close()

    rev = http.get("/api/v1/snapshot").json()["revision"]
    asyncio.run(poison())
    snap = http.get("/api/v1/snapshot")
    assert snap.status_code == 200
    rep = Replica()
    rep.load_snapshot(snap.json())
    assert [(k, n) for k, n, _ in rep.undecodable] == [("Network", "bad")]
    with httpx.stream("GET", f"{sqlite_server.url}/api/v1/watch", params={"after_revision": rev},
                      headers={"Authorization": f"Bearer {sqlite_server.token}"}, timeout=10) as w:
        ev = json.loads(next(w.iter_lines()))
    assert ev["kind"] == "Network" and ev["object"] == {"name": "bad", "mtu": "huge", "revision": ev["revision"]}
    assert rep.apply_event(ev) and not rep.networks


def test_an_endpoint_the_model_refuses_can_be_shown_and_deleted(sqlite_server: ServerProc) -> None:
    """Stored under looser rules (an older version, or around the API): GET shows it as stored with
    `invalid` saying why, and DELETE removes it with its index keys, so an operator can clean up."""
    http = sqlite_server.http()
    net = {"name": "blue", "subnets": [{"cidr": "10.9.0.0/24"}]}
    assert http.post("/api/v1/networks", json=net).status_code == 201
    ep = http.post("/api/v1/endpoints", json={"name": "web", "network": "blue"}).json()
    bad = {**{k: v for k, v in ep.items() if k != "revision"},
           "allowed_address_pairs": [{"ip_address": "garbage"}]}

    async def poison() -> None:
        store = SqliteStore(os.path.join(sqlite_server.state_dir, "tether.db"))
        try:
            await store.put(f"/tether/v1/endpoints/{ep['id']}", json.dumps(bad).encode())
        finally:
            await store.close()

    asyncio.run(poison())
    shown = http.get(f"/api/v1/endpoints/{ep['id']}")
    assert shown.status_code == 200, shown.text
    assert shown.json()["name"] == "web" and "garbage" in shown.json()["invalid"]
    assert http.delete(f"/api/v1/endpoints/{ep['id']}").status_code == 204
    assert http.get(f"/api/v1/endpoints/{ep['id']}").status_code == 404
    # its name and address are free again
    again = http.post("/api/v1/endpoints", json={"name": "web", "network": "blue", "ips": ep["ips"]})
    assert again.status_code == 201, again.text
