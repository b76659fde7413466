"""VM ports: this host's agent plugs every port bound to it (`binding:host_id`) as os-vif would.

A VM port is an Endpoint with `owner.type == "vm"`, `host` = this host and `interface` = its tap
name (`tap` + the port id's first 11 characters, as os-vif names it). A real VM's is a tap device
the agent creates (or adopts, when the hypervisor made it first); DHCP for it is `agent/dhcp.py`.
calc already treats it like any local endpoint (route, nftables maps); this service makes the
device exist: after each applied plan it compares the wanted VIFs with the kernel in a worker
thread, plugs or removes the difference, and asks for another plan pass so the routes through a
new tap are installed at once. It is an optional agent service (see `extras.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tether.agent.dhcp import DhcpService
from tether.agent.local_endpoints import LocalEndpoints
from tether.calc.host import endpoint_mtu
from tether.calc.names import VXLAN_OVERHEAD
from tether.calc.replica import Replica
from tether.client import ApiError, AsyncTetherClient, ServerUnreachable
from tether.dataplane.vif import VifSpec, reconcile_vifs
from tether.model import Endpoint

if TYPE_CHECKING:
    from tether.agent.extras import AgentHandle

log = logging.getLogger("tether.vmports")


def wanted_vifs(rep: Replica, host: str, underlay_mtu: int, overhead: int = VXLAN_OVERHEAD,
                endpoints: Iterable[Endpoint] | None = None) -> list[VifSpec]:
    """This host's VM ports to plug; a quarantined one (a foreign interface name, a netns outside
    the runtime's directories...) is not plugged (quarantine reports it). `endpoints`: the
    candidates when the caller knows this host's (`LocalEndpoints.here`; default: every one)."""
    from tether.calc.quarantine import problem

    out = []
    for ep in rep.endpoints if endpoints is None else endpoints:
        net = rep.networks.get(ep.network)
        if ep.host != host or ep.owner.type != "vm" or not ep.interface or net is None:
            continue
        if problem("Endpoint", ep, host) is not None or problem("Network", net, host) is not None:
            continue
        out.append(VifSpec(ep.id, ep.interface, ep.owner.netns, ep.owner.ifname or "eth0", tuple(ep.ips), ep.mac,
                           endpoint_mtu(net, underlay_mtu, overhead)))
    return sorted(out, key=lambda s: s.host_ifname)


class VmPorts:
    def __init__(self, local: LocalEndpoints, client: AsyncTetherClient) -> None:
        self.local = local
        self.client = client
        self.specs: list[VifSpec] = []
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run())
        self._waiting_logged: set[str] = set()
        self._errors_logged: set[str] = set()
        self._last_full = 0.0

    def update(self, replica: Replica) -> None:
        """Called after every applied plan. The kernel is read (a dump of every link: costly with
        hundreds of pods) only when this host's VM ports changed, at start, and every 30 s."""
        specs = wanted_vifs(replica, self.local.host, self.local.underlay_mtu, self.local.vxlan_overhead,
                            self.local.here(replica))
        now = time.monotonic()
        if specs != self.specs or now - self._last_full > 30:
            self.specs = specs
            self._last_full = now
            self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            specs = self.specs
            try:
                report = await asyncio.to_thread(reconcile_vifs, specs)
            except Exception:  # noqa: BLE001 - retried on the next pass
                log.exception("plugging VM ports failed")
                continue
            for name in report.plugged:
                log.info("plugged VM port %s", name)
            for name in report.removed:
                log.info("removed VM port %s (its port is gone)", name)
            for err in set(report.errors) - self._errors_logged:  # once each, not on every retry
                log.error("cannot plug VM port %s", err)
            self._errors_logged = set(report.errors)
            for name in set(report.waiting) - self._waiting_logged:
                log.warning("VM port %s waits for its VM namespace (binding:profile netns) to exist", name)
            self._waiting_logged = set(report.waiting)
            if report.plugged or report.removed:
                self.local.kick()  # routes through a new tap can now be installed
                await self._mark_active([s for s in specs if s.host_ifname in report.plugged])
            if report.waiting or report.errors:
                await asyncio.sleep(1)  # the VM namespace may appear later: look again
                self._wake.set()

    async def _mark_active(self, specs: list[VifSpec]) -> None:
        for s in specs:
            try:
                await self.client.patch_endpoint(s.port_id, {"status": "active"})
            except (ApiError, ServerUnreachable) as e:
                log.warning("could not mark port %s active: %s", s.port_id, e)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


async def start(agent: AgentHandle) -> list[VmPorts | DhcpService]:
    """VM ports and their DHCP (agent/dhcp.py): the DNS server VMs are told of is the agent's."""
    return [VmPorts(agent.local, agent.client),
            DhcpService(agent.host, agent.cfg.state_dir, agent.underlay_mtu, lambda: agent.dns_ip,
                        vxlan_overhead=agent.local.vxlan_overhead, here=agent.local.here)]
