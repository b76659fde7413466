"""Objects as agents receive them, encoded once: the snapshot's items and the watch's event lines.

Every agent is sent the same bytes for the same object at the same revision, so the server encodes
each (key, mod_revision) once and shares the bytes: the watch's lines (one per event, for every
stream) and GET /api/v1/snapshot (every agent lists the whole store when it starts or re-lists).
Before, each snapshot decoded every stored value with pydantic, dumped it to a dict and let FastAPI
encode ~12,000 dicts again; at 10,000 endpoints a hundred agents starting at once kept the server
busy long enough for their heartbeats to time out, and each response's dicts and body were held
until sent (the server's RSS reached ~1 GB).

Memory, bounded: `Wire.entries` holds each listed key's wire JSON (bytes, about the size of the
stored values: 17 MB kept at 10,000 endpoints, where one listing peaks at 33-38 MB and 100 old
requests at once took the server to 630 MB; bench/NOTES.md#snapshot), only while snapshots are
being asked for: SNAPSHOT_IDLE seconds after the last one, the cache is dropped whole, and until
the next snapshot the watch encodes its events without keeping them there.
Each snapshot rebuilds the entries from its listing, so deleted keys leave with the next snapshot
(or at once, by their delete event). The whole body of the last snapshot is kept as references to
those same bytes (no copy) and sent again while the store's revision has not moved; requests that
arrive while a listing is under way share it (agents starting at once). A body goes out in
CHUNK-sized pieces joined as they are sent: a request holds one piece, not a 10-20 MB copy.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tether.model import PREFIX, decode, kind_of_key

SNAPSHOT_IDLE = 300.0  # seconds after the last snapshot request the encoded objects are dropped
LINE_CACHE = 8192  # encoded events kept for the next watcher that is sent the same one
CHUNK = 256 * 1024  # bytes of a snapshot's body joined per write
YIELD_EVERY = 200  # objects encoded between two yields to the event loop (~10 ms: heartbeats go on)

Entry = tuple[int, str | None, bytes]  # mod_revision, kind (None: not an object), wire JSON


def wire_object(key: str, value: bytes, revision: int) -> Any:
    """A stored object as agents receive it. One the model refuses (written around the API, or by an
    older server) goes out as stored: each agent quarantines it, where raising here would stop
    every agent's snapshot and watch (one bad object must not stop a cluster)."""
    try:
        o = decode(key, value)
    except Exception:  # noqa: BLE001 - ValidationError, or not JSON at all
        try:
            raw = json.loads(value)
        except ValueError:
            return None
        return {**raw, "revision": revision} if isinstance(raw, dict) else raw
    if o is None:
        return None
    o.revision = revision
    return o.model_dump(mode="json")


def encode_object(key: str, value: bytes, revision: int) -> bytes:
    """`wire_object` as JSON bytes, by pydantic's serializer straight from the model (no dict in
    between); a value the model refuses takes `wire_object`'s fallback."""
    try:
        o = decode(key, value)
    except Exception:  # noqa: BLE001 - the fallback decides what goes out
        return json.dumps(wire_object(key, value, revision), separators=(",", ":")).encode()
    if o is None:
        return b"null"
    o.revision = revision
    return o.__pydantic_serializer__.to_json(o)


