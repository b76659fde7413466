"""Pure calculation: the replica of desired state -> this host's Plan.

No I/O here. Routes for every remote block (VXLAN via the peer's VTEP address, or direct via its
underlay address), /32 routes for local endpoints and for borrowed addresses, the VTEP with static
FDB and neighbour entries, and the nftables table assembled from the base chains below plus the
fragments of the policy and services compilers.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace

from tether import yielding
from tether.calc import l3, pod_ingress, policy, services
from tether.calc.addresses import ip_version, v4_subnets
from tether.calc.counted import count_in, count_out
from tether.calc.memos import Memos
from tether.calc.names import (
    CT_DENIED,
    CT_PICKED,
    CT_REJUDGE,
    HAIRPIN_MARK,
    LINK_PREFIX,
    VTEP_NAME,
    VXLAN_OVERHEAD,
    VXLAN_PORT,
    stateless_chain,
    vtep_mac_for,
    vxlan_overhead,
)
from tether.calc.nft import (
    ACCEPT,
    COUNTER,
    DROP,
    FIB_LOCAL,
    L4_DPORT,
    MASQUERADE,
    NOTRACK,
    addr_field,
    ct,
    ct_bits,
    ct_mark_clear,
    ct_mark_or,
    denied,
    match,
    meta,
    one_or_set,
    payload,
    rule,
)
from tether.calc.plan import (
    BY_NAME,
    ElementDelta,
    FdbEntry,
    HostInterface,
    Neighbour,
    NftChain,
    NftPlan,
    NftSet,
    Plan,
    Route,
    Vtep,
    new_token,
)
from tether.calc.policy import stateless_targets
from tether.calc.replica import Replica
from tether.model import Block, Endpoint, Host, Network

SYSCTLS = (("net/ipv4/ip_forward", "1"), ("net/ipv6/conf/all/forwarding", "1"))


def endpoint_mtu(net: Network, underlay_mtu: int, overhead: int = VXLAN_OVERHEAD) -> int:
    """A pod interface's MTU: the underlay's, less VXLAN's `overhead` (`names.vxlan_overhead`: 70
    over an IPv6 underlay) unless the network routes directly."""
    if net.mtu:
        return net.mtu
    return underlay_mtu if net.encap == "direct" else underlay_mtu - overhead


def same_family(me: Host, peer: Host) -> bool:
    """Whether two hosts' underlay addresses are of one family: only then is there a path between
    them (one VTEP per host, whose tunnels use its underlay address's family; a direct route needs
    a next hop the underlay device can reach). Path health reports a pair that is not."""
    return ip_version(me.underlay_ip) == ip_version(peer.underlay_ip)


def path_mode(net: Network, me: Host, peer: Host) -> str:
    """`direct` or `vxlan` for traffic from `me` to `peer` on `net`."""
    if net.encap != "auto":
        return net.encap
    if me.underlay_cidr and same_family(me, peer):
        try:
            if ipaddress.ip_address(peer.underlay_ip) in ipaddress.ip_network(me.underlay_cidr, strict=False):
                return "direct"
        except ValueError:
            pass
    return "vxlan"


@dataclass(frozen=True)
class HostContext:
    name: str
    underlay_dev: str
    underlay_mtu: int


@functools.lru_cache(maxsize=4096)
def vtep_link_local(mac: str) -> str:
    """The IPv6 next hop for pod routes through a peer's VTEP: the modified EUI-64 link-local
    address of its MAC (RFC 4291), the one its kernel gives the device."""
    b = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([b[0] ^ 0x02, *b[1:3], 0xFF, 0xFE, *b[3:]])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid))


def host_prefix(ip: str) -> str:
    """The /32 or /128 of an endpoint address (validated by the model: no parsing needed)."""
    return f"{ip}/{32 if ip_version(ip) == 4 else 128}"


def pod_route(ip: str, dev: str) -> Route:
    """The host route to a local pod address. IPv6 routes have no scope (the kernel reports
    every one as universe): asking for `link` would differ from what is read back on every pass."""
    return Route(host_prefix(ip), dev, scope="link" if ip_version(ip) == 4 else "universe")


class BlockOwners:
    """Which host owns the block an address is in: one dict lookup per block size, where testing
    the address against every block was O(remote pods x blocks) per plan (40% of a plan with 1,000
    remote pods in 24 blocks). Blocks do not overlap (the server allocates them)."""

    def __init__(self) -> None:
        self.by_size: dict[tuple[int, int], dict[int, str | None]] = {}  # (version, shift) -> {prefix: host}

    def add(self, cidr: str, host: str | None) -> None:
        version, shift, key = _block_key(cidr)
        self.by_size.setdefault((version, shift), {})[key] = host

    def owner(self, ip: str) -> str | None:
        version, value = _address(ip)
        for (v, shift), table in self.by_size.items():
            if v == version:
                key = value >> shift
                if key in table:
                    return table[key]
        return None


@functools.lru_cache(maxsize=1 << 14)
def _block_key(cidr: str) -> tuple[int, int, int]:
    """(IP version, host bits, network number): parsed once per block, not in every plan."""
    net = ipaddress.ip_network(cidr)
    shift = net.max_prefixlen - net.prefixlen
    return net.version, shift, int(net.network_address) >> shift


@functools.lru_cache(maxsize=1 << 16)
def _address(ip: str) -> tuple[int, int]:
    a = ipaddress.ip_address(ip)
    return a.version, int(a)


def local_index(rep: Replica, host: str, memos: Memos) -> dict[str, Endpoint]:
    """`host`'s endpoints in `rep` by id (`Memos.mine`), and the nested endpoints' ids
    (`Memos.nested`): kept from one plan to the next and changed for the endpoints the journal
    names, where finding them was a pass over every endpoint of the cluster in each part of a plan."""
    delta = memos.delta("mine")
    eps = rep.objects["Endpoint"]
    if delta is None or memos.mine_host != host:
        memos.mine = {i: ep for i, ep in eps.items() if ep.host == host}  # type: ignore[attr-defined]
        memos.nested = {i for i, ep in eps.items() if ep.parent and not ep.interface}  # type: ignore[attr-defined]
        memos.mine_host = host
        return memos.mine
    mine, nested = memos.mine, memos.nested
    for i in delta.get("Endpoint", ()):
        ep: Endpoint | None = eps.get(i)  # type: ignore[assignment]
        if ep is not None and ep.host == host:
            mine[i] = ep
        else:
            mine.pop(i, None)
        if ep is not None and ep.parent and not ep.interface:
            nested.add(i)
        else:
            nested.discard(i)
    return mine


def mine_of(rep: Replica, host: str, memos: Memos | None) -> dict[str, Endpoint]:
    """This host's endpoints in `rep`: those `compute_plan` found for this plan, else by a pass."""
    if memos is not None and memos.mine_for[0] == (memos.generation, id(rep)):
        return memos.mine_for[1]
    return {ep.id: ep for ep in rep.endpoints if ep.host == host}


