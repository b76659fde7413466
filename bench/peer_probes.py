"""CPU of one path-health round of 16 peers: `ping` processes (before) against the agent's in-process
echo (`agent/icmp.py`, now), in the same run.

    sudo .venv/bin/python -m bench.peer_probes [--rounds 7] [--peers 16]

A throwaway namespace `host` is joined by a veth to a namespace `peers` holding one address per
peer. A round is what `agent/peers.py` does for healthy peers with VXLAN between them: per peer,
PING_CONCURRENCY at a time, a full-size (1500) Don't-Fragment echo to its address, then one of 1450
bytes bound to a device (the overlay check's `-I tth.vxlan`; here the veth). Before: each echo a
`ping -n -q -c 1 -W 1 -M do -s N [-I dev]` process, as the agent ran them (kept below as the
baseline); now: `Pinger.ping`. The round runs with this thread inside `host` (its `ping` children
start there). Timed per round: CPU of this process plus its waited-for children (the `ping`s), wall
time; rounds alternate old and new; medians. Prints one JSON object. The namespaces are deleted at
the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tether.agent.icmp import Pinger
from tether.agent.peers import PING_CONCURRENCY
from tether.dataplane.netns import opened_in

Ping = Callable[[str, int, str | None], Awaitable[float | None]]


async def ping_process(ip: str, size: int, dev: str | None = None, timeout: float = 1.0) -> float | None:
    """The agent's probe before: one `ping` process per echo (agent/peers.py until this change)."""
    headers = 48 if ":" in ip else 28
    cmd = ["ping", "-n", "-q", "-c", "1", "-W", str(timeout), "-M", "do", "-s", str(max(0, size - headers))]
    if dev:
        cmd += ["-I", dev]
    try:
        p = await asyncio.create_subprocess_exec(*cmd, ip, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(p.communicate(), timeout + 2)
    except (OSError, TimeoutError):
        return None
    if p.returncode != 0:
        return None
    m = re.search(r"= [\d.]+/([\d.]+)/", out.decode(errors="replace"))
    return float(m.group(1)) if m else 0.0


def cpu_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


async def one_round(ping: Ping, peers: list[str]) -> dict[str, float]:
    slots = asyncio.Semaphore(PING_CONCURRENCY)

    async def check(ip: str) -> bool:
        async with slots:
            return await ping(ip, 1500, None) is not None and await ping(ip, 1450, "eth0") is not None

    c0, w0 = cpu_s(), time.perf_counter()
    ok = await asyncio.gather(*(check(ip) for ip in peers))
    c1, w1 = cpu_s(), time.perf_counter()
    if not all(ok):
        raise RuntimeError(f"{ok.count(False)} of {len(peers)} peers did not answer: the bench's namespaces are wrong")
    return {"cpu_ms": (c1 - c0) * 1000, "wall_ms": (w1 - w0) * 1000}


async def measure(rounds: int, peers: list[str]) -> dict[str, Any]:
    pinger = Pinger()

    async def new(ip: str, size: int, dev: str | None) -> float | None:
        return await pinger.ping(ip, size, dev)

    async def old(ip: str, size: int, dev: str | None) -> float | None:
        return await ping_process(ip, size, dev)

    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    try:
        for warm in (old, new):  # ARP, the sockets, the ping binary in the page cache
            await one_round(warm, peers)
        for _ in range(rounds):
            for name, ping in (("old", old), ("new", new)):
                runs[name].append(await one_round(ping, peers))
    finally:
        pinger.close()
    out: dict[str, Any] = {"peers": len(peers), "echoes_per_round": 2 * len(peers), "rounds": rounds,
                           "load_avg_1m": round(os.getloadavg()[0], 2)}
    for name, r in runs.items():
        out[name] = {k: round(statistics.median(x[k] for x in r), 2) for k in ("cpu_ms", "wall_ms")}
    out["old"]["processes"] = 2 * len(peers)
    out["new"]["processes"] = 0
    out["cpu_ratio_old_new"] = round(out["old"]["cpu_ms"] / max(out["new"]["cpu_ms"], 1e-3), 1)
    return out


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds of each kind (medians)")
    p.add_argument("--peers", type=int, default=16, help="peers checked per round (the agent's PEERS_PER_ROUND)")
    a = p.parse_args()
    host, far = f"tpp{os.getpid()}h", f"tpp{os.getpid()}p"
    made: list[str] = []
    try:
        for ns in (host, far):
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
            made.append(ns)
            ip(ns, "link", "set", "lo", "up")
        ip(host, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", far)
        ip(host, "addr", "add", "192.0.2.1/24", "dev", "eth0")
        peers = [f"192.0.2.{10 + i}" for i in range(a.peers)]
        for addr in peers:
            ip(far, "addr", "add", f"{addr}/24", "dev", "eth0")
        for ns in (host, far):
            ip(ns, "link", "set", "eth0", "up")
        print(json.dumps(opened_in(host, lambda: asyncio.run(measure(a.rounds, peers))), indent=1))
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)


if __name__ == "__main__":
    main()
