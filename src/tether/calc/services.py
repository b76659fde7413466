"""Pure: Services -> the nftables fragment that load-balances them (the `svc_*` names of
docs/ARCHITECTURE.md). No I/O.

Why this shape: every packet-path decision is a map lookup keyed by the service frontend, and the
chains are generic, so adding or removing a backend (or a whole service) changes only map elements,
never rules:
- `svc_vips` (vip . proto . port) and `svc_nodeports` (proto . port) send a new connection to a
  shared chain `svc-lb-<N>` (N ready backends) or `svc-aff-<T>-<N>` (client-IP affinity, T seconds);
- that chain writes a slot 1..N into the packet mark (`numgen random mod N offset 1`, or the slot
  this client was given before) and DNATs through `svc_backend_ip`
  and `svc_backend_port` (frontend ip . proto . port . slot -> backend ip, port; two maps because
  nft 1.0.6's JSON cannot declare a map with concatenated data);
- affinity remembers a client's slot in the dynamic sets `svc_aff_<k>` (client . frontend . proto .
  port, per-element timeout): a client keeps its backend while the backend set is unchanged, and a
  slot above the current N is never read, so a removed backend gets no new connection;
- hairpin (a backend reaching its own service) and published-port traffic are source-NATed to the
  host's address in `svc_postrouting`, so replies come back through the host that translated them;
- a frontend without ready backends is rejected at once (`svc_empty`) instead of timing out.
The packet mark is used as a scratch register for the slot on a connection's first packet only.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from tether.calc import names
from tether.calc.addresses import ip_version, network, v4_subnets
from tether.calc.counted import count_in, count_out
from tether.calc.memos import Memos
from tether.calc.names import HAIRPIN_MARK, POD_GATEWAY6, lb_chain
from tether.calc.nft import (
    COUNTER,
    L4_DPORT,
    MARK,
    MASQUERADE,
    REJECT,
    addr_field,
    ct,
    ct_bits,
    ct_mark_or,
    mark_is,
    mark_random,
    match,
    meta,
    rule,
    set_mark,
)
from tether.calc.plan import ElementDelta, NftChain, NftPlan, NftSet, new_token
from tether.model import Endpoint, Network, Service, ServicePort

PREDEFINED_SLOTS = 16  # lb chains that always exist, so growing a service to 16 backends is element-only
SLOT_STEP = 16  # past that, lb chains are made for whole steps of slots (see `slot_chains`)


def slot_chains(most: int) -> int:
    """How many balancing chains (`svc-lb-1` .. `-n`) a table has when its largest frontend has
    `most` backends: PREDEFINED_SLOTS, or `most` rounded up to a whole SLOT_STEP. A service growing
    past the largest (one more pod of the biggest deployment: every agent gets it) is then an
    element change over netlink, not a new chain in an `nft` batch, except once per step."""
    return max(PREDEFINED_SLOTS, -(-most // SLOT_STEP) * SLOT_STEP)

FRONTEND = ("ipv4_addr", "inet_proto", "inet_service")
_DADDR = addr_field(4, "daddr")
_SADDR = addr_field(4, "saddr")
_PROTO = meta("l4proto")
CLIENT_KEY = {"concat": [_SADDR, _DADDR, _PROTO, L4_DPORT]}


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    ip: str
    port: int
    local: bool = False  # on this host


@dataclass(frozen=True, slots=True)
class Frontend:
    """One (address, protocol, port) a service answers on, with its ready backends."""

    service: str  # namespace/name
    ip: str
    proto: str  # "tcp" | "udp"
    port: int
    backends: tuple[Backend, ...]
    affinity: int | None  # seconds, when ClientIP affinity is on
    published: bool = False  # a node port (source-NATed unless keep_source)
    keep_source: bool = False  # externalTrafficPolicy Local: local backends only, the client's address kept
    # published on its own address only (Docker's -p IP:port, `Service.host_ip`): looked up by address in
    # the VIP map (`svc_vips`/`svc_vips6`), not by port on every local address (`svc_nodeports`/`6`)
    at_address: bool = False


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Every key of the selector has its value in the labels (an items subset test, in C: a
    selector service looks at each endpoint of its namespace when it is recomputed)."""
    return selector.items() <= labels.items()


def _of_version(ips: Iterable[str], version: int) -> str | None:
    """The first address of that version (endpoint addresses are valid ones: the model checks them)."""
    return next((ip for ip in ips if ip_version(ip) == version), None)


def has_v6(services: Iterable[Service]) -> bool:
    """Does any service have an IPv6 virtual IP? Only then do the tables get the IPv6 lookups, maps
    and chains (`V6` names), so an IPv4-only cluster's table is what it was."""
    return any(":" in ip for s in services for ip in s.vips())


