"""Pure compiler: each local pod interface's own ingress chain, the first thing its packets meet.

A base chain of family `inet` hooked at `ingress` on the host-side device (`ing-<interface>`),
holding compares against that one pod's values:
- a disabled endpoint (`admin_state_up` false, Neutron's `port set --disable`) sends nothing: one
  rule drops all, so it can neither start nor answer anything;
- anti-spoofing: the interface may send from its endpoint's addresses and MAC, its allowed address
  pairs and those of the nested endpoints behind it (IPv6 also from link-local addresses, and
  duplicate address detection and MLD reports from `::`), unless the endpoint's `anti_spoofing` is
  off (Neutron's port security off); a VM port may also ask DHCP from 0.0.0.0 (from its own MAC);
- in a table without conntrack (`calc.needs_state`), isolation between networks and the refusal of
  a pod's VXLAN outside its network, both at the sender (that table has no other chain);
- in a table with conntrack, a pod's VXLAN to the hosts that would decapsulate it (with any inner
  source, once masqueraded) is dropped, and an IPv4 packet goes on to its network's stateless
  chain (`st-<digest>`: not tracked when neither end needs state).
A new pod's host-side veth is created down and comes up only after the apply that made its chain
(`links.raise_interfaces`), so it sends nothing unchecked.

Why a chain per interface and not one lookup in a shared set keyed by (interface, MAC, address):
on these VMs the first set lookup in a packet's pass through a host costs 1-2 us, about 4% of a
round trip between pods on two hosts, while compares and a per-device chain cost nothing measurable
(docs/ARCHITECTURE.md, "What a pod's packet pays"). The hook is bound to the device's name on
recent kernels (checked on 6.18): the chain may be created before its veth exists, it stays when
the veth is deleted, and it applies again to a veth re-created with the same name.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from tether import yielding
from tether.calc import names
from tether.calc.addresses import ip_version, v4_subnets
from tether.calc.memos import Memos
from tether.calc.names import VXLAN_PORT, stateless_chain
from tether.calc.nft import ACCEPT, addr_field, denied, match, meta, one_or_set, payload, rule
from tether.calc.plan import NftChain
from tether.model import Endpoint, Network

PRIORITY = -500  # before anything else on the device
VXLAN_FROM_POD = "VXLAN from a pod"
SPOOFED_ADDRESS = "spoofed source address"
SPOOFED_MAC = "spoofed source MAC"
PORT_DISABLED = "port disabled"
DHCP_CLIENT = "DHCP from a VM port"


# A VM without an address asks DHCP from 0.0.0.0:68 to the broadcast address (RFC 2131 4.1); the
# host's dnsmasq answers (calc/dhcp.py). Passed after the MAC check, before the address checks.
DHCP_DISCOVER = rule(match(payload("ip", "saddr"), "0.0.0.0"), match(payload("ip", "daddr"), "255.255.255.255"),
                     match(payload("udp", "sport"), 68), match(payload("udp", "dport"), 67), ACCEPT,
                     comment=DHCP_CLIENT)


# What a pod's IPv6 stack sends from the unspecified address `::` (RFC 4862 5.4.2, RFC 3810 5.2.13):
# neighbour solicitations of duplicate address detection and MLD reports, both to link-local
# multicast groups, so they never leave the link. Passed; anything else from `::` is spoofed.
UNSPECIFIED_SOURCE = rule(match(payload("ip6", "saddr"), "::"),
                          match(payload("ip6", "daddr"), one_or_set(["ff02::/16"])),
                          match(payload("icmpv6", "type"),
                                {"set": ["mld-listener-report", "nd-neighbor-solicit", "mld2-listener-report"]}),
                          ACCEPT, comment="DAD and MLD from ::")


@functools.lru_cache(maxsize=1 << 16)
def source_prefix(address: str) -> tuple[int, str, bool]:
    """(IP version, canonical form, single address?) of an address or prefix a pod may send from.
    Memoised: every plan builds the changed pods' chains, and parsing is most of that."""
    net = ipaddress.ip_network(address, strict=False)
    if net.num_addresses == 1:
        return net.version, str(net.network_address), True
    return net.version, str(net), False


def _subnets(net: Network, version: int) -> list[str]:
    return [s.cidr for s in net.subnets if ip_version(s.cidr) == version]


