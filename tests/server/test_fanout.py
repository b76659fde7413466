"""The server's watch fan-out (tether.server.fanout) over real stores (SQLite and etcd): one store
watch for all streams, each event's line encoded once and shared, bounded per-stream queues."""

from __future__ import annotations

import asyncio

from tether.server.fanout import Subscriber, WatchHub
from tether.store.base import Put


def encoder(counts: dict[str, int]):
    def encode(ev) -> bytes:
        counts["encoded"] = counts.get("encoded", 0) + 1
        return f"{ev.revision} {ev.key}\n".encode()
    return encode


class CountingStore:
    """A store whose watches are counted (the hub must open one, whatever the number of streams)."""

    def __init__(self, store) -> None:
        self.inner, self.watches = store, 0

    async def revision(self) -> int:
        return await self.inner.revision()

    def watch(self, prefix: str, after: int):
        self.watches += 1
        return self.inner.watch(prefix, after)


async def drained(subs: list[Subscriber], n: int, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while any(len(s.items) < n for s in subs):
            await asyncio.sleep(0.01)


async def test_one_store_watch_and_one_encoding_serve_every_stream(store) -> None:
    counts: dict[str, int] = {}
    counting = CountingStore(store)
    hub = WatchHub(counting, "/t/", encoder(counts))
    subs = [Subscriber(1 << 20, 10, asyncio.Event()) for _ in range(50)]
    try:
        assert await hub.ensure_started()
        head = await store.revision()
        for s in subs:
            assert hub.subscribe(s, head)
        for i in range(20):
            await store.put(f"/t/k{i}", b"v")
        await drained(subs, 20)
        assert counting.watches == 1 and counts["encoded"] == 20
        first = [line for _, line in subs[0].items]
        for s in subs[1:]:
            assert all(a is b for a, (_, b) in zip(first, s.items, strict=True)), "a line was copied per stream"
    finally:
        await hub.stop()


async def test_a_stream_joins_at_a_revision_boundary_and_gets_a_transaction_whole(store) -> None:
    hub = WatchHub(store, "/t/", encoder({}), ring_events=4)
    try:
        assert await hub.ensure_started()
        before = await store.revision()
        rev = await store.txn([], [Put(f"/t/a{i}", b"v") for i in range(3)])  # one revision, 3 events
        await asyncio.sleep(0.2)
        on_time = Subscriber(1 << 20, 10, asyncio.Event())
        assert hub.subscribe(on_time, before)
        assert [r for r, _ in on_time.items] == [rev] * 3
        for i in range(6):  # the ring (4 events) forgets the transaction
            await store.put(f"/t/b{i}", b"v")
        await drained([on_time], 9)
        assert not hub.subscribe(Subscriber(1 << 20, 10, asyncio.Event()), before), \
            "the ring no longer holds the transaction: the stream must replay from the store"
    finally:
        await hub.stop()


async def test_a_stream_that_stops_reading_is_cut_and_its_queue_freed_while_others_go_on(store) -> None:
    hub = WatchHub(store, "/t/", encoder({}))
    slow, fast = Subscriber(200, 0.3, asyncio.Event()), Subscriber(200, 0.3, asyncio.Event())
    try:
        assert await hub.ensure_started()
        head = await store.revision()
        assert hub.subscribe(slow, head) and hub.subscribe(fast, head)
        for i in range(40):
            await store.put(f"/t/k{i}", b"v" * 50)
            while fast.items:
                fast.take()
        await asyncio.sleep(0.5)
        assert slow.overflow and "fell behind" in slow.overflow
        assert not slow.items and slow.size == 0 and slow not in hub.subscribers
        assert fast.overflow is None and fast in hub.subscribers
    finally:
        await hub.stop()


async def test_a_stream_cut_in_the_middle_of_a_transaction_resumes_before_it() -> None:
    """Resuming after the last revision sent would skip the rest of a transaction whose first
    events were sent: the resync names the revision before it."""
    sub = Subscriber(1 << 20, 10, asyncio.Event())
    for rev in (5, 6, 6, 6):
        sub.push(rev, b"x\n")
    sub.take()
    sub.take()  # 5, and the first event of 6
    sub.cut("fell behind")
    assert sub.resume_at == 5 and not sub.items
    whole = Subscriber(1 << 20, 10, asyncio.Event())
    for rev in (5, 6, 7):
        whole.push(rev, b"x\n")
    whole.take()
    whole.take()
    whole.cut("fell behind")
    assert whole.resume_at == 6
    pending = Subscriber(1 << 20, 10, asyncio.Event())
    pending.push(6, b"x\n")
    pending.take()
    pending.cut("fell behind", pending=6)  # a replay cut before it could queue the next event of 6
    assert pending.resume_at == 5