def target_port(sp: ServicePort, ep: Endpoint | None) -> int | None:
    """The backend port for a service port: a number, or a named port the endpoint declares."""
    t = sp.target_port
    if t is None:
        return sp.port
    if isinstance(t, int) or (isinstance(t, str) and t.isdigit()):
        return int(t)
    if ep is None:
        return None
    return next((p.port for p in ep.ports if p.name == t and p.protocol == sp.protocol), None)


class EndpointIndex:
    """The endpoints by id and by namespace: looking a service's backends up in the whole endpoint
    list was O(services x endpoints) per plan (2 s of a plan with 500 services and 10,000 endpoints,
    bench/calc_scale.py). `by_id` may be the replica's own endpoint dict (keyed by id); `by_ns`
    (namespace -> id -> endpoint) and `by_label` ((namespace, label key, value) -> id -> endpoint)
    are given when the planner keeps them (`endpoint_index`), else `by_ns` is made when a selector
    first needs it."""

    __slots__ = ("by_id", "_by_ns", "by_label")

    def __init__(self, endpoints: Iterable[Endpoint] = (), by_id: dict[str, Endpoint] | None = None,
                 by_ns: dict[str, dict[str, Endpoint]] | None = None,
                 by_label: dict[tuple[str, str, str], dict[str, Endpoint]] | None = None) -> None:
        self.by_id: dict[str, Endpoint] = {ep.id: ep for ep in endpoints} if by_id is None else by_id
        self._by_ns = by_ns
        self.by_label = by_label

    @property
    def by_ns(self) -> dict[str, dict[str, Endpoint]]:
        if self._by_ns is None:
            self._by_ns = {}
            for key, ep in self.by_id.items():
                self._by_ns.setdefault(ep.namespace, {})[key] = ep
        return self._by_ns

    def candidates(self, namespace: str, selector: dict[str, str]) -> Iterable[Endpoint]:
        """Endpoints of the namespace among which `selector` picks: those with its rarest label
        when the label index is kept (a service looks at its few pods, not its namespace's)."""
        if self.by_label is not None and selector:
            return min((self.by_label.get((namespace, k, v), {}) for k, v in selector.items()), key=len).values()
        return self.by_ns.get(namespace, {}).values()


def endpoint_index(by_id: dict[str, Endpoint], memos: Memos) -> EndpointIndex:
    """`by_id` indexed by namespace and by label, the indexes kept in `memos` and changed for the
    endpoints the journal names: a selector service changed (or one an endpoint change concerns)
    is looked up among its pods, and building the index from every endpoint on each such plan was
    most of a service change at 10,000 endpoints (17 of 20 ms); scanning the namespace for the
    selector, 1.4 of a remote pod's 9 ms. An endpoint's quarantine verdict changes only with the
    endpoint, so the screened replica's endpoints change only where the journal says."""
    delta = memos.delta("endpoint_index")
    by_ns, by_label, indexed = memos.endpoints_by_ns, memos.endpoints_by_label, memos.endpoints_indexed
    if delta is None:
        by_ns, by_label, indexed = {}, {}, {}
        memos.endpoints_by_ns, memos.endpoints_by_label, memos.endpoints_indexed = by_ns, by_label, indexed
        keys: Iterable[str] = by_id
    else:
        keys = delta.get("Endpoint", ())
    for key in keys:
        old = indexed.pop(key, None)
        if old is not None:
            _unfile(by_ns, old.namespace, key)
            for k, v in old.labels.items():
                _unfile(by_label, (old.namespace, k, v), key)
        ep = by_id.get(key)
        if ep is not None:
            by_ns.setdefault(ep.namespace, {})[key] = ep
            for k, v in ep.labels.items():
                by_label.setdefault((ep.namespace, k, v), {})[key] = ep
            indexed[key] = ep
    return EndpointIndex(by_id=by_id, by_ns=by_ns, by_label=by_label)


def _unfile(index: dict, where: object, key: str) -> None:
    pool = index.get(where)
    if pool is not None:
        pool.pop(key, None)
        if not pool:
            del index[where]


def _index(endpoints: Iterable[Endpoint] | EndpointIndex) -> EndpointIndex:
    return endpoints if isinstance(endpoints, EndpointIndex) else EndpointIndex(endpoints)


def selected(svc: Service, endpoints: Iterable[Endpoint] | EndpointIndex) -> list[Endpoint]:
    """The ready endpoints a service's selector picks (same namespace, and network when it names one)."""
    if not svc.selector:
        return []
    pool = endpoints.candidates(svc.namespace, svc.selector) if isinstance(endpoints, EndpointIndex) else endpoints
    return [ep for ep in pool if ep.namespace == svc.namespace and ep.ready and selects(svc.selector, ep.labels)
            and (not svc.network or ep.network == svc.network)]


