"""GET /api/v1/snapshot at 10,000 endpoints: the server's CPU per request with each object's bytes
encoded once (tether.server.wire) against the old encoding (every stored value decoded and dumped
to a dict, FastAPI encoding the whole dict), both served by one server process over one store in
the same run, and the server's RSS while many agents ask at once.

    .venv/bin/python -m bench.snapshot [--store sqlite|etcd] [--size 100,10000] [--requests 10]
                                       [--burst 100] [--old-burst 20]

The old encoding lives here only, as a route the bench's server adds (`--serve-old`: the tether
server plus GET /api/v1/bench-old-snapshot, the handler as it was). A size is "hosts,endpoints"
(policies = endpoints/10, services = endpoints/20, as bench/fanout.py). Measured (server process
user+system CPU from /proc; the client reads and drops the bytes):
- new, cold: the first request (every object encoded);
- new, same revision: requests with no write between them (the last body sent again);
- new, revision moved: a write (one namespace's labels) before each request, the writes' own CPU
  measured alone and subtracted: one object encoded, every other one from the cache;
- old: sequential requests; the ratio old / new (revision moved) is the figure to keep;
- bursts of concurrent requests (agents starting at once), new and old: CPU per request, wall time
  and the server's peak RSS (sampled every 20 ms); the old burst runs last (its garbage stays).
Before the timing, the old and new bodies at one revision are checked to parse to the same JSON.
Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import httpx
from fastapi import Request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.server import ServerProc, start_server  # noqa: E402

from bench.fanout import populate  # noqa: E402
from bench.procstat import cpu_s, rss_mb  # noqa: E402

OLD = "/api/v1/bench-old-snapshot"
NEW = "/api/v1/snapshot"


def serve_old(argv: list[str]) -> None:
    """The tether server with the old snapshot handler added as OLD (the reference, bench only)."""
    from tether.model import PREFIX, kind_of_key
    from tether.server.api import router
    from tether.server.main import main
    from tether.server.wire import wire_object

    @router.get(OLD.removeprefix("/api/v1"))
    async def old_snapshot(request: Request) -> dict:
        listed = await request.app.state.objects.store.list(PREFIX)
        out = []
        for kv in listed.items:
            kind = kind_of_key(kv.key)
            if kind is not None:
                out.append({"kind": kind, "object": wire_object(kv.key, kv.value, kv.mod_revision)})
        return {"revision": listed.revision, "objects": out}

    main(argv)


class PeakRss:
    """The server's highest RSS while the block runs (sampled every 20 ms in a thread)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def __enter__(self) -> PeakRss:
        def sample() -> None:
            while not self.stop.is_set():
                self.peak = max(self.peak, rss_mb(self.pid))
                time.sleep(0.02)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self.thread.join()


async def fetch(http: httpx.AsyncClient, path: str) -> int:
    """One request, its body read and dropped (as many at once as agents: not kept): its size."""
    n = 0
    async with http.stream("GET", path, timeout=httpx.Timeout(600)) as r:
        r.raise_for_status()
        async for chunk in r.aiter_raw():
            n += len(chunk)
    return n


