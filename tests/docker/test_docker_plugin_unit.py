"""The Docker driver's bookkeeping against a stale replica, without dockerd: a restarted agent loads
its replica from disk, which may still give an address to a container removed just before the
crash, while the server has already handed that address to the next container."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tether.agent.docker.driver import DockerPlugin, DriverError, docker_made, to_create
from tether.agent.local_endpoints import LocalEndpoints
from tether.calc.replica import Replica
from tether.client import ApiError
from tether.model import Endpoint, Network, Owner, Subnet

CIDR = "10.77.0.0/16"


class FakeServer:
    """The few API calls the driver makes, over a dict of endpoints, handing out 10.77.0.5 first."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.endpoints: dict[str, Endpoint] = {}
        self.deleted: list[str] = []

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

    async def delete(self, kind: str, name: str) -> None:
        self.deleted.append(name)

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
    plugin = DockerPlugin(LocalEndpoints("h1", replica, 1500), server, str(tmp_path),  # type: ignore[arg-type]
                          str(tmp_path / "tether.sock"), "unix:///nonexistent/docker.sock")
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


def test_a_network_made_with_dockers_default_ipam_is_refused_with_the_command_to_use(tmp_path) -> None:
    plugin, _, _ = make_plugin(tmp_path)
    req = {"NetworkID": "n172", "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "172.18.0.0/16",
                                              "Gateway": "172.18.0.1/16"}]}
    with pytest.raises(DriverError, match="--ipam-driver tether"):
        asyncio.run(plugin.create_network(req))
    assert "n172" not in plugin.networks
    ok = {"NetworkID": "n77", "IPv4Data": [{"AddressSpace": "tether", "Pool": CIDR, "Gateway": "10.77.0.1/16"}]}
    asyncio.run(plugin.create_network(ok))
    assert plugin.networks["n77"]["network"] == "blue" and not plugin.networks["n77"]["docker_made"]


def test_docker_network_rm_removes_the_tether_network_docker_made_and_keeps_an_adopted_one(tmp_path) -> None:
    plugin, server, _ = make_plugin(tmp_path)
    plugin.networks["made"] = {"network": "green", "cidr": "10.79.0.0/16", "docker_made": True}
    asyncio.run(plugin.delete_network({"NetworkID": "dnet"}))  # adopted from `tether network create`
    asyncio.run(plugin.delete_network({"NetworkID": "made"}))
    assert server.deleted == ["green"] and not plugin.networks


def test_another_hosts_docker_networks_are_created_here_once() -> None:
    nets = [Network(name="blue", subnets=[Subnet(cidr=CIDR)], labels={"tether.io/created-by": "docker"}),
            Network(name="green", subnets=[Subnet(cidr="10.79.0.0/16")], labels={"tether.io/created-by": "docker"}),
            Network(name="admins", subnets=[Subnet(cidr="10.80.0.0/16")])]
    wanted = docker_made(nets)
    assert wanted == {"blue": CIDR, "green": "10.79.0.0/16"}
    todo = to_create(wanted, [{"Name": "blue"}], {})
    assert [(n, c) for n, c, _ in todo] == [("green", "10.79.0.0/16")]
    assert todo[0][2]["IPAM"] == {"Driver": "tether", "Config": [{"Subnet": "10.79.0.0/16"}]}
    assert to_create(wanted, [], {"x": {"cidr": CIDR}, "y": {"cidr": "10.79.0.0/16"}}) == []


def test_through_the_swarm_socket_the_driver_is_global_and_leaves_addresses_to_swarm(tmp_path) -> None:
    plugin, _server, _ = make_plugin(tmp_path)

    async def main() -> None:
        assert await plugin.call_swarm("/NetworkDriver.GetCapabilities", {}) == {"Scope": "global",
                                                                                 "ConnectivityScope": "global"}
        assert await plugin.call("/NetworkDriver.GetCapabilities", {}) == {"Scope": "local",
                                                                           "ConnectivityScope": "global"}
        assert await plugin.call_swarm("/Plugin.Activate", {}) == {"Implements": ["NetworkDriver"]}
        err = (await plugin.call_swarm("/IpamDriver.RequestPool", {"Pool": CIDR}))["Error"]
        assert "without --ipam-driver" in err
        # Swarm's own IPAM (address space GlobalDefault) is refused locally, taken through the Swarm socket
        req = {"NetworkID": "swarmnet", "IPv4Data": [{"AddressSpace": "GlobalDefault", "Pool": CIDR,
                                                      "Gateway": "10.77.0.1/16"}]}
        assert "tether's IPAM" in (await plugin.call("/NetworkDriver.CreateNetwork", req))["Err"]
        assert await plugin.call_swarm("/NetworkDriver.CreateNetwork", req) == {}
        assert plugin.networks["swarmnet"]["swarm"] and plugin.networks["swarmnet"]["network"] == "blue"

    asyncio.run(main())


def test_a_swarm_tasks_address_becomes_its_endpoint_here_and_goes_with_it(tmp_path, monkeypatch) -> None:
    import tether.dataplane.pods

    monkeypatch.setattr(tether.dataplane.pods, "delete_link", lambda name: None)  # no interface of this machine
    plugin, server, _ = make_plugin(tmp_path)
    plugin.networks["swarmnet"] = {"network": "blue", "cidr": CIDR, "swarm": True}

    async def main() -> None:
        out = await plugin.call_swarm("/NetworkDriver.CreateEndpoint", {
            "NetworkID": "swarmnet", "EndpointID": "task1", "Interface": {"Address": "10.77.3.4/16"}})
        assert "Err" not in out, out
        (ep,) = server.endpoints.values()
        assert ep.ips == ["10.77.3.4"] and ep.host == "h1" and ep.owner.docker_endpoint_id == "task1"
        again = await plugin.call_swarm("/NetworkDriver.CreateEndpoint", {  # dockerd retrying: the same one
            "NetworkID": "swarmnet", "EndpointID": "task1", "Interface": {"Address": "10.77.3.4/16"}})
        assert "Err" not in again and len(server.endpoints) == 1
        await plugin.call_swarm("/NetworkDriver.DeleteEndpoint", {"NetworkID": "swarmnet", "EndpointID": "task1"})
        assert not server.endpoints  # Swarm never sends ReleaseAddress to us

    asyncio.run(main())


def test_swarm_networks_are_never_copied_into_dockerd_as_local_networks() -> None:
    local = Network(name="blue", subnets=[Subnet(cidr=CIDR)], labels={"tether.io/created-by": "docker"})
    swarm = Network(name="sw", subnets=[Subnet(cidr="10.78.0.0/24")],
                    labels={"tether.io/created-by": "docker", "tether.io/docker-scope": "swarm"})
    assert docker_made([local, swarm]) == {"blue": CIDR}


def test_an_ipv6_swarm_network_is_refused_with_the_way_out(tmp_path) -> None:
    plugin, _server, _ = make_plugin(tmp_path)
    req = {"NetworkID": "swarm6", "IPv4Data": [{"AddressSpace": "GlobalDefault", "Pool": CIDR}],
           "IPv6Data": [{"AddressSpace": "GlobalDefault", "Pool": "fd00:78::/64"}]}
    err = asyncio.run(plugin.call_swarm("/NetworkDriver.CreateNetwork", req))["Err"]
    assert "IPv4 only" in err and "--ipv6" in err and "swarm6" not in plugin.networks
