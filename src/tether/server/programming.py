"""Programming status: has every host that must act on an object applied it yet? (issue 25)

Pure: from the object, the hosts (each with the `applied_revision` its agent reported in
`Host.status`) and the set of hosts whose lease is alive. The one home of the rule, used by
`GET /api/v1/programming/...`, `tether get KIND NAME`, `tether wait --for programmed` and by
anything else that needs "is this object in effect" (an endpoint's `active` state).

Rule (simple and sound): a host has programmed an object when its agent reported an applied
revision >= the object's revision (the agent's replica held every change up to that revision when
the plan was applied) and it does not report the object quarantined, nor failed kernel operations.
Which hosts must act: the endpoint's own host for an endpoint; every registered host for the
cluster-wide kinds (policies, security groups, services, networks, namespaces), since any host
may hold a pod the object selects or that talks to it. A host whose lease expired is "down": it
counts as not programmed for a revision it never reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime

from tether.model import Endpoint, Host, Obj

PROGRAMMED, PENDING, DOWN, FAILING, QUARANTINED = "programmed", "pending", "down", "failing", "quarantined"


@dataclass
class HostProgress:
    host: str
    state: str  # one of PROGRAMMED, PENDING, DOWN, FAILING, QUARANTINED
    applied_revision: int
    reason: str = ""
    after_ms: float | None = None  # status report time minus the object's write time


@dataclass
class Programming:
    kind: str
    name: str
    revision: int
    hosts: list[HostProgress] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(1 for h in self.hosts if h.state == PROGRAMMED)

    @property
    def programmed(self) -> bool:
        return self.done == len(self.hosts)

    def summary(self) -> str:
        """'enforced on 3/3 hosts (revision 4812, 140 ms after write)', plus the hosts that are not."""
        verb = "enforced" if self.kind in ("NetworkPolicy", "SecurityGroup") else "programmed"
        worst = [h.after_ms for h in self.hosts if h.state == PROGRAMMED and h.after_ms is not None]
        when = f", {max(worst):.0f} ms after write" if worst and self.programmed else ""
        text = f"{verb} on {self.done}/{len(self.hosts)} hosts (revision {self.revision}{when})"
        lagging = [f"{h.host}: {h.state}" + (f" ({h.reason})" if h.reason else "")
                   for h in self.hosts if h.state != PROGRAMMED]
        return text + ("; " + "; ".join(lagging) if lagging else "")

    def as_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "revision": self.revision, "programmed": self.programmed,
                "done": self.done, "total": len(self.hosts), "summary": self.summary(),
                "hosts": [asdict(h) for h in self.hosts]}


def must_act(obj: Obj, hosts: list[Host]) -> list[Host]:
    """The hosts whose agents must apply `obj` before it is in effect."""
    if isinstance(obj, Endpoint):
        return [h for h in hosts if h.name == obj.host]
    return list(hosts)


def _ms(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return max(0.0, (later - earlier).total_seconds() * 1000)


def host_progress(obj: Obj, host: Host, alive: bool, written_at: datetime | None = None) -> HostProgress:
    """Where one host stands with one object."""
    st = host.status
    applied = st.applied_revision
    quarantined = [p for p in st.problems if p.kind == obj.kind and p.name in (obj.store_name(), obj.name, obj.id)]
    if quarantined:
        return HostProgress(host.name, QUARANTINED, applied, quarantined[0].reason)
    if applied >= obj.revision and not st.failed_ops:
        return HostProgress(host.name, PROGRAMMED, applied, after_ms=_ms(st.updated_at, written_at))
    if not alive:
        return HostProgress(host.name, DOWN, applied, "agent down: no heartbeat within its lease; "
                            f"last applied revision {applied}")
    if st.failed_ops:
        f = st.failed_ops[0]
        more = f" and {len(st.failed_ops) - 1} more" if len(st.failed_ops) > 1 else ""
        return HostProgress(host.name, FAILING, applied, f"kernel operation failed: {f.name}: {f.reason}{more}")
    return HostProgress(host.name, PENDING, applied, f"applied revision {applied} < {obj.revision}")


def programming(obj: Obj, hosts: list[Host], live: set[str], written_at: datetime | None = None) -> Programming:
    """The programming status of `obj` across the hosts that must act on it."""
    p = Programming(obj.kind, obj.store_name() if obj.kind != "SecurityGroup" else obj.name, obj.revision)
    for h in sorted(must_act(obj, hosts), key=lambda h: h.name):
        p.hosts.append(host_progress(obj, h, h.name in live, written_at))
    return p
