"""Endpoint creations per second through the API, SQLite vs etcd, N client processes as N hosts.

    .venv/bin/python -m bench.ipam [--endpoints 4000] [--procs 8]

Starts its own etcd and servers on loopback; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

import httpx

from tether.client import NODELAY


def _worker(url: str, token: str, network: str, host: str, count: int, out: mp.Queue) -> None:
    made = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60,
                      transport=httpx.HTTPTransport(socket_options=NODELAY)) as h:
        for i in range(count):
            r = h.post("/api/v1/endpoints", json={"name": f"{host}-{i}", "network": network, "host": host})
            if r.status_code != 201:
                out.put(("error", f"{r.status_code} {r.text}"))
                return
            d = r.json()
            made.append((d["id"], d["ips"][0], host))
    out.put(("ok", made))


def _deleter(url: str, token: str, ids: list[str], out: mp.Queue) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as h:
        for i in ids:
            r = h.delete(f"/api/v1/endpoints/{i}")
            if r.status_code != 204:
                out.put(("error", f"{r.status_code} {r.text}"))
                return
    out.put(("ok", len(ids)))


def _fan_out(target, arg_lists) -> tuple[list, float]:
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, q)) for args in arg_lists]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [q.get(timeout=1800) for _ in procs]
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join(30)
    errors = [r[1] for r in results if r[0] == "error"]
    if errors:
        raise RuntimeError("storm failed: " + errors[0])
    return [r[1] for r in results], elapsed


def create_storm(url: str, token: str, network: str, hosts: list[str], total: int) -> tuple[list, float]:
    """Create `total` endpoints, one process per host; returns ([(id, ip, host)...], seconds)."""
    per = total // len(hosts)
    results, elapsed = _fan_out(_worker, [(url, token, network, h, per) for h in hosts])
    return [x for r in results for x in r], elapsed


def delete_storm(url: str, token: str, ids: list[str], procs: int) -> float:
    chunks = [ids[i::procs] for i in range(procs)]
    return _fan_out(_deleter, [(url, token, c) for c in chunks])[1]


def prepare(url: str, token: str, network: str, cidr: str, hosts: list[str]) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as h:
        r = h.post("/api/v1/networks", json={"name": network, "subnets": [{"cidr": cidr}]})
        r.raise_for_status()
        for i, host in enumerate(hosts):
            h.put(f"/api/v1/hosts/{host}", json={"name": host, "underlay_ip": f"198.18.0.{i + 1}"}).raise_for_status()


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.fixtures.etcd import start_etcd
    from tests.fixtures.server import start_server

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--endpoints", type=int, default=4000)
    ap.add_argument("--procs", type=int, default=8)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tether-bench-ipam-")
    etcd = start_etcd(tmp)
    out = {"benchmark": "ipam", "endpoints": a.endpoints, "client_processes": a.procs, "engines": {}}
    try:
        for engine, url in (("sqlite", f"sqlite://{tmp}/bench.db"), ("etcd", etcd.url)):
            srv = start_server(url, os.path.join(tmp, engine), "--gc-interval", "0")
            try:
                hosts = [f"h{i}" for i in range(a.procs)]
                prepare(srv.url, srv.token, "bench", "10.64.0.0/14", hosts)
                made, secs = create_storm(srv.url, srv.token, "bench", hosts, a.endpoints)
                del_secs = delete_storm(srv.url, srv.token, [m[0] for m in made], a.procs)
                out["engines"][engine] = {"creates_per_s": round(len(made) / secs, 1),
                                          "deletes_per_s": round(len(made) / del_secs, 1),
                                          "create_seconds": round(secs, 2)}
            finally:
                srv.stop()
        s, e = out["engines"]["sqlite"], out["engines"]["etcd"]
        out["etcd_vs_sqlite_create_ratio"] = round(e["creates_per_s"] / s["creates_per_s"], 2)
    finally:
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