def headless_addresses(svc: Service, endpoints: Iterable[Endpoint] | EndpointIndex) -> list[str]:
    """What a headless service's name answers: its ready backends' addresses, sorted."""
    if svc.selector:
        return sorted({ip for ep in selected(svc, endpoints) for ip in ep.ips})
    by_id = _index(endpoints).by_id
    return sorted({b.ip for b in svc.backends if b.endpoint is None
                   or (b.endpoint in by_id and by_id[b.endpoint].ready)})


def backends_of(svc: Service, sp: ServicePort, endpoints: Iterable[Endpoint] | EndpointIndex, host: str,
                version: int = 4, chosen: list[Endpoint] | None = None) -> tuple[Backend, ...]:
    """Ready backends of one service port (their addresses of the frontend's IP `version`), in a
    stable order (so slots move as little as possible). `chosen`: `selected(svc, endpoints)`, when
    the caller has it."""
    out: set[Backend] = set()
    if svc.selector:
        for ep in selected(svc, endpoints) if chosen is None else chosen:
            ip, port = _of_version(ep.ips, version), target_port(sp, ep)
            if ip and port:
                out.add(Backend(ip, port, ep.host == host))
    else:
        by_id = _index(endpoints).by_id
        for b in svc.backends:
            ep = by_id.get(b.endpoint or "")
            if ep is not None and not ep.ready:
                continue
            port = target_port(sp, ep)
            if port and ip_version(b.ip) == version:  # validated by the model: no parsing needed
                out.add(Backend(b.ip, port, ep is not None and ep.host == host))
    return tuple(sorted(out))


def frontends(services: list[Service], endpoints: Iterable[Endpoint] | EndpointIndex, host: str,
              node_ips: list[str], memos: Memos | None = None) -> list[Frontend]:
    """Every frontend of `host`, in service order. With `memos`, a service with listed backends
    (no selector) whose object and backend endpoints are the last plan's keeps its frontends: an
    endpoint change then costs a lookup per backend, not a frontend per service port."""
    out: list[Frontend] = []
    endpoints = _index(endpoints)
    by_id = endpoints.by_id
    last = memos.frontends if memos is not None else {}
    kept: dict[tuple[str, str], tuple] = {}
    context = (host, tuple(node_ips))
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        if svc.selector:
            out += _frontends(svc, endpoints, host, node_ips)
            continue
        eps = tuple(by_id.get(b.endpoint or "") for b in svc.backends)
        key = (svc.namespace, svc.name)
        hit = last.get(key)
        if (hit is None or hit[0] is not svc or hit[1] != context or len(hit[2]) != len(eps)
                or not all(a is b for a, b in zip(hit[2], eps, strict=True))):
            hit = (svc, context, eps, _frontends(svc, endpoints, host, node_ips))
        kept[key] = hit
        out += hit[3]
    if memos is not None:
        memos.frontends = kept
    return out


def _frontends(svc: Service, endpoints: EndpointIndex, host: str, node_ips: list[str],
               chosen: list[Endpoint] | None = None) -> list[Frontend]:
    out: list[Frontend] = []
    aff = svc.affinity_timeout if svc.session_affinity == "ClientIP" else None
    local = svc.external_traffic_policy == "Local"
    if svc.selector and chosen is None:
        chosen = selected(svc, endpoints)  # once for every VIP and port
    for vip in svc.vips():
        version = ip_version(vip)
        for sp in svc.ports:
            backends = backends_of(svc, sp, endpoints, host, version, chosen)
            ref = f"{svc.namespace}/{svc.name}"
            proto = sp.protocol.lower()
            out.append(Frontend(ref, vip, proto, sp.port, backends, aff))
            # node ports; Docker's -p: its host (and address) only
            if svc.type == "NodePort" and sp.node_port and svc.host in (None, host):
                published = tuple(b for b in backends if b.local) if local else backends
                for ip in published_addresses(svc, version, node_ips):
                    out.append(Frontend(ref, ip, proto, sp.node_port, published, aff, published=True,
                                        keep_source=local, at_address=svc.host_ip is not None))
    return out


ANY_NODE_ADDRESS6 = "::"  # an IPv6 published port's frontend address: every local IPv6 address of the host


def published_addresses(svc: Service, version: int, node_ips: list[str]) -> list[str]:
    """Where a NodePort service's `version` VIP is published: on Docker's host_ip only when given (so
    only its family's node port is published, as `docker run -p IP:...` does); else IPv4 on the
    host's IPv4 underlay address and IPv6 on every local IPv6 address of the host
    (`ANY_NODE_ADDRESS6`), because the agent does not report a host's global IPv6 addresses."""
    if svc.host_ip:
        return [svc.host_ip] if ip_version(svc.host_ip) == version else []
    if version == 6:
        return [ANY_NODE_ADDRESS6]
    return node_ips