async def measure(srv: ServerProc, hosts: int, endpoints: int, requests: int, burst: int, old_burst: int) -> dict:
    pid = srv.proc.pid
    headers = {"Authorization": f"Bearer {srv.token}"}
    limits = httpx.Limits(max_connections=burst + 20, max_keepalive_connections=burst + 20)
    async with httpx.AsyncClient(base_url=srv.url, headers=headers, timeout=120, limits=limits) as http:
        t0 = time.monotonic()
        await populate(http, hosts, endpoints)
        out: dict = {"hosts": hosts, "endpoints": endpoints, "policies": endpoints // 10,
                     "services": endpoints // 20, "populate_s": round(time.monotonic() - t0, 1)}
        await asyncio.sleep(1)
        out["server_rss_mb_populated"] = rss_mb(pid)

        async def cpu_of(call, n: int = 1) -> float:
            """Server CPU ms per call, over n calls one after the other."""
            c0 = cpu_s(pid, children=False)
            for _ in range(n):
                await call()
            return (cpu_s(pid, children=False) - c0) / n * 1e3

        mark = iter(range(1, 1 << 30))

        async def write() -> None:
            r = await http.put("/api/v1/namespaces/ns0", json={"name": "ns0", "labels": {"bench": str(next(mark))}})
            r.raise_for_status()

        out["new_cold_cpu_ms"] = round(await cpu_of(lambda: fetch(http, NEW)), 1)
        out["body_bytes"] = await fetch(http, NEW)
        out["new_same_revision_cpu_ms"] = round(await cpu_of(lambda: fetch(http, NEW), requests), 2)
        write_ms = await cpu_of(write, requests)

        async def write_then_fetch() -> None:
            await write()
            await fetch(http, NEW)

        out["write_cpu_ms"] = round(write_ms, 2)
        out["new_moved_cpu_ms"] = round(await cpu_of(write_then_fetch, requests) - write_ms, 2)
        out["server_rss_mb_after_new"] = rss_mb(pid)

        async def together(path: str, n: int) -> dict:
            with PeakRss(pid) as peak:
                c0, t0 = cpu_s(pid, children=False), time.monotonic()
                sizes = await asyncio.gather(*(fetch(http, path) for _ in range(n)), return_exceptions=True)
                wall, cpu = time.monotonic() - t0, cpu_s(pid, children=False) - c0
            # failed: an error status (503: the store did not answer in time), or a body cut off (one
            # process reads every body here, agents one each: one it leaves unread --write-timeout s)
            failed = [str(x).split("\n")[0] for x in sizes if isinstance(x, Exception)]
            return {"requests": n, "cpu_ms_per_request": round(cpu / n * 1e3, 1), "wall_s": round(wall, 2),
                    "server_rss_mb_peak": peak.peak, "failed": len(failed), "failed_first": failed[:1]}

        await write()  # a revision this burst's first request lists
        out["new_burst"] = await together(NEW, burst)

        new_body = json.loads((await http.get(NEW)).content)  # the same revision: nothing writes
        old_body = json.loads((await http.get(OLD)).content)
        out["same_content"] = new_body == old_body
        out["objects"] = len(new_body["objects"])
        del new_body, old_body

        out["old_cpu_ms"] = round(await cpu_of(lambda: fetch(http, OLD), max(2, requests // 2)), 1)
        out["old_burst"] = await together(OLD, old_burst)
        out["server_rss_mb_after_old"] = rss_mb(pid)
    out["ratio_old_over_new_moved"] = round(out["old_cpu_ms"] / max(out["new_moved_cpu_ms"], 1e-3), 1)
    out["ratio_old_over_new_same_revision"] = round(out["old_cpu_ms"] / max(out["new_same_revision_cpu_ms"], 1e-3), 1)
    return out


def main() -> None:
    if "--serve-old" in sys.argv:
        serve_old([a for a in sys.argv[1:] if a != "--serve-old"])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite")
    p.add_argument("--size", default="100,10000", help="hosts,endpoints (default %(default)s)")
    p.add_argument("--requests", type=int, default=10, help="sequential requests per figure (default %(default)s)")
    p.add_argument("--burst", type=int, default=100, help="concurrent requests, new encoding (default %(default)s)")
    p.add_argument("--old-burst", type=int, default=20,
                   help="concurrent requests, old encoding (default %(default)s)")
    a = p.parse_args()
    hosts, endpoints = (int(x) for x in a.size.split(","))
    base = tempfile.mkdtemp(prefix="tether-bench-snapshot-")
    etcd = None
    try:
        if a.store == "etcd":
            from tests.fixtures.etcd import start_etcd

            os.makedirs(os.path.join(base, "etcd"))
            etcd = start_etcd(os.path.join(base, "etcd"))
            url = etcd.url
        else:
            url = f"sqlite:///{base}/server/tether.db"
        srv = start_server(url, os.path.join(base, "server"), "--serve-old", module="bench.snapshot")
        try:
            result = asyncio.run(measure(srv, hosts, endpoints, a.requests, a.burst, a.old_burst))
        finally:
            srv.stop()
    finally:
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"store": a.store, **result}, indent=2))


if __name__ == "__main__":
    main()
