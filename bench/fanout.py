"""The server's watch fan-out at two sizes, measured in one run: a real `tether server` (SQLite or
etcd) holding a cluster's objects, `--watchers` watch streams read in this process as agents read
them (GET /api/v1/watch, one JSON line per event), while a writer registers endpoints one by one.

    .venv/bin/python -m bench.fanout [--store sqlite|etcd] [--small 10,1000] [--large 100,10000] [--changes 100]

A size is "hosts,endpoints" (one watcher per host; policies = endpoints/10, services =
endpoints/20, as issue 29's 10,000 / 1,000 / 500). Per size: server CPU per change (ms, the server
process's user+system time over the writes divided by their number), server RSS (MB) with all
watchers open, watch bytes per change (all watchers together, and per watcher), and the writes'
wall time. The comparison: CPU per change large/small against 1.5 x the hosts ratio (issue 29's
target), and RSS against 500 MB. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.server import ServerProc, start_server  # noqa: E402

from bench.procstat import cpu_s, rss_mb  # noqa: E402

NETWORK = {"name": "bench", "subnets": [{"cidr": "10.128.0.0/9"}], "block_size": 26}


def endpoint(i: int, hosts: int, prefix: str = "h") -> dict:
    return {"name": f"ep{i}", "network": "bench", "host": f"{prefix}{i % hosts}", "namespace": f"ns{i % 20}",
            "labels": {"app": f"a{i % 500}", "tier": f"t{i % 7}"}}


def policy(i: int) -> dict:
    return {"name": f"p{i}", "namespace": f"ns{i % 20}",
            "spec": {"podSelector": {"matchLabels": {"app": f"a{i % 500}"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": f"a{(i * 7) % 500}"}}}],
                                  "ports": [{"protocol": "TCP", "port": 80 + i % 5}]}]}}


def service(i: int) -> dict:
    return {"name": f"s{i}", "namespace": f"ns{i % 20}", "network": "bench", "selector": {"app": f"a{i % 500}"},
            "ports": [{"port": 80, "target_port": 8080}]}


async def gather_limited(calls, concurrency: int = 16) -> None:
    """Run the coroutine factories, `concurrency` at a time (a runtime's CNI ADDs, many hosts at once)."""
    it = iter(calls)

    async def worker() -> None:
        for call in it:
            await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def populate(http: httpx.AsyncClient, hosts: int, endpoints: int, prefix: str = "h",
                   underlay: str = "198.18", network: dict = NETWORK) -> None:
    """`hosts` hosts named <prefix>N registered through the API (no agent: what a real agent on them
    would be sent is the same), the endpoints spread over them, 1 policy per 10, 1 service per 20."""
    async def ok(call) -> None:
        """One request, retried as a runtime would on a busy server (503, a CAS 409, a broken connection)."""
        for attempt in range(8):
            try:
                r = await call()
            except httpx.TransportError:
                if attempt == 7:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if r.status_code < 300 or (attempt and r.status_code == 409 and "already" in r.text):
                return  # (a retried create that had gone through)
            if r.status_code in (409, 503) and "retry" in r.text and attempt < 7:
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            raise RuntimeError(f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:300]}")

    await ok(lambda: http.post("/api/v1/networks", json=network))
    for n in range(20):
        await ok(lambda n=n: http.put(f"/api/v1/namespaces/ns{n}", json={"name": f"ns{n}"}))

    def host(h: int):
        async def call() -> None:
            body = {"name": f"{prefix}{h}", "underlay_ip": f"{underlay}.{h // 250}.{h % 250 + 1}"}
            await ok(lambda: http.put(f"/api/v1/hosts/{prefix}{h}", json=body))
        return call

    def ep(i: int):
        async def call() -> None:
            await ok(lambda: http.post("/api/v1/endpoints", json=endpoint(i, hosts, prefix)))
        return call

    def pol(i: int):
        async def call() -> None:
            p = policy(i)
            await ok(lambda: http.put(f"/api/v1/namespaces/{p['namespace']}/networkpolicies/{p['name']}", json=p))
        return call

    def svc(i: int):
        async def call() -> None:
            s = service(i)
            await ok(lambda: http.put(f"/api/v1/namespaces/{s['namespace']}/services/{s['name']}", json=s))
        return call

    await gather_limited((host(h) for h in range(hosts)), 1)  # one at a time: hosts share a guard key
    await gather_limited(ep(i) for i in range(endpoints))
    await gather_limited(pol(i) for i in range(endpoints // 10))
    # one at a time: concurrent services may pick the same free cluster IP (a 409 for the loser)
    await gather_limited((svc(i) for i in range(endpoints // 20)), 1)


class Watcher:
    """One agent's watch stream, reduced to what the server sees: a client reading lines."""

    def __init__(self, http: httpx.AsyncClient, after: int) -> None:
        self.http, self.after = http, after
        self.bytes = 0
        self.events = 0
        self.resyncs = 0
        self.revision = after
        self.seen = asyncio.Event()
        self.target = 0

    async def run(self) -> None:
        while True:
            async with self.http.stream("GET", "/api/v1/watch", params={"after_revision": self.revision},
                                        timeout=httpx.Timeout(10, read=None)) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    self.bytes += len(line) + 1
                    ev = json.loads(line)
                    if ev["type"] == "resync":
                        self.resyncs += 1
                        break
                    if ev["type"] == "bookmark":
                        continue
                    self.events += 1
                    self.revision = ev["revision"]
                    if self.revision >= self.target > 0:
                        self.seen.set()


async def measure(srv: ServerProc, hosts: int, endpoints: int, changes: int) -> dict:
    headers = {"Authorization": f"Bearer {srv.token}"}
    limits = httpx.Limits(max_connections=hosts + 40, max_keepalive_connections=hosts + 40)
    async with httpx.AsyncClient(base_url=srv.url, headers=headers, timeout=60, limits=limits) as http:
        t0 = time.monotonic()
        await populate(http, hosts, endpoints)
        populate_s = time.monotonic() - t0
        head = (await http.get("/api/v1/snapshot")).json()["revision"]
        watchers = [Watcher(http, head) for _ in range(hosts)]
        tasks = [asyncio.create_task(w.run()) for w in watchers]
        await asyncio.sleep(1.0)  # every stream open and idle
        rss_idle = rss_mb(srv.proc.pid)
        cpu0 = cpu_s(srv.proc.pid, children=False)
        t0 = time.monotonic()
        last = 0
        for i in range(changes):
            r = await http.post("/api/v1/endpoints", json=endpoint(endpoints + i, hosts))
            r.raise_for_status()
            last = r.json()["revision"]
        for w in watchers:
            w.target = last
            if w.revision >= last:
                w.seen.set()
        await asyncio.wait_for(asyncio.gather(*(w.seen.wait() for w in watchers)), 120)
        wall = time.monotonic() - t0
        cpu = cpu_s(srv.proc.pid, children=False) - cpu0
        rss = rss_mb(srv.proc.pid)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
    total_bytes = sum(w.bytes for w in watchers)
    return {"hosts": hosts, "watchers": hosts, "endpoints": endpoints, "policies": endpoints // 10,
            "services": endpoints // 20, "changes": changes, "populate_s": round(populate_s, 1),
            "server_cpu_ms_per_change": round(cpu / changes * 1e3, 3),
            "server_rss_mb_idle": round(rss_idle, 1), "server_rss_mb": round(rss, 1),
            "watch_bytes_per_change": round(total_bytes / changes), "watch_bytes_per_change_per_watcher":
            round(total_bytes / changes / hosts), "resyncs": sum(w.resyncs for w in watchers),
            "writes_wall_s": round(wall, 2)}


def run_size(store: str, size: str, changes: int, base: str) -> dict:
    hosts, endpoints = (int(x) for x in size.split(","))
    state = os.path.join(base, f"server-{hosts}-{endpoints}")
    etcd = None
    if store == "etcd":
        from tests.fixtures.etcd import start_etcd

        os.makedirs(os.path.join(base, f"etcd-{hosts}-{endpoints}"))
        etcd = start_etcd(os.path.join(base, f"etcd-{hosts}-{endpoints}"))
        url = etcd.url
    else:
        url = f"sqlite:///{state}/tether.db"
    srv = start_server(url, state, "--max-watches-per-client", str(hosts + 10))
    try:
        return asyncio.run(measure(srv, hosts, endpoints, changes))
    finally:
        srv.stop()
        if etcd is not None:
            etcd.stop() if hasattr(etcd, "stop") else etcd.proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite")
    p.add_argument("--small", default="10,1000", help="hosts,endpoints of the reference size (default %(default)s)")
    p.add_argument("--large", default="100,10000", help="hosts,endpoints of the target size (default %(default)s)")
    p.add_argument("--changes", type=int, default=100,
                   help="endpoints registered while measuring (default %(default)s)")
    a = p.parse_args()
    base = tempfile.mkdtemp(prefix="tether-bench-fanout-")
    try:
        small = run_size(a.store, a.small, a.changes, base)
        large = run_size(a.store, a.large, a.changes, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    hosts_ratio = large["hosts"] / small["hosts"]
    cpu_ratio = large["server_cpu_ms_per_change"] / max(small["server_cpu_ms_per_change"], 1e-9)
    print(json.dumps({"store": a.store, "small": small, "large": large, "hosts_ratio": hosts_ratio,
                      "server_cpu_ratio": round(cpu_ratio, 2), "server_cpu_target_ratio": 1.5 * hosts_ratio,
                      "server_cpu_ok": cpu_ratio <= 1.5 * hosts_ratio,
                      "server_rss_ok": large["server_rss_mb"] <= 500}, indent=2))


if __name__ == "__main__":
    main()
