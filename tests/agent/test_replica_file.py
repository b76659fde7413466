"""The agent's copy of its replica on disk: a base plus a log of the events applied since, which
loads back as the replica (a torn last line or a log of another base does not fail the load), is
compacted once the log outgrows the base, and is written whole after a re-list. An agent that loses
its server writes it at once: a restart while the server is down serves from that copy (DNS, the
datapath), so it must hold the events the 1 s save throttle skipped just before the loss."""

from __future__ import annotations

import asyncio
import json
import os
import time

from tether.agent import replica_file
from tether.agent.main import Agent, AgentConfig
from tether.calc.replica import Replica
from tether.client import ServerUnreachable
from tether.model import Endpoint, Network, Subnet, key_of


def test_losing_the_server_saves_the_events_the_throttle_skipped(tmp_path) -> None:
    cfg = AgentConfig(server="http://127.0.0.1:9", host="h1", underlay_ip="198.18.0.1", state_dir=str(tmp_path),
                      cni_socket=str(tmp_path / "cni.sock"), underlay=("eth0", 1500, "198.18.0.0/24"))
    a = Agent(cfg)
    net = Network(name="n1", subnets=[Subnet(cidr="10.1.0.0/16")])
    ep = Endpoint(id="e1", name="p1", network="n1", host="h2", ips=["10.1.0.1"])
    lost = asyncio.Event()

    async def nothing(*args, **kw) -> None:
        return None

    async def snapshot() -> dict:
        return {"revision": 5, "objects": [{"kind": "Network", "object": net.model_dump(mode="json")}]}

    async def watch(after: int):
        yield {"type": "put", "kind": "Endpoint", "key": key_of("Endpoint", ep.id), "revision": 6,
               "object": ep.model_dump(mode="json")}
        lost.set()
        raise ServerUnreachable("the server is shutting down")

    async def registered(host):
        return host

    a.client.register_host, a.client.heartbeat = registered, nothing  # type: ignore[method-assign]
    a.client.snapshot, a.client.watch = snapshot, watch  # type: ignore[method-assign]
    a._saved_at = time.monotonic()  # an apply has just saved: the throttle holds the next writes back

    async def run() -> None:
        task = asyncio.create_task(a._sync_loop())
        await asyncio.wait_for(lost.wait(), 5)
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await a.client.close()

    asyncio.run(run())
    back = Replica()
    assert replica_file.load(back, a.replica_path), "the replica was written when the server was lost"
    assert back.revision == 6 and back.endpoint("e1") == ep and "n1" in back.networks


def _ep(i: int, host: str = "h2") -> Endpoint:
    return Endpoint(id=f"e{i}", name=f"p{i}", network="n1", host=host, ips=[f"10.1.0.{i}"])


def _event(rev: int, ep: Endpoint, kind: str = "put") -> dict:
    return {"type": kind, "kind": "Endpoint", "key": key_of("Endpoint", ep.id), "revision": rev,
            "object": ep.model_dump(mode="json")}


def _based(tmp_path, n: int = 20) -> tuple[Replica, replica_file.DiskCopy]:
    """A replica of `n` endpoints at revision 10, saved whole."""
    rep = Replica()
    rep.load_snapshot({"revision": 10, "objects": [{"kind": "Network", "object": Network(
        name="n1", subnets=[Subnet(cidr="10.1.0.0/16")]).model_dump(mode="json")}] + [
        {"kind": "Endpoint", "object": _ep(i).model_dump(mode="json")} for i in range(n)]})
    disk = replica_file.DiskCopy(str(tmp_path / "replica.json"))
    disk.save(rep)
    return rep, disk


def _follow(rep: Replica, disk: replica_file.DiskCopy, ev: dict) -> None:
    """What the agent's `_follow` does with each event."""
    rep.apply_event(ev)
    disk.record(ev)


def _loaded(path: str) -> Replica:
    back = Replica()
    assert replica_file.load(back, path)
    return back


