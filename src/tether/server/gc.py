"""Garbage collection: addresses nobody owns, empty blocks, the blocks of dead hosts, and (etcd)
the store's history.

Other SDNs strand addresses when a node dies. Here a host whose lease has been gone for longer than
`dead_host_grace` loses its endpoints (their containers died with it) and its blocks return to the
pool; allocations whose endpoint no longer exists are released. Everything reclaimed is logged.

Only the elected leader collects (`Leadership`): two servers reclaiming the same host at once fought
over the same keys. A host's liveness is its lease key in the store, kept alive through whichever
server its agent talks to, and the time a host was first seen dead is stored too, so a new leader
goes on counting where the last one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tether.model import PREFIX, Block, Endpoint, Host
from tether.server.leader import Leadership
from tether.server.objects import Objects, handle_key, with_retries
from tether.store.base import Compare, Conflict, Delete, Put, StoreError

log = logging.getLogger("tether.gc")
DEAD_SINCE = PREFIX + "gc/dead-since/"  # + host name: when the leader first saw it without its lease
DEAD_TIMER = PREFIX + "gc/dead-timer/"  # + host name: on a lease of --dead-host-grace seconds


class GarbageCollector:
    def __init__(self, objects: Objects, *, dead_host_grace: float, interval: float,
                 leadership: Leadership | None = None, compact_keep: int = 0) -> None:
        self.o = objects
        self.dead_host_grace = dead_host_grace
        self.interval = interval
        self.leadership = leadership or Leadership(objects.store)
        self.compact_keep = compact_keep  # revisions of history to keep; 0: the store compacts itself
        self.compacted = 0  # the last revision this server compacted to

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.leadership.leading:
                continue
            try:
                await self.collect()
                await self.compact()
            except StoreError as e:
                log.warning("garbage collection stopped for this round: %s", e)
            except Exception:  # noqa: BLE001 - keep collecting next time
                log.exception("garbage collection failed")

    async def compact(self) -> int:
        """Forget history older than `compact_keep` revisions (etcd keeps every revision until
        told: 73,355 revisions took 221 MiB per member, and at the space quota every write fails)."""
        if self.compact_keep <= 0:
            return 0
        target = await self.o.store.revision() - self.compact_keep
        if target <= self.compacted:
            return 0
        await self.o.store.compact(target)
        log.info("compacted the store's history up to revision %d", target)
        self.compacted = target
        return target

    async def dead_hosts(self) -> list[str]:
        """Hosts without a live lease for `dead_host_grace` seconds. The grace is a store lease
        too: when a host is first seen without its lease, a record (`DEAD_SINCE`, the time, for
        people) and a timer key on a lease of `dead_host_grace` seconds (`DEAD_TIMER`) are written;
        the host is dead once the timer key has expired. The store's clock counts, not a server's:
        a leader whose wall clock jumps forward reclaims nobody early, and a new leader goes on
        counting where the last one stopped."""
        live = await self.o.live_hosts()
        hosts = {h.name for h in await self.o.list(Host)}
        since = {kv.key[len(DEAD_SINCE):]: kv for kv in (await self.o.store.list(DEAD_SINCE)).items}
        timers = {kv.key[len(DEAD_TIMER):] for kv in (await self.o.store.list(DEAD_TIMER)).items}
        dead = []
        fence = self.leadership.fence() if self.leadership.lease else []
        for name, kv in since.items():
            if name in live or name not in hosts:  # back (or deleted): the count starts again next time
                with contextlib.suppress(Conflict):
                    await self.o.store.txn([*fence, Compare(kv.key, kv.mod_revision)],
                                           [Delete(kv.key), Delete(DEAD_TIMER + name)])
        for name in sorted(hosts - live):
            if name not in since:
                lease = await self.o.store.grant_lease(self.dead_host_grace)
                with contextlib.suppress(Conflict):
                    await self.o.store.txn([*fence, Compare(DEAD_SINCE + name, 0)],
                                           [Put(DEAD_SINCE + name, repr(time.time()).encode()),
                                            Put(DEAD_TIMER + name, b"", lease=lease)])
            elif name not in timers:
                dead.append(name)
        return dead

    async def collect(self) -> dict[str, int]:
        """One pass; returns counts of what was reclaimed."""
        counts = {"endpoints": 0, "addresses": 0, "blocks": 0}
        dead = set(await self.dead_hosts())
        if dead:
            live = await self.o.live_hosts()
            for ep in await self.o.list(Endpoint):
                if ep.host in dead and ep.host not in live:
                    fence = self.leadership.fence() if self.leadership.lease else []
                    try:
                        await self.o.delete_endpoint(ep.id, fence=fence)
                    except Conflict:  # another server leads now: it decides
                        log.warning("not reclaiming endpoint %s: this server lost the leadership", ep.name)
                        return counts
                    log.warning("reclaimed endpoint %s (%s) of dead host %s", ep.name, ", ".join(ep.ips), ep.host)
                    counts["endpoints"] += 1
        # one listing of the handles, after the blocks (an allocation writes its block and its
        # handle in one transaction, so a handle missing here is missing or released since);
        # `_release_stale` checks each candidate again before releasing it
        listed_blocks = await self.o.list(Block)
        handles = {kv.key for kv in (await self.o.store.list(handle_key(""))).items}
        for block in listed_blocks:
            stale = [ip for ip, handle in block.allocations.items() if handle_key(handle) not in handles]
            if stale:
                await with_retries(lambda b=block, s=stale: self._release_stale(b, s))
                counts["addresses"] += len(stale)
        blocks = await self.o.ipam.blocks_all()
        due = self.o.ipam.empty_blocks_due(blocks)
        due_keys = {k for k, _ in due}
        for key, (rev, b) in blocks.items():
            if key in due_keys or (b.host in dead and not b.allocations):
                try:
                    await self.o.store.txn([Compare(key, rev)], [Delete(key)])
                    log.info("block %s of host %s returned to the pool", b.cidr, b.host)
                    counts["blocks"] += 1
                except Exception:  # noqa: BLE001 - changed meanwhile: next pass
                    pass
        self.o.ipam.invalidate()
        return counts

    async def _release_stale(self, block: Block, stale: list[str]) -> None:
        kv = await self.o.store.get(block.key())
        if kv is None:
            return
        current = Block.model_validate_json(kv.value)
        for ip in stale:
            handle = current.allocations.get(ip)
            if handle is not None and await self.o.store.get(handle_key(handle)) is None:
                log.warning("releasing %s in %s: its endpoint (handle %s) is gone", ip, block.cidr, handle)
                del current.allocations[ip]
        if not current.allocations and current.empty_since is None:
            from tether.model import now

            current.empty_since = now()
        from tether.model import encode

        await self.o.store.txn([Compare(kv.key, kv.mod_revision)], [Put(kv.key, encode(current))])
