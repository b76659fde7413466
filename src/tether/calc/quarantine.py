"""Per-object quarantine: one bad object in the replica never stops a host's plan.

The server validates what clients send, but the agent does not rely on it (an older server, a
store written by hand, a validator with a gap): before planning, every object is checked with the
rules the agent's own compilers, nftables and netlink apply (`problem`); an object that fails is
left out of the plan and everything else is applied. Should a compiler still raise on the
remaining objects, `isolate` finds the objects that make it raise by bisection and leaves them out
too. Each quarantined object is logged once at WARNING (not on every retry), counted in
`tether_agent_quarantined_objects{kind}` and reported in the host's status (`HostStatus.problems`).

Pure apart from the log: the checks are cached per object (objects in the replica are replaced,
never changed in place), so a plan with hundreds of unchanged objects pays a dict lookup for each.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, TypeVar

from tether.calc.memos import Memos
from tether.calc.names import confined_netns, own_link
from tether.calc.plan import Quarantined
from tether.calc.replica import Replica
from tether.model import (
    DNS_LABEL,
    MAC,
    Block,
    Endpoint,
    FloatingIP,
    Host,
    Namespace,
    Network,
    NetworkPolicy,
    Obj,
    Router,
    SecurityGroup,
    Service,
)

T = TypeVar("T")

# the order objects are added back in when `isolate` looks for the one that makes a plan raise:
# what others depend on first, so the object found is the one that adds the failing part
ISOLATION_ORDER = ("Network", "Namespace", "Host", "Block", "SecurityGroup", "Endpoint", "NetworkPolicy", "Service",
                   "Router", "FloatingIP")
PROTOCOLS = {"tcp", "udp", "icmp", "sctp", "icmpv6", "ipv6-icmp", "any"}
DNS_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.?$")
MAX_LIST = 4096  # addresses, address pairs, rules, ports, backends per object: what a table can carry


def _ip(value: Any, what: str) -> None:
    try:
        ipaddress.ip_address(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {str(value)[:64]!r} is not an IP address") from None


def _net(value: Any, what: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {str(value)[:64]!r} is not an address or CIDR") from None


def _mac(value: Any, what: str) -> None:
    if not isinstance(value, str) or not MAC.match(value.lower()):
        raise ValueError(f"{what} {str(value)[:64]!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")


def _label(value: Any, what: str) -> None:
    if not isinstance(value, str) or not DNS_LABEL.match(value):
        raise ValueError(f"{what} {str(value)[:64]!r} is not a DNS label")


def _size(items: Any, what: str) -> None:
    if len(items) > MAX_LIST:
        raise ValueError(f"{what}: {len(items)} entries, more than {MAX_LIST}")


def _host(h: Host, me: str) -> None:
    _label(h.name, "host name")
    _ip(h.underlay_ip, "underlay_ip")
    if h.underlay_cidr:
        _net(h.underlay_cidr, "underlay_cidr")
    if h.vtep_ip:
        _ip(h.vtep_ip, "vtep_ip")
        if ipaddress.ip_address(h.vtep_ip).version != 4:
            raise ValueError(f"vtep_ip {h.vtep_ip!r} is not an IPv4 address")
    if h.vtep_mac:
        _mac(h.vtep_mac, "vtep_mac")


def _network(n: Network, me: str) -> None:
    _label(n.name, "network name")
    for s in n.subnets:
        _net(s.cidr, "subnet")
    if not isinstance(n.dns_domain, str) or not DNS_NAME.match(n.dns_domain.lower()):
        raise ValueError(f"dns_domain {str(n.dns_domain)[:64]!r} is not a DNS name")
    if n.encap not in ("vxlan", "direct", "auto"):
        raise ValueError(f"encap {str(n.encap)[:32]!r} is not vxlan, direct or auto")


def _block(b: Block, me: str) -> None:
    net = ipaddress.ip_network(b.cidr)  # ValueError names the value
    if net.prefixlen == 0:
        raise ValueError(f"block {b.cidr} covers every address")


def _endpoint(ep: Endpoint, me: str) -> None:
    _label(ep.name, "endpoint name")
    _size(ep.ips, "ips")
    _size(ep.allowed_address_pairs, "allowed_address_pairs")
    for ip in ep.ips:
        _ip(ip, "ip")
    if ep.mac is not None:
        _mac(ep.mac, "mac")
    for p in ep.allowed_address_pairs:
        _net(p.ip_address, "allowed address pair")
        if p.mac_address:
            _mac(p.mac_address, "allowed address pair MAC")
    if ep.host == me and ep.interface is not None and not own_link(ep.interface):
        raise ValueError(f"interface {ep.interface[:64]!r} is not a Tether device name: this agent only "
                         "touches its own links (tth..., or tap<port id> for a VM port)")
    if ep.host == me and ep.owner.type == "vm" and ep.owner.netns:
        confined_netns(ep.owner.netns)


def _security_group(sg: SecurityGroup, me: str) -> None:
    _size(sg.rules, "rules")
    for r in sg.rules:
        if r.protocol not in (None, ""):
            p = str(r.protocol).lower()
            if p not in PROTOCOLS and not (p.isdigit() and 0 <= int(p) <= 255):
                raise ValueError(f"rule protocol {str(r.protocol)[:32]!r} is not tcp, udp, icmp, icmpv6, sctp, any "
                                 "or a number 0-255")
        for v in (r.port_range_min, r.port_range_max):
            if v is not None and not 0 <= v <= 65535:
                raise ValueError(f"rule port {v} is outside 0-65535")
        if (r.port_range_min is not None and r.port_range_max is not None and r.port_range_min > r.port_range_max
                and str(r.protocol).lower() not in ("icmp", "icmpv6", "ipv6-icmp", "1", "58")):
            raise ValueError(f"rule port range {r.port_range_min}-{r.port_range_max} is empty")
        if r.remote_ip_prefix:
            _net(r.remote_ip_prefix, "rule remote_ip_prefix")


def _policy(p: NetworkPolicy, me: str) -> None:
    from tether.calc.k8s_validation import validate_network_policy

    _label(p.namespace, "policy namespace")  # the name: a DNS subdomain, checked below
    errors = validate_network_policy(p.spec, p.name)
    if errors:
        raise ValueError("; ".join(errors)[:300])


def _service(s: Service, me: str) -> None:
    _label(s.name, "service name")
    _label(s.namespace, "service namespace")
    _size(s.ports, "ports")
    _size(s.backends, "backends")
    for vip in s.vips():
        _ip(vip, "cluster_ip")
    for b in s.backends:
        _ip(b.ip, "backend ip")
    for p in s.ports:
        if p.name is not None:
            _label(p.name, "port name")
        if isinstance(p.target_port, str):
            _label(p.target_port, "target port name")
        elif p.target_port is not None and not 1 <= p.target_port <= 65535:
            raise ValueError(f"target port {p.target_port} is outside 1-65535")


def _namespace(n: Namespace, me: str) -> None:
    _label(n.name, "namespace name")


def _router(r: Router, me: str) -> None:
    for leg in r.interfaces:
        _ip(leg.ip, "router interface address")
        _net(leg.cidr, "router interface subnet")


def _floating_ip(f: FloatingIP, me: str) -> None:
    _ip(f.address, "floating IP")
    if f.fixed_ip is not None:
        _ip(f.fixed_ip, "fixed IP")


CHECKS: dict[str, Callable[[Any, str], None]] = {
    "Host": _host, "Network": _network, "Block": _block, "Endpoint": _endpoint, "SecurityGroup": _security_group,
    "NetworkPolicy": _policy, "Service": _service, "Namespace": _namespace, "Router": _router,
    "FloatingIP": _floating_ip,
}

def problem(kind: str, obj: Obj, me: str, memos: Memos | None = None) -> str | None:
    """Why this host's agent cannot apply `obj` (None: it can). Cached per object in `memos.checked`."""
    checked = memos.checked if memos is not None else {}
    key = (kind, obj.store_name())
    hit = checked.get(key)
    if hit is not None and hit[0] is obj and hit[1] == me:
        return hit[2]
    try:
        CHECKS[kind](obj, me)
        reason = None
    except Exception as e:  # noqa: BLE001 - whatever the check trips over is the object's problem
        reason = str(e) or type(e).__name__
    checked[key] = (obj, me, reason)
    return reason


