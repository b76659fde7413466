"""A real agent at cluster size: its RSS, and how long a restarted agent takes to be fully
programmed, with a TCP stream through it that must not break (issue 29: 120 MB, 5 s at 10,000
endpoints / 1,000 policies / 500 services).

    sudo .venv/bin/python -m bench.agent_scale [--endpoints 10000] [--fake-hosts 98] [--restarts 2] [--settle 60]
        [--keep DIR]

A 2-host lab (real agents h1, h2 in their namespaces); `--fake-hosts` more hosts registered through
the API without agents carry the endpoints (1 policy per 10 endpoints, 1 service per 20), as
bench/fanout.py generates them. Pods a (h1) and b (h2) keep a TCP stream (tests/lab/tcp_stream.py)
while h1's agent is stopped (SIGTERM, or SIGKILL with --kill) and started again; a write made while
it was down makes sure the new process has to apply something. Restart time: process start -> the
host's status says applied at that revision. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fixtures.lab import make_lab, unique  # noqa: E402

from bench.fanout import endpoint, populate  # noqa: E402
from bench.procstat import rss_mb
from tether.lab.cluster import Lab, wait_for  # noqa: E402

STREAM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "lab", "tcp_stream.py")
NETWORK = {"name": "bench", "subnets": [{"cidr": "10.160.0.0/12"}], "block_size": 26}


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def applied(http: httpx.Client, host: str) -> int:
    status = http.get(f"/api/v1/hosts/{host}").json().get("status") or {}
    return int(status.get("applied_revision") or 0)


def wait_applied(http: httpx.Client, host: str, revision: int, timeout: float) -> float:
    t0 = time.monotonic()
    while applied(http, host) < revision:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{host} did not report revision {revision} within {timeout} s")
        time.sleep(0.05)
    return time.monotonic()


def measure(lab: Lab, endpoints: int, fake_hosts: int, restarts: int, kill: bool, settle: float = 0) -> dict:
    headers = {"Authorization": f"Bearer {lab.token}"}
    t0 = time.monotonic()

    async def load() -> None:
        async with httpx.AsyncClient(base_url=lab.server_url, headers=headers, timeout=60) as h:
            await populate(h, fake_hosts, endpoints, prefix="f", underlay="198.19", network=NETWORK)
    asyncio.run(load())
    populate_s = time.monotonic() - t0
    http = httpx.Client(base_url=lab.server_url, headers=headers, timeout=60)
    a = lab.run_pod("h1", "a", "bench")
    b = lab.run_pod("h2", "b", "bench")
    assert lab.reaches("h1/a", b.ip, within=60), "the pods do not reach each other"
    head = http.get("/api/v1/snapshot").json()["revision"]
    wait_applied(http, "h1", head, 120)
    pid = lab.host("h1").agent_pid
    assert pid is not None
    out: dict = {"endpoints": endpoints + 2, "policies": endpoints // 10, "services": endpoints // 20,
                 "hosts": fake_hosts + 2, "populate_s": round(populate_s, 1),
                 "agent_rss_mb": round(rss_mb(pid), 1),
                 "agent_children_rss_mb": round(sum(rss_mb(c) for c in children(pid)), 1),
                 "agent_children": [open(f"/proc/{c}/comm").read().strip() for c in children(pid)], "restarts": []}
    if settle:  # after reconcile passes, peer probes and heartbeats: what a running agent holds
        time.sleep(settle)
        out["agent_rss_mb_settled"] = round(rss_mb(pid), 1)
    for i in range(restarts):
        port = 5001 + i  # tcp_stream.py serves one connection
        serve = subprocess.Popen(["ip", "netns", "exec", b.ns, sys.executable, STREAM, "serve", str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stream = None
        try:
            wait_for(lambda port=port: f":{port}" in lab.exec("h2/b", "ss", "-Hltn").stdout, 10, "the stream server")
            stream = subprocess.Popen(["ip", "netns", "exec", a.ns, sys.executable, STREAM, "send", b.ip, str(port),
                                       "20"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(1.0)
            lab.kill_agent("h1", signal.SIGKILL if kill else signal.SIGTERM)
            r = http.post("/api/v1/endpoints", json=endpoint(endpoints + i, fake_hosts, "f"))
            r.raise_for_status()
            target = r.json()["revision"]
            started = time.monotonic()
            lab.start_agent("h1", wait=False)
            done = wait_applied(http, "h1", target, 60)
            stream_out, _ = stream.communicate(timeout=60)
            out["restarts"].append({"programmed_s": round(done - started, 2), "stream_ok": stream.returncode == 0,
                                    "stream": stream_out.strip()[-200:]})
        finally:
            for p in (stream, serve):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
    pid = lab.host("h1").agent_pid
    time.sleep(2)
    out["agent_rss_mb_after_restart"] = round(rss_mb(pid), 1) if pid else None
    out["agent_children_rss_mb_after_restart"] = round(sum(rss_mb(c) for c in children(pid)), 1) if pid else None
    if settle and pid:
        time.sleep(settle)
        out["agent_rss_mb_after_restart_settled"] = round(rss_mb(pid), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoints", type=int, default=10_000, help="endpoints on the fake hosts (default %(default)s)")
    p.add_argument("--fake-hosts", type=int, default=98, help="hosts without agents (default %(default)s)")
    p.add_argument("--restarts", type=int, default=2, help="restarts of h1's agent measured (default %(default)s)")
    p.add_argument("--settle", type=float, default=60, help="seconds after the first sync, and after the last "
                   "restart, to sample the agent's RSS again, settled (0: not) (default %(default)s)")
    p.add_argument("--kill", action="store_true", help="stop the agent with SIGKILL instead of SIGTERM")
    p.add_argument("--keep", metavar="DIR", help="copy h1's agent log (its restart phases, with times) and its "
                   "replica file (a real replica of that size, to profile the calculation in-process) to DIR")
    a = p.parse_args()
    unique("bench")
    lab = make_lab(hosts=2)
    try:
        result = measure(lab, a.endpoints, a.fake_hosts, a.restarts, a.kill, a.settle)
    finally:
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
            for name in ("agent.log", "replica.json", "replica.log"):  # the base and its log
                with contextlib.suppress(OSError):
                    shutil.copy(os.path.join(lab.agent_dir("h1"), name), os.path.join(a.keep, name))
        lab.down()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