def isolation_rules(senders: Iterable[Endpoint], networks: dict[str, Network], several: bool) -> list[str]:
    """Without conntrack: a pod's packet to another network's subnets is dropped where it is sent
    (`several`: the interface sends for endpoints of more than one network, so each rule names its
    senders' addresses too). Only when no policy or security group exists, so nothing could allow it."""
    out = []
    by_net: dict[str, list[str]] = {}
    for who in senders:
        by_net.setdefault(who.network, []).extend(who.ips)
    for name, ips in sorted(by_net.items()):
        net = networks.get(name)
        if net is None:
            continue
        for v in (4, 6):
            own = _subnets(net, v)
            others = [c for n in networks.values() if n.name != name for c in _subnets(n, v)]
            if not others:
                continue
            stmts = []
            mine = sorted(ip for ip in ips if ip_version(ip) == v)
            if several:
                if not mine:
                    continue
                stmts.append(match(addr_field(v, "saddr"), one_or_set(mine)))
            if own:
                stmts.append(match(addr_field(v, "daddr"), one_or_set(sorted(own)), "!="))
            stmts.append(match(addr_field(v, "daddr"), one_or_set(sorted(others))))
            out.append(denied(*stmts, comment=f"deny out isolation {name}"))
    return out


def vxlan_out_of_network(senders: tuple[Endpoint, ...], nets: list[Network | None], version: int = 4) -> str:
    """Without conntrack: a pod's UDP 4789 to anything outside its own network(s) is dropped here.
    Every host decapsulates VXLAN sent to any of its addresses (the kernel's socket is bound to
    none), a pod reaches its own host's (the resolver's, the VTEP's) and the other hosts' addresses,
    and no host checks the outer source in this table: so the sender does. Outside the network a
    pod's unmasqueraded packets find no way back anyway, unless the underlay routes pod subnets.
    `version` 6: the same for IPv6, on a host whose underlay (so whose peers' tunnels) is IPv6."""
    own = sorted({c for net in nets if net is not None for c in _subnets(net, version)})
    stmts = [match(addr_field(version, "daddr"), one_or_set(own), "!=")] if own else []
    return denied(match(meta("nfproto"), "ipv4" if version == 4 else "ipv6"), *stmts,
                  match(payload("udp", "dport"), VXLAN_PORT), comment=VXLAN_FROM_POD)


