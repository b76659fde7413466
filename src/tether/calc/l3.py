"""Pure: Neutron routers and floating IPs -> what each host's table adds (docs/ARCHITECTURE.md, "L3:
routers and floating IPs"). No I/O.

Distributed, as Neutron's DVR: every host already routes every pod address (a /32 or a block route),
so a router is not a device anywhere but three decisions each host makes itself:
- **routing between its subnets**: network isolation (calc/policy.py, `others-<net>`) lets a source
  in one of the router's IPv4 subnets reach a destination in another (`routed`, pairs of subnets);
- **SNAT to the outside**: with an external gateway and `enable_snat`, its subnets join
  `nat_sources`, so their traffic to anything outside the Tether networks is masqueraded to the
  sending host's address, as nat-outgoing is;
- **floating IPs**: on the host of the port, `fip_dnat` (floating -> fixed) in a nat prerouting
  chain before the services' and `fip_snat` (fixed -> floating, towards the outside only) in a nat
  postrouting chain before masquerade: NAT takes the first binding, so a port with a floating IP
  leaves as its floating IP, not as its host. Both chains exist only on a host with a floating IP
  (each base chain is one more hook on every packet).
External networks (`router:external`) hold no pod: their subnets are the floating range and are not
Tether networks to isolation, the stateless path or nat-outgoing (`pod_networks`).
"""

from __future__ import annotations

from collections.abc import Iterable

from tether.calc.addresses import ip_version
from tether.calc.nft import addr_field, match, rule
from tether.calc.plan import NftChain, NftPlan, NftSet
from tether.calc.replica import Replica
from tether.model import Network, Router, RouterInterface

FIP_DNAT_PRIORITY = -110  # before the services' DNAT (-100): a floating IP is not a service VIP
FIP_SNAT_PRIORITY = 98  # before svc_postrouting (99) and nat-outgoing (100): the first binding wins


def pod_networks(networks: Iterable[Network]) -> list[Network]:
    """The networks pods live on: every one but the external (floating IP) networks."""
    return [n for n in networks if not n.external]


def has_l3(rep: Replica) -> bool:
    return next(iter(rep.routers), None) is not None or next(iter(rep.floating_ips), None) is not None


def live_legs(rep: Replica, r: Router) -> list[RouterInterface]:
    """A router's interfaces whose subnet still exists with the same range (the API refuses to
    delete a subnet a router is on; an old replica may still show it)."""
    out = []
    for leg in r.interfaces:
        net = rep.networks.get(leg.network)
        if net is not None and not net.external and any(s.id == leg.subnet_id and s.cidr == leg.cidr
                                                         for s in net.subnets):
            out.append(leg)
    return out


def routed_pairs(rep: Replica) -> frozenset[tuple[str, str]]:
    """(source subnet, destination subnet) of every two IPv4 subnets on one router: what network
    isolation lets through."""
    pairs: set[tuple[str, str]] = set()
    for r in rep.routers:
        cidrs = sorted({leg.cidr for leg in live_legs(rep, r) if ip_version(leg.cidr) == 4})
        pairs.update((a, b) for a in cidrs for b in cidrs if a != b)
    return frozenset(pairs)


def snat_subnets(rep: Replica) -> frozenset[str]:
    """The IPv4 subnets of routers with an external gateway and SNAT on."""
    out: set[str] = set()
    for r in rep.routers:
        ext = rep.networks.get(r.external_network or "")
        if ext is None or not ext.external or not r.enable_snat:
            continue
        out.update(leg.cidr for leg in live_legs(rep, r) if ip_version(leg.cidr) == 4)
    return frozenset(out)


def floating_on(rep: Replica, host: str) -> frozenset[tuple[str, str]]:
    """(floating, fixed) of the floating IPs whose port is on `host` and still has the fixed address."""
    out = set()
    for f in rep.floating_ips:
        if f.endpoint is None or f.fixed_ip is None:
            continue
        ep = rep.endpoint(f.endpoint)
        if ep is not None and ep.host == host and f.fixed_ip in ep.ips:
            out.add((f.address, f.fixed_ip))
    return frozenset(out)


def _nat_by_map(kind: str, which: str, data: str) -> dict:
    """`dnat|snat ip to ip <which> map @data` (no element: the rule does not apply)."""
    return {kind: {"family": "ip", "addr": {"map": {"key": addr_field(4, which), "data": data}}}}


def compile(rep: Replica, host: str) -> NftPlan:
    """The L3 fragment of `host`'s table (merged by calc.host.merge; the table has conntrack)."""
    sets = [NftSet("nat_sources", "ipv4_addr", ("interval",), elements=snat_subnets(rep))]
    chains: list[NftChain] = []
    fips = floating_on(rep, host)
    if fips:
        sets += [NftSet("fip_dnat", "ipv4_addr", map_type="ipv4_addr", elements=fips),
                 NftSet("fip_snat", "ipv4_addr", map_type="ipv4_addr",
                        elements=frozenset((fixed, fip) for fip, fixed in fips))]
        chains += [
            NftChain("fip_prerouting", (rule(_nat_by_map("dnat", "daddr", "@fip_dnat"), comment="floating IP"),),
                     hook="prerouting", type="nat", priority=FIP_DNAT_PRIORITY, policy="accept"),
            NftChain("fip_postrouting", (
                rule(match(addr_field(4, "daddr"), "@tether_nets", "!="), _nat_by_map("snat", "saddr", "@fip_snat"),
                     comment="floating IP"),
            ), hook="postrouting", type="nat", priority=FIP_SNAT_PRIORITY, policy="accept"),
        ]
    return NftPlan(sets=tuple(sets), chains=tuple(chains))
