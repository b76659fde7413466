"""The embedded store: a revisioned key-value log in one SQLite file (in the spirit of k3s's kine).

Tables: `kv` (current values), `log` (every change, ordered by revision and position in its
transaction), `meta` (current and compact revision), `leases`. Every write transaction runs under
`BEGIN IMMEDIATE`, so concurrent writers (even in other processes) serialise, and WAL mode makes a
kill -9 lose nothing that was acknowledged. Watchers in this process are woken on each commit and
also poll, so writes from other processes are seen within `poll_interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator

from tether.store.base import KV, Compacted, Compare, Conflict, Delete, Event, ListResult, Op, Put

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, create_rev INTEGER NOT NULL,
                               mod_rev INTEGER NOT NULL, lease INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS kv_lease ON kv(lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS log (rev INTEGER NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL,
                                key TEXT NOT NULL, value BLOB, PRIMARY KEY (rev, seq));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('rev', 0), ('compact', 0);
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl REAL NOT NULL, expires REAL NOT NULL);
"""

MAX_KEY = "\U0010ffff"


def prefix_end(prefix: str) -> str:
    return prefix + MAX_KEY


class SqliteStore:
    """`Store` over SQLite. `history` is how many revisions of the log are kept before compaction."""

    def __init__(self, path: str, *, history: int = 100_000, poll_interval: float = 0.2) -> None:
        if path not in (":memory:", "") and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.history = history
        self.poll_interval = poll_interval
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable against process crashes in WAL mode
        self._db.executescript(SCHEMA)
        # completed at the next commit (a new one per generation): the watchers of this process wait
        # on it. Not an asyncio.Condition waited on with wait_for: a watch cancelled (its agent was
        # killed) as its wait ended could keep the condition's lock for good, and every later commit
        # then waited for that lock forever (seen once in the kill -9 test: the server hung)
        self._changed: asyncio.Future[None] | None = None
        self._bg: asyncio.Task[None] | None = None
        self._closed = False

    # --- plumbing -------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._bg is None and not self._closed:
            self._bg = asyncio.get_running_loop().create_task(self._housekeeping())

    def _notify(self) -> None:
        """Wake this process's watchers: something was committed."""
        self._start()
        fut, self._changed = self._changed, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _next_change(self, timeout: float) -> None:
        """Return at the next commit in this process, or after `timeout` (other processes' writes)."""
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        # asyncio.wait, not wait_for: in Python 3.11 wait_for swallows a cancellation that arrives as
        # the awaited future completes, and the cancelled watch then went on for ever
        await asyncio.wait((self._changed,), timeout=timeout)

    def _meta(self, name: str) -> int:
        return self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()[0]

    async def _housekeeping(self) -> None:
        """Expire leases, compact old history, and wake watchers for other processes' writes."""
        last_rev = -1
        while not self._closed:
            try:
                await self._expire_leases()
                rev = self._meta("rev")
                if rev - self._meta("compact") > self.history * 1.1:
                    await self.compact(rev - self.history)
                if rev != last_rev:
                    last_rev = rev
                    self._notify()
            except sqlite3.Error as e:  # pragma: no cover - logged, retried
                log.warning("sqlite housekeeping failed: %s", e)
            await asyncio.sleep(self.poll_interval)

    def _write(self, compares: list[Compare], ops: list[Op]) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for c in compares:
                row = db.execute("SELECT mod_rev FROM kv WHERE key=?", (c.key,)).fetchone()
                if (row[0] if row else 0) != c.mod_revision:
                    raise Conflict(f"{c.key}: expected revision {c.mod_revision}, found {row[0] if row else 0}")
            rev = self._meta("rev") + 1
            seq = 0
            for op in ops:
                if isinstance(op, Put):
                    row = db.execute("SELECT create_rev FROM kv WHERE key=?", (op.key,)).fetchone()
                    create = row[0] if row else rev
                    if op.lease and not db.execute("SELECT 1 FROM leases WHERE id=?", (op.lease,)).fetchone():
                        raise Conflict(f"lease {op.lease} not found (expired?)")
                    db.execute(
                        "INSERT OR REPLACE INTO kv VALUES (?,?,?,?,?)", (op.key, op.value, create, rev, op.lease)
                    )
                    db.execute("INSERT INTO log VALUES (?,?,?,?,?)", (rev, seq, "put", op.key, op.value))
                    seq += 1
                elif isinstance(op, Delete):
                    if db.execute("DELETE FROM kv WHERE key=?", (op.key,)).rowcount:
                        db.execute("INSERT INTO log VALUES (?,?,?,?,NULL)", (rev, seq, "delete", op.key))
                        seq += 1
            if seq:
                db.execute("UPDATE meta SET value=? WHERE name='rev'", (rev,))
            else:
                rev -= 1
            db.execute("COMMIT")
            return rev
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # --- Store ----------------------------------------------------------------------------------

    async def get(self, key: str) -> KV | None:
        row = self._db.execute("SELECT key, value, mod_rev, create_rev, lease FROM kv WHERE key=?", (key,)).fetchone()
        return KV(row[0], bytes(row[1]), row[2], row[3], row[4]) if row else None

    async def list(self, prefix: str) -> ListResult:
        db = self._db
        db.execute("BEGIN")
        try:
            rows = db.execute(
                "SELECT key, value, mod_rev, create_rev, lease FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, prefix_end(prefix)),
            ).fetchall()
            rev = self._meta("rev")
        finally:
            db.execute("COMMIT")
        return ListResult([KV(r[0], bytes(r[1]), r[2], r[3], r[4]) for r in rows], rev)

    async def txn(self, compares: list[Compare], ops: list[Op]) -> int:
        rev = self._write(compares, ops)
        self._notify()
        return rev

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
        return self._meta("rev")

    async def compact(self, revision: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            revision = min(revision, self._meta("rev"))
            if revision > self._meta("compact"):
                db.execute("DELETE FROM log WHERE rev <= ?", (revision,))
                db.execute("UPDATE meta SET value=? WHERE name='compact'", (revision,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def watch(self, prefix: str, after_revision: int) -> AsyncIterator[Event]:
        self._start()
        last = after_revision
        end = prefix_end(prefix)
        while not self._closed:
            db = self._db
            db.execute("BEGIN")
            try:
                compact = self._meta("compact")
                if last < compact:
                    raise Compacted(compact)
                rows = db.execute(
                    "SELECT rev, type, key, value FROM log WHERE rev > ? AND key >= ? AND key < ? "
                    "ORDER BY rev, seq LIMIT 2000",
                    (last, prefix, end),
                ).fetchall()
                head = self._meta("rev")
            finally:
                db.execute("COMMIT")
            if len(rows) == 2000 and rows[0][0] != rows[-1][0]:
                cut = rows[-1][0]  # only whole revisions: the last one may continue past the limit
                rows = [r for r in rows if r[0] != cut]
            for rev, typ, key, value in rows:
                yield Event(typ, key, bytes(value) if value is not None else None, rev)
                last = rev
            if rows and len(rows) >= 1000:
                continue
            if not rows:
                last = max(last, head)  # nothing under prefix up to head: skip ahead
            if self._meta("rev") <= last:  # no await since the check: a commit cannot slip in between
                await self._next_change(self.poll_interval * 5)

    async def grant_lease(self, ttl: float) -> int:
        self._start()
        lease = random.randrange(1, 2**62)
        with self._db:
            self._db.execute("INSERT INTO leases VALUES (?,?,?)", (lease, ttl, time.time() + ttl))
        return lease

    async def keepalive(self, lease: int) -> bool:
        await self._expire_leases()
        with self._db:
            cur = self._db.execute("UPDATE leases SET expires = ? + ttl WHERE id=?", (time.time(), lease))
        return cur.rowcount == 1

    async def revoke(self, lease: int) -> None:
        await self._drop_lease(lease)

    async def _drop_lease(self, lease: int) -> None:
        keys = [r[0] for r in self._db.execute("SELECT key FROM kv WHERE lease=?", (lease,))]
        if keys:
            await self.txn([], [Delete(k) for k in keys])
        with self._db:
            self._db.execute("DELETE FROM leases WHERE id=?", (lease,))

    async def _expire_leases(self) -> None:
        expired = [r[0] for r in self._db.execute("SELECT id FROM leases WHERE expires < ?", (time.time(),))]
        for lease in expired:
            await self._drop_lease(lease)

    async def close(self) -> None:
        self._closed = True
        if self._bg is not None:
            self._bg.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._bg
        self._notify()
        self._db.close()
