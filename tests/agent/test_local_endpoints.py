"""LocalEndpoints: what the CNI server, the Docker driver and VM ports share of the agent."""

from __future__ import annotations

import asyncio
from typing import Any

from tether.agent.local_endpoints import LocalEndpoints
from tether.calc.replica import Replica
from tether.client import ServerUnreachable
from tether.model import Endpoint, Network, Owner, Subnet


def endpoint(name: str, handle: str) -> Endpoint:
    return Endpoint(name=name, network="blue", host="h1", ips=["10.77.0.9"], handle=handle, owner=Owner(type="cni"),
                    interface=f"tth{name}")


def test_an_endpoint_put_is_in_the_replica_at_once_and_removed_by_id_or_by_handle() -> None:
    replica = Replica()
    local = LocalEndpoints("h1", replica, 1500)
    a, b = endpoint("a", "cid-a/eth0"), endpoint("b", "cid-b/eth0")
    local.put(a)
    local.put(b)
    assert local.endpoint(a.id) is a and replica.endpoint(b.id) is b
    local.remove(a.id)
    local.remove_handle("cid-b/eth0")
    assert list(local.endpoints) == [] and list(replica.endpoints) == []


def test_kick_reaches_the_agent_with_its_gather_flag() -> None:
    kicks: list[bool] = []
    local = LocalEndpoints("h1", Replica(), 1500, kicks.append)
    local.kick()
    local.kick(gather=False)
    assert kicks == [True, False]


def test_a_protected_interface_stays_in_the_live_view_until_unprotected_or_too_old(monkeypatch) -> None:
    import tether.agent.local_endpoints as mod

    local = LocalEndpoints("h1", Replica(), 1500)
    view = local.protected()
    local.protect("ttha")
    local.protect("tthb")
    assert set(view) == {"ttha", "tthb"}  # live: an apply holding the view sees later plugs
    local.unprotect("ttha")
    now = mod.time.monotonic()
    monkeypatch.setattr(mod.time, "monotonic", lambda: now + mod.PROTECT_FOR + 1)
    assert set(local.protected()) == set()


def test_the_mtu_is_the_networks_or_the_vxlan_one_when_the_network_is_unknown() -> None:
    local = LocalEndpoints("h1", Replica(), 1500)
    assert local.mtu(Network(name="blue", subnets=[Subnet(cidr="10.77.0.0/24")], mtu=1400)) == 1400
    assert local.mtu(Network(name="blue", subnets=[Subnet(cidr="10.77.0.0/24")], encap="direct")) == 1500
    assert local.mtu(None) == 1450


class DownClient:
    async def get(self, kind: str, name: str) -> Any:
        raise ServerUnreachable("down")


class UpClient:
    async def get(self, kind: str, name: str) -> Any:
        return Network(name=name, subnets=[Subnet(cidr="10.78.0.0/24")])


def test_a_network_comes_from_the_replica_else_from_the_server_else_none() -> None:
    replica = Replica()
    blue = Network(name="blue", subnets=[Subnet(cidr="10.77.0.0/24")])
    replica.objects["Network"][blue.store_name()] = blue
    local = LocalEndpoints("h1", replica, 1500)
    assert asyncio.run(local.network("blue", DownClient())) is blue  # type: ignore[arg-type]
    assert asyncio.run(local.network("green", DownClient())) is None  # type: ignore[arg-type]
    assert asyncio.run(local.network("green", UpClient())).name == "green"  # type: ignore[arg-type, union-attr]


def test_this_hosts_endpoints_come_from_the_planners_index_when_it_describes_the_replica() -> None:
    """`here` (what the VM ports and their DHCP read after every apply) is this host's endpoints:
    the planner's index for the replica it planned, else a pass over every endpoint; both agree."""
    from tether.calc.host import HostContext
    from tether.calc.planner import Planner

    replica = Replica()
    replica.objects["Network"]["blue"] = Network(name="blue", subnets=[Subnet(cidr="10.77.0.0/16")])
    for i, host in enumerate(("h1", "h2", "h1", "h3")):
        replica.objects["Endpoint"][f"e{i}"] = Endpoint(id=f"e{i}", name=f"e{i}", network="blue", host=host,
                                                        ips=[f"10.77.0.{i + 2}"])
    planner = Planner()
    asked: list[Any] = []

    def indexed(rep: Replica) -> Any:
        asked.append(planner.local_endpoints(rep))
        return asked[-1]

    local = LocalEndpoints("h1", replica, 1500, indexed=indexed)
    assert sorted(ep.id for ep in local.here()) == ["e0", "e2"] and asked == [None]  # nothing planned yet: a pass
    view = replica.view()
    planner.plan(view, HostContext("h1", "eth0", 1500))
    assert sorted(ep.id for ep in local.here(view)) == ["e0", "e2"] and asked[-1] is not None  # the index
