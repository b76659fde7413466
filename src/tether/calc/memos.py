"""What the calculation keeps from one plan to the next: one `Memos` per agent (held by its
`Planner`), never a module global, so two planners (two agents in one process, a test beside
the agent) never share or evict each other's entries.

Every memo is keyed by an object's id and holds the object itself (objects in a replica are
replaced, never changed in place), so a hit is an identity check and ids are not reused while an
entry lives. A fresh `Memos` computes everything cold; the plan is the same either way
(tests/calc/test_golden_plans.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Memos:
    # the objects changed since the last plan, kind -> store names (`Planner` reads them from the
    # replica's journal), None: unknown (everything may have changed). A part that keeps state from
    # one plan to the next takes them through `delta`, which also says when its state is too old
    changed: dict[str, set[str]] | None = None
    generation: int = 0  # plans computed with these memos (`Planner` counts them)
    ran: dict[str, int] = field(default_factory=dict)  # part -> the generation it last ran in
    # calc.host: this host's endpoints (host == it) by id, and the ids of nested endpoints, of the
    # replica before quarantine; and (generation, id of the replica) -> this host's endpoints in it
    mine: dict[str, Any] = field(default_factory=dict)
    mine_host: str = ""
    nested: set[str] = field(default_factory=set)
    mine_for: tuple[tuple[int, int], dict[str, Any]] = ((0, 0), {})
    # calc.host: the routes, FDB and neighbour entries of remote blocks and endpoints (`RemoteRoutes`)
    remote: Any = None
    # calc.quarantine: (kind, name) -> Quarantined of the objects in the last plan's replica
    bad: dict[tuple[str, str], Any] = field(default_factory=dict)
    # calc.host: endpoint id -> (endpoint, network, underlay MTU, its HostInterface, its routes)
    local: dict[str, tuple] = field(default_factory=dict)
    # calc.pod_ingress: endpoint id -> (key, senders, its ingress chain)
    pod_chains: dict[str, tuple] = field(default_factory=dict)
    # calc.policy: (policy, direction, spec) -> its encoded rules and what makes its sets
    policy_rules: dict[tuple, tuple] = field(default_factory=dict)
    # calc.policy: (direction, jumped chains and their names) -> a dispatch chain's encoded rules
    dispatch_rules: dict[tuple, tuple[str, ...]] = field(default_factory=dict)
    # calc.policy: (endpoint id -> endpoint, (label key, value) -> endpoint id -> endpoint) of the last plan
    # (changed in place: a default of its own per Memos)
    policy_labels: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))
    # calc.policy: (store name -> policy, their postings by label, by namespace) of the last plan
    policy_postings: tuple[dict, dict, dict] = field(default_factory=lambda: ({}, {}, {}))
    # calc.policy: (direction, workload) -> its policies and groups, while no policy or group changed
    policy_layers: dict[tuple, tuple] = field(default_factory=dict)
    # calc.policy: namespace -> how many of those endpoints are in it
    policy_ep_ns: dict[str, int] = field(default_factory=dict)
    # calc.policy: selector -> the addresses it matched in the last plan (`Members`, changed in place
    # by the next), and the namespaces' labels then
    policy_peers: dict[str, Any] = field(default_factory=dict)
    policy_ns: dict[str, dict[str, str]] | None = None
    # calc.policy: endpoint id -> (endpoint, its workload key)
    workloads: dict[str, tuple] = field(default_factory=dict)
    # calc.services: (namespace, name) -> (service, (host, node addresses), its backends' endpoints,
    # its frontends) of a service with listed backends
    frontends: dict[tuple[str, str], tuple] = field(default_factory=dict)
    # calc.services: what each service adds to the fragment (`ServiceParts`), None: make them afresh
    service_parts: Any = None
    # calc.host.merge: set name -> (the base's elements, the fragment's token, their union) of the
    # last plan, so the next union can carry a delta (`calc.plan.ElementDelta`)
    unions: dict[str, tuple] = field(default_factory=dict)
    # calc.services: namespace -> endpoint id -> endpoint, (namespace, label key, value) -> endpoint
    # id -> endpoint, and endpoint id -> the endpoint indexed, of the last plan's (screened) replica
    # (`endpoint_index`)
    endpoints_by_ns: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoints_by_label: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    endpoints_indexed: dict[str, Any] = field(default_factory=dict)
    # calc.quarantine: (kind, name) -> (object, host, problem or None)
    checked: dict[tuple[str, str], tuple] = field(default_factory=dict)
    # calc.dns_records: objects left out of the records, each logged once
    dns_skipped: set[tuple[str, str]] = field(default_factory=set)

    def delta(self, part: str) -> dict[str, set[str]] | None:
        """The changes since `part` last ran, or None (compute it in full): when it did not run in
        the last plan its state is older than the changes known. Marks it as run in this plan."""
        last = self.ran.get(part)
        self.ran[part] = self.generation
        return self.changed if last is not None and last == self.generation - 1 else None

    def forget(self) -> None:
        """A plan failed half way: every part's state may be half updated, the next plan is full."""
        self.ran.clear()
        self.policy_peers = {}  # changed in place (calc.policy.Members)
