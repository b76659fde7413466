"""Several servers on one store: store failures are 503 answers on a connection that stays open,
/healthz says why the store cannot take writes, the admin token is shared through the store, a
release reads the store, and the singletons (GC, reclaim, compaction) run on one elected leader."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import pytest

from tests.fixtures.etcd import start_etcd
from tests.fixtures.server import start_server
from tether.model import Block, Endpoint, Host, Network, Subnet
from tether.server.gc import DEAD_SINCE, GarbageCollector
from tether.server.ipam import Ipam
from tether.server.leader import LEADER_KEY, Leadership
from tether.server.objects import Objects


def objects(store) -> Objects:
    return Objects(store, Ipam(store, empty_grace=0), service_cidr="10.96.0.0/16", vtep_cidr="169.254.64.0/18")


def two_requests_on_one_connection(port: int, token: str, path: str) -> list[tuple[int, dict, bytes]]:
    """Send two GETs on one keep-alive TCP connection; (status, headers, body) of each answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    reader = sock.makefile("rb")
    out = []
    try:
        for _ in range(2):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            status = int(reader.readline().split()[1])
            headers = {}
            while (line := reader.readline().decode().strip()):
                k, _, v = line.partition(":")
                headers[k.lower()] = v.strip()
            out.append((status, headers, reader.read(int(headers.get("content-length", 0)))))
    finally:
        sock.close()
    return out


@pytest.fixture
def own_etcd(tmp_path):
    e = start_etcd(str(tmp_path))
    try:
        yield e
    finally:
        e.stop(signal.SIGKILL)


def test_store_failure_is_503_with_retry_after_and_the_connection_stays_open(own_etcd, tmp_path):
    srv = start_server(own_etcd.url, str(tmp_path / "s1"))
    try:
        own_etcd.stop(signal.SIGKILL)
        answers = two_requests_on_one_connection(srv.port, srv.token, "/api/v1/networks")
        for status, headers, body in answers:
            assert status == 503, body
            assert headers.get("retry-after") == "1"
            assert "store is unavailable" in json.loads(body)["detail"]
        health = two_requests_on_one_connection(srv.port, srv.token, "/healthz")[0]
        assert health[0] == 503 and json.loads(health[2])["problems"]
    finally:
        srv.stop()


def test_a_second_server_accepts_the_first_servers_token_without_a_copied_file(own_etcd, tmp_path):
    first = start_server(own_etcd.url, str(tmp_path / "s1"))
    second = None
    try:
        token = first.token
        # the second server's state dir has no token: it learns the credential from the store
        second = start_server(own_etcd.url, str(tmp_path / "s2"))
        with second.http(token=token) as c:
            assert c.get("/api/v1/networks").status_code == 200
        with second.http(token="wrong") as c:
            assert c.get("/api/v1/networks").status_code == 401
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_an_address_deleted_through_another_server_is_released_at_once(store):
    a, b = objects(store), objects(store)  # two servers: each with its own cache of blocks
    await a.put_network(Network(name="n", subnets=[Subnet(cidr="10.9.0.0/24")]), True)
    for h in ("h1", "h2"):
        await a.register_host(Host(name=h, underlay_ip="198.18.0.5"))
    await a.create_endpoint(Endpoint(name="warm", network="n", host="h1"))  # a caches the blocks now
    ep, _ = await b.create_endpoint(Endpoint(name="e", network="n", host="h2"))  # a new block, via b
    await a.delete_endpoint(ep.id)
    held = {ip for blk in await a.list(Block) for ip in blk.allocations}
    assert not set(ep.ips) & held, "the address stayed allocated after its endpoint was deleted"


async def test_a_hosts_heartbeats_through_either_server_keep_it_alive_for_both(store):
    a, b = objects(store), objects(store)
    await a.register_host(Host(name="h", underlay_ip="198.18.0.5"))
    await a.heartbeat("h", ttl=1)
    for _ in range(3):  # its server changes: the same lease in the store goes on
        await asyncio.sleep(0.6)
        await b.heartbeat("h", ttl=1)
    assert "h" in await a.live_hosts() and "h" in await b.live_hosts()


async def test_only_one_server_leads_and_another_takes_over_when_it_resigns(store):
    one, two = Leadership(store, ttl=2, identity="one"), Leadership(store, ttl=2, identity="two")
    assert await one.check() and not await two.check()
    assert await one.check() and not await two.check()  # renewed
    await one.resign()
    assert await two.check() and not await one.check()
    assert (await store.get(LEADER_KEY)).value == b"two"
    await two.resign()


async def test_a_new_leader_goes_on_counting_a_dead_hosts_grace_from_the_store(store):
    o = objects(store)
    await o.put_network(Network(name="n", subnets=[Subnet(cidr="10.9.0.0/24")]), True)
    await o.register_host(Host(name="gone", underlay_ip="198.18.0.5"))
    await o.create_endpoint(Endpoint(name="e", network="n", host="gone"))
    old = GarbageCollector(o, dead_host_grace=1.0, interval=3600)
    assert await old.dead_hosts() == []  # first seen dead: the time goes into the store
    assert await store.get(DEAD_SINCE + "gone") is not None
    new = GarbageCollector(objects(store), dead_host_grace=1.0, interval=3600)  # another server, no memory
    for _ in range(10):
        await asyncio.sleep(0.5)
        if (counts := await new.collect())["endpoints"]:
            break
    assert counts["endpoints"] == 1


async def test_a_leader_whose_clock_jumps_forward_reclaims_no_host_early(store, monkeypatch):
    o = objects(store)
    await o.put_network(Network(name="n", subnets=[Subnet(cidr="10.9.0.0/24")]), True)
    await o.register_host(Host(name="partitioned", underlay_ip="198.18.0.5"))
    await o.create_endpoint(Endpoint(name="e", network="n", host="partitioned"))
    gc = GarbageCollector(o, dead_host_grace=600, interval=3600)
    assert await gc.dead_hosts() == []  # first seen without its lease: the grace starts
    real = time.time
    monkeypatch.setattr("tether.server.gc.time.time", lambda: real() + 3600)  # NTP step, VM resume...
    assert (await gc.collect())["endpoints"] == 0


async def test_compaction_keeps_the_configured_history(store):
    o = objects(store)
    gc = GarbageCollector(o, dead_host_grace=600, interval=3600, compact_keep=5)
    for i in range(20):
        await store.put(f"/tether/v1/test/{i % 3}", str(time.time()).encode())
    head = await store.revision()
    assert await gc.compact() == head - 5
    assert await gc.compact() == 0  # nothing new to forget