def children_of(rep: Replica, memos: Memos | None) -> dict[str, list[Endpoint]]:
    """`policy.nested_children` of `rep`: none to look for when the index knows of no nested endpoint."""
    if memos is not None and memos.mine_for[0] == (memos.generation, id(rep)) and not memos.nested:
        return {}
    return policy.nested_children(rep.endpoints)


def compute_plan(rep: Replica, ctx: HostContext, memos: Memos | None = None) -> Plan:
    """This host's plan, compiled per object: an object this host cannot apply (`quarantine`) is
    left out, and listed in the plan's `quarantined`, while every other object is applied.
    `memos`: what the last plan left (`Planner` keeps them); None computes everything cold."""
    from tether.calc import quarantine

    m = Memos() if memos is None else memos
    mine = local_index(rep, ctx.name, m)
    clean, bad = quarantine.screen(rep, ctx.name, m)
    if clean is not rep:  # this host's endpoints that are not quarantined
        mine = {i: ep for i, ep in mine.items() if i in clean.objects["Endpoint"]}
    m.mine_for = ((m.generation, id(clean)), mine)
    try:
        plan = _compute_plan(clean, ctx, m)
    except Exception as e:  # noqa: BLE001 - find the objects that make it raise, plan without them
        m.forget()
        plan, more = quarantine.isolate(clean, lambda r: _compute_plan(r, ctx, Memos()), e)
        bad = [*bad, *more]
    return replace(plan, quarantined=tuple(sorted(bad))) if bad else plan


def _route_to(ctx: HostContext, me: Host | None, vtep: Vtep | None, peer: Host, net: Network, dst: str,
              out: tuple[list[Route], list[FdbEntry], list[Neighbour]]) -> None:
    """What reaches `dst` (a block or a borrowed address of `peer`) on `net`: routes, FDB and
    neighbour entries, added to `out`."""
    routes, fdb, neighbours = out
    if me is None or not same_family(me, peer):
        return
    v6 = ":" in dst
    if path_mode(net, me, peer) == "direct":
        # IPv6 pods: the peer's reported IPv6 address (its underlay's link-local one), else its
        # IPv6 underlay address; IPv4 pods over an IPv6 underlay: an IPv6 next hop (RTA_VIA)
        via = (peer.underlay_ip6 or (peer.underlay_ip if ":" in peer.underlay_ip else None)) if v6 \
            else peer.underlay_ip
        if via:  # an IPv6 route needs an IPv6 next hop: a peer that reported none gets no route
            routes.append(Route(dst, ctx.underlay_dev, via=via))
        return
    if vtep is None or not peer.vtep_ip:
        return
    mac = peer.vtep_mac or vtep_mac_for(peer.name)
    fdb.append(FdbEntry(mac, peer.underlay_ip, VTEP_NAME))
    if v6:  # via the peer VTEP's link-local address, pinned to its MAC (no neighbour discovery)
        gw = vtep_link_local(mac)
        routes.append(Route(dst, VTEP_NAME, via=gw))
        neighbours.append(Neighbour(gw, mac, VTEP_NAME))
        return
    routes.append(Route(dst, VTEP_NAME, via=peer.vtep_ip, onlink=True))
    # the peer's VTEP address itself, over the tunnel: path health pings it (and the peer's
    # reply comes back the same way), so the overlay is checked, not only the underlay
    routes.append(Route(f"{peer.vtep_ip}/32", VTEP_NAME, via=peer.vtep_ip, onlink=True))
    neighbours.append(Neighbour(peer.vtep_ip, mac, VTEP_NAME))


class AddressIndex:
    """Endpoint ids by address, sorted per IP version: the endpoints inside a block's range (whose
    borrowed addresses a block change may change) by bisection, not by a pass over every endpoint.
    An address of one endpoint maps to its id, of several to a set of them (memory: one entry per
    endpoint address of the cluster)."""

    def __init__(self, eps: dict[str, Endpoint] | None = None) -> None:
        self.ids: dict[int, dict[int, str | set[str]]] = {4: {}, 6: {}}
        for i, ep in (eps or {}).items():
            for ip in ep.ips:
                self._add(*_address(ip), i)
        self.sorted: dict[int, list[int]] = {v: sorted(ids) for v, ids in self.ids.items()}

    def _add(self, version: int, n: int, i: str) -> bool:
        """Note `i` at an address; True when the address is new."""
        ids = self.ids[version]
        have = ids.get(n)
        if have is None:
            ids[n] = i
            return True
        if isinstance(have, set):
            have.add(i)
        elif have != i:
            ids[n] = {have, i}
        return False

    def add(self, i: str, ep: Endpoint) -> None:
        for ip in ep.ips:
            version, n = _address(ip)
            if self._add(version, n, i):
                bisect.insort(self.sorted[version], n)

    def remove(self, i: str, ep: Endpoint) -> None:
        for ip in ep.ips:
            version, n = _address(ip)
            ids = self.ids[version]
            have = ids.get(n)
            if isinstance(have, set):
                have.discard(i)
                if len(have) > 1:
                    continue
                if have:
                    ids[n] = next(iter(have))
                    continue
            elif have != i:
                continue
            del ids[n]
            lst = self.sorted[version]
            del lst[bisect.bisect_left(lst, n)]

    def within(self, cidr: str) -> set[str]:
        net = ipaddress.ip_network(cidr)
        lst, ids = self.sorted[net.version], self.ids[net.version]
        lo = bisect.bisect_left(lst, int(net.network_address))
        hi = bisect.bisect_right(lst, int(net.broadcast_address))
        out: set[str] = set()
        for n in lst[lo:hi]:
            have = ids[n]
            if isinstance(have, set):
                out |= have
            else:
                out.add(have)
        return out


