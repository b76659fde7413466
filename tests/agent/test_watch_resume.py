"""An agent's watch resumes from its replica's revision (issue 29): a server restart (the stream
breaks) or a stream cut for falling behind costs no full list; only a server that no longer holds
the history after that revision (compacted, or a restored store) makes the agent list again.
The agent's sync loop runs for real against a real server; only its kernel side is left out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tests.fixtures.server import ServerProc
from tether.agent import replica_file
from tether.agent.main import Agent
from tether.calc.replica import Replica
from tether.client import AsyncTetherClient
from tether.model import Network, Subnet


def syncing_agent(s: ServerProc) -> Agent:
    """An Agent that syncs its replica and plans nothing (no namespace, no root needed)."""
    a = Agent.__new__(Agent)
    a.host = "h1"
    a.replica = Replica()
    a.client = AsyncTetherClient(s.url, s.token)
    a._kicks, a._now, a._dirty = 0, False, asyncio.Event()
    a._apply_ok, a._apply_lock, a._reported_rev = False, asyncio.Lock(), 1 << 62
    a.connected, a.last_sync, a._synced_once, a._status_sent = False, 0.0, False, None
    a.lists = a.resumes = a._catch_up = 0
    a._from_disk = False
    a._save_replica = lambda force=False, final=False: None
    a.disk = replica_file.DiskCopy("/nonexistent/replica.json")  # never saved: records nothing

    async def register() -> int:
        return 0

    a._register = register
    snapshot = a.client.snapshot
    a.snapshots = 0  # counted here, not by the agent: a list is a list, whoever asks

    async def counted() -> dict:
        a.snapshots += 1
        return await snapshot()

    a.client.snapshot = counted
    return a


async def until(check, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


def network(i: int) -> Network:
    return Network(name=f"n{i}", subnets=[Subnet(cidr=f"10.{60 + i}.0.0/16")])


async def running(a: Agent) -> AsyncIterator[asyncio.Task]:
    task = asyncio.create_task(a._sync_loop())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await a.client.close()


async def test_a_server_restart_resumes_the_watch_without_a_list(sqlite_server: ServerProc) -> None:
    a = syncing_agent(sqlite_server)
    async for _ in running(a):
        await until(lambda: a.connected)
        sqlite_server.client().apply(network(1))
        await until(lambda: "n1" in a.replica.objects["Network"])
        await asyncio.to_thread(sqlite_server.stop)  # in a thread: the agent's loop sees the server go
        await asyncio.sleep(1)
        await asyncio.to_thread(sqlite_server.start)
        sqlite_server.client().apply(network(2))
        await until(lambda: "n2" in a.replica.objects["Network"])
        assert a.snapshots == 1, "the agent listed everything again after the server restarted"


async def test_a_resync_without_relist_resumes_and_one_with_relist_lists(sqlite_server: ServerProc) -> None:
    a = syncing_agent(sqlite_server)
    real_watch = a.client.watch
    cuts = [{"type": "resync", "revision": 0, "reason": "this watcher fell behind", "relist": False},
            {"type": "resync", "compact_revision": 5, "relist": True}]

    async def watch(after: int) -> AsyncIterator[dict]:
        if cuts and a.connected and after > 0:
            yield {**cuts.pop(0), "revision": after}
            return
        async for ev in real_watch(after):
            yield ev

    a.client.watch = watch
    async for _ in running(a):
        await until(lambda: a.connected and not cuts)
        sqlite_server.client().apply(network(3))
        await until(lambda: "n3" in a.replica.objects["Network"])
        assert a.snapshots == 2 and a.resumes == 1, "a cut without relist must resume; a compacted history must list"


async def test_a_listed_snapshot_keeps_one_copy_of_each_repeated_string(sqlite_server: ServerProc) -> None:
    """The snapshot (every object of the cluster) is parsed with one copy per distinct short string,
    as the disk copy is: the names and labels repeated over 10,000 endpoints are not 10,000 strings
    each while the agent decodes its replica from them."""
    c = sqlite_server.client()
    for i in (1, 2):
        c.apply(Network(name=f"n{i}", subnets=[Subnet(cidr=f"10.{70 + i}.0.0/16")], dns_domain="shared.example"))
    client = AsyncTetherClient(sqlite_server.url, sqlite_server.token)
    try:
        snap = await client.snapshot()
    finally:
        await client.close()
    domains = [o["object"]["dns_domain"] for o in snap["objects"] if o["kind"] == "Network"]
    assert domains == ["shared.example"] * 2 and domains[0] is domains[1]