def test_the_base_and_the_events_appended_since_load_back_as_the_replica(tmp_path) -> None:
    rep, disk = _based(tmp_path)
    base = open(disk.path).read()
    _follow(rep, disk, _event(11, _ep(30)))
    _follow(rep, disk, _event(12, _ep(1).model_copy(update={"ready": False})))
    disk.save(rep)
    _follow(rep, disk, _event(13, _ep(2), "delete"))
    disk.save(rep)
    assert open(disk.path).read() == base, "a few changes are appended, the base is not rewritten"
    assert disk.full_writes == 1 and disk.appends == 2
    back = _loaded(disk.path)
    assert back.objects == rep.objects and back.revision == 13
    # a restarted agent appends to the same log
    again = replica_file.DiskCopy(disk.path)
    assert again.load(back)
    _follow(back, again, _event(14, _ep(31)))
    again.save(back)
    assert again.full_writes == 0 and again.appends == 1
    assert _loaded(disk.path).objects == back.objects



def test_a_base_without_its_revision_is_refused_and_leaves_the_replica_as_it_was(tmp_path) -> None:
    """`load` says False and the replica is untouched (before: the objects were replaced, then the
    missing revision raised: a replica of one file's objects at another's revision)."""
    rep, disk = _based(tmp_path)
    before = {kind: dict(objs) for kind, objs in rep.objects.items()}
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"objects": [{"kind": "Endpoint", "object": _ep(99).model_dump(mode="json")}]}))
    assert not replica_file.DiskCopy(str(broken)).load(rep)
    assert {kind: dict(objs) for kind, objs in rep.objects.items()} == before and rep.revision == 10

def test_a_torn_last_line_ends_the_replay_and_the_load_still_succeeds(tmp_path) -> None:
    """A crash mid-append: the events before the torn line stand; the next save writes everything
    (an append after the torn text would never be read)."""
    rep, disk = _based(tmp_path)
    _follow(rep, disk, _event(11, _ep(30)))
    disk.save(rep)
    with open(disk.log_path, "a") as f:
        f.write(json.dumps(_event(12, _ep(31)))[:40])
    back = Replica()
    again = replica_file.DiskCopy(disk.path)
    assert again.load(back)
    assert back.revision == 11 and back.endpoint("e30") == rep.endpoint("e30") and back.endpoint("e31") is None
    _follow(back, again, _event(12, _ep(31)))
    again.save(back)
    assert again.full_writes == 1
    assert _loaded(disk.path).objects == back.objects


def test_a_log_that_does_not_follow_the_base_is_ignored(tmp_path) -> None:
    """A crash after the base was rewritten but before its log was reset: the old log's events are
    older than the base (and may undo what it holds)."""
    rep, disk = _based(tmp_path)
    _follow(rep, disk, _event(11, _ep(30)))
    disk.save(rep)
    old_log = open(disk.log_path).read()
    _follow(rep, disk, _event(12, _ep(30), "delete"))
    disk.save_full(rep)
    with open(disk.log_path, "w") as f:
        f.write(old_log)
    back = _loaded(disk.path)
    assert back.revision == 12 and back.endpoint("e30") is None and back.objects == rep.objects


def test_the_log_is_compacted_into_the_base_once_it_outgrows_it(tmp_path) -> None:
    rep, disk = _based(tmp_path, n=5)
    base_size = os.path.getsize(disk.path)
    rev = 10
    while disk.full_writes == 1:
        rev += 1
        _follow(rep, disk, _event(rev, _ep(rev % 7).model_copy(update={"ready": rev % 2 == 0})))
        disk.save(rep)
        assert os.path.getsize(disk.log_path) <= base_size, "the log never outgrows the base"
    assert disk.appends > 3
    assert open(disk.log_path).read() == json.dumps({"base_revision": rev}) + "\n"
    assert _loaded(disk.path).objects == rep.objects


def test_after_a_relist_the_next_save_writes_the_replica_whole(tmp_path) -> None:
    """The snapshot's changes came by no event: appending to the log would lose them."""
    rep, disk = _based(tmp_path)
    rep.load_snapshot({"revision": 40, "objects": [{"kind": "Endpoint", "object": _ep(50).model_dump(mode="json")}]})
    disk.relisted()
    _follow(rep, disk, _event(41, _ep(51)))
    disk.save(rep)
    assert disk.full_writes == 2 and disk.appends == 0
    back = _loaded(disk.path)
    assert back.revision == 41 and set(back.objects["Endpoint"]) == {"e50", "e51"}
