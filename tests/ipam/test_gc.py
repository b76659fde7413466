"""Garbage collection reclaims a dead host's endpoints and blocks, and orphaned addresses."""

from __future__ import annotations

import asyncio

from tether.model import Endpoint, Host, Network, Subnet, encode
from tether.server.gc import GarbageCollector
from tether.server.ipam import Ipam
from tether.server.objects import Objects


async def test_dead_hosts_blocks_and_orphaned_addresses_are_reclaimed(store):
    o = Objects(store, Ipam(store, empty_grace=0), service_cidr="10.96.0.0/16", vtep_cidr="169.254.64.0/18")
    gc = GarbageCollector(o, dead_host_grace=1.0, interval=3600)
    await o.put_network(Network(name="n", subnets=[Subnet(cidr="10.9.0.0/24")]), True)
    for h in ("alive", "dead"):
        await o.register_host(Host(name=h, underlay_ip="198.18.0.5"))
        await o.heartbeat(h, ttl=1)
    for i in range(3):
        await o.create_endpoint(Endpoint(name=f"d{i}", network="n", host="dead"))
    keep, _ = await o.create_endpoint(Endpoint(name="keep", network="n", host="alive"))
    # an address whose endpoint vanished (as if written by a buggy older version)
    blocks = await o.ipam.blocks_all()
    key, (_, block) = next((k, v) for k, v in blocks.items() if v[1].host == "alive")
    import ipaddress

    ghost = str(ipaddress.ip_network(block.cidr)[60])
    block.allocations[ghost] = "ghost-handle"
    await store.put(key, encode(block))
    o.ipam.invalidate()

    for _ in range(3):  # the dead host stops heartbeating; its lease expires
        await asyncio.sleep(0.6)
        await o.heartbeat("alive", ttl=1)
    counts = await gc.collect()  # first sight of the dead host starts its grace period
    assert counts["endpoints"] == 0 and counts["addresses"] == 1
    for _ in range(10):  # the grace (1 s) is a store lease: etcd checks expiries every 0.5 s
        await asyncio.sleep(0.6)
        await o.heartbeat("alive", ttl=1)
        counts = await gc.collect()
        if counts["endpoints"]:
            break
    assert counts["endpoints"] == 3 and counts["blocks"] == 1
    remaining = await o.ipam.blocks_all()
    assert all(b.host == "alive" for _, b in remaining.values())
    assert {ip for _, b in remaining.values() for ip in b.allocations} == set(keep.ips)
    assert [e.name for e in await o.list(Endpoint)] == ["keep"]
