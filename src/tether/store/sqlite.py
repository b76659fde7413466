"""The embedded store: a revisioned key-value log in one SQLite file (in the spirit of k3s's kine).

Tables: `kv` (current values), `log` (every change, ordered by revision and position in its
transaction), `meta` (current and compact revision), `leases`. Every write transaction runs under
`BEGIN IMMEDIATE`, so concurrent writers (even in other processes) serialise. WAL mode with
`synchronous=FULL` syncs the WAL at every commit, before the write is acknowledged, so neither a
kill -9 nor a power loss loses an acknowledged write (NORMAL only syncs at checkpoints: a power
loss could take the last commits with it). Watchers in this process are woken on each commit and
also poll, so writes from other processes are seen within `poll_interval`.

SQLite calls block (a commit waits for its fsync), so none runs on the event loop: writes go to
one writer thread, in the order they were submitted, grouped so that transactions waiting together
share one sync (`_commit_pending`), and reads to one reader thread with its own connection (WAL
readers never wait for the writer). A write is acknowledged only after its COMMIT returned, so a
read or watch that starts after the acknowledgement sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from tether.store.base import (
    KV,
    Compacted,
    Compare,
    Conflict,
    Delete,
    Event,
    ListResult,
    Op,
    Put,
    StoreError,
    StoreUnusable,
    Unavailable,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

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
MAX_GROUP = 256  # transactions committed together at most (one WAL sync)

# How long a write waits for another process's write lock (another server on the same file; a
# restore). Writes of this process never wait for each other here (one writer thread), and a
# commit takes milliseconds, so a lock held longer than this is a stuck or foreign process: the
# request gets a 503 the client can retry, instead of hanging past the client's own timeout
# (the old 30 s outlived every client timeout and held a connection and a thread all along).
BUSY_TIMEOUT = 5.0
FREED_ENOUGH = 1 << 20  # bytes freed since a write failed on a full disk before /healthz says healthy again

# Exit codes of `tether server` for a database it cannot use (sysexits.h): scripts and systemd
# units can tell "restore from a backup" apart from "fix the disk or permissions" and "wait".
EXIT_CORRUPT = 65  # EX_DATAERR
EXIT_UNWRITABLE = 74  # EX_IOERR
EXIT_IN_USE = 75  # EX_TEMPFAIL: a restore holds the database

CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
UNWRITABLE_CODES = {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_PERM,
                    sqlite3.SQLITE_FULL, sqlite3.SQLITE_AUTH}


class DatabaseUnusable(StoreUnusable):
    """The database file cannot be used at all (corrupt, unwritable, being restored): the server
    cannot start. `exit_code` says which, for scripts."""


def prefix_end(prefix: str) -> str:
    return prefix + MAX_KEY


def error_code(e: sqlite3.Error) -> int:
    """The primary SQLite result code of an error (extended codes carry it in the low byte)."""
    return getattr(e, "sqlite_errorcode", 0) & 0xFF


def describe_open_error(path: str, e: sqlite3.Error | OSError) -> DatabaseUnusable:
    """What is wrong with a database that would not open, and what to do about it."""
    if isinstance(e, sqlite3.Error) and error_code(e) in CORRUPT_CODES:
        return DatabaseUnusable(
            f"database {path} is corrupt ({e}); restore it from a backup: "
            f"tether server restore --from BACKUP --store sqlite://{path}", EXIT_CORRUPT)
    if isinstance(e, sqlite3.Error) and error_code(e) == sqlite3.SQLITE_FULL:
        return DatabaseUnusable(f"database {path} cannot be written: its disk is full ({e}); free space there",
                                EXIT_UNWRITABLE)
    return DatabaseUnusable(
        f"database {path} cannot be opened for writing ({e}); check that the file and its directory exist, "
        "are writable by this user and that the filesystem is mounted read-write", EXIT_UNWRITABLE)


def describe_runtime_error(path: str, e: sqlite3.Error) -> Unavailable | None:
    """A store error for an SQLite failure during a request, or None for a bug (left to raise)."""
    code = error_code(e)
    if code == sqlite3.SQLITE_FULL:
        return Unavailable(f"the disk holding {path} is full ({e}); nothing was written; free space on it "
                           "and retry")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return Unavailable(f"{path} stayed locked by another process for {BUSY_TIMEOUT:g} s (another server, "
                           "a restore?); retry")
    if code in CORRUPT_CODES:
        return Unavailable(f"database {path} is corrupt ({e}); stop the server and restore it from a backup "
                           "(tether server restore --from BACKUP)")
    if code in UNWRITABLE_CODES:
        return Unavailable(f"database {path} cannot be written ({e}); check its disk and permissions")
    return None


def lock_path(path: str) -> str:
    return path + ".lock"


def hold_lock(path: str, exclusive: bool) -> int:
    """flock the database's lock file: shared by every store that has it open, exclusive for a
    restore. The kernel drops it when the process dies, even by kill -9."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # see the module docstring; the cost is in docs/SQLITE.md
    return db