class RemoteRoutes:
    """The routes, FDB and neighbour entries to other hosts' blocks and to remote endpoints'
    addresses borrowed from a block of another host, kept from one plan to the next
    (`Memos.remote`): a part per block and per endpoint, and how many parts give each entry. A
    plan changes the parts of the objects the journal names (and of the endpoints in a changed
    block's range or on a changed host) instead of visiting every endpoint of the cluster."""

    def __init__(self, key: tuple, rep: Replica) -> None:
        self.key = key  # (context, this host's underlay, VTEP): a change of any makes a new one
        self.parts: dict[tuple[str, str], tuple[tuple, ...]] = {}
        self.counts: tuple[dict, dict, dict] = ({}, {}, {})
        eps: dict[str, Endpoint] = rep.objects["Endpoint"]  # type: ignore[assignment]
        self.eps = dict(eps)  # every endpoint as this state last saw it
        self.by_host: dict[str | None, set[str]] = {}
        for i, ep in eps.items():
            self.by_host.setdefault(ep.host, set()).add(i)
        self.addresses = AddressIndex(eps)
        self.blocks: dict[str, Block] = dict(rep.objects["Block"])  # type: ignore[arg-type]
        self.owners = self._owners(rep)

    @staticmethod
    def _owners(rep: Replica) -> BlockOwners:
        owners = BlockOwners()
        for b in rep.blocks:
            owners.add(b.cidr, b.host)
        return owners

    def put(self, key: tuple[str, str], part: tuple[tuple, ...] | None) -> None:
        old = self.parts.pop(key, None)
        if old is not None:
            count_out(old, self.counts)
        if part is not None:
            self.parts[key] = part
            count_in(part, self.counts)

    def track(self, i: str, ep: Endpoint | None) -> None:
        old = self.eps.pop(i, None)
        if old is not None:
            self.by_host.get(old.host, set()).discard(i)
            self.addresses.remove(i, old)
        if ep is not None:
            self.eps[i] = ep
            self.by_host.setdefault(ep.host, set()).add(i)
            self.addresses.add(i, ep)


def _remote_routes(rep: Replica, ctx: HostContext, me: Host | None, vtep: Vtep | None, memos: Memos
                   ) -> RemoteRoutes:
    hosts, networks = rep.hosts, rep.networks
    eps: dict[str, Endpoint] = rep.objects["Endpoint"]  # type: ignore[assignment]
    blocks: dict[str, Block] = rep.objects["Block"]  # type: ignore[assignment]
    delta = memos.delta("remote")
    # what the parts read of this host (its status reports replace its object, unjournaled)
    key = (ctx, None if me is None else (me.underlay_ip, me.underlay_cidr), vtep)
    st: RemoteRoutes | None = memos.remote
    full = delta is None or st is None or st.key != key or "Network" in delta
    if full:
        st = RemoteRoutes(key, rep)
    assert st is not None
    memos.remote = None  # if this raises half way, the next plan starts afresh

    def block_part(b: Block | None) -> tuple[tuple, ...] | None:
        if b is None:
            return None
        net = networks.get(b.network)
        if net is None or b.host in (None, ctx.name) or b.host not in hosts:
            return None
        out: tuple[list, list, list] = ([], [], [])
        _route_to(ctx, me, vtep, hosts[b.host], net, b.cidr, out)
        return tuple(map(tuple, out)) if out[0] or out[1] or out[2] else None

    def ep_part(ep: Endpoint | None) -> tuple[tuple, ...] | None:
        if ep is None or ep.host == ctx.name:
            return None
        net = networks.get(ep.network)
        peer = hosts.get(ep.host or "")
        if net is None or peer is None:
            return None
        # an address borrowed from a block of another host needs its own route
        borrowed = [ip for ip in ep.ips if st.owners.owner(ip) != ep.host]
        if not borrowed:
            return None
        out: tuple[list, list, list] = ([], [], [])
        for ip in borrowed:
            _route_to(ctx, me, vtep, peer, net, host_prefix(ip), out)
        return tuple(map(tuple, out))

    if full:
        for name, b in blocks.items():
            st.put(("b", name), block_part(b))
        for i, ep in eps.items():
            yielding.checkpoint()
            st.put(("e", i), ep_part(ep))
        memos.remote = st
        return st
    assert delta is not None
    changed_eps = delta.get("Endpoint", set())
    for i in changed_eps:
        st.track(i, eps.get(i))
    affected = set(changed_eps)
    changed_blocks = delta.get("Block", ())
    if changed_blocks:
        for name in changed_blocks:  # the endpoints in a changed block's range, before and after
            for b in (st.blocks.pop(name, None), blocks.get(name)):
                if b is not None:
                    affected |= st.addresses.within(b.cidr)
            if name in blocks:
                st.blocks[name] = blocks[name]
        st.owners = RemoteRoutes._owners(rep)
        for name in changed_blocks:
            st.put(("b", name), block_part(blocks.get(name)))
    for h in delta.get("Host", ()):
        for name, b in blocks.items():
            if b.host == h:
                st.put(("b", name), block_part(b))
        affected |= st.by_host.get(h, set())
    for i in affected:
        st.put(("e", i), ep_part(eps.get(i)))
    memos.remote = st
    return st


