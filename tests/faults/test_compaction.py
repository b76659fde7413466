"""Tether compacts etcd itself: with its compaction on, etcd's database stays bounded under many
writes and no space alarm fires; beside it, the same writes on an etcd nobody compacts.

Scale: TETHER_COMPACTION_WRITES (default 5000; the issue's figure is 50000).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from tests.fixtures.etcd import start_etcd
from tests.fixtures.server import start_server
from tether.store.base import Unavailable
from tether.store.etcd import EtcdStore

WRITES = int(os.environ.get("TETHER_COMPACTION_WRITES", "5000"))
QUOTA = 32 << 20  # small, so that history nobody compacts would reach it at the full size


@pytest.fixture
def two_etcds(tmp_path):
    started = [start_etcd(str(tmp_path), name, "--quota-backend-bytes", str(QUOTA)) for name in ("compacted", "plain")]
    try:
        yield started
    finally:
        for e in started:
            e.stop(signal.SIGKILL)


async def storm(store: EtcdStore, writes: int) -> int:
    """`writes` puts of 2 KB over 200 keys (an endpoint's write is ~3 KB with its index keys);
    returns how many etcd refused (NOSPACE)."""
    value = b"x" * 2048
    refused = 0
    for start in range(0, writes, 50):
        results = await asyncio.gather(*(store.put(f"/tether/v1/test/{i % 200}", value)
                                         for i in range(start, min(start + 50, writes))), return_exceptions=True)
        refused += sum(isinstance(r, Unavailable) for r in results)
        if refused:
            return refused + writes - start - 50
    return refused


async def test_tethers_compaction_keeps_etcds_database_bounded_without_a_space_alarm(two_etcds, tmp_path):
    compacted, plain = two_etcds
    servers = [start_server(compacted.url, str(tmp_path / "s1"), "--compact-keep", "500", "--gc-interval", "0.5"),
               start_server(plain.url, str(tmp_path / "s2"), "--compact-keep", "0", "--gc-interval", "0.5")]
    stores = [EtcdStore([compacted.endpoint]), EtcdStore([plain.endpoint])]
    try:
        refused_compacted, refused_plain = await asyncio.gather(storm(stores[0], WRITES), storm(stores[1], WRITES))
        await asyncio.sleep(2)  # a last compaction round
        status_c, status_p = compacted.status(), plain.status()
        size_c, size_p = status_c["dbSize"], status_p["dbSize"]
        # the file never shrinks without a defrag (pages freed by compaction are reused): what
        # compaction bounds is the part in use, so the two etcds are compared on that
        used_c, used_p = status_c.get("dbSizeInUse", size_c), status_p.get("dbSizeInUse", size_p)
        figures = {"writes": WRITES, "db_bytes_compacted": size_c, "db_bytes_plain": size_p,
                   "in_use_compacted": used_c, "in_use_plain": used_p, "in_use_ratio": round(used_p / used_c, 1),
                   "refused_compacted": refused_compacted, "refused_plain": refused_plain,
                   "alarms_compacted": compacted.alarms()}
        print("\ncompaction:", json.dumps(figures))
        assert refused_compacted == 0 and not compacted.alarms(), figures
        assert size_c < QUOTA // 2, figures  # bounded: live data and recent history, far from the quota
        assert used_p > 2 * used_c, figures
    finally:
        for s in stores:
            await s.close()
        for srv in servers:
            srv.stop()
