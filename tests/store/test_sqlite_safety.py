"""The SQLite engine keeps its promise: acknowledged writes are durable, its work never blocks the
event loop, a full disk or a foreign lock is a store error the API turns into 503, a database it
cannot use is refused with what to do, and backup/restore keep agents' watches honest."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import time

import pytest

from tests.fixtures.disk import fill, small_filesystem
from tests.store.test_store_semantics import collect
from tether.store import sqlite as engine
from tether.store.base import Compacted, Unavailable
from tether.store.sqlite import (
    EXIT_CORRUPT,
    EXIT_IN_USE,
    EXIT_UNWRITABLE,
    DatabaseUnusable,
    SqliteStore,
    backup,
    restore,
)

P = "/tether/v1/test/"


async def test_both_connections_sync_every_commit(tmp_path) -> None:
    store = SqliteStore(str(tmp_path / "t.db"))
    try:
        assert store._wdb.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._wdb.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await store.close()


async def test_a_write_waiting_for_the_database_lock_does_not_block_the_event_loop(tmp_path) -> None:
    """Another process holds the write lock for 1.5 s: the write waits in the store's thread while
    the loop keeps running other requests (on the old engine the whole server froze)."""
    path = str(tmp_path / "t.db")
    store = SqliteStore(path)
    await store.put(P + "a", b"1")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    try:
        write = asyncio.create_task(store.put(P + "b", b"2"))
        await asyncio.sleep(0.3)
        assert not write.done()
        assert (await store.get(P + "a")).value == b"1"  # reads go on beside the waiting write
        await asyncio.get_running_loop().run_in_executor(None, time.sleep, 1.2)
        other.execute("ROLLBACK")
        await asyncio.wait_for(write, 5)
        assert (await store.get(P + "b")).value == b"2"
        assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f} s"
    finally:
        tick.cancel()
        other.close()
        await store.close()


async def test_a_lock_held_past_the_busy_timeout_is_unavailable_not_a_hang(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(engine, "BUSY_TIMEOUT", 0.3)
    path = str(tmp_path / "t.db")
    store = SqliteStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="locked by another process"):
            await store.put(P + "a", b"1")
        assert time.monotonic() - t0 < 3
    finally:
        other.execute("ROLLBACK")
        other.close()
    await store.put(P + "a", b"1")  # and works again once the lock is gone
    await store.close()


async def test_watchers_are_woken_by_each_commit_without_waiting_for_the_poll(tmp_path) -> None:
    """Reads and writes run in threads now; a commit that lands between a watcher's read and its
    wait must still wake it (the poll here is 20 s, so a missed wake-up shows as a timeout)."""
    store = SqliteStore(str(tmp_path / "t.db"), poll_interval=4.0)
    try:
        start = await store.revision()
        watcher = asyncio.create_task(collect(store, P, start, 300, timeout=30))
        for i in range(300):
            await store.put(P + str(i % 7), str(i).encode())
            if i % 10 == 0:
                await asyncio.sleep(0)
        events = await asyncio.wait_for(watcher, 10)
        assert [e.revision for e in events] == list(range(start + 1, start + 301))
        for i in range(20):  # one write at a time, each seen at once
            w = asyncio.create_task(collect(store, P, await store.revision(), 1, timeout=2))
            await asyncio.sleep(0.005 * (i % 4))
            await store.put(P + "x", b"%d" % i)
            assert (await w)[0].value == b"%d" % i
    finally:
        await store.close()


@pytest.mark.root  # mounts a small filesystem
async def test_disk_full_is_unavailable_and_leaves_the_store_consistent() -> None:
    with small_filesystem("4m") as d:
        store = SqliteStore(os.path.join(d, "t.db"))
        try:
            for i in range(20):
                await store.put(P + f"k{i}", b"v" * 1000)
            before = await store.revision()
            watcher = asyncio.create_task(collect(store, P, before, 2, timeout=60))
            filler = fill(d)
            failures = 0
            for i in range(50):
                try:
                    await store.put(P + f"big{i}", os.urandom(20_000))
                except Unavailable as e:
                    assert "full" in str(e) and d in str(e)
                    failures += 1
            assert failures >= 45, "the disk never filled up"
            assert any("is full" in p for p in await store.problems())  # /healthz: unhealthy, and why
            acknowledged = await store.revision()
            written = {kv.key for kv in (await store.list(P)).items}
            assert len(written) == 20 + (acknowledged - before)  # each acknowledged write, none else
            os.unlink(filler)
            assert await store.problems() == []  # space freed: healthy again, before any write
            rev = await store.put(P + "after", b"1")
            assert rev == acknowledged + 1  # no revision was burnt by the failed writes
            if acknowledged == before:
                rev2 = await store.put(P + "after2", b"2")
                events = await watcher
                assert [e.revision for e in events] == [rev, rev2]
            else:
                watcher.cancel()
        finally:
            await store.close()


def damage_pages(path: str) -> None:
    """Overwrite the middle of a database file (not its header) with garbage."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(4096 * 2)
        f.write(os.urandom(min(size - 4096 * 2, 4096 * 4)))


