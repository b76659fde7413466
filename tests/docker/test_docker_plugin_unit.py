"""The Docker driver's bookkeeping against a stale replica, without dockerd: a restarted agent loads
its replica from disk, which may still give an address to a container removed just before the
crash, while the server has already handed that address to the next container."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from tether.agent.cache import Replica
from tether.agent.docker_plugin import DockerPlugin
from tether.client import ApiError
from tether.model import Endpoint, Network, Owner, Subnet

CIDR = "10.77.0.0/16"


class FakeServer:
    """The few API calls the driver makes, over a dict of endpoints, handing out 10.77.0.5 first."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.endpoints: dict[str, Endpoint] = {}

    async def create_endpoint(self, ep: Endpoint) -> Endpoint:
        ep = ep.model_copy(update={"ips": ep.ips or ["10.77.0.5"]})
        self.endpoints[ep.id] = ep
        return ep

    async def get(self, kind: str, ep_id: str) -> Endpoint:
        if ep_id not in self.endpoints:
            raise ApiError(404, f"no endpoint {ep_id}")
        return self.endpoints[ep_id]

    async def list(self, kind: str, **filters: Any) -> list[Any]:
        if kind == "Network":
            return [self.net]
        return [e for e in self.endpoints.values()
                if all(getattr(e, k) == v for k, v in filters.items())]

    async def release_by_handle(self, handle: str) -> None:
        for k, e in list(self.endpoints.items()):
            if e.handle == handle:
                del self.endpoints[k]


def make_plugin(tmp_path) -> tuple[DockerPlugin, FakeServer, Endpoint]:
    net = Network(name="blue", subnets=[Subnet(cidr=CIDR)])
    gone = Endpoint(name="gone", network="blue", host="h1", ips=["10.77.0.5"], handle="docker/gone",
                    owner=Owner(type="docker"), interface="tthgone")
    replica = Replica()
    replica.objects["Network"][net.store_name()] = net
    replica.objects["Endpoint"][gone.id] = gone  # stale: the server no longer has it
    server = FakeServer(net)
    agent = SimpleNamespace(host="h1", replica=replica, client=server, cni=SimpleNamespace(in_flight={}),
                            cfg=SimpleNamespace(state_dir=str(tmp_path)), kick=lambda: None)
    plugin = DockerPlugin(agent, str(tmp_path / "tether.sock"), "unix:///nonexistent/docker.sock")
    plugin.networks["dnet"] = {"network": "blue", "cidr": CIDR}
    return plugin, server, gone


def test_create_endpoint_takes_the_endpoint_request_address_made_not_a_stale_holder(tmp_path) -> None:
    plugin, server, gone = make_plugin(tmp_path)

    async def go() -> None:
        got = await plugin.request_address({"PoolID": f"tether/{CIDR}", "Options": {}})
        assert got["Address"] == "10.77.0.5/32"
        (new_id,) = server.endpoints
        await plugin.create_endpoint({"NetworkID": "dnet", "EndpointID": "d0cker",
                                      "Interface": {"Address": "10.77.0.5/32"}})
        assert plugin.endpoints["d0cker"] == new_id != gone.id
        assert not plugin.allocated
        await plugin.docker.close()

    asyncio.run(go())


def test_release_address_releases_the_servers_holder_not_the_replicas(tmp_path) -> None:
    plugin, server, gone = make_plugin(tmp_path)

    async def go() -> None:
        await plugin.request_address({"PoolID": f"tether/{CIDR}", "Options": {}})
        plugin.allocated.clear()  # as after a restart: only the server knows who holds the address
        await plugin.release_address({"PoolID": f"tether/{CIDR}", "Address": "10.77.0.5/32"})
        assert server.endpoints == {}
        await plugin.docker.close()

    asyncio.run(go())