def _dnat(version: int = 4) -> dict:
    """DNAT to the backend in the drawn slot: `svc_backend_ip`/`_port` (`...6` for IPv6)."""
    v = "" if version == 4 else "6"
    key = {"concat": [addr_field(version, "daddr"), _PROTO, L4_DPORT, MARK]}
    return {"dnat": {"family": "ip" if version == 4 else "ip6",
                     "addr": {"map": {"key": key, "data": f"@svc_backend_ip{v}"}},
                     "port": {"map": {"key": key, "data": f"@svc_backend_port{v}"}}}}


# The balancing chains depend only on their arguments, and every plan has at least PREDEFINED_SLOTS
# of them (with their published-port entries): made once, not encoded again for every plan
@functools.lru_cache(maxsize=1024)
def random_chain(n: int, version: int = 4) -> NftChain:
    return NftChain(lb_chain(n, None, version), (rule(mark_random(n)), rule(_dnat(version))))


@functools.lru_cache(maxsize=1024)
def affinity_chain(timeout: int, n: int, version: int = 4) -> NftChain:
    """Reuse the client's remembered slot when it is still valid (<= n), else draw one; refresh it.
    The client is its address (IPv4 or IPv6) and the frontend's; slots are sets `svc_aff[6]_<k>`."""
    client = CLIENT_KEY if version == 4 else CLIENT_KEY6
    sets = "@svc_aff_" if version == 4 else "@svc_aff6_"
    rules = [rule(set_mark(0))]
    for k in range(1, n + 1):
        rules.append(rule(match(client, f"{sets}{k}"), set_mark(k)))
    rules.append(rule(mark_is(0), mark_random(n)))
    for k in range(1, n + 1):
        rules.append(rule(mark_is(k), {"set": {"op": "update", "elem": {"elem": {"val": client, "timeout": timeout}},
                                                 "set": f"{sets}{k}"}}))
    rules.append(rule(_dnat(version)))
    return NftChain(lb_chain(n, timeout, version), tuple(rules))


@functools.lru_cache(maxsize=1024)
def published_chain(target: str) -> NftChain:
    """Published-port entry: mark the connection for source NAT, then balance like the VIP."""
    return NftChain(names.published_chain(target), (
        rule(ct_mark_or(HAIRPIN_MARK)),
        rule({"goto": {"target": target}}),
    ))


# IPv6 frontends: the same shape under names with a 6 (`svc_vips6`, `svc6-lb-<N>`, ...), keyed by
# ip6 addresses. Published ports (node ports) answer on every local IPv6 address of the host:
# `svc_nodeports6` (proto . port) -> `svc6-np-...` chains that draw a slot like the VIP's and DNAT
# through `svc_np_backend_ip6`/`_port6` keyed by proto . port . slot (no node address: the agent
# does not know the host's global IPv6 addresses); they are masqueraded on the way out (the source
# becomes the host's IPv6 address towards the backend) unless externalTrafficPolicy is Local.
# Hairpin (`svc_hairpin6`) is source-NATed to the pods' IPv6 gateway fe80::1: a hairpinned packet
# always leaves through the sender's own veth, where that link-local address is its next hop (a
# host's IPv6 underlay address may be link-local on another link, which the pod cannot answer)
_DADDR6 = addr_field(6, "daddr")
_SADDR6 = addr_field(6, "saddr")
FRONTEND6 = ("ipv6_addr", "inet_proto", "inet_service")
CLIENT_KEY6 = {"concat": [_SADDR6, _DADDR6, _PROTO, L4_DPORT]}
SVC_KEY6 = {"concat": [_DADDR6, _PROTO, L4_DPORT]}


NODEPORT_KEY6 = {"concat": [_PROTO, L4_DPORT]}


def _dnat_published6() -> dict:
    """DNAT of an IPv6 published port: the slot's backend by proto . port . slot."""
    key = {"concat": [_PROTO, L4_DPORT, MARK]}
    return {"dnat": {"family": "ip6", "addr": {"map": {"key": key, "data": "@svc_np_backend_ip6"}},
                     "port": {"map": {"key": key, "data": "@svc_np_backend_port6"}}}}


