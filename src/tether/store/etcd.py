"""The distributed store: etcd v3 through aetcd (asyncio gRPC).

etcd already has the semantics `Store` promises (one revision per transaction, ordered watches from
a revision, compaction, leases), so this is a thin mapping. Several endpoints: the client connects
to the first that answers and moves to the next on connection failure; watches resume from the
last delivered revision after such a switch, so there are no gaps and no duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aetcd
import aetcd.exceptions as etcd_errors
import aetcd.rpc as rpc
from aetcd import transactions as tx

from tether.store.base import KV, Compacted, Compare, Conflict, Delete, Event, ListResult, Op, Put, Unavailable

log = logging.getLogger(__name__)

CONNECTION_ERRORS = (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError, etcd_errors.InternalError)


GRPC_OPTIONS = {"grpc.max_receive_message_length": 1 << 30, "grpc.max_send_message_length": 64 << 20}


def _range_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)


class EtcdStore:
    def __init__(self, endpoints: list[str], *, timeout: float = 10) -> None:
        if not endpoints:
            raise ValueError("etcd store needs at least one endpoint host:port")
        self.endpoints = endpoints
        self.timeout = timeout
        self._client: aetcd.Client | None = None
        self._current = 0
        self._lock = asyncio.Lock()

    async def _connect(self) -> aetcd.Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is not None:
                return self._client
            errors = []
            for i in range(len(self.endpoints)):
                idx = (self._current + i) % len(self.endpoints)
                host, _, port = self.endpoints[idx].rpartition(":")
                client = aetcd.Client(host=host or "127.0.0.1", port=int(port), timeout=self.timeout,
                                      options=GRPC_OPTIONS)
                try:
                    await client.connect()
                    await client.status()
                except Exception as e:  # noqa: BLE001 - any failure means "try the next one"
                    errors.append(f"{self.endpoints[idx]}: {e}")
                    await client.close()
                    continue
                self._client, self._current = client, idx
                return client
            raise Unavailable("cannot reach etcd (" + "; ".join(errors) + "); is etcd running?")

    async def _drop(self) -> None:
        client, self._client = self._client, None
        self._current = (self._current + 1) % len(self.endpoints)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _call(self, fn: Any) -> Any:
        """Run `fn(client)`, retrying once on another endpoint when the connection fails."""
        for attempt in range(max(2, len(self.endpoints))):
            client = await self._connect()
            try:
                return await fn(client)
            except CONNECTION_ERRORS as e:
                log.warning("etcd %s failed: %s", self.endpoints[self._current], e)
                await self._drop()
                if attempt >= len(self.endpoints):
                    raise Unavailable(f"etcd unavailable: {e}") from e
        raise Unavailable("etcd unavailable")

    @staticmethod
    def _kv(kv: Any) -> KV:
        return KV(kv.key.decode(), bytes(kv.value), kv.mod_revision, kv.create_revision, kv.lease)

    async def get(self, key: str) -> KV | None:
        r = await self._call(lambda c: c.get(key.encode()))
        return self._kv(r) if r is not None else None

    async def list(self, prefix: str) -> ListResult:
        p = prefix.encode()

        async def run(c: aetcd.Client) -> ListResult:
            req = rpc.RangeRequest(key=p, range_end=_range_end(p), sort_order=1, sort_target=0)
            resp = await c.kvstub.Range(req, timeout=self.timeout, metadata=c.metadata)
            return ListResult([self._kv(kv) for kv in resp.kvs], resp.header.revision)

        return await self._call(run)

    async def txn(self, compares: list[Compare], ops: list[Op]) -> int:
        conds = [tx.Mod(c.key.encode()) == c.mod_revision for c in compares]
        reqs: list[Any] = []
        for op in ops:
            if isinstance(op, Put):
                reqs.append(tx.Put(op.key.encode(), op.value, lease=op.lease or None))
            elif isinstance(op, Delete):
                reqs.append(tx.Delete(op.key.encode()))

        async def run(c: aetcd.Client) -> int:
            request = rpc.TxnRequest(
                compare=[x.build_message() for x in conds], success=c._ops_to_requests(reqs), failure=[]
            )
            resp = await c.kvstub.Txn(request, timeout=self.timeout, metadata=c.metadata)
            if not resp.succeeded:
                raise Conflict("a compared key changed: " + ", ".join(f"{c.key}@{c.mod_revision}" for c in compares))
            return resp.header.revision

        try:
            return await self._call(run)
        except etcd_errors.ClientError as e:
            if "lease not found" in str(e):
                raise Conflict(f"lease not found (expired?): {e}") from e
            raise

    async def create(self, key: str, value: bytes, lease: int = 0) -> int:
        return await self.txn([Compare(key, 0)], [Put(key, value, lease)])

    async def update(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> int:
        return await self.txn([Compare(key, mod_revision)], [Put(key, value, lease)])

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return await self.txn([], [Put(key, value, lease)])

    async def delete(self, key: str, mod_revision: int | None = None) -> int:
        compares = [Compare(key, mod_revision)] if mod_revision is not None else []
        return await self.txn(compares, [Delete(key)])

    async def revision(self) -> int:
        return (await self.list("\x00/none")).revision

    async def compact(self, revision: int) -> None:
        async def run(c: aetcd.Client) -> None:
            await c.compact(revision, physical=True)

        try:
            await self._call(run)
        except etcd_errors.ClientError as e:
            if "compacted" not in str(e):  # already compacted further: fine
                raise

    async def watch(self, prefix: str, after_revision: int) -> AsyncIterator[Event]:
        p = prefix.encode()
        last = after_revision
        while True:
            client = await self._connect()
            try:
                w = await client.watch(p, range_end=_range_end(p), start_revision=last + 1)
                try:
                    async for ev in w:
                        rev = ev.kv.mod_revision
                        typ = "delete" if ev.kind == "DELETE" else "put"
                        yield Event(typ, ev.kv.key.decode(), None if typ == "delete" else bytes(ev.kv.value), rev)
                        last = max(last, rev)
                finally:
                    await w.cancel()
            except etcd_errors.RevisionCompactedError as e:
                raise Compacted(e.compacted_revision) from None
            except CONNECTION_ERRORS as e:
                log.warning("etcd watch interrupted (%s); resuming from revision %d", e, last)
                await self._drop()
                await asyncio.sleep(0.2)

    async def grant_lease(self, ttl: float) -> int:
        lease = await self._call(lambda c: c.lease(max(1, round(ttl))))
        return lease.id

    async def keepalive(self, lease: int) -> bool:
        reply = await self._call(lambda c: c.refresh_lease(lease))
        return bool(reply is not None and reply.TTL > 0)

    async def revoke(self, lease: int) -> None:
        try:
            await self._call(lambda c: c.revoke_lease(lease))
        except etcd_errors.ClientError as e:
            if "not found" not in str(e):
                raise

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