async def make_db(path: str, n: int = 400) -> None:
    store = SqliteStore(path)
    for i in range(n):
        await store.put(P + f"k{i}", b"v" * 200)
    await store.close()  # checkpoints the WAL into the file


async def test_a_file_that_is_not_a_database_is_refused_as_corrupt(tmp_path) -> None:
    path = tmp_path / "t.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(DatabaseUnusable, match="is corrupt.*restore it from a backup") as e:
        SqliteStore(str(path))
    assert e.value.exit_code == EXIT_CORRUPT


async def test_a_database_with_damaged_pages_is_refused_as_corrupt(tmp_path) -> None:
    path = str(tmp_path / "t.db")
    await make_db(path)
    damage_pages(path)
    with pytest.raises(DatabaseUnusable, match="corrupt") as e:
        SqliteStore(path)
    assert e.value.exit_code == EXIT_CORRUPT


@pytest.mark.root  # mounts a small filesystem
async def test_a_database_on_a_read_only_filesystem_is_refused_as_unwritable() -> None:
    with small_filesystem("4m") as d:
        path = os.path.join(d, "t.db")
        await make_db(path, 5)
        subprocess.run(["mount", "-o", "remount,ro", d], check=True)
        with pytest.raises(DatabaseUnusable, match="cannot be opened for writing") as e:
            SqliteStore(path)
        assert e.value.exit_code == EXIT_UNWRITABLE


async def test_backup_while_writing_is_one_consistent_revision(tmp_path) -> None:
    path = str(tmp_path / "t.db")
    store = SqliteStore(path)
    stop = asyncio.Event()

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            await store.txn([], [engine.Put(P + "a", b"%d" % i), engine.Put(P + "b", b"%d" % i)])
            i += 1

    w = asyncio.create_task(writer())
    try:
        await asyncio.sleep(0.2)
        to = str(tmp_path / "backup.db")
        rev = await asyncio.get_running_loop().run_in_executor(None, backup, path, to)
        assert rev > 0
    finally:
        stop.set()
        await w
        await store.close()
    assert not os.path.exists(to + "-wal")  # one self-contained file
    copy = SqliteStore(to)
    try:
        a, b = await copy.get(P + "a"), await copy.get(P + "b")
        assert a.value == b.value and a.mod_revision == rev  # both keys of one transaction, at one revision
    finally:
        await copy.close()


async def test_restore_refuses_while_the_database_is_open_and_checks_the_backup_first(tmp_path) -> None:
    path, to = str(tmp_path / "t.db"), str(tmp_path / "backup.db")
    await make_db(path, 10)
    backup(path, to)
    store = SqliteStore(path)
    try:
        with pytest.raises(DatabaseUnusable, match="in use by a running tether server") as e:
            restore(path, to)
        assert e.value.exit_code == EXIT_IN_USE
    finally:
        await store.close()
    bad = str(tmp_path / "bad.db")
    await make_db(bad)
    damage_pages(bad)
    with pytest.raises(DatabaseUnusable, match="backup .* is not usable"):
        restore(path, bad)
    store = SqliteStore(path)  # untouched by the refused restore
    assert len((await store.list(P)).items) == 10
    await store.close()


