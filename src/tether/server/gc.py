"""Garbage collection: addresses nobody owns, empty blocks, and the blocks of dead hosts.

Other SDNs strand addresses when a node dies. Here a host whose lease has been gone for longer than
`dead_host_grace` loses its endpoints (their containers died with it) and its blocks return to the
pool; allocations whose endpoint no longer exists are released. Everything reclaimed is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tether.model import Block, Endpoint, Host
from tether.server.objects import Objects, handle_key, with_retries
from tether.store.base import Compare, Delete, Put

log = logging.getLogger("tether.gc")


class GarbageCollector:
    def __init__(self, objects: Objects, *, dead_host_grace: float, interval: float) -> None:
        self.o = objects
        self.dead_host_grace = dead_host_grace
        self.interval = interval
        self._missing_since: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.collect()
            except Exception:  # noqa: BLE001 - keep collecting next time
                log.exception("garbage collection failed")

    async def dead_hosts(self) -> list[str]:
        live = await self.o.live_hosts()
        hosts = [h.name for h in await self.o.list(Host)]
        t = time.monotonic()
        dead = []
        for name in hosts:
            if name in live:
                self._missing_since.pop(name, None)
                continue
            since = self._missing_since.setdefault(name, t)
            if t - since >= self.dead_host_grace:
                dead.append(name)
        return dead

    async def collect(self) -> dict[str, int]:
        """One pass; returns counts of what was reclaimed."""
        counts = {"endpoints": 0, "addresses": 0, "blocks": 0}
        dead = set(await self.dead_hosts())
        if dead:
            for ep in await self.o.list(Endpoint):
                if ep.host in dead:
                    log.warning("reclaiming endpoint %s (%s) of dead host %s", ep.name, ", ".join(ep.ips), ep.host)
                    await self.o.delete_endpoint(ep.id)
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
