"""An agent that loses its server writes its replica to disk at once: a restart while the server is
down serves from that copy (DNS, the datapath), so it must hold the events the 1 s save throttle
skipped just before the loss."""

from __future__ import annotations

import asyncio
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