def _compute_plan(rep: Replica, ctx: HostContext, memos: Memos) -> Plan:
    hosts = rep.hosts  # read once per endpoint below: a local, not the property
    me = hosts.get(ctx.name)
    networks = rep.networks
    routes: set[Route] = set()
    interfaces: set[HostInterface] = set()
    vtep = None
    # 70 bytes over an IPv6 underlay; the agent's CNI path sizes new pods the same (`LocalEndpoints.mtu`)
    overhead = vxlan_overhead(me.underlay_ip) if me is not None else VXLAN_OVERHEAD
    sizes = (ctx.underlay_mtu, overhead)
    needs_vtep = any(n.encap in ("vxlan", "auto") for n in networks.values())
    if me is not None and needs_vtep and me.vtep_ip:
        vtep = Vtep(VTEP_NAME, vni=4096, local_ip=me.underlay_ip, underlay_dev=ctx.underlay_dev,
                    mac=me.vtep_mac or vtep_mac_for(me.name), ip=me.vtep_ip,
                    mtu=ctx.underlay_mtu - overhead)
    remote = _remote_routes(rep, ctx, me, vtep, memos)

    local: dict[str, tuple] = {}  # this plan's local pods, kept for the next (`Memos.local`)
    for ep in mine_of(rep, ctx.name, memos).values():
        yielding.checkpoint()
        net = networks.get(ep.network)
        if net is None:
            continue
        if ep.interface:
            hit = memos.local.get(ep.id)
            if hit is None or hit[0] is not ep or hit[1] is not net or hit[2] != sizes:
                hit = (ep, net, sizes,
                       HostInterface(ep.interface, endpoint_mtu(net, *sizes), ep.id,
                                     (ep.mac or "").lower(), tuple(ep.ips)),
                       tuple(pod_route(ip, ep.interface) for ip in ep.ips))
            local[ep.id] = hit
            interfaces.add(hit[3])
            routes.update(hit[4])
        elif ep.parent:  # a nested container behind its VM's interface (issue 7)
            parent = rep.endpoint(ep.parent)
            if parent is not None and parent.interface and parent.host == ctx.name:
                for ip in ep.ips:
                    routes.add(pod_route(ip, parent.interface))

    memos.local = local
    routes.update(remote.counts[0])
    return Plan(vtep=vtep, routes=frozenset(routes), neighbours=frozenset(remote.counts[2]),
                fdb=frozenset(remote.counts[1]), interfaces=frozenset(interfaces),
                nft=compute_nft(rep, ctx, memos), sysctls=SYSCTLS, underlay_dev=ctx.underlay_dev)


# --- nftables --------------------------------------------------------------------------------------

CT_INVALID = match(ct("state"), "invalid", "in")
CT_PASSED = match(ct("state"), ["established", "related", "untracked"], "in")  # see base_nft
UDP_DPORT = payload("udp", "dport")
SVC_KEY = {"concat": [addr_field(4, "daddr"), meta("l4proto"), L4_DPORT]}
NODEPORT_KEY = {"concat": [meta("l4proto"), L4_DPORT]}
EPHEMERAL = 32768  # the lowest port of Linux's default ip_local_port_range (32768-60999)


REJUDGED = ct_bits(CT_REJUDGE)
NOT_SYN = match({"&": [payload("tcp", "flags"), "syn"]}, 0)
# addresses tracked since less than PICKUP_GRACE seconds (the agent adds them in the batch that starts
# tracking them; the kernel expires them): only their connections are picked up mid-stream
PICKUP_SETS = {4: "picked_grace", 6: "picked_grace6"}
PICKUP_GRACE = 30
POD_IFACES = LINK_PREFIX + "*"
VXLAN_REFUSED = "VXLAN from a pod or an unknown host"


def same_network_pairs(rep: Replica) -> frozenset[tuple[str, str]]:
    """(subnet, subnet) pairs of every network's IPv4 subnets: traffic that network isolation allows."""
    pairs = set()
    for n in l3.pod_networks(rep.networks.values()):
        v4 = v4_subnets(n)
        pairs.update((a, b) for a in v4 for b in v4)
    return frozenset(pairs)


def _in_subnets(field: str, cidrs: list[str]) -> dict:
    return match(addr_field(4, field), one_or_set(cidrs))


def stateless_chains(rep: Replica) -> list[NftChain]:
    """One chain per network with IPv4 subnets: not tracked when both ends are in the network and
    neither is in `stateful`. Pod packets reach it from their ingress chain (`pod_ingress`) and
    packets to a local pod from `local_dst4`, so the common case is hash lookups and prefix
    compares, never the pipapo `same_net` (bench/policy.py: that lookup alone added 4-5% to a round
    trip)."""
    chains = []
    for net in rep.networks.values():
        cidrs = v4_subnets(net)
        if cidrs:
            chains.append(NftChain(stateless_chain(net.name), (
                rule(match(addr_field(4, "saddr"), "@stateful", "!="), match(addr_field(4, "daddr"), "@stateful", "!="),
                     _in_subnets("saddr", cidrs), _in_subnets("daddr", cidrs), NOTRACK, comment="stateless"),)))
    return chains


def vxlan_peers(rep: Replica, host: str, version: int = 4) -> frozenset[str]:
    """The other hosts' underlay addresses of one family: the only sources this host decapsulates
    VXLAN from (`vxlan_peers`, or `vxlan_peers6` on a host with an IPv6 underlay)."""
    return frozenset(h.underlay_ip for h in rep.hosts.values()
                     if h.name != host and h.underlay_ip and ip_version(h.underlay_ip) == version)


def local_destinations(rep: Replica, host: str, mine: Iterable[Endpoint] | None = None) -> frozenset[tuple[str, str]]:
    """This host's endpoints' IPv4 addresses -> `goto` their network's stateless chain (`mine`:
    this host's endpoints, when known)."""
    targets = stateless_targets(rep.networks.values())
    eps = rep.endpoints if mine is None else mine
    return frozenset((ip, targets[ep.network]) for ep in eps if ep.host == host and ep.network in targets
                     for ip in ep.ips if ip_version(ip) == 4)