async def test_restore_brings_back_the_backup_and_old_watch_positions_must_resync(tmp_path) -> None:
    path, to = str(tmp_path / "t.db"), str(tmp_path / "backup.db")
    store = SqliteStore(path)
    await store.put(P + "kept", b"1")
    backup(path, to)
    await store.put(P + "lost", b"2")
    agent_position = await store.revision()
    await store.close()
    rev, kept = restore(path, to)
    assert rev > agent_position and kept == path + ".before-restore"
    store = SqliteStore(path)
    try:
        listed = await store.list(P)
        assert [kv.key for kv in listed.items] == [P + "kept"] and listed.revision == rev
        with pytest.raises(Compacted):  # an agent watching from before the restore resyncs
            await collect(store, P, agent_position, 1, timeout=5)
        new = await store.put(P + "new", b"3")
        assert [e.key for e in await collect(store, P, rev, 1, timeout=5)] == [P + "new"] and new == rev + 1
    finally:
        await store.close()


async def test_transactions_committed_together_keep_one_revision_each_in_order_and_cas(tmp_path) -> None:
    """Group commit: writes waiting together share one WAL sync, yet each keeps its own revision, in
    the order they were submitted, and a compare sees the writes grouped before it."""
    store = SqliteStore(str(tmp_path / "t.db"))
    try:
        start = await store.revision()
        revs = await asyncio.gather(*(store.put(P + f"k{i}", b"%d" % i) for i in range(100)))
        assert revs == list(range(start + 1, start + 101))
        results = await asyncio.gather(*(store.create(P + "once", b"%d" % i) for i in range(50)),
                                       return_exceptions=True)
        winners = [r for r in results if isinstance(r, int)]
        assert len(winners) == 1 and all(isinstance(r, engine.Conflict) for r in results if r not in winners)
        assert (await store.get(P + "once")).mod_revision == winners[0] == await store.revision()
        events = await collect(store, P, start, 101, timeout=10)
        assert [e.revision for e in events] == list(range(start + 1, start + 102))
    finally:
        await store.close()


async def test_a_backup_never_overwrites_the_database_it_copies(tmp_path) -> None:
    path = str(tmp_path / "t.db")
    await make_db(path, 3)
    with pytest.raises(DatabaseUnusable, match="is the database itself"):
        backup(path, str(tmp_path / "." / "t.db"))
    store = SqliteStore(path)
    assert len((await store.list(P)).items) == 3
    await store.close()


@pytest.mark.parametrize("jump", [7200.0, -7200.0])
async def test_leases_ignore_a_wall_clock_jump(tmp_path, monkeypatch, jump) -> None:
    """An NTP step or `date -s` on the server's machine: a jump forward expired every lease at once
    (every host looked dead), a jump back kept an unrenewed lease alive for the jump's length.
    (etcd's leases run on etcd's clock; tests/faults/test_clock_jump.py jumps a real server's.)"""
    store = SqliteStore(str(tmp_path / "t.db"))
    try:
        kept = await store.grant_lease(30)
        await store.put(P + "kept", b"1", lease=kept)
        left = await store.grant_lease(1)
        await store.put(P + "left", b"1", lease=left)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + jump)
        assert await store.keepalive(kept)
        assert await store.get(P + "kept") is not None
        for _ in range(100):  # the 1 s lease still expires, after about 1 s (not 2 h later)
            if await store.get(P + "left") is None:
                break
            await asyncio.sleep(0.1)
        assert await store.get(P + "left") is None
        assert await store.get(P + "kept") is not None
    finally:
        await store.close()


async def test_a_lease_written_before_a_reboot_lives_at_most_its_ttl(tmp_path) -> None:
    """The monotonic clock restarts at boot: a lease whose expiry was written under a higher reading
    gets its TTL from now when the database is opened, instead of living for the old uptime."""
    path = str(tmp_path / "t.db")
    store = SqliteStore(path)
    lease = await store.grant_lease(1)
    await store.put(P + "k", b"1", lease=lease)
    await store.close()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE leases SET expires = expires + 1e7")  # as if written when uptime was 116 days longer
    db.close()
    store = SqliteStore(path)
    try:
        await store.put(P + "other", b"1")  # starts the housekeeping that expires leases
        for _ in range(100):
            if await store.get(P + "k") is None:
                break
            await asyncio.sleep(0.1)
        assert await store.get(P + "k") is None
    finally:
        await store.close()
