"""Limits on what one client can push at the server: bodies, headers, connections, watch streams,
and a SIGTERM that always stops it. Each test runs a real `tether server` process (SQLite)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures.server import ServerProc, start_server


@pytest.fixture
def spawn(tmp_path) -> Iterator:
    started: list[ServerProc] = []

    def run(*extra: str) -> ServerProc:
        s = start_server(f"sqlite://{tmp_path}/s{len(started)}/tether.db", str(tmp_path / f"s{len(started)}"), *extra)
        started.append(s)
        return s

    yield run
    for s in started:
        s.kill()


def connect(s: ServerProc, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", s.port))
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes (or resets) the connection within `seconds`, whatever it sent."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if r:
            try:
                if sock.recv(1 << 16) == b"":
                    return True
            except ConnectionResetError:
                return True
    return False


def watch_request(s: ServerProc, after: int = 0) -> bytes:
    return (f"GET /api/v1/watch?after_revision={after}&bookmark_interval=1 HTTP/1.1\r\nHost: t\r\n"
            f"Authorization: Bearer {s.token}\r\n\r\n").encode()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# --- bodies -----------------------------------------------------------------------------------------

def test_body_over_the_limit_is_refused_with_413(spawn) -> None:
    s = spawn()
    with s.http() as h:
        big = {"name": "x", "labels": {"a": "b" * (2 << 20)}}
        r = h.put("/api/v1/namespaces/x", json=big)
        assert r.status_code == 413
        assert "larger than 1048576 bytes" in r.json()["detail"] and "--max-body" in r.json()["detail"]
        assert h.get("/api/v1/namespaces/x").status_code == 404
        assert h.put("/api/v1/namespaces/x", json={"name": "x"}).status_code == 201


def test_body_limit_is_a_flag(spawn) -> None:
    s = spawn("--max-body", "4096")
    with s.http() as h:
        r = h.put("/api/v1/namespaces/x", json={"name": "x", "labels": {"a": "b" * 5000}})
        assert r.status_code == 413 and "4096" in r.json()["detail"]


def test_chunked_body_is_refused_once_past_the_limit_before_it_is_all_sent(spawn) -> None:
    s = spawn()
    sock = connect(s)
    sock.sendall(b"PUT /api/v1/namespaces/x HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\nAuthorization: Bearer " + s.token.encode() + b"\r\n\r\n")
    chunk = b"a" * 65536
    sent, answer = 0, b""
    sock.settimeout(5)
    try:
        while sent < 8 << 20:  # a client that would send 8 MiB
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            if select.select([sock], [], [], 0.01)[0]:
                answer = sock.recv(4096)
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    if not answer:
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent <= 3 << 20, f"the server read {sent} bytes before refusing"


# --- headers and connections ------------------------------------------------------------------------

def test_connections_that_never_finish_their_headers_are_closed(spawn) -> None:
    s = spawn("--header-timeout", "1")
    silent = connect(s)
    partial = connect(s)
    partial.sendall(b"GET /api/v1/hosts HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
    dribble = connect(s)
    t0 = time.monotonic()
    for i in range(4):  # a byte now and then does not extend the deadline
        dribble.sendall(b"GET /api/v1/hosts HTTP/1.1\r\n"[i:i + 1])
        time.sleep(0.2)
    assert closed_within(silent, 3), "a connection that sent nothing was kept"
    assert closed_within(partial, 3), "a connection with half its headers was kept"
    assert closed_within(dribble, 3)
    assert time.monotonic() - t0 < 4
    with s.http() as h:  # the server itself is fine
        assert h.get("/api/v1/hosts").status_code == 200


def test_keep_alive_connection_idle_past_the_timeout_is_closed(spawn) -> None:
    s = spawn("--idle-timeout", "1")
    sock = connect(s)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    assert closed_within(sock, 3)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_connection_cap_holds_and_new_clients_still_get_in(spawn) -> None:
    s = spawn("--max-connections", "20", "--header-timeout", "30")
    assert s.proc is not None
    base = open_fds(s.proc.pid)
    idle = [connect(s) for _ in range(100)]
    time.sleep(0.5)
    assert open_fds(s.proc.pid) <= base + 22, "the server holds more connections than --max-connections"
    with s.http() as h:  # a real client displaces a connection that never sent a request
        assert h.get("/api/v1/hosts").status_code == 200
    for sock in idle:
        sock.close()


# --- watches ----------------------------------------------------------------------------------------

def test_bookmark_interval_under_a_second_is_refused(spawn) -> None:
    s = spawn()
    with s.http() as h:
        for value in ("0", "0.01", "-1"):
            r = h.get("/api/v1/watch", params={"after_revision": 0, "bookmark_interval": value})
            assert r.status_code == 422, value
            assert "bookmark_interval" in r.json()["detail"]


def test_watch_streams_per_client_are_capped(spawn) -> None:
    s = spawn("--max-watches-per-client", "3")
    socks = [connect(s) for _ in range(3)]
    for sock in socks:
        sock.sendall(watch_request(s))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    with s.http() as h:
        r = h.get("/api/v1/watch", params={"after_revision": 0})
        assert r.status_code == 429 and "--max-watches-per-client" in r.json()["detail"]
        socks.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the slot comes back once the server sees the close
            with h.stream("GET", "/api/v1/watch", params={"after_revision": 0}) as r:
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
            time.sleep(0.1)
        assert r.status_code == 200
    for sock in socks:
        sock.close()


def test_watch_streams_in_all_are_capped(spawn) -> None:
    s = spawn("--max-watches", "2")
    socks = [connect(s) for _ in range(2)]
    for sock in socks:
        sock.sendall(watch_request(s))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    with s.http() as h:
        r = h.get("/api/v1/watch", params={"after_revision": 0})
        assert r.status_code == 503 and "--max-watches" in r.json()["detail"]


def test_watch_from_too_far_back_is_told_to_resync(spawn) -> None:
    s = spawn("--watch-max-replay", "5")
    with s.http() as h:
        for i in range(10):
            assert h.put(f"/api/v1/namespaces/n{i}", json={"name": f"n{i}"}).status_code == 201
        head = h.get("/api/v1/snapshot").json()["revision"]
        lines = h.get("/api/v1/watch", params={"after_revision": 0}).text.splitlines()
        assert len(lines) == 1
        first = json.loads(lines[0])
        assert first["type"] == "resync" and first["revision"] == head and "behind" in first["reason"]
        assert first["relist"] is True, "the history is out of reach: the client must list"
        with h.stream("GET", "/api/v1/watch", params={"after_revision": head - 3}) as r:  # close enough
            first = json.loads(next(r.iter_lines()))
        assert first["type"] == "put" and first["revision"] == head - 2


def test_a_watch_from_ahead_of_the_store_is_told_to_relist(spawn) -> None:
    """An agent that watched a store since restored from a backup holds revisions the store has not
    reached: waiting for them would leave it stale for good."""
    s = spawn()
    with s.http() as h:
        head = h.get("/api/v1/snapshot").json()["revision"]
        first = json.loads(h.get("/api/v1/watch", params={"after_revision": head + 50}).text.splitlines()[0])
    assert first["type"] == "resync" and first["relist"] is True and "ahead" in first["reason"]


def test_a_watcher_cut_for_falling_behind_resumes_from_its_last_event(spawn) -> None:
    """Cut with `relist: false` and the last revision it was sent: watching again from there gets
    the rest, with no event lost or repeated (one missed event never costs a full list)."""
    s = spawn("--watch-buffer", "16384", "--watch-stall", "1", "--write-timeout", "30", "--send-buffer", "16384")
    sock = connect(s, rcvbuf=4096)
    sock.sendall(watch_request(s))
    time.sleep(0.5)
    label = "v" * 60
    with s.http() as h:
        for i in range(200):
            body = {"name": f"n{i}", "labels": {f"k{j}": label for j in range(12)}}
            assert h.put(f"/api/v1/namespaces/n{i}", json=body).status_code == 201
        time.sleep(2.5)  # over --watch-stall without reading
        data = b""
        sock.settimeout(10)
        while not data.endswith(b"0\r\n\r\n"):
            got = sock.recv(1 << 16)
            if not got:
                break
            data += got
        sock.close()
        events = [json.loads(x) for x in data.split(b"\r\n") if x.startswith(b"{")]
        cut = events[-1]
        assert cut["type"] == "resync" and cut["relist"] is False and "fell behind" in cut["reason"], cut
        received = [e["key"] for e in events if e["type"] == "put"]
        assert received and cut["revision"] == events[-2]["revision"]
        with h.stream("GET", "/api/v1/watch", params={"after_revision": cut["revision"], "bookmark_interval": 1}) as r:
            for line in r.iter_lines():
                ev = json.loads(line)
                if ev["type"] == "bookmark":
                    break
                received.append(ev["key"])
    names = [k.rsplit("/", 1)[1] for k in received]
    assert names == ["default"] * (names[:1] == ["default"]) + [f"n{i}" for i in range(200)], \
        "events were lost or repeated across the cut"


def test_a_watcher_that_stops_reading_is_cut_off_and_memory_stays_flat(spawn) -> None:
    s = spawn("--watch-buffer", "65536", "--watch-stall", "1", "--write-timeout", "3", "--send-buffer", "16384")
    assert s.proc is not None
    stalled = []
    for _ in range(10):
        sock = connect(s, rcvbuf=4096)
        sock.sendall(watch_request(s))
        stalled.append(sock)
    time.sleep(0.5)
    rss0 = rss_mb(s.proc.pid)
    label = "v" * 60
    with s.http() as h:
        for i in range(300):  # about 1 MB of events for each watcher, which reads none of them
            body = {"name": f"n{i}", "labels": {f"k{j}": label for j in range(12)}}
            assert h.put(f"/api/v1/namespaces/n{i}", json=body).status_code == 201
        growth = rss_mb(s.proc.pid) - rss0
        time.sleep(5)  # --write-timeout and then some, without reading
        for sock in stalled:
            assert closed_within(sock, 1), "a watcher that never reads was kept"
        assert growth < 40, f"the server grew by {growth:.0f} MB for 10 stalled watchers"
        # a watcher that reads on gets every event
        with h.stream("GET", "/api/v1/watch", params={"after_revision": 0, "bookmark_interval": 1}) as r:
            seen, deadline = 0, time.monotonic() + 20
            for line in r.iter_lines():
                seen += json.loads(line)["type"] == "put"
                if seen == 301 or time.monotonic() > deadline:
                    break
        assert seen == 301  # the default namespace and ours


def test_sigterm_stops_the_server_within_5s_with_open_and_stalled_watches(spawn) -> None:
    s = spawn("--write-timeout", "60")
    assert s.proc is not None
    socks = []
    for i in range(20):
        sock = connect(s, rcvbuf=4096 if i % 2 else None)
        sock.sendall(watch_request(s))
        socks.append(sock)
    half = [connect(s) for _ in range(5)]  # and a few that never finish their headers
    for sock in half:
        sock.sendall(b"GET /api/v1/hosts HTTP/1.1\r\n")
    with httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {s.token}"}) as h:
        for i in range(200):  # enough events that the stalled watchers' buffers are full
            assert h.put(f"/api/v1/namespaces/n{i}",
                         json={"name": f"n{i}", "labels": {"k": "v" * 60}}).status_code == 201
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(15)
    took = time.monotonic() - t0
    assert took < 5, f"SIGTERM took {took:.1f} s"
    for sock in socks + half:
        sock.close()
