"""The calculation's front door: one `Planner` per agent turns its replica into plans, keeping what
one plan can reuse in the next (`Memos`) in itself, not in module globals. (The DNS server keeps
its own `Memos` for the records: it builds them on its own schedule.)"""

from __future__ import annotations

from tether.calc.host import HostContext, compute_nft, compute_plan
from tether.calc.memos import Memos
from tether.calc.plan import NftPlan, Plan
from tether.calc.replica import Replica


class Planner:
    def __init__(self) -> None:
        self.memos = Memos()

    def plan(self, rep: Replica, ctx: HostContext) -> Plan:
        """This host's whole plan (`calc.host.compute_plan`)."""
        return compute_plan(rep, ctx, self.memos)

    def nft(self, rep: Replica, ctx: HostContext) -> NftPlan:
        """This host's nft table alone (`calc.host.compute_nft`)."""
        return compute_nft(rep, ctx, self.memos)
