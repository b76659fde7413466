"""A host's liveness lease: renewed by heartbeats, but not by every one (agents beat after each apply)."""

from __future__ import annotations

import pytest

from tether.model import Host
from tether.server.ipam import Ipam
from tether.server.objects import HOST_LEASE, RENEW_SHARE, ApiError, Objects


async def test_heartbeats_close_together_renew_the_lease_once_and_a_lost_lease_is_granted_again(store, monkeypatch):
    o = Objects(store, Ipam(store), service_cidr="10.96.0.0/16", vtep_cidr="169.254.64.0/18")
    await o.register_host(Host(name="h1", underlay_ip="198.18.0.1"))
    renewals: list[int] = []
    keepalive = store.keepalive

    async def counted(lease: int) -> bool:
        renewals.append(lease)
        return await keepalive(lease)

    monkeypatch.setattr(store, "keepalive", counted)
    clock = [1000.0]
    monkeypatch.setattr("tether.server.objects.time.monotonic", lambda: clock[0])
    ttl = 15.0
    await o.heartbeat("h1", ttl, 5)  # grants the lease
    first = (await store.get(HOST_LEASE + "h1")).lease
    for rev in (6, 7, 8):  # after each apply, within a quarter of the TTL: in memory only
        clock[0] += 1.0
        await o.heartbeat("h1", ttl, rev)
    assert renewals == [] and o.beats["h1"][1] == 8 and await o.live_hosts() == {"h1"}
    clock[0] += ttl / RENEW_SHARE  # a quarter of the TTL since the grant: renewed
    await o.heartbeat("h1", ttl, 8)
    assert renewals == [first]
    await store.delete(HOST_LEASE + "h1")  # the lease key lost (revoked, expired): granted again at once
    clock[0] += 0.1
    await o.heartbeat("h1", ttl, 9)
    assert await o.live_hosts() == {"h1"} and (await store.get(HOST_LEASE + "h1")).lease != first


async def test_a_heartbeat_for_an_unknown_host_is_refused(store):
    o = Objects(store, Ipam(store), service_cidr="10.96.0.0/16", vtep_cidr="169.254.64.0/18")
    with pytest.raises(ApiError, match="host 'ghost' not found"):
        await o.heartbeat("ghost", 15.0)