def ingress_chain(interface: str, senders: tuple[Endpoint, ...], networks: dict[str, Network], stateful: bool,
                  underlay6: bool = False) -> NftChain:
    """The chain of one interface; `senders`: its endpoint, then the nested endpoints behind it.
    `underlay6`: this host's underlay (and so its peers' tunnels) is IPv6, so a pod's VXLAN is
    refused over IPv6 as well (only then: an IPv4 underlay's chains stay as they were).
    Ordered for the common packet (IPv4, to its own network), which leaves after the fewest
    expressions: every expression counts on these VMs, where the chain is a pod's whole table."""
    nets = [networks.get(who.network) for who in senders]
    several = len({who.network for who in senders}) > 1
    if not senders[0].admin_state_up:
        return _chain(interface, [denied(comment=PORT_DISABLED)])
    rules: list[str] = []
    spoof_checks = senders[0].anti_spoofing
    if senders[0].mac and spoof_checks:
        macs = set()
        for who in senders:
            if who.mac:
                macs.add(who.mac.lower())
            macs.update(p.mac_address.lower() for p in who.allowed_address_pairs if p.mac_address)
        right = sorted(macs)[0] if len(macs) == 1 else {"set": sorted(macs)}
        rules.append(denied(match(payload("ether", "saddr"), right, "!="), comment=SPOOFED_MAC))
    if senders[0].owner.type == "vm" and spoof_checks:
        rules.append(DHCP_DISCOVER)
    allowed: dict[int, set[str]] = {4: set(), 6: {"fe80::/10"}}
    for who in senders:
        for a in [*who.ips, *(p.ip_address for p in who.allowed_address_pairs)]:
            version, canonical, _ = source_prefix(a)
            allowed[version].add(canonical)
    for v, proto in ((4, "ipv4"), (6, "ipv6")):
        own = _subnets(nets[0], v) if nets[0] is not None else []
        done = not stateful and not several and own  # isolation allows its own network: accepted
        mine = sorted(ip for ip in senders[0].ips if ip_version(ip) == v)
        if v == 6 and done and spoof_checks and mine:
            # the common IPv6 packet (from the pod's address to its network) leaves on two compares,
            # as IPv4's does, before the rules for `::` and link-local sources (bench/dataplane vxlan6)
            rules.append(rule(match(addr_field(6, "saddr"), one_or_set(mine)),
                              match(addr_field(6, "daddr"), one_or_set(sorted(own))), ACCEPT))
        if v == 6 and spoof_checks:  # before any address exists: duplicate address detection and MLD reports
            rules.append(UNSPECIFIED_SOURCE)
        if spoof_checks and allowed[v]:
            rules.append(denied(*_none_of(v, sorted(allowed[v])), comment=SPOOFED_ADDRESS))
        elif spoof_checks:
            rules.append(denied(match(meta("nfproto"), proto), comment=SPOOFED_ADDRESS))
        if done:
            rules.append(rule(match(addr_field(v, "daddr"), one_or_set(sorted(own))), ACCEPT))
    if not stateful:
        rules.append(vxlan_out_of_network(senders, nets))
        if underlay6:
            rules.append(vxlan_out_of_network(senders, nets, 6))
        rules.extend(isolation_rules(senders, networks, several))
        return _chain(interface, rules)
    # the peers accept VXLAN from this host's address, which a masqueraded packet has (calc.base_nft)
    rules.append(denied(match(payload("udp", "dport"), VXLAN_PORT), match(payload("ip", "daddr"), "@vxlan_peers"),
                        comment=VXLAN_FROM_POD))
    if underlay6:  # `vxlan_peers6` exists on such a host only (calc.base_nft)
        rules.append(denied(match(payload("udp", "dport"), VXLAN_PORT),
                            match(payload("ip6", "daddr"), "@vxlan_peers6"), comment=VXLAN_FROM_POD))
    if several:  # nested endpoints of another network: by source address first
        for who, net in zip(senders[1:], nets[1:], strict=True):
            mine = sorted(ip for ip in who.ips if ip_version(ip) == 4)
            if net is not None and mine and who.network != senders[0].network and v4_subnets(net):
                rules.append(rule(match(payload("ip", "saddr"), one_or_set(mine)),
                                  {"goto": {"target": stateless_chain(net.name)}}))
    if nets[0] is not None and v4_subnets(nets[0]):
        rules.append(rule({"goto": {"target": stateless_chain(nets[0].name)}}))
    return _chain(interface, rules)


def _none_of(v: int, sources: list[str]) -> list[dict]:
    """`saddr` is none of `sources`: an anonymous set, but for IPv6's usual two (the pod's address
    and fe80::/10) or three, compares, each cheaper than a set lookup on these VMs (see above)."""
    if v == 6 and len(sources) <= 3:
        return [match(addr_field(6, "saddr"), one_or_set([x]), "!=") for x in sources]
    return [match(addr_field(v, "saddr"), one_or_set(sources), "!=")]


def _chain(interface: str, rules: list[str]) -> NftChain:
    return NftChain(names.ingress_chain(interface), tuple(rules), hook="ingress", type="filter", priority=PRIORITY,
                    policy="accept", device=interface)


# endpoint id -> (key: ids of its senders, mode, networks; the senders; chain): the last plan's
# chains, so a plan with 500 pods builds the changed ones only. The entry holds the endpoint objects
# (replaced, never changed in place), so their ids are not reused while it lives.
def compile(local: list[Endpoint], children: dict[str, list[Endpoint]], networks: dict[str, Network],
            stateful: bool, memos: Memos | None = None, underlay6: bool = False) -> list[NftChain]:
    """The ingress chains of this host's pod interfaces (`memos.pod_chains`: the last plan's)."""
    last = memos.pod_chains if memos is not None else {}
    nets_key = tuple(sorted((n.name, tuple(s.cidr for s in n.subnets)) for n in networks.values()))
    memo: dict[str, tuple[tuple, tuple, NftChain]] = {}
    out = []
    for ep in local:
        yielding.checkpoint()
        senders = (ep, *children.get(ep.id, ()))
        key = (tuple(map(id, senders)), stateful, nets_key, underlay6)
        hit = last.get(ep.id)
        if hit is None or hit[0] != key:
            hit = (key, senders, ingress_chain(ep.interface or "", senders, networks, stateful, underlay6))
        memo[ep.id] = hit
        out.append(hit[2])
    if memos is not None:
        memos.pod_chains = memo
    return out