@functools.lru_cache(maxsize=1024)
def published6_chain(n: int, timeout: int | None, keep_source: bool) -> NftChain:
    """An IPv6 published port over n slots: mark the connection for source NAT (unless Local), draw
    a slot (the client's remembered one with affinity, as the VIP's chain), DNAT."""
    rules = [] if keep_source else [rule(ct_mark_or(HAIRPIN_MARK))]
    if timeout is None:
        rules.append(rule(mark_random(n)))
    else:
        rules.extend(affinity_chain(timeout, n, 6).rules[:-1])  # all but its DNAT (keyed by the VIP)
    rules.append(rule(_dnat_published6()))
    return NftChain(names.published6_chain(n, timeout, keep_source), tuple(rules))


# the IPv4 rule before it (snat ip to the underlay address) does nothing to an IPv6 packet
PUBLISHED6_SNAT = rule(ct_bits(HAIRPIN_MARK), match(meta("nfproto"), "ipv6"), MASQUERADE,
                       comment="published port (IPv6)")


def published6(fes: list[Frontend]) -> tuple[list[NftSet], list[NftChain]]:
    """The IPv6 published ports of this host: `svc_nodeports6`, its backend maps and chains."""
    ports, backend_ip, backend_port, chains = set(), set(), set(), {}
    for f in fes:
        if not f.backends:
            continue  # nothing answers: the connection goes on to the host, as for IPv4
        chain = published6_chain(len(f.backends), f.affinity, f.keep_source)
        chains[chain.name] = chain
        if not f.at_address:  # those are looked up by address in `svc_vips6` (compile6)
            ports.add(((f.proto, f.port), f"goto {chain.name}"))
        for slot, b in enumerate(f.backends, start=1):
            backend_ip.add(((f.proto, f.port, slot), b.ip))
            backend_port.add(((f.proto, f.port, slot), b.port))
    key = ("inet_proto", "inet_service", "mark")
    sets = [NftSet("svc_nodeports6", ("inet_proto", "inet_service"), map_type="verdict", elements=frozenset(ports)),
            NftSet("svc_np_backend_ip6", key, map_type="ipv6_addr", elements=frozenset(backend_ip)),
            NftSet("svc_np_backend_port6", key, map_type="inet_service", elements=frozenset(backend_port))]
    return sets, [chains[k] for k in sorted(chains)]


def compile6(fes: list[Frontend]) -> tuple[list[NftSet], list[NftChain], str, str]:
    """The IPv6 part: sets, chains, the `svc_reject` rule for IPv6 frontends without backends and the
    `svc_postrouting` rule that source-NATs a backend reaching itself through its VIP (hairpin)."""
    max_n = max([1, *(len(f.backends) for f in fes)])
    timeouts = sorted({f.affinity for f in fes if f.affinity is not None})
    vips, backend_ip, backend_port, empty, hairpin = set(), set(), set(), set(), set()
    for f in fes:
        key = (f.ip, f.proto, f.port)
        if f.published:
            hairpin.update((b.ip, b.ip) for b in f.backends)
            if f.at_address and f.backends:  # on host_ip only: by address, to its `published6` chain
                vips.add((key, f"goto {names.published6_chain(len(f.backends), f.affinity, f.keep_source)}"))
            continue  # in `published6`
        if not f.backends:
            empty.add(key)
            continue
        vips.add((key, f"goto {lb_chain(len(f.backends), f.affinity, 6)}"))
        for slot, b in enumerate(f.backends, start=1):
            backend_ip.add(((f.ip, f.proto, f.port, slot), b.ip))
            backend_port.add(((f.ip, f.proto, f.port, slot), b.port))
            hairpin.add((b.ip, b.ip))
    chains = [random_chain(n, 6) for n in range(1, max_n + 1)]
    chains += [affinity_chain(t, n, 6) for t in timeouts for n in range(1, max_n + 1)]
    sets = [
        NftSet("svc_vips6", FRONTEND6, map_type="verdict", elements=frozenset(vips)),
        NftSet("svc_backend_ip6", (*FRONTEND6, "mark"), map_type="ipv6_addr", elements=frozenset(backend_ip)),
        NftSet("svc_backend_port6", (*FRONTEND6, "mark"), map_type="inet_service", elements=frozenset(backend_port)),
        NftSet("svc_empty6", FRONTEND6, elements=frozenset(empty)),
        NftSet("svc_hairpin6", ("ipv6_addr", "ipv6_addr"), elements=frozenset(hairpin)),
    ]
    if timeouts:
        sets += [NftSet(f"svc_aff6_{k}", ("ipv6_addr", "ipv6_addr", "inet_proto", "inet_service"),
                        flags=("timeout",), timeout=max(timeouts)) for k in range(1, max_n + 1)]
    reject = rule(match(SVC_KEY6, "@svc_empty6"), COUNTER, REJECT, comment="service without ready backends")
    hairpin_rule = rule(match(ct("status"), "dnat", "in"), match({"concat": [_SADDR6, _DADDR6]}, "@svc_hairpin6"),
                        {"snat": {"family": "ip6", "addr": POD_GATEWAY6}}, comment="hairpin")
    return sets, chains, reject, hairpin_rule


