"""The Plan: what one host's kernel should hold, as plain data.

The agent's calculation (pure) produces a Plan from its replica of the desired state; the dataplane
(`links.py` for netlink, `nft.py` for nftables) diffs a Plan against the kernel and changes only the
difference. Everything here is immutable and hashable so plans can be compared and diffed cheaply.

Ownership marks, so a restarted agent can tell what is its own:
- links: names start with `LINK_PREFIX` (pod veths `tth<11 hex>`, the VTEP `tth.vxlan`), or are a VM
  port's `tap<port id[:11]>`; `names.own_link` says which, and the dataplane never creates, changes, hooks
  or deletes any other link whatever a plan says (an endpoint's `interface` comes from the API);
- routes: protocol number `RTPROT_TETHER`;
- nftables: the whole table `inet tether`;
- neighbours/FDB entries: those on the VTEP device (which is ours), plus pod-side gateway neighbours.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Literal

from tether.calc.names import VXLAN_PORT


@dataclass(frozen=True, slots=True, order=True)
class Route:
    """A route in the host's main table. `dst` is a CIDR ("10.1.0.5/32")."""

    dst: str
    dev: str
    via: str | None = None
    onlink: bool = False
    scope: Literal["link", "universe"] = "universe"


@dataclass(frozen=True, slots=True, order=True)
class Neighbour:
    """A permanent neighbour entry (IP -> MAC on a device)."""

    ip: str
    lladdr: str
    dev: str


@dataclass(frozen=True, slots=True, order=True)
class FdbEntry:
    """A static VXLAN forwarding entry: frames for `lladdr` go to the VTEP at `dst`."""

    lladdr: str
    dst: str
    dev: str


@dataclass(frozen=True, slots=True)
class Vtep:
    """The host's single VXLAN device (learning off, no flooding)."""

    name: str
    vni: int
    local_ip: str
    underlay_dev: str
    mac: str
    ip: str  # address of the VTEP device itself (/32), used as peers' onlink next hop
    mtu: int
    port: int = VXLAN_PORT


@dataclass(frozen=True, slots=True, order=True)
class HostInterface:
    """The host side of a pod veth that should exist (it is created by the CNI path, the plan keeps
    its settings right and lets the dataplane remove owned veths that are not in the plan)."""

    name: str
    mtu: int
    endpoint_id: str = ""
    mac: str = ""  # the pod side's MAC: with `ips`, permanent neighbours once the veth is up
    ips: tuple[str, ...] = ()  # the endpoint's own addresses (not those of nested endpoints behind it)


BY_NAME = operator.attrgetter("name")  # the order of a plan's sets and chains (a C-level sort key)

_tokens = itertools.count(1)


def new_token() -> int:
    """A number naming one set of elements for this process's life (see `NftSet.token`)."""
    return next(_tokens)


@dataclass(frozen=True, slots=True)
class ElementDelta:
    """How a set's elements came from those of an earlier plan's set (`base`, its token): `added`
    and `removed`. A part of the calculation that keeps its elements from one plan to the next says
    so, and the dataplane then applies a change in proportion to it, not to the set (a service's
    maps hold an entry per backend in the cluster: 10,000 at the scale lab's size)."""

    base: int
    added: frozenset[Any]
    removed: frozenset[Any]


@dataclass(frozen=True, slots=True)
class NftSet:
    """A named set (or, with `map_type`, a map / verdict map) in the Tether table.

    `type` is an nft type or a concatenation tuple, e.g. "ipv4_addr" or ("ipv4_addr", "inet_service").
    Elements are JSON-able nft element values; for maps each element is a (key, value) pair.
    """

    name: str
    type: str | tuple[str, ...]
    flags: tuple[str, ...] = ()
    map_type: str | tuple[str, ...] | None = None  # e.g. "verdict" for a verdict map
    elements: frozenset[Any] = frozenset()
    timeout: int | None = None  # seconds, for dynamic sets (session affinity)
    # `token` (not 0) names these elements: a set with the same token has the same elements; `delta`
    # tells how they came from the set whose token is `delta.base`. Neither takes part in equality.
    token: int = field(default=0, compare=False, repr=False)
    delta: ElementDelta | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class NftChain:
    """A chain; `hook` set for base chains. Each rule is a tuple of nft JSON statement dicts,
    kept as a JSON string so the plan stays hashable (see `rule()`)."""

    name: str
    rules: tuple[str, ...] = ()
    hook: str | None = None  # prerouting, input, forward, output, postrouting; ingress with `device`
    type: Literal["filter", "nat", "route"] | None = None
    priority: int | None = None
    policy: Literal["accept", "drop"] | None = None
    device: str | None = None  # the device of an ingress chain


@dataclass(frozen=True, slots=True)
class NftPlan:
    """The whole `inet tether` table. Applied atomically; set elements are diffed incrementally."""

    sets: tuple[NftSet, ...] = ()
    chains: tuple[NftChain, ...] = ()

    def set(self, name: str) -> NftSet | None:
        return next((s for s in self.sets if s.name == name), None)

    def chain(self, name: str) -> NftChain | None:
        return next((c for c in self.chains if c.name == name), None)


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one host's kernel should hold for Tether."""

    vtep: Vtep | None = None
    routes: frozenset[Route] = frozenset()
    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()
    interfaces: frozenset[HostInterface] = frozenset()
    nft: NftPlan = field(default_factory=NftPlan)
    sysctls: tuple[tuple[str, str], ...] = ()  # (path under /proc/sys, value), e.g. ("net/ipv4/ip_forward", "1")
    underlay_dev: str = ""  # the host's underlay device (from the agent's config): direct routes use it
    quarantined: tuple[Quarantined, ...] = ()  # objects left out of this plan, and why (calc/quarantine.py)


@dataclass(frozen=True, slots=True, order=True)
class Quarantined:
    """An object the agent could not apply and left out of its plan (every other object is applied)."""

    kind: str
    name: str
    reason: str
