"""This host's endpoints, as the front ends that plug them (CNI, Docker, VM ports) share them.

The front ends never reach into the agent or into each other: each gets this object (plus an API
client and its own configuration). Through it they read the replica (networks and endpoints), put an
endpoint they just made into it before the watch echoes it (so the next plan already has it), remove
one they just released, protect an interface that is being plugged from the apply (which removes
the kernel's links it does not plan), and kick the agent for a plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, KeysView, Mapping

from tether.calc.host import endpoint_mtu
from tether.calc.names import VXLAN_OVERHEAD
from tether.calc.replica import Replica
from tether.client import ApiError, AsyncTetherClient, ServerUnreachable
from tether.model import Endpoint, Network

PROTECT_FOR = 120.0  # seconds an interface stays protected when its plug never finishes


class LocalEndpoints:
    def __init__(self, host: str, replica: Replica, underlay_mtu: int,
                 kick: Callable[[bool], None] = lambda gather: None, vxlan_overhead: int = VXLAN_OVERHEAD,
                 indexed: Callable[[Replica], Mapping[str, Endpoint] | None] = lambda rep: None) -> None:
        self.host = host
        self._indexed = indexed  # the planner's index of this host's endpoints, when it describes `rep`
        self.underlay_mtu = underlay_mtu
        self.vxlan_overhead = vxlan_overhead  # names.vxlan_overhead of the host's underlay address
        self._replica = replica
        self._kick = kick
        self._plugging: dict[str, float] = {}  # host ifname -> when its plug began

    # --- reading the replica ----------------------------------------------------------------------

    @property
    def networks(self) -> Mapping[str, Network]:
        return self._replica.networks

    @property
    def endpoints(self) -> Iterable[Endpoint]:
        return self._replica.endpoints

    def endpoint(self, ep_id: str) -> Endpoint | None:
        return self._replica.endpoint(ep_id)

    def here(self, replica: Replica | None = None) -> Iterable[Endpoint]:
        """This host's endpoints of `replica` (default: the agent's): from the planner's index when
        it describes that replica (an apply just planned it), else by a pass over every endpoint.
        The extras that run after each apply (VM ports, their DHCP) need only these: a pass over
        10,000 endpoints on every change was a cost that grew with the cluster."""
        rep = self._replica if replica is None else replica
        mine = self._indexed(rep)
        if mine is not None:
            return mine.values()
        return [ep for ep in rep.endpoints if ep.host == self.host]

    def mtu(self, net: Network | None) -> int:
        """The MTU of an interface on `net`; without the network (the server is away), the VXLAN one."""
        return endpoint_mtu(net, self.underlay_mtu, self.vxlan_overhead) if net else \
            self.underlay_mtu - self.vxlan_overhead

    # --- changing it ------------------------------------------------------------------------------

    def put(self, ep: Endpoint) -> None:
        """An endpoint the server just stored: visible to the plan before the watch echoes it."""
        self._replica.objects["Endpoint"][ep.id] = ep

    def remove(self, ep_id: str) -> None:
        self._replica.objects["Endpoint"].pop(ep_id, None)

    def remove_handle(self, handle: str) -> None:
        """Remove the endpoints of a runtime handle (`<container id>/<ifname>`)."""
        eps = self._replica.objects["Endpoint"]
        for ep_id, ep in list(eps.items()):
            if getattr(ep, "handle", None) == handle:
                del eps[ep_id]

    def kick(self, gather: bool = True) -> None:
        """Ask for a plan soon (`gather=False`: at once, a local change such as a pod just plugged)."""
        self._kick(gather)

    # --- interfaces being plugged -----------------------------------------------------------------

    def protect(self, ifname: str) -> None:
        """No apply may remove this interface while it is being plugged (it is not planned yet)."""
        self._plugging[ifname] = time.monotonic()

    def unprotect(self, ifname: str) -> None:
        self._plugging.pop(ifname, None)

    def protected(self) -> KeysView[str]:
        """Interfaces being plugged right now, as a live view: an apply that started before a pod's
        veth appeared must still see it as protected when it lists the kernel's links."""
        now = time.monotonic()
        for name, t in list(self._plugging.items()):
            if now - t > PROTECT_FOR:
                del self._plugging[name]
        return self._plugging.keys()

    async def network(self, name: str, client: AsyncTetherClient) -> Network | None:
        """The network from the replica, else from the server (None: neither has it, or the server
        is away)."""
        net = self._replica.networks.get(name)
        if net is not None:
            return net
        try:
            return await client.get("Network", name)  # type: ignore[return-value]
        except (ApiError, ServerUnreachable):
            return None
