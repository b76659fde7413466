"""Faults proven harmless: 3 etcd members and 2 Tether servers under a write storm of 8 clients,
while an etcd follower, the etcd leader and one server are killed by PID (SIGKILL). No acknowledged
write may be lost, no address given twice; a quorum loss makes /healthz and the watch say so.

Scale: TETHER_FAULT_SECONDS (default 2) is how long the storm runs around each fault.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.faults.storm import Storm, check
from tests.fixtures.etcd import etcd_leader
from tests.fixtures.server import start_server

PHASE = float(os.environ.get("TETHER_FAULT_SECONDS", "2"))


@pytest.fixture
def servers(etcd_cluster, tmp_path):
    url = "etcd://" + ",".join(m.endpoint for m in etcd_cluster)
    started = [start_server(url, str(tmp_path / "s1"), "--gc-interval", "1")]
    started.append(start_server(url, str(tmp_path / "s2"), "--gc-interval", "1"))
    try:
        yield started
    finally:
        for s in started:
            s.stop()


def test_killing_an_etcd_follower_the_leader_and_a_server_loses_no_acknowledged_write(etcd_cluster, servers):
    token = servers[0].token  # the second server shares it through the store
    with servers[0].http(token=token) as c:
        assert c.put("/api/v1/networks/storm", json={"name": "storm", "subnets": [{"cidr": "10.77.0.0/16"}]}
                     ).status_code in (200, 201)
    with Storm([s.url for s in servers], token, "storm") as storm:
        time.sleep(PHASE)
        leader = etcd_leader(etcd_cluster)
        follower = next(m for m in etcd_cluster if m is not leader)
        follower.stop(signal.SIGKILL)
        time.sleep(PHASE)
        follower.start()
        follower.wait_ready(30)
        time.sleep(PHASE)
        etcd_leader(etcd_cluster).stop(signal.SIGKILL)
        time.sleep(PHASE)
        servers[0].kill()
        time.sleep(PHASE)
    with servers[1].http(token=token) as c:
        r = c.get("/api/v1/endpoints", params={"network": "storm"})
        assert r.status_code == 200, r.text
        counts = check(storm.books, r.json())
        deadline = time.monotonic() + 20  # the killed server's leader lease (10 s) must expire first
        while not (health := c.get("/healthz").json())["leader"] and time.monotonic() < deadline:
            time.sleep(0.5)
    print("\nfault storm:", json.dumps(counts))
    assert counts["acknowledged"] > 20, counts
    assert not counts["lost"] and not counts["resurrected"] and not counts["duplicates"], counts
    assert not counts["unknown"] and not counts["refused"], counts
    assert health["ok"] and health["leader"], health  # the surviving server took over the singletons


def test_a_quorum_loss_is_unhealthy_and_stops_bookmarks_until_quorum_is_back(etcd_cluster, servers):
    srv = servers[0]
    lines: list[tuple[float, dict]] = []
    stop = threading.Event()

    def follow() -> None:
        with srv.http() as c, c.stream("GET", "/api/v1/watch", params={"after_revision": 0, "bookmark_interval": 1},
                                      timeout=httpx.Timeout(5, read=None)) as r:
            for line in r.iter_lines():
                lines.append((time.monotonic(), json.loads(line)))
                if stop.is_set():
                    return

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    time.sleep(2.5)
    assert any(ev["type"] == "bookmark" for _, ev in lines), lines
    lost_at = time.monotonic()
    for m in etcd_cluster[1:]:
        m.stop(signal.SIGKILL)
    with srv.http() as c:
        health = c.get("/healthz")
    assert health.status_code == 503 and "quorum" in " ".join(health.json()["problems"]), health.text
    time.sleep(3 * 1.0 + 5)  # bookmark interval 1 s; a linearizable read gives up after its retries
    during = [ev for t, ev in lines if t > lost_at + 6 and ev["type"] == "bookmark"]
    for m in etcd_cluster[1:]:
        m.start()
    for m in etcd_cluster[1:]:
        m.wait_ready(30)
    back_at = time.monotonic()
    deadline = back_at + 20
    while time.monotonic() < deadline and not any(t > back_at and ev["type"] == "bookmark" for t, ev in lines):
        time.sleep(0.2)
    stop.set()
    assert during == [], f"bookmarks sent without quorum: {during}"
    assert any(t > back_at and ev["type"] == "bookmark" for t, ev in lines), "no bookmark once quorum was back"
    with srv.http() as c:
        assert c.get("/healthz").status_code == 200