def needs_state(rep: Replica) -> str:
    """Why the hosts' tables need conntrack, or "" when nothing does: then a table has no `ct`
    expression, no nat chain and no `notrack`, so the kernel does not register conntrack in the
    host's namespace at all (registered, it costs a round trip between pods about 5% even when
    every packet is `notrack`ed, bench/NOTES.md#dataplane). Services (their VIPs are reached from every
    host, published ports too), masquerading networks, policies, security groups and disabled ports
    (the forward chain drops what is sent to them) need state; they are cluster-wide conditions, so
    every host's table is of the same kind."""
    if next(iter(rep.services), None) is not None:
        return "services"
    if any(n.nat_outgoing for n in rep.networks.values()):
        return "a nat-outgoing network"
    if next(iter(rep.policies), None) is not None:
        return "network policies"
    if any(ep.security_groups or ep.port_security for ep in rep.endpoints):  # a group nobody uses filters nothing
        return "security groups"
    if any(not ep.admin_state_up for ep in rep.endpoints):
        return "disabled ports"
    if l3.has_l3(rep):  # SNAT and floating IPs are NAT; routed pairs are judged in the forward chain
        return "routers or floating IPs"
    return ""


def needs_nat(rep: Replica) -> bool:
    """Whether the table with conntrack needs its nat chains: services (VIPs, node ports, hairpin,
    published ports), a masquerading network or a router's SNAT (`calc/l3.py`). Without them the
    nat base chains are left out: a registered nat chain is an nf_nat hook call on every packet at
    its hook, even for established connections that nothing translates (bench/policy.py, two per
    forwarded packet: round trip about 1.5%, bench/NOTES.md#policy). Connections that exist when
    the first such object appears are not translated afterwards, which no rule would do for them
    anyway (NAT is decided on a connection's first packet)."""
    return (next(iter(rep.services), None) is not None or any(n.nat_outgoing for n in rep.networks.values())
            or bool(l3.snat_subnets(rep)))


PICKUPS = tuple(  # TCP of a pod tracked since PICKUP_GRACE at most: no SYN, so not a new connection
    rule(match(ct("state"), "new", "in"), NOT_SYN,
         match(addr_field(v, end), "@" + name),
         ct_mark_or(CT_PICKED | CT_REJUDGE), {"goto": {"target": "midstream"}}, comment="picked up mid-stream")
    for v, name in PICKUP_SETS.items() for end in ("saddr", "daddr"))
DISPATCH = (  # the forward chain's verdict for a packet that conntrack does not pass
    rule({"vmap": {"key": meta("iifname"), "data": "@ep_out"}}),
    rule(match(meta("iifname"), POD_IFACES), match(meta("iifname"), VTEP_NAME, "!="), COUNTER,
         DROP, comment="unknown pod interface"),
    rule({"vmap": {"key": meta("oifname"), "data": "@ep_in"}}),
    rule(match(meta("oifname"), POD_IFACES), match(meta("oifname"), VTEP_NAME, "!="), COUNTER,
         DROP, comment="unknown pod interface"),
)
MIDSTREAM_DENIED = "denied connection, from its server"


def midstream_chains() -> tuple[NftChain, ...]:
    """Connections whose verdict is not settled: conntrack picked them up mid-stream (their pod
    became stateful, or the table switched from the one without conntrack), or a policy change
    marked them for judging again (`tether.dataplane.conntrack.rejudge`, ct mark `CT_REJUDGE`).

    Such a connection's packets towards its server are judged like a new connection's first
    packet (the policies' drops set `CT_DENIED`, an accept clears the marks: it is then an ordinary
    connection). Its packets from its server pass until one towards the server was denied: judging
    them as new connections from the server, which is what conntrack made of them, stalled a
    server push into a pod with default-deny ingress until its silent client sent a byte.
    Which end is the server: for a connection tracked from its SYN, conntrack's original direction;
    for one picked up mid-stream, the end whose port is below the ephemeral range when the other's is
    in it (otherwise each packet is judged on its own, as conntrack sees it)."""
    to_server = {"goto": {"target": "midstream_judge"}}
    from_server = {"goto": {"target": "midstream_from_server"}}
    return (
        NftChain("midstream", (
            rule(ct_bits(CT_PICKED, 0), match(ct("direction"), "reply"), from_server),
            rule(ct_bits(CT_PICKED, 0), to_server),
            rule(match(payload("tcp", "sport"), EPHEMERAL, "<"), match(payload("tcp", "dport"), EPHEMERAL, ">="),
                 from_server),
            rule(to_server),
        )),
        NftChain("midstream_from_server", (
            rule(ct_bits(CT_DENIED), COUNTER, DROP, comment=MIDSTREAM_DENIED),
            rule(ACCEPT),
        )),
        NftChain("midstream_judge", (
            rule(ct_mark_clear(CT_REJUDGE | CT_DENIED)),
            *DISPATCH,
            rule(ACCEPT),
        )),
    )


