"""Lifecycle states that are true, against a real server: an endpoint is `pending` (Neutron BUILD)
until its host's agent reports (with its heartbeat) that it has applied a revision holding the
endpoint's last write, then `active` (Neutron ACTIVE); a quarantined endpoint stays pending; the
host's `heartbeat` shows when the server last heard from it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.fixtures.server import ServerProc, start_server


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[ServerProc]:
    d = tmp_path_factory.mktemp("lifecycle-server")
    s = start_server(f"sqlite://{d}/tether.db", str(d / "state"))
    try:
        http = s.http()
        for h in ("h1", "h2"):
            assert http.put(f"/api/v1/hosts/{h}", json={"name": h, "underlay_ip": f"198.18.0.{h[1]}"}).is_success
        assert http.post("/api/v1/networks", json={"name": "life", "subnets": [{"cidr": "10.82.0.0/16"}]}).is_success
        yield s
    finally:
        s.stop()


def beat(srv: ServerProc, host: str, applied: int | None) -> None:
    body = {"ttl": 15} | ({"applied_revision": applied} if applied is not None else {})
    assert srv.http().post(f"/api/v1/hosts/{host}/heartbeat", json=body).is_success


def state(srv: ServerProc, ep_id: str) -> tuple[str, str, str]:
    http = srv.http()
    one = http.get(f"/api/v1/endpoints/{ep_id}").json()["status"]
    listed = next(e for e in http.get("/api/v1/endpoints").json() if e["id"] == ep_id)["status"]
    port = http.get(f"/v2.0/ports/{ep_id}", headers={"X-Auth-Token": srv.token}).json()["port"]["status"]
    return one, listed, port


def test_an_endpoint_is_active_once_its_host_applied_it(srv: ServerProc) -> None:
    ep = srv.http().post("/api/v1/endpoints", json={"name": "a", "network": "life", "host": "h1"}).json()
    assert state(srv, ep["id"]) == ("pending", "pending", "BUILD")
    beat(srv, "h1", ep["revision"] - 1)  # applied, but not this endpoint's write yet
    assert state(srv, ep["id"]) == ("pending", "pending", "BUILD")
    beat(srv, "h2", ep["revision"] + 5)  # another host's progress says nothing about this endpoint
    assert state(srv, ep["id"])[0] == "pending"
    beat(srv, "h1", ep["revision"])
    assert state(srv, ep["id"]) == ("active", "active", "ACTIVE")
    beat(srv, "h1", None)  # an older agent's heartbeat does not take it back
    assert state(srv, ep["id"])[0] == "active"
    changed = srv.http().patch(f"/api/v1/endpoints/{ep['id']}", json={"labels": {"v": "2"}}).json()
    assert changed["status"] == "pending"  # the new version is not programmed yet
    beat(srv, "h1", changed["revision"])
    assert state(srv, ep["id"])[0] == "active"


def test_a_quarantined_endpoint_stays_pending(srv: ServerProc) -> None:
    http = srv.http()
    ep = http.post("/api/v1/endpoints", json={"name": "q", "network": "life", "host": "h2"}).json()
    assert http.put("/api/v1/hosts/h2/status", json={"problems": [
        {"kind": "Endpoint", "name": ep["id"], "reason": "test"}]}).is_success
    beat(srv, "h2", ep["revision"] + 100)
    assert state(srv, ep["id"]) == ("pending", "pending", "BUILD")


def test_the_host_heartbeat_field_changes_with_each_heartbeat(srv: ServerProc) -> None:
    beat(srv, "h1", None)
    first = srv.http().get("/api/v1/hosts/h1").json()["heartbeat"]
    time.sleep(0.05)
    beat(srv, "h1", None)
    listed = next(h for h in srv.http().get("/api/v1/hosts").json() if h["name"] == "h1")
    assert first and listed["heartbeat"] > first
