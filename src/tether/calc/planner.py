"""The calculation's front door: one `Planner` per agent turns its replica into plans and DNS
records, keeping what one plan can reuse in the next (`Memos`) in itself, not in module globals."""

from __future__ import annotations

from collections.abc import Iterable

from tether.calc import dns_records
from tether.calc.host import HostContext, compute_nft, compute_plan
from tether.calc.memos import Memos
from tether.calc.plan import NftPlan, Plan
from tether.calc.replica import Replica
from tether.model import Endpoint, Network, Service


class Planner:
    def __init__(self) -> None:
        self.memos = Memos()

    def plan(self, rep: Replica, ctx: HostContext) -> Plan:
        """This host's whole plan (`calc.host.compute_plan`)."""
        return compute_plan(rep, ctx, self.memos)

    def nft(self, rep: Replica, ctx: HostContext) -> NftPlan:
        """This host's nft table alone (`calc.host.compute_nft`)."""
        return compute_nft(rep, ctx, self.memos)

    def dns(self, endpoints: Iterable[Endpoint], services: Iterable[Service], networks: Iterable[Network],
            serial: int = 0) -> dns_records.Records:
        """The cluster's DNS records (`calc.dns_records.build`)."""
        return dns_records.build(endpoints, services, networks, serial=serial, memos=self.memos)
