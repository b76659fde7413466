"""What a durable commit costs: SQLite store writes with synchronous=FULL (the engine's setting)
beside NORMAL (the old one), and FULL without group commit (MAX_GROUP=1: one WAL sync per
transaction), measured in the same run, round after round (the machine is shared).

    .venv/bin/python -m bench.store_write [--writes 400] [--concurrency 8] [--rounds 3] [--dir /var/lib/tether]

Per mode: one writer (latency of a single create, p50 and p99 in ms) and `--concurrency` writers
at once (creates per second). The database lives in --dir (default: a temp dir), since the cost
is that filesystem's fsync. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time

from tether.store import sqlite as engine
from tether.store.sqlite import SqliteStore

VALUE = b"x" * 900  # about an endpoint object


MODES = {"NORMAL": ("NORMAL", engine.MAX_GROUP), "FULL": ("FULL", engine.MAX_GROUP), "FULL_ungrouped": ("FULL", 1)}


async def one_round(path: str, mode: str, writes: int, concurrency: int) -> dict:
    store = SqliteStore(path)
    synchronous, engine.MAX_GROUP = MODES[mode]
    try:
        await store._call(store._writer, store._wdb.execute, f"PRAGMA synchronous={synchronous}")
        lat = []
        for i in range(writes):
            t0 = time.perf_counter()
            await store.create(f"/bench/seq/{i}", VALUE)
            lat.append(time.perf_counter() - t0)

        async def writer(w: int) -> None:
            for i in range(writes // concurrency):
                await store.create(f"/bench/par/{w}/{i}", VALUE)

        t0 = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
        lat.sort()
        return {"p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
                "concurrent_writes_per_s": (writes // concurrency) * concurrency / elapsed}
    finally:
        engine.MAX_GROUP = MODES["FULL"][1]
        await store.close()


async def main_async(a: argparse.Namespace) -> dict:
    base = tempfile.mkdtemp(prefix="tether-bench-store-", dir=a.dir)
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    try:
        for r in range(a.rounds):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                path = os.path.join(base, f"{mode}-{r}.db")
                results[mode].append(await one_round(path, mode, a.writes, a.concurrency))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def med(mode: str, key: str) -> float:
        return round(statistics.median(x[key] for x in results[mode]), 3)

    keys = ("p50_ms", "p99_ms", "concurrent_writes_per_s")
    summary = {mode: {k: med(mode, k) for k in keys} for mode in results}
    summary["full_vs_normal"] = {k: round(summary["FULL"][k] / summary["NORMAL"][k], 2) for k in keys}
    summary["full_grouped_vs_ungrouped"] = {k: round(summary["FULL"][k] / summary["FULL_ungrouped"][k], 2)
                                            for k in keys}
    return {"bench": "store_write", "writes": a.writes, "concurrency": a.concurrency, "rounds": a.rounds,
            "dir": a.dir or tempfile.gettempdir(), "median_of_rounds": summary, "rounds_detail": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--writes", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="directory for the databases (its filesystem is measured)")
    print(json.dumps(asyncio.run(main_async(p.parse_args())), indent=1))


if __name__ == "__main__":
    main()
