"""Watch fan-out: one store watch per server process, each event encoded once, its bytes shared by
every watch stream.

Before, each watch stream ran a store watch of its own: with 100 agents, one write was read from
the store 100 times (SQLite: 100 queries on the one reader thread; etcd: 100 gRPC streams, 100
protobuf decodes) before the shared line cache saved the encoding. Now the `WatchHub` reads each
event once and appends a reference to its line to every subscriber's queue (O(watchers) appends
per event, no I/O, no copies). A stream that starts further back than the hub's ring replays from
the store on its own and joins the hub once the ring holds everything after what it has sent.

Buffers stay bounded per watcher: a subscriber whose queued bytes stay above `cap` for `stall`
seconds is cut (its queue dropped at once) and told to resync from the last revision it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

RING_EVENTS = 8192  # events kept for streams that start a little behind (an agent reconnecting)


class Subscriber:
    """One watch stream's queue of (revision, line) items (or an exception: the stream resyncs).
    The lines are the hub's: a queue holds references, never copies."""

    __slots__ = ("items", "size", "cap", "stall", "full_since", "overflow", "wake", "room", "timer", "on_cut",
                 "progress", "hub", "taken", "resume_at")

    def __init__(self, cap: int, stall: float, wake: asyncio.Event) -> None:
        self.items: deque[Any] = deque()
        self.size = 0
        self.cap, self.stall = cap, stall
        self.full_since: float | None = None
        self.overflow: str | None = None
        self.wake = wake
        self.room = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None
        self.on_cut: Callable[[Subscriber], None] | None = None
        self.progress = 0  # every event up to here is queued (or was sent)
        self.hub: WatchHub | None = None
        self.taken = -1  # the revision of the last item taken (sent)
        self.resume_at = -1  # once cut: every event up to here was sent (a revision is never split)

    def push(self, revision: int, line: bytes | None) -> None:
        if self.overflow is not None:
            return
        self.items.append((revision, line))
        self.size += len(line) if line else 16
        self.progress = max(self.progress, revision)
        self.wake.set()
        if self.size > self.cap and self.full_since is None:
            self.full_since = time.monotonic()
            self.timer = asyncio.get_running_loop().call_later(self.stall, self._check)

    def fail(self, e: Exception) -> None:
        self.items.append(e)
        self.wake.set()

    def take(self) -> Any:
        item = self.items.popleft()
        if isinstance(item, tuple):
            self.size -= len(item[1]) if item[1] else 16
            self.taken = item[0]
        if self.size <= self.cap:
            self.room.set()
            if self.full_since is not None:
                self.full_since = None
                if self.timer is not None:
                    self.timer.cancel()
        return item

    def _check(self) -> None:
        if self.full_since is not None and self.overflow is None:
            self.cut(f"this watcher fell behind: {self.size} bytes of events waited over {self.stall:g} s "
                     "(--watch-stall); watch again from the revision given")

    def cut(self, reason: str, pending: int | None = None) -> None:
        """Stop queueing for this stream and free what it holds: it ends with a resync from
        `resume_at`. A transaction's events share a revision: when some of the last revision sent
        are dropped (queued, or `pending`: the next event read), the client resumes before it."""
        nxt = self.items[0][0] if self.items and isinstance(self.items[0], tuple) else pending
        self.resume_at = self.taken - 1 if nxt is not None and nxt == self.taken else self.taken
        self.overflow = reason
        self.items.clear()
        self.size = 0
        if self.timer is not None:
            self.timer.cancel()
        if self.on_cut is not None:
            self.on_cut(self)
        self.wake.set()
        self.room.set()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.hub is not None:
            self.hub.subscribers.discard(self)


class WatchHub:
    """The server's one watch of `prefix`; `encode(event)` makes an event's line (None: not sent)."""

    def __init__(self, store: Any, prefix: str, encode: Callable[[Any], bytes | None],
                 ring_events: int = RING_EVENTS) -> None:
        self.store, self.prefix, self.encode = store, prefix, encode
        self.ring: deque[tuple[int, bytes | None]] = deque()
        self.ring_events = ring_events
        self.floor = -1  # every event after this revision is in the ring (-1: not started)
        self.revision = -1  # the store's word: every event up to here has been queued
        self.subscribers: set[Subscriber] = set()
        self.task: asyncio.Task[None] | None = None
        self.starting: asyncio.Future[None] | None = None
        self.events = 0  # store events read (one per event, whatever the number of watchers)

    async def ensure_started(self) -> bool:
        """Start the store watch if it is not running; False if the store could not be read."""
        if self.task is not None and not self.task.done():
            return True
        if self.starting is None or self.starting.done():
            self.starting = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self.starting)
        except Exception:  # noqa: BLE001 - the store is down: the stream replays on its own
            return False
        return self.task is not None and not self.task.done()

    async def _start(self) -> None:
        head = await self.store.revision()
        self.ring.clear()
        self.floor = self.revision = head
        self.task = asyncio.create_task(self._run(head))

    def covers(self, after: int) -> bool:
        return self.task is not None and not self.task.done() and 0 <= self.floor <= after

    def subscribe(self, sub: Subscriber, after: int) -> bool:
        """Queue for `sub` every event after `after`, now and from now on; False if the ring does
        not reach back that far (replay from the store first)."""
        if not self.covers(after):
            return False
        start = len(self.ring)
        while start and self.ring[start - 1][0] > after:
            start -= 1
        for i in range(start, len(self.ring)):
            sub.push(*self.ring[i])
        sub.progress = max(sub.progress, self.revision)
        sub.hub = self
        sub.on_cut = self._drop
        self.subscribers.add(sub)
        return True

    def _drop(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    async def _run(self, head: int) -> None:
        try:
            async for ev in self.store.watch(self.prefix, head):
                if ev.type == "progress":
                    self.revision = max(self.revision, ev.revision)
                    for sub in self.subscribers:
                        sub.progress = max(sub.progress, ev.revision)
                    continue
                self.events += 1
                line = self.encode(ev)
                self.ring.append((ev.revision, line))
                if len(self.ring) > self.ring_events:
                    self.floor = self.ring.popleft()[0]
                self.revision = max(self.revision, ev.revision)
                if line is None:
                    continue  # an internal key (name index, interface claim): nothing to send
                for sub in tuple(self.subscribers):
                    sub.push(ev.revision, line)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a store failure: every stream resyncs, the next one restarts
            log.warning("the server's watch of the store ended (%s); watch streams resync", e)
            for sub in tuple(self.subscribers):
                sub.fail(e)
            self.subscribers.clear()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