def base_nft(rep: Replica, host: str = "", stateful: bool = True, mine: Iterable[Endpoint] | None = None,
             svc_v6: bool | None = None) -> NftPlan:
    """The table every host has, apart from its pods' ingress chains (`pod_ingress`), which do the
    anti-spoofing.

    Without state (`needs_state`): no base chain at all (each is one more hook call on a packet's
    path, and `input` would be one per encapsulated packet on the receiving host, 1-2% of vxlan
    throughput here). So no host checks where VXLAN comes from: a pod's own is dropped where it is
    sent (`pod_ingress.vxlan_out_of_network`), and a machine on the underlay could route a packet
    to a pod with any source without VXLAN anyway (as it can with conntrack, for same-network
    sources). `vxlan_peers` stays, though nothing in this table looks it up (no cost per packet).

    With state: local pod interfaces default to "accept" in both directions (`ep_out`/`ep_in`); the
    policy fragment replaces those verdicts for pods that policies or security groups select.
    Stateless fast path: conntrack is only needed for stateful decisions, so packets between two
    addresses of one network are not tracked (`notrack`, in the network's `st-` chain, reached from
    a pod's ingress chain or here for packets to a local pod) unless either address is in
    `stateful`, which the policy fragment fills with its selected local endpoints and the services
    fragment with every backend and the frontends inside a network subnet; the forward chain accepts
    untracked packets (they have passed anti-spoofing, and isolation allows same-network traffic).
    Encapsulated VXLAN packets to and from this host's underlay address are not tracked either.
    The nat chains exist only while something needs them (`needs_nat`). `mine`: this host's
    endpoints, when known (else found among all); `svc_v6`: whether a service has an IPv6
    address, when known."""
    peers = NftSet("vxlan_peers", "ipv4_addr", elements=vxlan_peers(rep, host))
    if not stateful:
        return NftPlan(sets=(peers,))
    mine = list(rep.endpoints if mine is None else mine)
    local = sorted(ep.interface for ep in mine if ep.host == host and ep.interface)
    # Neutron's `port set --disable`: nothing reaches the port (its own ingress chain stops what it sends);
    # dropped before the established accept, so open connections stop too. Only in a table that has a
    # disabled port: a lookup on every forwarded packet costs ~4% of a round trip (bench/policy.py)
    disabled = sorted(ep.interface for ep in mine
                      if ep.host == host and ep.interface and not ep.admin_state_up)
    to_disabled = (denied(match(meta("oifname"), disabled[0] if len(disabled) == 1 else {"set": disabled}),
                          comment=pod_ingress.PORT_DISABLED),) if disabled else ()
    pods = l3.pod_networks(rep.networks.values())
    cidrs = sorted({c for n in pods for c in v4_subnets(n)})
    nat = sorted({c for n in pods if n.nat_outgoing for c in v4_subnets(n)})
    sets = (
        NftSet("tether_nets", "ipv4_addr", ("interval",), elements=frozenset(cidrs)),
        NftSet("nat_sources", "ipv4_addr", ("interval",), elements=frozenset(nat)),
        NftSet("same_net", ("ipv4_addr", "ipv4_addr"), ("interval",), elements=same_network_pairs(rep)),
        NftSet("stateful", "ipv4_addr"),
        peers,
        NftSet("local_dst4", "ipv4_addr", map_type="verdict", elements=local_destinations(rep, host, mine)),
        NftSet("ep_out", "ifname", map_type="verdict", elements=frozenset((i, "accept") for i in local)),
        NftSet("ep_in", "ifname", map_type="verdict", elements=frozenset((i, "accept") for i in local)),
        NftSet("svc_vips", ("ipv4_addr", "inet_proto", "inet_service"), map_type="verdict"),
        NftSet("svc_nodeports", ("inet_proto", "inet_service"), map_type="verdict"),
        *(NftSet(name, "ipv4_addr" if v == 4 else "ipv6_addr", ("timeout",), timeout=PICKUP_GRACE)
          for v, name in PICKUP_SETS.items()),
    )
    # IPv6 nat-outgoing: only when a masquerading network has an IPv6 subnet (an IPv4-only cluster's
    # table stays as it was); the source becomes the host's IPv6 address on the way out
    nat6 = sorted({s.cidr for n in rep.networks.values() if n.nat_outgoing for s in n.subnets if ":" in s.cidr})
    nat6_rules: tuple[str, ...] = ()
    if nat6:
        sets += (NftSet("nat_sources6", "ipv6_addr", ("interval",), elements=frozenset(nat6)),
                 NftSet("tether_nets6", "ipv6_addr", ("interval",), elements=frozenset(
                     s.cidr for n in rep.networks.values() for s in n.subnets if ":" in s.cidr)))
        nat6_rules = (rule(match(addr_field(6, "saddr"), "@nat_sources6"),
                           match(addr_field(6, "daddr"), "@tether_nets6", "!="),
                           MASQUERADE, comment="nat-outgoing"),)
    svc_lookups: tuple[str, ...] = (
        rule({"vmap": {"key": SVC_KEY, "data": "@svc_vips"}}),
        rule(FIB_LOCAL, {"vmap": {"key": NODEPORT_KEY, "data": "@svc_nodeports"}}),
    )
    if svc_v6 is None:
        svc_v6 = services.has_v6(rep.services)
    if svc_v6:  # the services fragment then declares `svc_vips6`
        svc_lookups = ipv6_published_lookup(svc_lookups)
        svc_lookups += (rule({"vmap": {"key": services.SVC_KEY6, "data": "@svc_vips6"}}),)
    me = rep.hosts.get(host)
    vxlan_in: tuple[str, ...] = ()
    vxlan_out: tuple[str, ...] = ()
    vxlan_refused: tuple[str, ...] = ()
    if me is not None and me.underlay_ip:
        v = ip_version(me.underlay_ip)
        peer_set = "@vxlan_peers" if v == 4 else "@vxlan_peers6"
        if v == 6:  # declared only here: an IPv4 underlay's table stays as it was
            sets += (NftSet("vxlan_peers6", "ipv6_addr", elements=vxlan_peers(rep, host, 6)),)
        vxlan_in = (rule(match(addr_field(v, "daddr"), me.underlay_ip), match(UDP_DPORT, VXLAN_PORT),
                         match(addr_field(v, "saddr"), peer_set), match(meta("iifname"), POD_IFACES, "!="),
                         NOTRACK, ACCEPT, comment="vxlan underlay"),)
        vxlan_out = (rule(match(addr_field(v, "saddr"), me.underlay_ip), match(UDP_DPORT, VXLAN_PORT), NOTRACK, ACCEPT,
                          comment="vxlan underlay"),)
        # what the rule above did not let through (tracked, so only its first packets come here):
        # the VTEP would decapsulate it and the inner packet's source would bypass anti-spoofing
        vxlan_refused = (denied(match(UDP_DPORT, VXLAN_PORT), comment=VXLAN_REFUSED),)
    # DHCP from this host's VM ports to its dnsmasq (calc/dhcp.py) whatever their security groups say,
    # as in Neutron; only in a table whose host has VM ports
    vm_taps = sorted(ep.interface for ep in mine
                     if ep.host == host and ep.interface and ep.owner.type == "vm")
    dhcp_in = (rule(match(meta("iifname"), vm_taps[0] if len(vm_taps) == 1 else {"set": vm_taps}),
                    match(UDP_DPORT, 67), ACCEPT, comment=pod_ingress.DHCP_CLIENT),) if vm_taps else ()
    nat_chains = (
        NftChain("prerouting_nat", svc_lookups, hook="prerouting", type="nat", priority=-100, policy="accept"),
        NftChain("output_nat", svc_lookups, hook="output", type="nat", priority=-100, policy="accept"),
        NftChain("postrouting_nat", (
            rule(ct_bits(HAIRPIN_MARK), MASQUERADE,
                 comment="hairpin and published ports"),
            rule(match(addr_field(4, "saddr"), "@nat_sources"), match(addr_field(4, "daddr"), "@tether_nets", "!="),
                 MASQUERADE, comment="nat-outgoing"),
            *nat6_rules,
        ), hook="postrouting", type="nat", priority=100, policy="accept"),
    ) if needs_nat(rep) else ()
    svc_reject = rule({"jump": {"target": "svc_reject"}})
    to_local_pod = {"vmap": {"key": addr_field(4, "daddr"), "data": "@local_dst4"}}
    chains = (
        NftChain("raw_prerouting", (
            # encapsulated VXLAN first, so the tunnel's own packets pass at once (never from a pod)
            *vxlan_in,
            # decapsulated packets to a local pod: straight to their network's stateless chain
            rule(match(meta("iifname"), VTEP_NAME), to_local_pod),
            # a pod's packet: its ingress chain has checked it and sent it to its stateless chain
            rule(match(meta("iifname"), POD_IFACES), match(meta("iifname"), VTEP_NAME, "!="), ACCEPT,
                 comment="decided by the pod's ingress chain"),
            rule(to_local_pod),  # e.g. from the underlay device (direct routing)
            # anything else (transit, prefix sources): the general pair lookup, hash lookups first
            rule(match(addr_field(4, "saddr"), "@stateful", "!="), match(addr_field(4, "daddr"), "@stateful", "!="),
                 match({"concat": [addr_field(4, "saddr"), addr_field(4, "daddr")]}, "@same_net"), NOTRACK,
                 comment="stateless"),
        ), hook="prerouting", type="filter", priority=-300, policy="accept"),
        *stateless_chains(rep),
        NftChain("raw_output", (*vxlan_out, svc_reject), hook="output", type="filter", priority=-300,
                 policy="accept"),
        NftChain("svc_reject", ()),  # frontends without backends; the services fragment fills it
        *nat_chains,
        NftChain("forward", (
            *to_disabled,
            # a connection marked for judging again (a policy changed, or picked up mid-stream): `midstream`
            rule(REJUDGED, match(ct("state"), "related", "!="), {"goto": {"target": "midstream"}}),
            rule(CT_PASSED, ACCEPT),
            rule(CT_INVALID, DROP),
            *PICKUPS,
            svc_reject,
            *DISPATCH,
        ), hook="forward", type="filter", priority=0, policy="accept"),
        *midstream_chains(),
        NftChain("input", (
            rule(CT_PASSED, ACCEPT),  # untracked here: only encapsulated VXLAN (pod addresses are not local)
            *vxlan_refused,
            *dhcp_in,
            rule({"vmap": {"key": meta("iifname"), "data": "@ep_out"}}),
        ), hook="input", type="filter", priority=0, policy="accept"),
    )
    return NftPlan(sets=sets, chains=chains)


