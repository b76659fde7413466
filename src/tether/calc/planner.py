"""The calculation's front door: one `Planner` per agent turns its replica into plans, keeping what
one plan can reuse in the next (`Memos`) in itself, not in module globals. (The DNS server keeps
its own `Memos` for the records: it builds them on its own schedule.)"""

from __future__ import annotations

from tether.calc.host import HostContext, compute_nft, compute_plan
from tether.calc.memos import Memos
from tether.calc.plan import NftPlan, Plan
from tether.calc.replica import JournaledDict, Replica


class Planner:
    def __init__(self) -> None:
        self.memos = Memos()
        # (journal, position, context) of the last plan: the next reads the journal from there
        self._last: tuple | None = None

    def plan(self, rep: Replica, ctx: HostContext) -> Plan:
        """This host's whole plan (`calc.host.compute_plan`)."""
        return self._run(rep, ctx, compute_plan)

    def nft(self, rep: Replica, ctx: HostContext) -> NftPlan:
        """This host's nft table alone (`calc.host.compute_nft`). Computed in full, from the replica
        as it is (no quarantine screen): what its parts keep is not what the next plan could build
        on, so that plan is a full one too."""
        m = self.memos
        m.generation += 1
        m.changed, self._last = None, None
        try:
            return compute_nft(rep, ctx, m)
        finally:
            m.forget()

    def _run(self, rep: Replica, ctx: HostContext, compute):  # noqa: ANN001, ANN202
        changed, here = changes_since(rep, ctx, self._last)
        m = self.memos
        m.generation += 1
        m.changed = changed
        self._last = None  # if this raises, the next plan is a full one
        try:
            out = compute(rep, ctx, m)
        except BaseException:
            m.forget()
            raise
        self._last = here
        return out

    def local_endpoints(self, rep: Replica) -> dict | None:
        """This host's endpoints in `rep` by id (quarantined ones too), when `rep` is what this
        planner planned last (`calc.host.rejudge_scope` then reads them, not every endpoint)."""
        _, here = changes_since(rep, None, None)
        last, m = self._last, self.memos
        if (here is None or last is None or here[:2] != last[:2] or m.ran.get("mine") != m.generation
                or m.mine_host != last[2].name):
            return None
        return self.memos.mine


def changes_since(rep: Replica, ctx: HostContext | None, last: tuple | None
                  ) -> tuple[dict[str, set[str]] | None, tuple | None]:
    """(kind -> names of the objects changed since `last`, or None: unknown; where `rep` is in its
    journal, or None: it has none to trust). Unknown when `rep` is not what the last plan's replica
    became through journaled writes: another replica, a snapshot loaded, the journal overflowed,
    objects not in journaled dicts, another context. A view is trusted to be as it was taken."""
    j = getattr(rep, "journal", None)
    if j is None:
        return None, None
    if j.origin is not None:  # a view (plain dicts, read only): its changes are the replica's when taken
        if j.entries or j.start or any(type(d) is not dict for d in rep.objects.values()):
            return None, None
        src, entries, start, end = j.origin
    else:
        src, entries, start, end = j.mark()
        if any(type(d) is not JournaledDict or d.journal is not j for d in rep.objects.values()):
            return None, None
    here = (src, end, ctx)
    if last is None or last[0] is not src or last[2] != ctx or not start <= last[1] <= end:
        return None, here
    changed: dict[str, set[str]] = {}
    for kind, name in entries[last[1] - start:end - start]:
        changed.setdefault(kind, set()).add(name)
    return changed, here