def screen(rep: Replica, me: str, memos: Memos | None = None) -> tuple[Replica, list[Quarantined]]:
    """The replica without the objects this host cannot apply, and those objects with the reason.
    The replica itself when nothing is wrong (no copy)."""
    bad: list[Quarantined] = []
    checked = memos.checked if memos is not None else {}
    delta = memos.delta("screen") if memos is not None else None
    if delta is not None and memos is not None:  # the objects changed since the last plan only
        for kind, changed in delta.items():
            objs = rep.objects.get(kind, {})
            for name in changed:
                obj = objs.get(name)
                reason = None if obj is None else problem(kind, obj, me, memos)
                if reason is None:
                    memos.bad.pop((kind, name), None)
                    if obj is None:
                        checked.pop((kind, name), None)
                else:
                    memos.bad[(kind, name)] = Quarantined(kind, name, reason)
        bad = list(memos.bad.values())
        return _screened(rep, bad)
    for kind, objs in rep.objects.items():
        for name, obj in objs.items():
            # an unchanged object's verdict, looked up inline: once per object per plan (10,000
            # endpoints), a call per object was most of this pass. The replica keys objects by
            # their store name; an object under another key is only ever a miss here
            hit = checked.get((kind, name))
            reason = hit[2] if hit is not None and hit[0] is obj and hit[1] == me else problem(kind, obj, me, memos)
            if reason is not None:
                bad.append(Quarantined(kind, name, reason))
    if memos is not None:
        memos.bad = {(q.kind, q.name): q for q in bad}
    if len(checked) > 2 * sum(len(o) for o in rep.objects.values()) + 1024:  # forget what was deleted
        for key in [k for k in checked if k[1] not in rep.objects.get(k[0], {})]:
            del checked[key]
    return _screened(rep, bad)