def merge(base: NftPlan, *fragments: NftPlan, memo: dict[str, tuple] | None = None) -> NftPlan:
    """Add fragments to the base: chains by name are added; sets of the same name merge elements,
    and in maps a fragment's entry replaces the base's entry for the same key. Where one side is
    empty the other is kept as it is (its token and delta too: calc.plan.ElementDelta); `memo` (set
    name -> the last union) lets the union of a plain set carry a delta when the base's part is
    unchanged and the fragment's says how it changed (`stateful`: a policy's few local addresses
    and every service backend of the cluster)."""
    sets = {s.name: s for s in base.sets}
    chains = {c.name: c for c in base.chains}
    for frag in fragments:
        for s in frag.sets:
            old = sets.get(s.name)
            if old is None or (not old.elements and _same_definition(old, s)):
                sets[s.name] = s
            elif s.elements:
                sets[s.name] = _union(old, s, memo)
        for c in frag.chains:
            chains[c.name] = c
    return NftPlan(sets=tuple(sorted(sets.values(), key=BY_NAME)),
                   chains=tuple(sorted(chains.values(), key=BY_NAME)))


def _same_definition(a: NftSet, b: NftSet) -> bool:
    return (a.type, a.flags, a.map_type, a.timeout) == (b.type, b.flags, b.map_type, b.timeout)


def _union(old: NftSet, s: NftSet, memo: dict[str, tuple] | None) -> NftSet:
    """`old`'s elements with `s`'s (a map: `s`'s entry wins for a key), in `old`'s definition."""
    if old.map_type:
        keys = {k for k, _ in s.elements}
        elements = frozenset(e for e in old.elements if e[0] not in keys) | s.elements
        return NftSet(old.name, old.type, old.flags, old.map_type, elements, old.timeout)
    last = memo.get(s.name) if memo is not None else None
    d = s.delta
    if (last is not None and d is not None and last[1] == d.base
            and (last[0] is old.elements or last[0] == old.elements)):
        prev: NftSet = last[2]
        added, removed = d.added - old.elements, d.removed - old.elements  # `old` keeps its own
        elements = prev.elements - removed if removed else prev.elements
        out = NftSet(old.name, old.type, old.flags, old.map_type, elements | added if added else elements,
                     old.timeout, new_token(), ElementDelta(prev.token, added, removed))
    else:
        out = NftSet(old.name, old.type, old.flags, old.map_type, old.elements | s.elements, old.timeout,
                     new_token() if s.token else 0)
    if memo is not None and s.token:
        memo[s.name] = (old.elements, s.token, out)
    return out