class ServiceParts:
    """What each service adds to the IPv4 maps and sets of the fragment, kept from one plan to the
    next (`Memos.service_parts`) with how many services add each element: a plan recomputes the
    services the journal names and those whose backends changed, instead of every frontend of the
    cluster. Not used while a service has an IPv6 address (those plans are made in full).
    Each set of the fragment it makes is named by a token and says what changed since the last
    one made (`plan.ElementDelta`); an unchanged one is the same frozenset, so the dataplane's work
    per change is the change, not the cluster's backends."""

    def __init__(self, key: tuple) -> None:
        self.key = key  # (host, node addresses, networks): a change of any makes a new one
        self.parts: dict[str, tuple[tuple, ...]] = {}  # store name -> its elements, per PART
        self.counts: tuple[dict, ...] = tuple({} for _ in PARTS)
        self.services: dict[str, Service] = {}
        self.by_backend: dict[str, set[str]] = {}  # listed backend endpoint id -> services
        self.by_namespace: dict[str, set[str]] = {}  # namespace -> services with a selector
        self.selected: dict[str, set[str]] = {}  # endpoint id -> the selector services that picked it
        self.picked: dict[str, tuple[str, ...]] = {}  # selector service -> the endpoints it picked
        self.v6 = 0  # services with an IPv6 address
        self.fragment: NftPlan | None = None  # made from these parts (None: since changed)
        # per set PART: the elements of the last fragment, their token, and the elements that may
        # have come or gone since (those of every part put in or taken out)
        self.made: list[frozenset] = [frozenset() for _ in SET_PARTS]
        self.tokens: list[int] = [0 for _ in SET_PARTS]
        self.touched: list[set] = [set() for _ in SET_PARTS]

    def put(self, name: str, svc: Service | None, part: tuple[tuple, ...] | None, picked: tuple[str, ...]) -> None:
        self.fragment = None
        old_svc = self.services.pop(name, None)
        if old_svc is not None:
            self.v6 -= has_v6([old_svc])
            for b in old_svc.backends:
                self.by_backend.get(b.endpoint or "", set()).discard(name)
            self.by_namespace.get(old_svc.namespace, set()).discard(name)
        for ep_id in self.picked.pop(name, ()):
            self.selected.get(ep_id, set()).discard(name)
        old = self.parts.pop(name, None)
        if old is not None:
            count_out(old, self.counts)
        for i in range(len(SET_PARTS)):
            if old is not None and (part is None or old[i] != part[i]):
                self.touched[i].update(old[i])
            if part is not None and (old is None or old[i] != part[i]):
                self.touched[i].update(part[i])
        if svc is None or part is None:
            return
        self.services[name] = svc
        self.v6 += has_v6([svc])
        if svc.selector:
            self.by_namespace.setdefault(svc.namespace, set()).add(name)
        for b in svc.backends:
            self.by_backend.setdefault(b.endpoint or "", set()).add(name)
        self.picked[name] = picked
        for ep_id in picked:
            self.selected.setdefault(ep_id, set()).add(name)
        self.parts[name] = part
        count_in(part, self.counts)

    def _elements(self, i: int) -> tuple[frozenset, int, ElementDelta | None]:
        """Set PART i as the fragment gets it: (elements, token, delta since the last fragment's)."""
        made, token, touched, counts = self.made[i], self.tokens[i], self.touched[i], self.counts[i]
        delta = None
        if token:
            added = frozenset(x for x in touched if x in counts and x not in made)
            removed = frozenset(x for x in touched if x not in counts and x in made)
            if not added and not removed:
                touched.clear()
                return made, token, None
            delta = ElementDelta(token, added, removed)
        touched.clear()
        self.made[i], self.tokens[i] = frozenset(counts), new_token()  # a C-level copy: the dict's hashes
        return self.made[i], self.tokens[i], delta

    def made_fragment(self, node_ips: list[str]) -> NftPlan:
        """The fragment of these parts (the last one while nothing was put since)."""
        if self.fragment is None:
            c = self.counts
            self.fragment = _fragment([self._elements(i) for i in range(len(SET_PARTS))],
                                      slot_chains(max(c[7], default=0)), sorted(c[8]), node_ips,
                                      bool(self.services), [], [], None, None)
        return self.fragment


