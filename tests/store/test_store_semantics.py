"""One suite, two engines: every test runs against SQLite and a real etcd (fixture `store`)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tether.store.base import Compacted, Compare, Conflict, Delete, Put
from tether.store.sqlite import SqliteStore

P = "/tether/v1/test/"


async def collect(store, prefix, after, n, timeout=30.0):
    out = []

    async def run():
        async for ev in store.watch(prefix, after):
            if ev.type == "progress":
                continue
            out.append(ev)
            if len(out) >= n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_create_get_list_update_delete(store):
    r1 = await store.create(P + "a", b"1")
    kv = await store.get(P + "a")
    assert kv.value == b"1" and kv.mod_revision == r1 and kv.create_revision == r1
    r2 = await store.update(P + "a", b"2", r1)
    assert r2 > r1
    await store.create(P + "b", b"x")
    await store.create("/tether/v1/other/c", b"y")
    listed = await store.list(P)
    assert [k.key for k in listed.items] == [P + "a", P + "b"]
    assert listed.revision >= r2
    await store.delete(P + "a")
    assert await store.get(P + "a") is None
    assert await store.get(P + "missing") is None


async def test_cas_conflicts_are_detected(store):
    r1 = await store.create(P + "a", b"1")
    with pytest.raises(Conflict):
        await store.create(P + "a", b"again")
    await store.update(P + "a", b"2", r1)
    with pytest.raises(Conflict):
        await store.update(P + "a", b"stale", r1)
    with pytest.raises(Conflict):
        await store.delete(P + "a", mod_revision=r1)
    assert (await store.get(P + "a")).value == b"2"


async def test_transaction_applies_whole_or_not_at_all(store):
    r = await store.create(P + "a", b"1")
    before = await store.revision()
    with pytest.raises(Conflict):
        await store.txn([Compare(P + "a", r), Compare(P + "b", 12345)], [Put(P + "a", b"2"), Put(P + "c", b"3")])
    assert (await store.get(P + "a")).value == b"1"
    assert await store.get(P + "c") is None
    assert await store.revision() == before
    rev = await store.txn([Compare(P + "a", r), Compare(P + "b", 0)], [Put(P + "a", b"2"), Put(P + "b", b"3"),
                                                                     Delete(P + "zz")])
    assert rev == before + 1  # one revision per transaction
    assert (await store.get(P + "a")).mod_revision == (await store.get(P + "b")).mod_revision == rev


async def test_watch_delivers_10000_writes_in_order_without_gap_or_duplicate(store):
    start = await store.revision()
    n = 10_000
    watcher = asyncio.create_task(collect(store, P, start, n, timeout=240))

    async def writer(w):
        for i in range(n // 4):
            await store.put(f"{P}w{w}/{i % 50}", f"{w}:{i}".encode())

    await asyncio.gather(*(writer(w) for w in range(4)))
    events = await watcher
    revs = [e.revision for e in events]
    assert revs == sorted(revs)
    assert len(set(revs)) == n  # one event per single-put transaction: no duplicate
    assert revs[-1] - revs[0] == n - 1  # and no gap
    last = {}
    for e in events:
        last[e.key] = e.value
    for kv in (await store.list(P)).items:
        assert last[kv.key] == kv.value


async def test_watch_resumes_from_a_revision_and_keeps_transaction_order(store):
    revs = [await store.put(P + f"k{i}", str(i).encode()) for i in range(5)]
    events = await collect(store, P, revs[1], 3)
    assert [e.key for e in events] == [P + "k2", P + "k3", P + "k4"]
    rev = await store.txn([], [Put(P + "x", b"1"), Put(P + "y", b"2"), Delete(P + "k0")])
    events = await collect(store, P, revs[-1], 3)
    assert [(e.type, e.key, e.revision) for e in events] == [
        ("put", P + "x", rev), ("put", P + "y", rev), ("delete", P + "k0", rev)]


async def test_compacted_history_answers_resync(store):
    revs = [await store.put(P + "k", str(i).encode()) for i in range(10)]
    await store.compact(revs[5])
    with pytest.raises(Compacted):
        await collect(store, P, revs[2], 1, timeout=10)
    events = await collect(store, P, revs[5], 4)
    assert [e.revision for e in events] == revs[6:]


async def test_lease_expiry_deletes_keys_with_delete_events(store):
    lease = await store.grant_lease(1)
    r = await store.put(P + "alive", b"1", lease=lease)
    await store.put(P + "stays", b"1")
    watcher = asyncio.create_task(collect(store, P + "alive", r, 1, timeout=20))
    events = await watcher
    assert events[0].type == "delete"
    assert await store.get(P + "alive") is None
    assert await store.get(P + "stays") is not None
    assert await store.keepalive(lease) is False


async def test_keepalive_extends_and_revoke_deletes(store):
    lease = await store.grant_lease(2)
    await store.put(P + "a", b"1", lease=lease)
    for _ in range(4):
        await asyncio.sleep(0.8)
        assert await store.keepalive(lease)
    assert await store.get(P + "a") is not None
    await store.revoke(lease)
    assert await store.get(P + "a") is None



@pytest.mark.timeout(60)
async def test_watchers_cancelled_at_any_moment_never_block_writes(tmp_path):
    """Agents die while watching: their watches are cancelled at arbitrary points, including while a
    wait for the next change times out. Writes must still complete: the SQLite engine once left its
    wake-up lock held by such a watcher, and every later commit waited for it forever. (SQLite only:
    a short poll interval makes those timeouts frequent.)"""
    store = SqliteStore(str(tmp_path / "t.db"), poll_interval=0.002)
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            await asyncio.wait_for(store.put(P + "k", str(n).encode()), 5)  # a stuck commit fails here
            n += 1
            await asyncio.sleep(0.003)

    w = asyncio.ensure_future(writer())
    try:
        for i in range(300):
            task = asyncio.ensure_future(collect(store, P, 0, 10**9, timeout=3600))
            await asyncio.sleep((i % 23) * 0.001)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert not w.done(), w.exception()
    finally:
        stop.set()
        await w
        await store.close()