def ipv6_published_lookup(lookups: tuple[str, ...]) -> tuple[str, ...]:
    """IPv6 node ports (`svc_nodeports6`) looked up before IPv4's `svc_nodeports`: that map is keyed by
    proto . port only, and an IPv6 packet sent to its IPv4-keyed chain would leave it un-NATed."""
    v6 = rule(FIB_LOCAL, match(meta("nfproto"), "ipv6"),
              {"vmap": {"key": services.NODEPORT_KEY6, "data": "@svc_nodeports6"}})
    at = next(i for i, r in enumerate(lookups) if "@svc_nodeports" in r)
    return (*lookups[:at], v6, *lookups[at:])


def compute_nft(rep: Replica, ctx: HostContext, memos: Memos | None = None) -> NftPlan:
    m = Memos() if memos is None else memos
    stateful = bool(needs_state(rep))
    mine = mine_of(rep, ctx.name, m).values()
    # in the order of their ids, not the replica's: the index keeps this host's endpoints in the
    # order it learnt them, and what is made first wins where two names collide (two policies of
    # one id in two namespaces, two endpoints of one interface)
    local = sorted((ep for ep in mine if ep.interface), key=lambda ep: ep.id)
    children = children_of(rep, m)
    me = rep.hosts.get(ctx.name)
    underlay6 = me is not None and ip_version(me.underlay_ip) == 6
    ingress = NftPlan(chains=tuple(pod_ingress.compile(local, children, rep.networks, stateful, m, underlay6)))
    yielding.checkpoint()
    if not stateful:
        return merge(base_nft(rep, ctx.name, stateful, mine), ingress)
    routed = l3.routed_pairs(rep)
    pol = policy.compile(list(rep.endpoints), list(rep.namespaces), list(rep.policies), list(rep.security_groups),
                         list(rep.networks.values()), ctx.name, m, routed=routed, local=local, children=children,
                         by_id=rep.objects["Endpoint"],  # type: ignore[arg-type]
                         policies_by_name=rep.objects["NetworkPolicy"])  # type: ignore[arg-type]
    yielding.checkpoint()
    # IPv4 node ports answer on an IPv4 underlay address: a host with an IPv6 one publishes IPv6 only
    by_id = rep.objects["Endpoint"]
    svc = services.compile(list(rep.services),
                           services.endpoint_index(by_id, m),  # type: ignore[arg-type]
                           list(rep.networks.values()), ctx.name,
                           [me.underlay_ip] if me and ip_version(me.underlay_ip) == 4 else [], m,
                           by_name=rep.objects["Service"])  # type: ignore[arg-type]
    yielding.checkpoint()
    # the services' parts kept for the next plan have no IPv6 address (else none are kept)
    kept = m.service_parts is not None and m.ran.get("service_parts") == m.generation
    base = base_nft(rep, ctx.name, stateful, mine, svc_v6=False if kept else None)
    if not l3.has_l3(rep):
        return merge(base, pol, svc, ingress, memo=m.unions)
    return merge(base, pol, svc, ingress, l3.compile(rep, ctx.name), memo=m.unions)


# --- connections a table change may now forbid ------------------------------------------------------

# chains and sets whose change can narrow a verdict: policy and group chains, dispatch chains and
# maps, peer and member sets, named ports, isolation (see calc/policy.py); not services, `st-` or
# `ing-` chains, and not `stateful` (a pod that becomes stateful is picked up mid-stream)
POLICY_PREFIXES = ("np", "sg", "in-", "out-", "sel", "pn-", "others", "ep_", "nested", "parent", "routed")


def _policy_name(name: str) -> bool:
    return name.startswith(POLICY_PREFIXES)


def rejudge_needed(report) -> bool:
    """Did an nft apply (its `NftReport`) change something that may forbid a connection it allowed
    before? Elements only added (a new pod, a new selector member) never do; the whole table
    replaced (first apply, a restart) may."""
    if report.full:
        return True
    if any(_policy_name(n) for n in (*report.chains_replaced, *report.chains_removed, *report.chains_added,
                                     *report.sets_removed, *report.sets_redefined)):
        return True
    for change in report.changes:  # element changes: "<set>: +<added> -<removed>"
        name, _, counts = change.partition(": ")
        if counts.startswith("+") and _policy_name(name) and not counts.endswith(" -0"):
            return True
    return False


def pickup_grace(addresses: frozenset[str]) -> list[dict]:
    """nft commands for the apply's batch: the addresses enter the `picked_grace` sets (expiring
    after PICKUP_GRACE s), so their connections are picked up mid-stream from the batch's commit on.
    `add set` with elements, not `add element` (see nft.add_into)."""
    out = []
    for v, name in PICKUP_SETS.items():
        elems = sorted(a for a in addresses if ip_version(a) == v)
        if elems:
            body = {"family": "inet", "table": "tether", "name": name, "type": "ipv4_addr" if v == 4 else "ipv6_addr",
                    "flags": ["timeout"], "timeout": PICKUP_GRACE, "elem": elems}
            out.append({"add": {"set": body}})
    return out


def rejudge_scope(rep: Replica, host: str, nft: NftPlan, mine: dict[str, Endpoint] | None = None) -> frozenset[str]:
    """The addresses of this host's endpoints (nested ones included) that the table tracks for a
    policy or group (in `stateful`): the connections a policy change may now forbid. `mine`: this
    host's endpoints in `rep` when known (`Planner.local_endpoints`), else found among all."""
    stateful = next((s.elements for s in nft.sets if s.name == "stateful"), frozenset())
    if not stateful:
        return frozenset()
    mine_eps = [ep for ep in rep.endpoints if ep.host == host] if mine is None else list(mine.values())
    local = {ep.id for ep in mine_eps if ep.interface}
    return frozenset(ip for ep in mine_eps
                     if (ep.id in local or ep.parent in local) and any(a in stateful for a in ep.ips) for ip in ep.ips)