# what a service adds, in ServiceParts.counts' order
PARTS = ("vips", "nodeports", "backend_ip", "backend_port", "empty", "hairpin", "tracked", "slots", "timeouts")
SET_PARTS = PARTS[:7]  # those that are sets of the fragment, in `_fragment`'s order
# the fragment's set made of each SET_PARTS part: (name, type, map type)
SET_SHAPES = (("svc_vips", FRONTEND, "verdict"), ("svc_nodeports", ("inet_proto", "inet_service"), "verdict"),
              ("svc_backend_ip", (*FRONTEND, "mark"), "ipv4_addr"),
              ("svc_backend_port", (*FRONTEND, "mark"), "inet_service"), ("svc_empty", FRONTEND, None),
              ("svc_hairpin", ("ipv4_addr", "ipv4_addr"), None), ("stateful", "ipv4_addr", None))


def _part(fes: list[Frontend], subnets: list) -> tuple[tuple, ...]:
    """IPv4 elements of frontends (one service's, kept by `ServiceParts`, or all of them, `_compile`).
    Service traffic needs conntrack for its NAT, so every backend is `tracked` (goes into
    `stateful`); a frontend only when it lies inside a network's subnet: the stateless rule matches
    only pairs of network subnets (calc.same_network_pairs), so traffic to a VIP outside them is
    tracked anyway, and listing those only grew the set two lookups per packet search (5,000 VIPs
    in bench/services.py)."""
    vips, nodeports, backend_ip, backend_port, empty, hairpin, tracked, slots, timeouts = ([] for _ in PARTS)
    for f in fes:
        if ip_version(f.ip) != 4:
            continue
        slots.append(len(f.backends))
        if f.affinity is not None:
            timeouts.append(f.affinity)
        tracked.extend(b.ip for b in f.backends if ip_version(b.ip) == 4)
        if any(network(f.ip).network_address in net for net in subnets):
            tracked.append(f.ip)
        key = (f.ip, f.proto, f.port)
        if not f.backends:
            if not f.published:
                empty.append(key)
            continue
        target = lb_chain(len(f.backends), f.affinity)
        if f.published:
            verdict = f"goto {target}" if f.keep_source else f"goto svc-np-{target.removeprefix('svc-')}"
            if f.at_address:
                vips.append((key, verdict))
            else:
                nodeports.append(((f.proto, f.port), verdict))
        else:
            vips.append((key, f"goto {target}"))
        for slot, b in enumerate(f.backends, start=1):
            backend_ip.append(((f.ip, f.proto, f.port, slot), b.ip))
            backend_port.append(((f.ip, f.proto, f.port, slot), b.port))
            hairpin.append((b.ip, b.ip))
    return tuple(map(tuple, (vips, nodeports, backend_ip, backend_port, empty, hairpin, tracked, slots, timeouts)))


def _service_parts(by_name: dict[str, Service], endpoints: EndpointIndex, networks: list[Network], host: str,
                   node_ips: list[str], memos: Memos) -> ServiceParts | None:
    """This plan's `ServiceParts`, changed for what the journal names; None when they cannot serve
    (a full plan: `compile` then makes them afresh for the next)."""
    delta = memos.delta("service_parts")
    st: ServiceParts | None = memos.service_parts
    memos.service_parts = None  # if this raises half way, the next plan starts afresh
    key = (host, tuple(node_ips), tuple(networks))
    if delta is None or st is None or st.key != key or st.v6:
        return None
    subnets = [network(c) for n in networks for c in v4_subnets(n)]
    affected = set(delta.get("Service", ()))
    for ep_id in delta.get("Endpoint", ()):
        affected |= st.by_backend.get(ep_id, set())
        affected |= st.selected.get(ep_id, set())
        ep = endpoints.by_id.get(ep_id)
        if ep is not None:
            affected.update(name for name in st.by_namespace.get(ep.namespace, ()) if _picks(st.services[name], ep))
    for name in affected:
        svc = by_name.get(name)
        if svc is None:
            st.put(name, None, None, ())
            continue
        chosen = selected(svc, endpoints)
        st.put(name, svc, _part(_frontends(svc, endpoints, host, node_ips, chosen), subnets),
               tuple(ep.id for ep in chosen))
    if st.v6:
        return None
    memos.service_parts = st
    return st


def _picks(svc: Service, ep: Endpoint) -> bool:
    """Would `selected` pick this endpoint for this service (one with a selector)?"""
    return (ep.namespace == svc.namespace and ep.ready and selects(svc.selector, ep.labels)
            and (not svc.network or ep.network == svc.network))


