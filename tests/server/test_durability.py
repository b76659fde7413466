"""Restarting the server loses nothing, and `kill -9` in the middle of a write storm leaves the
store consistent: no address allocated without its endpoint, and no endpoint without its address."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
from bench.ipam import prepare


def snapshot(server) -> dict:
    c = server.client()
    return {kind: sorted(c.list_raw(kind), key=lambda d: str(d.get("id") or d.get("cidr") or d.get("name")))
            for kind in ("Network", "Endpoint", "Block", "Namespace", "SecurityGroup")}


def assert_consistent(server, network: str) -> tuple[int, int]:
    c = server.client()
    eps = c.list_raw("Endpoint", network=network)
    blocks = c.list_raw("Block", network=network)
    allocated = {}
    for b in blocks:
        for ip, handle in b["allocations"].items():
            assert ip not in allocated, f"{ip} allocated twice"
            allocated[ip] = handle
    by_ip = {}
    for ep in eps:
        for ip in ep["ips"]:
            assert ip not in by_ip, f"{ip} belongs to two endpoints"
            by_ip[ip] = ep
            assert allocated.get(ip) == ep["handle"], f"endpoint {ep['name']} has {ip} but IPAM does not say so"
    orphans = set(allocated) - set(by_ip)
    assert not orphans, f"addresses allocated without an endpoint: {sorted(orphans)[:5]}"
    return len(eps), len(allocated)


def test_restart_loses_nothing(server) -> None:
    prepare(server.url, server.token, "keep", "10.70.0.0/16", ["h1", "h2"])
    c = server.client()
    h = server.http()
    for i in range(60):
        r = h.post("/api/v1/endpoints", json={"name": f"e{i}", "network": "keep", "host": f"h{i % 2 + 1}",
                                              "labels": {"i": str(i)}})
        assert r.status_code == 201, r.text
    h.put("/api/v1/namespaces/team-a", json={"name": "team-a", "labels": {"env": "prod"}}).raise_for_status()
    before = snapshot(server)
    assert len(before["Endpoint"]) == 60
    server.restart()
    assert snapshot(server) == before
    server.kill()
    server.start()
    assert snapshot(server) == before
    # and it keeps allocating after the restart without reusing an address
    made = c.create_endpoint(c.get("Endpoint", before["Endpoint"][0]["id"]).model_copy(
        update={"id": str(uuid.uuid4()), "name": "after", "ips": [], "handle": None, "interface": None}))
    assert made.ips[0] not in {ip for e in before["Endpoint"] for ip in e["ips"]}


def test_kill9_during_write_storm_leaves_store_consistent(server) -> None:
    prepare(server.url, server.token, "storm", "10.71.0.0/16", [f"h{i}" for i in range(4)])
    stop = threading.Event()
    counts = [0] * 4

    def writer(i: int) -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=5) as h:
            n = 0
            while not stop.is_set():
                try:
                    r = h.post("/api/v1/endpoints", json={"name": f"w{i}-{n}", "network": "storm", "host": f"h{i}"})
                    if r.status_code == 201:
                        counts[i] += 1
                    # delete every third one, so releases are in flight too
                    if r.status_code == 201 and n % 3 == 0:
                        h.delete(f"/api/v1/endpoints/{r.json()['id']}")
                except httpx.TransportError:
                    time.sleep(0.05)
                n += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        server.kill()
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert sum(counts) > 50, "the storm did not get going"
    server.start()
    eps, allocated = assert_consistent(server, "storm")
    assert eps == allocated > 0