def _screened(rep: Replica, bad: list[Quarantined]) -> tuple[Replica, list[Quarantined]]:
    bad = [*bad, *(Quarantined(kind, name, reason) for kind, name, reason in rep.undecodable)]
    if not any(q.kind in rep.objects for q in bad):
        return rep, bad
    return without(rep, {(q.kind, q.name) for q in bad}), bad


def without(rep: Replica, leave_out: set[tuple[str, str]]) -> Replica:
    r = rep.view()
    for kind, name in leave_out:
        r.objects.get(kind, {}).pop(name, None)
    return r


def isolate(rep: Replica, compute: Callable[[Replica], T], error: Exception) -> tuple[T, list[Quarantined]]:
    """`compute(rep)` raised: find the objects that make it raise and compute without them. Adds
    the objects back in `ISOLATION_ORDER` and bisects for the shortest failing prefix; its last
    object is a culprit (the plan of the prefix before it was computed). log2(objects) plans per
    culprit: only ever on this failure path."""
    order = [(k, n) for k in ISOLATION_ORDER for n in rep.objects.get(k, {})]
    order += [(k, n) for k in rep.objects if k not in ISOLATION_ORDER for n in rep.objects[k]]
    culprits: list[Quarantined] = []
    removed: set[tuple[str, str]] = set()
    while True:
        items = [i for i in order if i not in removed]

        def fails(n: int, items: list[tuple[str, str]] = items) -> BaseException | None:
            try:
                compute(without(rep, removed | set(items[n:])))
            except Exception as e:  # noqa: BLE001
                return e
            return None

        lo, hi = 0, len(items)  # fails(lo) is None; fails(hi) raised `error`
        if fails(0) is not None:  # raises with no objects at all: not an object's fault
            raise error
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fails(mid) is None:
                lo = mid
            else:
                hi = mid
        culprit = items[hi - 1]
        removed.add(culprit)
        culprits.append(Quarantined(culprit[0], culprit[1], f"the plan raised {type(error).__name__}: {error}"[:300]))
        try:
            return compute(without(rep, removed)), culprits
        except Exception as e:  # noqa: BLE001 - another culprit
            error = e
            if len(culprits) > 50:
                raise
