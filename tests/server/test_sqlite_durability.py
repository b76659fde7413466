"""The SQLite store as safe as its promise, proven on a real `tether server` process: no
acknowledged endpoint is lost to kill -9 or to a power loss, a full disk answers 503, a database
the server cannot use stops it with one line and an exit code, and backup/restore work on a
running server."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from bench.ipam import prepare

from tests.fixtures.disk import fill, small_filesystem
from tests.fixtures.server import ServerProc, start_server
from tests.server.test_durability import assert_consistent


def sqlite_server(state_dir: str) -> ServerProc:
    return start_server(f"sqlite://{state_dir}/tether.db", state_dir)


def write_storm(server: ServerProc, network: str, writers: int, stop: threading.Event) -> tuple[list, list]:
    """Start `writers` threads creating endpoints until `stop`; returns (acknowledged ids, threads)."""
    acknowledged: list[str] = []

    def writer(i: int) -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=5) as h:
            n = 0
            while not stop.is_set():
                try:
                    r = h.post("/api/v1/endpoints", json={"name": f"w{i}-{n}", "network": network, "host": f"h{i}"})
                    if r.status_code == 201:
                        acknowledged.append(r.json()["id"])
                except httpx.TransportError:
                    time.sleep(0.05)
                n += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    return acknowledged, threads


def endpoint_ids(server: ServerProc, network: str) -> set[str]:
    return {e["id"] for e in server.client().list_raw("Endpoint", network=network)}


def test_kill9_under_write_load_loses_no_acknowledged_endpoint(tmp_path) -> None:
    s = sqlite_server(str(tmp_path / "server"))
    try:
        prepare(s.url, s.token, "k9", "10.72.0.0/16", [f"h{i}" for i in range(4)])
        stop = threading.Event()
        acknowledged, threads = write_storm(s, "k9", 4, stop)
        try:
            time.sleep(2.5)
            os.kill(s.proc.pid, signal.SIGKILL)  # by PID, mid-storm
            s.proc.wait()
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert len(acknowledged) > 50, "the storm did not get going"
        s.start()
        missing = set(acknowledged) - endpoint_ids(s, "k9")
        assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged endpoints lost"
        assert_consistent(s, "k9")
    finally:
        s.stop()


def test_a_power_loss_copy_taken_before_the_checkpoint_holds_every_acknowledged_endpoint(tmp_path) -> None:
    """The files as a power loss would leave them right after the last acknowledgement: the
    database file and its WAL (not the -shm index, which lives in memory), taken while the server
    runs, before any checkpoint folds the WAL in. Opened elsewhere, they hold every acknowledged
    endpoint. (That the WAL was on disk, not only in the page cache, when each write was answered
    is the next test.)"""
    s = sqlite_server(str(tmp_path / "server"))
    try:
        prepare(s.url, s.token, "pl", "10.73.0.0/16", [f"h{i}" for i in range(4)])
        stop = threading.Event()
        acknowledged, threads = write_storm(s, "pl", 4, stop)
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join()
        db = os.path.join(s.state_dir, "tether.db")
        copy_dir, db_only_dir = tmp_path / "copy", tmp_path / "db-only"
        copy_dir.mkdir()
        db_only_dir.mkdir()
        shutil.copyfile(db + "-wal", copy_dir / "tether.db-wal")
        shutil.copyfile(db, copy_dir / "tether.db")
        shutil.copyfile(db, db_only_dir / "tether.db")
        for d in (copy_dir, db_only_dir):  # the store holds the admin token's hash: the same token opens it
            shutil.copyfile(os.path.join(s.state_dir, "token"), d / "token")
        assert s.proc.poll() is None  # the server was running all along: no clean-shutdown checkpoint
    finally:
        s.stop()
    assert len(acknowledged) > 30, "the storm did not get going"
    without_wal = sqlite_server(str(db_only_dir))
    try:
        # the last acknowledged writes were in the WAL only: the copy is from between ack and checkpoint
        assert set(acknowledged) - endpoint_ids(without_wal, "pl")
    finally:
        without_wal.stop()
    recovered = sqlite_server(str(copy_dir))
    try:
        missing = set(acknowledged) - endpoint_ids(recovered, "pl")
        assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged endpoints lost"
        assert_consistent(recovered, "pl")
    finally:
        recovered.stop()


SYNC = re.compile(r"^(?:\d+\s+)?(\d+\.\d+) f(?:data)?sync\(\d+<([^>]*)>")


def test_every_acknowledged_write_is_synced_to_disk_before_its_answer(tmp_path) -> None:
    """A power loss keeps what was fsync'd: strace shows the WAL synced inside every write's
    request/answer window. (With synchronous=NORMAL the WAL was synced only at checkpoints, so a
    power loss could take acknowledged writes with it.)"""
    s = sqlite_server(str(tmp_path / "server"))
    trace = tmp_path / "strace.txt"
    tracer = None
    try:
        prepare(s.url, s.token, "fs", "10.74.0.0/16", ["h0"])
        tracer = subprocess.Popen(["strace", "-f", "-ttt", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace),
                                   "-p", str(s.proc.pid)], stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached to every thread
        windows = []
        with s.http() as h:
            for i in range(20):
                t0 = time.time()
                r = h.post("/api/v1/endpoints", json={"name": f"e{i}", "network": "fs", "host": "h0"})
                windows.append((t0, time.time()))
                assert r.status_code == 201, r.text
    finally:
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(10)
        s.stop()
    syncs = [float(m.group(1)) for line in trace.read_text().splitlines()
             if (m := SYNC.match(line)) and m.group(2).endswith("tether.db-wal")]
    unsynced = [w for w in windows if not any(w[0] <= t <= w[1] for t in syncs)]
    assert not unsynced, f"{len(unsynced)} of {len(windows)} writes were answered before the WAL was synced"


@pytest.mark.root  # mounts a small filesystem
def test_a_full_disk_answers_503_with_a_message_and_the_store_stays_consistent() -> None:
    with small_filesystem("24m") as d:
        s = sqlite_server(d)
        try:
            prepare(s.url, s.token, "full", "10.75.0.0/16", ["h0"])
            with s.http() as h:
                for i in range(5):
                    r = h.post("/api/v1/endpoints", json={"name": f"a{i}", "network": "full", "host": "h0"})
                    assert r.status_code == 201, r.text
                filler = fill(d)
                answers = []
                for i in range(300):
                    r = h.post("/api/v1/endpoints", json={"name": f"b{i}", "network": "full", "host": "h0",
                                                          "labels": {"pad": "x" * 60}})
                    answers.append(r.status_code)
                    if r.status_code == 503:
                        assert "full" in r.json()["detail"] and d in r.json()["detail"]
                        break
                assert answers[-1] == 503 and set(answers) <= {201, 503}, answers
                assert h.get("/api/v1/endpoints").status_code == 200  # reads go on
                health = h.get("/healthz")  # but the store takes no writes: unhealthy, and why
                assert health.status_code == 503, health.text
                assert any("is full" in p and d in p for p in health.json()["problems"]), health.text
                assert "CANNOT TAKE WRITES" in cli_status(s) and "is full" in cli_status(s)
                os.unlink(filler)
                assert h.get("/healthz").status_code == 200  # space freed: healthy before any write
                assert h.post("/api/v1/endpoints", json={"name": "after", "network": "full",
                                                         "host": "h0"}).status_code == 201
                assert "store: takes writes" in cli_status(s)
            eps, _ = assert_consistent(s, "full")
            assert eps == 5 + answers.count(201) + 1
        finally:
            s.stop()


def cli_status(s: ServerProc) -> str:
    r = subprocess.run([sys.executable, "-m", "tether.cli.main", "status", "--server", s.url, "--token", s.token],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def run_server_on(db_path: str, state_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tether.cli.main", "server", "--store", f"sqlite://{db_path}",
                           "--state-dir", state_dir, "--listen", f"unix://{state_dir}/s.sock"],
                          capture_output=True, text=True, timeout=60)


def test_a_corrupt_database_stops_the_server_with_one_line_and_exit_code_65(tmp_path) -> None:
    db = tmp_path / "tether.db"
    db.write_bytes(b"SQLite format 3\0" + os.urandom(16_000))
    out = run_server_on(str(db), str(tmp_path))
    assert out.returncode == 65, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert str(db) in lines[0] and "corrupt" in lines[0] and "tether server restore --from" in lines[0]


@pytest.mark.root  # mounts a small filesystem
def test_an_unwritable_database_stops_the_server_with_one_line_and_exit_code_74(tmp_path) -> None:
    with small_filesystem("4m") as d:
        db = os.path.join(d, "tether.db")
        open(db, "wb").close()
        subprocess.run(["mount", "-o", "remount,ro", d], check=True)
        out = run_server_on(db, str(tmp_path))
    assert out.returncode == 74, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert db in lines[0] and "cannot be opened for writing" in lines[0]


def tether(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tether.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.timeout(180)
def test_backup_of_a_running_server_and_restore_after_it_stopped(tmp_path) -> None:
    s = sqlite_server(str(tmp_path / "server"))
    store = f"sqlite://{s.state_dir}/tether.db"
    backup_file = str(tmp_path / "tether-backup.db")
    try:
        prepare(s.url, s.token, "bk", "10.76.0.0/16", [f"h{i}" for i in range(2)])
        stop = threading.Event()
        acknowledged, threads = write_storm(s, "bk", 2, stop)
        try:
            time.sleep(1.0)
            before = len(acknowledged)
            out = tether("server", "backup", "--store", store, "--to", backup_file)
            after = len(acknowledged)
            assert out.returncode == 0, out.stderr
            refused = tether("server", "restore", "--store", store, "--from", backup_file)
            assert refused.returncode == 1 and "stop it first" in refused.stderr, refused.stderr
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert len(endpoint_ids(s, "bk")) > after  # the server kept writing during the backup
    finally:
        s.stop()
    out = tether("server", "restore", "--store", store, "--from", backup_file)
    assert out.returncode == 0, out.stderr
    assert "before-restore" in out.stdout
    s.start()
    try:
        restored = endpoint_ids(s, "bk")
        assert set(acknowledged[:before]) <= restored <= set(acknowledged[:after + 2])
        assert_consistent(s, "bk")
    finally:
        s.stop()
