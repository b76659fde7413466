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
    # calc.host: endpoint id -> (endpoint, network, underlay MTU, its HostInterface, its routes)
    local: dict[str, tuple] = field(default_factory=dict)
    # calc.host: (the blocks, endpoint id -> (remote endpoint, its addresses outside its host's blocks))
    borrowed: tuple[tuple, dict[str, tuple]] = ((), {})
    # calc.pod_ingress: endpoint id -> (key, senders, its ingress chain)
    pod_chains: dict[str, tuple] = field(default_factory=dict)
    # calc.policy: (policy, direction, spec) -> its encoded rules and what makes its sets
    policy_rules: dict[tuple, tuple] = field(default_factory=dict)
    # calc.policy: (direction, jumped chains and their names) -> a dispatch chain's encoded rules
    dispatch_rules: dict[tuple, tuple[str, ...]] = field(default_factory=dict)
    # calc.policy: (endpoint id -> endpoint, (label key, value) -> endpoint id -> endpoint) of the last plan
    # (changed in place: a default of its own per Memos)
    policy_labels: tuple[dict, dict] = field(default_factory=lambda: ({}, {}))
    # calc.policy: selector -> the addresses it matched in the last plan, and the namespaces' labels then
    policy_peers: dict[str, list[str]] = field(default_factory=dict)
    policy_ns: dict[str, dict[str, str]] | None = None
    # calc.policy: endpoint id -> (endpoint, its workload key)
    workloads: dict[str, tuple] = field(default_factory=dict)
    # calc.services: (namespace, name) -> (service, (host, node addresses), its backends' endpoints,
    # its frontends) of a service with listed backends
    frontends: dict[tuple[str, str], tuple] = field(default_factory=dict)
    # calc.quarantine: (kind, name) -> (object, host, problem or None)
    checked: dict[tuple[str, str], tuple] = field(default_factory=dict)
    # calc.dns_records: ((zones, reverse networks, TTL), endpoint id -> (endpoint, network, its
    # records)) of the last build: an unchanged endpoint's part is reused (building every part again
    # was ~7 ms of the agent's CPU per pod added with 500 pods present, bench/cni.py)
    dns_endpoints: tuple[tuple, dict[str, Any]] = ((), {})
    # calc.dns_records: (what the last records were built from besides the objects, the last records,
    # how many parts give each name): the next build replaces only the changed objects' parts in them
    dns_last: tuple | None = None
    # calc.dns_records: (namespace, name) -> (service, its records) of the last build
    dns_services: dict[tuple[str, str], tuple] = field(default_factory=dict)
    # calc.dns_records: objects left out of the records, each logged once
    dns_skipped: set[tuple[str, str]] = field(default_factory=set)