@dataclass(frozen=True, slots=True)
class Body:
    """One snapshot's JSON, `{"revision": R, "objects": [{"kind": K, "object": O}, ...]}`, as the
    pieces to join (references to the cached objects' bytes)."""

    revision: int
    parts: list[bytes]
    length: int

    async def chunks(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        buf: list[bytes] = []
        n = 0
        for p in self.parts:
            buf.append(p)
            n += len(p)
            if n >= size:
                yield b"".join(buf)
                buf, n = [], 0
        if buf:
            yield b"".join(buf)


class Wire:
    """One store's objects as agents receive them (per store: revisions of two stores are unrelated)."""

    def __init__(self, store: Any, idle: float = SNAPSHOT_IDLE, line_cache: int = LINE_CACHE) -> None:
        self.store = store
        self.idle = idle
        self.entries: dict[str, Entry] = {}
        self.lines: OrderedDict[tuple[int, str], bytes | None] = OrderedDict()
        self.line_cache = line_cache
        self.last: Body | None = None  # the last snapshot, sent again while the store's revision is its
        self.building: asyncio.Future[Body] | None = None  # the listing under way
        self.used_at = -float("inf")
        self.timer: asyncio.TimerHandle | None = None
        self.encoded = 0  # objects encoded (what the cache saves shows here)
        self.heads: dict[str, bytes] = {}  # kind -> an item's opening

    def keeping(self) -> bool:
        return time.monotonic() - self.used_at < self.idle

    def item(self, key: str, value: bytes, revision: int) -> tuple[str | None, bytes]:
        """The kind and wire JSON of `key`'s value written at `revision`, encoded once."""
        hit = self.entries.get(key)
        if hit is not None and hit[0] == revision:
            return hit[1], hit[2]
        kind = kind_of_key(key)
        data = b""
        if kind is not None:
            data = encode_object(key, value, revision)
            self.encoded += 1
        if (hit is None or hit[0] < revision) and self.keeping():
            self.entries[key] = (revision, kind, data)
        return kind, data

    # --- the watch -------------------------------------------------------------------------------

    def event_line(self, ev: Any) -> bytes | None:
        """The JSON line of a store event, encoded once for all watchers (None: not sent, an internal
        key): every watcher (each agent, and a client replaying history) is sent the same events, and
        decoding and dumping one costs ~50 us - per watcher, that was the server's main cost of a
        write with many watch streams."""
        key = (ev.revision, ev.key)
        line = self.lines.get(key, b"")
        if line != b"":
            return line
        line = self.encode_event(ev)
        self.lines[key] = line
        if len(self.lines) > self.line_cache:
            self.lines.popitem(last=False)
        return line

    def encode_event(self, ev: Any) -> bytes | None:
        if ev.value is None:
            kind, obj = kind_of_key(ev.key), b"null"
            hit = self.entries.get(ev.key)
            if hit is not None and hit[0] < ev.revision:
                del self.entries[ev.key]
        else:
            kind, obj = self.item(ev.key, ev.value, ev.revision)
        if kind is None:
            return None
        return b'{"type": %s, "kind": %s, "key": %s, "object": %s, "revision": %d}\n' % (
            json.dumps(ev.type).encode(), json.dumps(kind).encode(), json.dumps(ev.key).encode(), obj, ev.revision)

    # --- the snapshot ----------------------------------------------------------------------------

    async def snapshot(self) -> Body:
        """Every object at one revision, at least the store's revision when asked (a client that
        wrote and then lists sees its write). Asked while a listing is under way or while the
        store's revision has not moved (many agents starting at once), one listing serves all."""
        self._touch()
        head = await self.store.revision()
        last = self.last
        if last is not None and last.revision == head:  # (lower: the store was restored or replaced)
            return last
        while (building := self.building) is not None and not building.done():
            body = await asyncio.shield(building)
            if body.revision >= head:
                return body
            if self.building is building:
                break  # too old, and no newer listing under way: start one
        building = self.building = asyncio.ensure_future(self._build())
        building.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved if all went away
        return await asyncio.shield(building)  # a client that goes away does not cancel the others' listing

    async def _build(self) -> Body:
        listed = await self.store.list(PREFIX)
        parts = [b'{"revision":%d,"objects":[' % listed.revision]
        fresh: dict[str, Entry] = {}
        before = self.encoded
        for kv in listed.items:
            entry = self.entries.get(kv.key)
            if entry is None or entry[0] != kv.mod_revision:
                entry = (kv.mod_revision, *self.item(kv.key, kv.value, kv.mod_revision))
                if self.encoded - before >= YIELD_EVERY:  # a cold cache: let heartbeats and writes in
                    before = self.encoded
                    await asyncio.sleep(0)
            fresh[kv.key] = entry
            if entry[1] is not None:
                parts += (self.heads.get(entry[1]) or self._head(entry[1]), entry[2], b"},")
        if len(parts) > 1:
            parts[-1] = b"}"
        parts.append(b"]}")
        body = Body(listed.revision, parts, sum(map(len, parts)))
        if self.keeping() and (self.last is None or self.last.revision <= body.revision):
            # what the listing saw, and what the watch encoded since: deleted keys leave here
            fresh.update((k, e) for k, e in self.entries.items() if e[0] > listed.revision)
            self.entries = fresh
            self.last = body
        return body

    def _head(self, kind: str) -> bytes:
        head = self.heads[kind] = b'{"kind":%s,"object":' % json.dumps(kind).encode()
        return head

    def _touch(self) -> None:
        self.used_at = time.monotonic()
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.idle, self._expire)

    def _expire(self) -> None:
        """No snapshot for `idle` seconds: the encoded objects and the last body go (memory)."""
        self.timer = None
        left = self.used_at + self.idle - time.monotonic()
        if left > 0:
            self.timer = asyncio.get_running_loop().call_later(left, self._expire)
            return
        self.entries = {}
        self.last = None


def wire_of(app: Any, store: Any) -> Wire:
    """The app's `Wire` for `store` (a new one when the app's store was replaced)."""
    wire = getattr(app.state, "wire", None)
    if wire is None or wire.store is not store:
        wire = app.state.wire = Wire(store)
    return wire
