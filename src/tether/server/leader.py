"""One leader among the servers of a store, for the work that must run once: IPAM garbage
collection, dead-host reclaim and etcd compaction.

The leader is the server whose lease holds `LEADER_KEY` (an etcd election in the small: create the
key with a lease if it is absent, keep the lease alive; the key vanishes when the lease expires, and
the next server to look takes over). On SQLite the one server always wins. The leader's writes can
compare the key's revision (`fence()`), so a server that lost the lease without noticing cannot
write as leader any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

from tether.model import PREFIX
from tether.store.base import Compare, Conflict, Store, StoreError

log = logging.getLogger("tether.leader")
LEADER_KEY = PREFIX + "leader/singletons"


def server_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Leadership:
    def __init__(self, store: Store, *, ttl: float = 10.0, identity: str | None = None) -> None:
        self.store = store
        self.ttl = ttl
        self.identity = identity or server_identity()
        self.lease = 0
        self.revision = 0  # mod_revision of our leader key, for fenced writes
        self._until = 0.0  # monotonic time our lease surely still holds

    @property
    def leading(self) -> bool:
        return self.lease != 0 and time.monotonic() < self._until

    def fence(self) -> list[Compare]:
        """The compare that makes a write fail unless this server still holds the leader key."""
        return [Compare(LEADER_KEY, self.revision)]

    async def check(self) -> bool:
        """Renew our lease, or campaign if nobody leads; True while this server leads."""
        started = time.monotonic()
        try:
            if self.lease and await self.store.keepalive(self.lease):
                kv = await self.store.get(LEADER_KEY)
                if kv is not None and kv.lease == self.lease:
                    self._until = started + self.ttl * 0.8
                    return True
            if self.lease:
                self._lost("its lease expired")
            return await self._campaign(started)
        except StoreError as e:  # unknown: lead only as long as the lease surely holds
            if self.lease and not self.leading:
                self._lost(f"the store cannot be reached ({e})")
            return self.leading

    async def _campaign(self, started: float) -> bool:
        if await self.store.get(LEADER_KEY) is not None:
            return False
        lease = await self.store.grant_lease(self.ttl)
        try:
            self.revision = await self.store.create(LEADER_KEY, self.identity.encode(), lease)
        except Conflict:
            with contextlib.suppress(StoreError):
                await self.store.revoke(lease)
            return False
        self.lease, self._until = lease, started + self.ttl * 0.8
        log.warning("this server (%s) is now the leader: it runs garbage collection and compaction", self.identity)
        return True

    def _lost(self, why: str) -> None:
        log.warning("this server (%s) is no longer the leader: %s", self.identity, why)
        self.lease = 0
        self._until = 0.0

    async def run(self) -> None:
        """Renew or campaign every third of the lease's lifetime."""
        while True:
            with contextlib.suppress(Exception):
                await self.check()
            await asyncio.sleep(self.ttl / 3)

    async def resign(self) -> None:
        """Give the key up at shutdown, so another server takes over at once, not after the TTL."""
        if self.lease:
            lease, self.lease = self.lease, 0
            with contextlib.suppress(Exception):
                await self.store.revoke(lease)