def compile(services: list[Service], endpoints: Iterable[Endpoint] | EndpointIndex, networks: list[Network],
            host: str, node_ips: list[str], memos: Memos | None = None,
            by_name: dict[str, Service] | None = None) -> NftPlan:
    """The services fragment for `host` (merged into the base table by calc.merge). With `memos`
    and `by_name` (the services by store name), the IPv4 elements are the last plan's changed for
    what the journal names (`ServiceParts`); the first plan, and any the journal cannot tell, make
    them all from the frontends."""
    if memos is None or by_name is None:
        return _compile(services, endpoints, networks, host, node_ips, memos)
    index = _index(endpoints)
    st = _service_parts(by_name, index, networks, host, node_ips, memos)
    if st is not None:  # (an unchanged fragment is the last plan's: node addresses are in the key)
        return st.made_fragment(node_ips)
    if has_v6(services):
        return _compile(services, index, networks, host, node_ips, memos)
    # the parts for the next plan, and this plan's fragment made from them
    subnets = [network(c) for n in networks for c in v4_subnets(n)]
    st = ServiceParts((host, tuple(node_ips), tuple(networks)))
    by_service: dict[str, list[Frontend]] = {}
    for f in frontends(services, index, host, node_ips, memos):
        by_service.setdefault(f.service, []).append(f)
    for name, svc in by_name.items():
        st.put(name, svc, _part(by_service.get(f"{svc.namespace}/{svc.name}", []), subnets),
               tuple(ep.id for ep in selected(svc, index)))
    memos.service_parts = st
    return st.made_fragment(node_ips)


def _compile(services: list[Service], endpoints: Iterable[Endpoint] | EndpointIndex, networks: list[Network],
             host: str, node_ips: list[str], memos: Memos | None = None) -> NftPlan:
    every = frontends(services, endpoints, host, node_ips, memos)
    fes = [f for f in every if ip_version(f.ip) == 4]
    sets6, chains6, reject6, hairpin6 = (compile6([f for f in every if ip_version(f.ip) == 6])
                                         if has_v6(services) else ([], [], None, None))
    if has_v6(services):
        np_sets6, np_chains6 = published6([f for f in every if f.published and ip_version(f.ip) == 6])
        sets6, chains6 = sets6 + np_sets6, chains6 + np_chains6
    subnets = [network(c) for n in networks for c in v4_subnets(n)]
    part = _part(fes, subnets)
    slots, timeouts = part[len(SET_PARTS)], part[len(SET_PARTS) + 1]
    return _fragment([(frozenset(x), 0, None) for x in part[:len(SET_PARTS)]], slot_chains(max(slots, default=0)),
                     sorted(set(timeouts)), node_ips, bool(services), sets6, chains6, reject6, hairpin6)


def _fragment(elements: list[tuple[frozenset, int, ElementDelta | None]], max_n: int, timeouts: list[int],
              node_ips: list[str], any_services: bool, sets6: list[NftSet], chains6: list[NftChain],
              reject6: str | None, hairpin6: str | None) -> NftPlan:
    """The fragment from its sets' elements, in SET_PARTS order, each (elements, token, delta)
    (`_compile`'s, or those `ServiceParts` keeps)."""
    chains = [random_chain(n) for n in range(1, max_n + 1)]
    chains += [affinity_chain(t, n) for t in timeouts for n in range(1, max_n + 1)]
    chains += [published_chain(c.name) for c in list(chains)]
    snat = [{"snat": {"family": "ip", "addr": node_ips[0]}}] if node_ips else [MASQUERADE]
    if any_services:  # a nat chain is a hook call on every packet: none without services (calc.host.needs_nat)
        chains.append(NftChain("svc_postrouting", (
            rule(match(ct("status"), "dnat", "in"), match({"concat": [_SADDR, _DADDR]}, "@svc_hairpin"),
                 *snat, comment="hairpin"),
            rule(ct_bits(HAIRPIN_MARK), *snat,
                 comment="published port"),
            *((hairpin6, PUBLISHED6_SNAT) if hairpin6 else ()),
        ), hook="postrouting", type="nat", priority=99, policy="accept"))
    # jumped to from the base table's forward chain (new connections) and raw_output chain: no base
    # chain of its own, because every base chain is one more hook on every packet's path
    chains.append(NftChain("svc_reject", (
        rule(match({"concat": [_DADDR, _PROTO, L4_DPORT]}, "@svc_empty"), COUNTER, REJECT,
             comment="service without ready backends"),
        *((reject6,) if reject6 else ()))))
    chains += chains6

    sets = [NftSet(name, typ, map_type=map_type, elements=els, token=token, delta=delta)
            for (name, typ, map_type), (els, token, delta) in zip(SET_SHAPES, elements, strict=True)]
    sets += sets6
    if timeouts:
        sets += [NftSet(f"svc_aff_{k}", ("ipv4_addr", "ipv4_addr", "inet_proto", "inet_service"),
                        flags=("timeout",), timeout=max(timeouts)) for k in range(1, max_n + 1)]
    return NftPlan(sets=tuple(sets), chains=tuple(chains))