def open_checked(path: str, memory: bool) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """The writer's and the reader's connections to a database that passed `PRAGMA quick_check`
    (about 0.3 s for 200 MB), or DatabaseUnusable saying what is wrong."""
    opened: list[sqlite3.Connection] = []
    try:
        opened.append(connect(path))
        opened[0].executescript(SCHEMA)
        damage = opened[0].execute("PRAGMA quick_check").fetchone()[0]
        # one connection for :memory: (a second one would be another, empty database)
        opened.append(opened[0] if memory else connect(path))
    except sqlite3.Error as e:
        for db in opened:
            db.close()
        raise describe_open_error(path, e) from None
    if damage != "ok":
        for db in opened:
            db.close()
        raise DatabaseUnusable(f"database {path} is corrupt (quick_check: {damage}); restore it from a backup: "
                               f"tether server restore --from BACKUP --store sqlite://{path}", EXIT_CORRUPT)
    return opened[0], opened[1]


def lease_clock() -> float:
    """The clock leases expire by: CLOCK_MONOTONIC, which NTP steps and operators' `date -s` do not
    move (with the wall clock, a jump forward expired every lease at once and every host looked dead,
    and a jump back kept leases alive for the jump's length). It is one clock for every process on
    the machine, so servers sharing the file agree; it restarts at boot, see `rebase_leases`."""
    return time.monotonic()


def rebase_leases(db: sqlite3.Connection) -> None:
    """A lease can never expire more than its TTL from now: one that claims to (written before this
    machine booted, when the monotonic clock read higher) gets its TTL from now, as etcd gives every
    lease a full TTL when a new leader takes over."""
    now = lease_clock()
    with db:
        db.execute("UPDATE leases SET expires = ? + ttl WHERE expires > ? + ttl", (now, now))


def in_thread(name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


class SqliteStore:
    """`Store` over SQLite. `history` is how many revisions of the log are kept before compaction.
    Raises `DatabaseUnusable` when the file cannot be used (corrupt, unwritable, being restored)."""

    def __init__(self, path: str, *, history: int = 100_000, poll_interval: float = 0.2) -> None:
        self.path = path
        self.history = history
        self.poll_interval = poll_interval
        memory = path in (":memory:", "")
        self._lock_fd = -1
        try:
            if not memory and os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            if not memory:
                self._lock_fd = hold_lock(path, exclusive=False)
        except BlockingIOError:
            raise DatabaseUnusable(f"database {path} is being restored (tether server restore holds "
                                   f"{lock_path(path)}); start the server once the restore is done",
                                   EXIT_IN_USE) from None
        except OSError as e:
            raise describe_open_error(path, e) from None
        try:
            self._wdb, self._rdb = open_checked(path, memory)
            rebase_leases(self._wdb)
        except BaseException:
            self._release_lock()
            raise
        self._pending: deque[tuple[list[Compare], list[Op], Future[int]]] = deque()
        self._pending_lock = threading.Lock()
        self._writer = in_thread("tether-sqlite-write")
        self._reader = self._writer if memory else in_thread("tether-sqlite-read")
        # completed at the next commit (a new one per generation): the watchers of this process wait
        # on it. Not an asyncio.Condition waited on with wait_for: a watch cancelled (its agent was
        # killed) as its wait ended could keep the condition's lock for good, and every later commit
        # then waited for that lock forever (seen once in the kill -9 test: the server hung)
        self._changed: asyncio.Future[None] | None = None
        self._bg: asyncio.Task[None] | None = None
        self._closed = False
        self._full_at: int | None = None  # free bytes when a write last failed on a full disk; None: none did

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

    def _next_change(self) -> asyncio.Future[None]:
        """A future completed at the next commit in this process. Take it *before* reading the
        revision: a commit acknowledged between the read and the wait then still wakes the watcher."""
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    async def _call(self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` in the store's thread; SQLite failures become store errors (503), not 500s."""
        if self._closed:
            raise Unavailable("the store is closed (the server is stopping)")
        try:
            return await asyncio.wrap_future(executor.submit(fn, *args))
        except sqlite3.Error as e:
            raise self._store_error(e) from None

    def _store_error(self, e: sqlite3.Error) -> Exception:
        """The store error (503) a SQLite failure is, logged; one it does not know stays itself."""
        err = describe_runtime_error(self.path, e)
        if err is None:
            return e
        if error_code(e) == sqlite3.SQLITE_FULL:
            self._full_at = self._free_bytes()
        log.error("%s", err)
        return err

    def _free_bytes(self) -> int:
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    async def problems(self) -> list[str]:
        """What keeps the database from taking writes (for /healthz): a full disk, known from a write
        that failed on it, until a write succeeds or FREED_ENOUGH more bytes are free than then."""
        await self.revision()  # reads answer (or this raises Unavailable)
        if self._full_at is None or self.path in (":memory:", ""):
            return []
        free = self._free_bytes()
        if free >= self._full_at + FREED_ENOUGH:
            self._full_at = None  # space was freed: the next write will tell
            return []
        return [f"the disk holding {self.path} is full ({free} bytes free): every write fails (503) until space "
                "is freed on it"]

    async def _write_call(self, fn: Callable[..., T], *args: object) -> T:
        """A write in the writer thread. Watchers are woken when the commit returns, even if the
        caller was cancelled meanwhile (the write still happened)."""
        if self._closed:
            raise Unavailable("the store is closed (the server is stopping)")
        return await self._committed(self._writer.submit(fn, *args))

    async def _committed(self, cf: Future[T]) -> T:
        loop = asyncio.get_running_loop()
        cf.add_done_callback(lambda _: self._notify_from_thread(loop))
        try:
            result = await asyncio.wrap_future(cf)
        except sqlite3.Error as e:
            raise self._store_error(e) from None
        self._full_at = None  # a write went through: the disk takes writes again
        return result

    def _notify_from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is watching any more
            loop.call_soon_threadsafe(self._notify)

    @staticmethod
    def _meta(db: sqlite3.Connection, name: str) -> int:
        return db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()[0]

    async def _housekeeping(self) -> None:
        """Expire leases, compact old history, and wake watchers for other processes' writes."""
        last_rev = -1
        while not self._closed:
            try:
                if await self._call(self._reader, self._expired_leases):
                    await self._write_call(self._expire_leases)
                rev, compact = await self._call(self._reader, self._revisions)
                if rev - compact > self.history * 1.1:
                    await self.compact(rev - self.history)
                if rev != last_rev:
                    last_rev = rev
                    self._notify()
            except (StoreError, sqlite3.Error) as e:  # pragma: no cover - logged, retried
                log.warning("sqlite housekeeping failed: %s", e)
            await asyncio.sleep(self.poll_interval)

    def _revisions(self) -> tuple[int, int]:
        db = self._rdb
        db.execute("BEGIN")
        try:
            return self._meta(db, "rev"), self._meta(db, "compact")
        finally:
            db.execute("COMMIT")

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        """Roll back if a transaction is still open: SQLite ends some on its own (SQLITE_FULL)."""
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")

    @classmethod
    def _apply(cls, db: sqlite3.Connection, compares: list[Compare], ops: list[Op]) -> int:
        """One store transaction inside an open SQLite transaction; returns its revision."""
        for c in compares:
            row = db.execute("SELECT mod_rev FROM kv WHERE key=?", (c.key,)).fetchone()
            if (row[0] if row else 0) != c.mod_revision:
                raise Conflict(f"{c.key}: expected revision {c.mod_revision}, found {row[0] if row else 0}")
        rev = cls._meta(db, "rev") + 1
        seq = 0
        for op in ops:
            if isinstance(op, Put):
                row = db.execute("SELECT create_rev FROM kv WHERE key=?", (op.key,)).fetchone()
                create = row[0] if row else rev
                if op.lease and not db.execute("SELECT 1 FROM leases WHERE id=?", (op.lease,)).fetchone():
                    raise Conflict(f"lease {op.lease} not found (expired?)")
                db.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?,?,?)", (op.key, op.value, create, rev, op.lease))
                db.execute("INSERT INTO log VALUES (?,?,?,?,?)", (rev, seq, "put", op.key, op.value))
                seq += 1
            elif isinstance(op, Delete):
                if db.execute("DELETE FROM kv WHERE key=?", (op.key,)).rowcount:
                    db.execute("INSERT INTO log VALUES (?,?,?,?,NULL)", (rev, seq, "delete", op.key))
                    seq += 1
        if not seq:
            return rev - 1
        db.execute("UPDATE meta SET value=? WHERE name='rev'", (rev,))
        return rev

    def _write(self, compares: list[Compare], ops: list[Op]) -> int:
        db = self._wdb
        db.execute("BEGIN IMMEDIATE")
        try:
            rev = self._apply(db, compares, ops)
            db.execute("COMMIT")
            return rev
        except BaseException:
            self._rollback(db)
            raise

    def _commit_pending(self) -> None:
        """Group commit, in the writer thread: every transaction waiting now goes into one SQLite
        transaction (each under its own savepoint, with its own revision, in submission order), so
        they share one WAL sync. None is answered before the COMMIT returned; if SQLite fails (disk
        full), the whole group fails and nothing of it is written. Eight writers at once on a busy
        disk: 2,196 commits/s grouped, 359 one by one (bench/store_write, docs/SQLITE.md)."""
        with self._pending_lock:
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), MAX_GROUP))]
        batch = [job for job in batch if job[2].set_running_or_notify_cancel()]  # skip the cancelled
        if not batch:
            return
        db = self._wdb
        outcomes: list[tuple[Future[int], int | None, BaseException | None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for compares, ops, fut in batch:
                db.execute("SAVEPOINT txn")
                try:
                    outcomes.append((fut, self._apply(db, compares, ops), None))
                except Exception as e:  # a conflict, or a failure of this transaction alone
                    if not db.in_transaction:
                        raise  # SQLite ended the transaction itself (disk full, I/O): the group fails
                    db.execute("ROLLBACK TO txn")
                    outcomes.append((fut, None, e))
                db.execute("RELEASE txn")
            db.execute("COMMIT")
        except BaseException as e:  # handed to every caller of the group
            self._rollback(db)
            for _, _, fut in batch:
                fut.set_exception(e)
            return
        for fut, rev, err in outcomes:
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(rev)  # type: ignore[arg-type]

    def _submit_txn(self, compares: list[Compare], ops: list[Op]) -> Future[int]:
        fut: Future[int] = Future()
        with self._pending_lock:
            self._pending.append((compares, ops, fut))
        self._writer.submit(self._commit_pending)  # the first of these to run takes the whole queue
        return fut

    # --- Store ----------------------------------------------------------------------------------

    def _get(self, key: str) -> KV | None:
        row = self._rdb.execute("SELECT key, value, mod_rev, create_rev, lease FROM kv WHERE key=?",
                                (key,)).fetchone()
        return KV(row[0], bytes(row[1]), row[2], row[3], row[4]) if row else None

    async def get(self, key: str) -> KV | None:
        return await self._call(self._reader, self._get, key)

    def _list(self, prefix: str) -> ListResult:
        db = self._rdb
        db.execute("BEGIN")
        try:
            rows = db.execute(
                "SELECT key, value, mod_rev, create_rev, lease FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, prefix_end(prefix)),
            ).fetchall()
            rev = self._meta(db, "rev")
        finally:
            db.execute("COMMIT")
        return ListResult([KV(r[0], bytes(r[1]), r[2], r[3], r[4]) for r in rows], rev)

    async def list(self, prefix: str) -> ListResult:
        return await self._call(self._reader, self._list, prefix)

    async def txn(self, compares: list[Compare], ops: list[Op]) -> int:
        if self._closed:
            raise Unavailable("the store is closed (the server is stopping)")
        return await self._committed(self._submit_txn(compares, ops))

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
        return await self._call(self._reader, self._meta, self._rdb, "rev")

    def _compact(self, revision: int) -> None:
        db = self._wdb
        db.execute("BEGIN IMMEDIATE")
        try:
            revision = min(revision, self._meta(db, "rev"))
            if revision > self._meta(db, "compact"):
                db.execute("DELETE FROM log WHERE rev <= ?", (revision,))
                db.execute("UPDATE meta SET value=? WHERE name='compact'", (revision,))
            db.execute("COMMIT")
        except BaseException:
            self._rollback(db)
            raise

    async def compact(self, revision: int) -> None:
        await self._call(self._writer, self._compact, revision)

    def _events_after(self, last: int, prefix: str) -> tuple[list[tuple], int]:
        """Up to 2000 log rows under `prefix` after `last`, and the head revision, in one read."""
        db = self._rdb
        db.execute("BEGIN")
        try:
            compact = self._meta(db, "compact")
            if last < compact:
                raise Compacted(compact)
            rows = db.execute(
                "SELECT rev, type, key, value FROM log WHERE rev > ? AND key >= ? AND key < ? "
                "ORDER BY rev, seq LIMIT 2000",
                (last, prefix, prefix_end(prefix)),
            ).fetchall()
            return rows, self._meta(db, "rev")
        finally:
            db.execute("COMMIT")

    async def watch(self, prefix: str, after_revision: int) -> AsyncIterator[Event]:
        self._start()
        last = after_revision
        while not self._closed:
            woken = self._next_change()  # before the read: see _next_change
            rows, head = await self._call(self._reader, self._events_after, last, prefix)
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
            if head <= last:
                # asyncio.wait, not wait_for: in Python 3.11 wait_for swallows a cancellation that
                # arrives as the awaited future completes, and the cancelled watch then went on for ever
                await asyncio.wait((woken,), timeout=self.poll_interval * 5)

    def _grant(self, lease: int, ttl: float) -> None:
        with self._wdb:
            self._wdb.execute("INSERT INTO leases VALUES (?,?,?)", (lease, ttl, lease_clock() + ttl))

    async def grant_lease(self, ttl: float) -> int:
        self._start()
        # from the OS, not `random`: a process that seeds `random` (hypothesis does, per example) would
        # otherwise draw the same id again and collide with a live lease
        lease = 1 + secrets.randbelow(2**62 - 1)
        await self._call(self._writer, self._grant, lease, ttl)
        return lease

    def _keepalive(self, lease: int) -> bool:
        self._expire_leases()
        with self._wdb:
            cur = self._wdb.execute("UPDATE leases SET expires = ? + ttl WHERE id=?", (lease_clock(), lease))
        return cur.rowcount == 1

    async def keepalive(self, lease: int) -> bool:
        return await self._write_call(self._keepalive, lease)

    async def revoke(self, lease: int) -> None:
        await self._write_call(self._drop_lease, lease)

    def _drop_lease(self, lease: int) -> None:
        keys = [r[0] for r in self._wdb.execute("SELECT key FROM kv WHERE lease=?", (lease,))]
        if keys:
            self._write([], [Delete(k) for k in keys])
        with self._wdb:
            self._wdb.execute("DELETE FROM leases WHERE id=?", (lease,))

    def _expired_leases(self) -> bool:
        return self._rdb.execute("SELECT 1 FROM leases WHERE expires < ? LIMIT 1", (lease_clock(),)).fetchone() \
            is not None

    def _expire_leases(self) -> None:
        for (lease,) in self._wdb.execute("SELECT id FROM leases WHERE expires < ?", (lease_clock(),)).fetchall():
            self._drop_lease(lease)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bg is not None:
            self._bg.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._bg
        self._notify()
        # the threads finish what was submitted (acknowledged or about to be) before the files close
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        if self._rdb is not self._wdb:
            self._rdb.close()
        self._wdb.close()
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


# --- backup and restore ------------------------------------------------------------------------

RESTORE_REVISION_BUMP = 1_000_000


def _open_existing(path: str, *, readonly: bool) -> sqlite3.Connection:
    """Open a database that must already exist (sqlite3.connect would create an empty one)."""
    if not os.path.isfile(path):
        raise DatabaseUnusable(f"{path}: no such database file", EXIT_UNWRITABLE)
    mode = "ro" if readonly else "rw"
    return sqlite3.connect(f"file:{path}?mode={mode}", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT)


def damage(db: sqlite3.Connection) -> str | None:
    """What is wrong with an open database as a Tether store, or None when it is intact."""
    problems = [r[0] for r in db.execute("PRAGMA integrity_check")]
    if problems != ["ok"]:
        return "damaged: " + "; ".join(problems[:3])
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"kv", "log", "meta", "leases"} <= tables:
        return f"an SQLite file but not a Tether database (tables: {', '.join(sorted(tables)) or 'none'})"
    return None


def check_database(path: str, what: str = "database") -> int:
    """Check that `path` is an intact Tether database; return its revision. Raises DatabaseUnusable
    saying what is wrong with the `what` (a database, a backup)."""
    try:
        db = _open_existing(path, readonly=True)
        try:
            wrong = damage(db)
            if wrong is None:
                return db.execute("SELECT value FROM meta WHERE name='rev'").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as e:
        wrong = str(e)
    raise DatabaseUnusable(f"{what} {path} is not usable: {wrong}", EXIT_CORRUPT)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(path: str, to: str) -> int:
    """Copy the database at `path` to the file `to`, online: SQLite's backup API copies it in one
    read transaction, so the copy is one consistent revision even while a server writes (a WAL
    reader does not block writers). Written beside `to` and renamed into place, checked, synced.
    Returns the revision the copy holds."""
    if os.path.realpath(to) in {os.path.realpath(path + suffix) for suffix in ("", "-wal", "-shm", ".lock")}:
        raise DatabaseUnusable(f"--to {to} is the database itself; back up to another file", EXIT_UNWRITABLE)
    tmp = to + ".partial"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        src = _open_existing(path, readonly=False)  # a WAL reader needs the -shm file, made read-write
        try:
            dst = sqlite3.connect(tmp, isolation_level=None)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            finally:
                dst.close()
        finally:
            src.close()
        rev = check_database(tmp, "the copy")
        _fsync_path(tmp)
        os.replace(tmp, to)
        _fsync_path(os.path.dirname(os.path.abspath(to)))
        return rev
    except sqlite3.Error as e:
        raise describe_open_error(path, e) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def restore(path: str, source: str) -> tuple[int, str | None]:
    """Replace the database at `path` by the backup `source`, after checking the backup. Refuses
    while any process has the database open (servers hold its lock file). The restored store's
    revision is bumped past anything the old one handed out (by RESTORE_REVISION_BUMP, as etcd's
    `snapshot restore --bump-revision`) and its history marked compacted, so every agent's watch
    gets "compacted" and resyncs instead of waiting for revisions it has already seen. Leases keep
    their expiry times: hosts whose agents still renew them stay alive, the others expire.
    Returns the new revision and where the replaced database was kept (None if there was none)."""
    check_database(source, "backup")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".restoring"
    try:
        lock = hold_lock(path, exclusive=True)
    except BlockingIOError:
        raise DatabaseUnusable(f"{path} is in use by a running tether server (or another restore); stop it "
                               "first, then restore", EXIT_IN_USE) from None
    try:
        old_rev = 0
        with contextlib.suppress(StoreError, sqlite3.Error):
            old_rev = check_database(path)  # a damaged old database: its revision is unknown
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        src = _open_existing(source, readonly=True)
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            src.backup(dst)
            rev = max(old_rev, dst.execute("SELECT value FROM meta WHERE name='rev'").fetchone()[0])
            rev += RESTORE_REVISION_BUMP
            with dst:
                dst.execute("BEGIN IMMEDIATE")
                dst.execute("DELETE FROM log")
                dst.execute("UPDATE meta SET value=? WHERE name IN ('rev', 'compact')", (rev,))
            wrong = damage(dst)
            if wrong is not None:
                raise DatabaseUnusable(f"the copy of {source} is not usable: {wrong}", EXIT_CORRUPT)
            dst.execute("PRAGMA journal_mode=WAL")  # set last: closing folds the WAL back into the file
        finally:
            dst.close()
            src.close()
        _fsync_path(tmp)
        kept = _set_aside(path)
        os.replace(tmp, path)
        _fsync_path(os.path.dirname(os.path.abspath(path)))
        return rev, kept
    except sqlite3.Error as e:
        raise DatabaseUnusable(f"restore of {path} from {source} failed: {e}; the database was not replaced",
                               EXIT_UNWRITABLE) from None
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        os.close(lock)


def _set_aside(path: str) -> str | None:
    """Move the database and its WAL to `<path>.before-restore[-wal]` (an undo, and evidence);
    drop its -shm (an index SQLite rebuilds). A WAL left beside the restored file would be replayed
    into it."""
    kept = None
    for suffix in ("", "-wal"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, path + ".before-restore" + suffix)
            kept = path + ".before-restore"
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + ".before-restore" + suffix)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + "-shm")
    return kept
