"""Applying a Plan's links, routes, neighbours and FDB entries with netlink, by difference.

Only what Tether owns is touched: the VTEP and pod veths (names with our prefix, `names.own_link`),
routes with our protocol number, neighbour and FDB entries on the VTEP. That holds whatever the
plan says: a planned interface or link-scope route on a device that is not ours is refused and
reported as a failure, never applied. An unchanged plan changes nothing, so an agent restart is
invisible to traffic.

One apply path: each object kind (the VTEP, pod interfaces, neighbours, FDB entries, routes) has a
desired-vs-kernel tracker (dataplane.tracker) and the apply writes the difference. The per-event
pass starts from what the previous apply left; a full resync (start-up, periodic reconcile, after
an error) reloads the kernel side of each tracker from the kernel first, then runs the same apply.
Link lookups, routes and dumps go through rtnl_batch (they are on every apply's path, and the dumps
on every reconcile's); the VTEP, its neighbours and FDB entries, which change with hosts rather than
pods, through pyroute2.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Container
from dataclasses import dataclass, field

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tether.calc.names import LINK_PREFIX, RTPROT_TETHER, VTEP_NAME, own_link
from tether.calc.plan import Plan, Route, Vtep
from tether.dataplane import rtnl_batch as nl
from tether.dataplane.netns import open_ipr
from tether.dataplane.pods import get_link, host_side_sysctls, write_sysctl
from tether.dataplane.rtnl_batch import AF_BRIDGE, NUD_PERMANENT, RT_SCOPE_LINK, RTNH_F_ONLINK, RouteState, RtnlSocket
from tether.dataplane.tracker import DeltaTracker

NTF_SELF = 0x02


@dataclass
class ApplyReport:
    changes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # kernel operations that failed or were refused

    def add(self, what: str) -> None:
        self.changes.append(what)

    def fail(self, what: str) -> None:
        """A failed (or refused) operation: the agent logs these at WARNING and reports them in the
        host's status."""
        self.failures.append(what)

    @property
    def changed(self) -> int:
        return len(self.changes)


def _attr(msg, name: str, default=None):
    return msg.get(name, default)


def _linkinfo(msg) -> dict:
    info = msg.get(("IFLA_LINKINFO", "IFLA_INFO_DATA")) or {}
    out = {}
    if info:
        for k, v in info.get("attrs", []) if isinstance(info, dict) else info["attrs"]:
            out[k] = v
    return out


def _kind(msg) -> str | None:
    return msg.get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))


def _local_key(vtep: Vtep) -> str:
    """The VXLAN attribute (pyroute2's name, lower case for `link add`) of the VTEP's local address:
    a separate one for an IPv6 underlay."""
    return "IFLA_VXLAN_LOCAL6" if ":" in vtep.local_ip else "IFLA_VXLAN_LOCAL"


def _vxlan_matches(ipr: IPRoute, msg, vtep: Vtep, underlay_idx: int | None) -> bool:
    data = _linkinfo(msg)
    local = data.get(_local_key(vtep))
    return (data.get("IFLA_VXLAN_ID") == vtep.vni and local is not None
            and ipaddress.ip_address(local) == ipaddress.ip_address(vtep.local_ip)
            and data.get("IFLA_VXLAN_PORT") == vtep.port and not data.get("IFLA_VXLAN_LEARNING")
            and (underlay_idx is None or data.get("IFLA_VXLAN_LINK") == underlay_idx))


def ensure_vtep(ipr: IPRoute, vtep: Vtep, report: ApplyReport) -> tuple[int, bool]:
    """The VTEP as `vtep` says, made or corrected: (its index, whether it was (re)created)."""
    underlay = get_link(ipr, vtep.underlay_dev)
    underlay_idx = underlay["index"] if underlay else None
    msg = get_link(ipr, vtep.name)
    created = msg is None
    if msg is not None and (_kind(msg) != "vxlan" or not _vxlan_matches(ipr, msg, vtep, underlay_idx)):
        ipr.link("del", index=msg["index"])
        report.add(f"recreate {vtep.name}")
        msg, created = None, True
    if msg is None:
        kw = dict(ifname=vtep.name, kind="vxlan", vxlan_id=vtep.vni, vxlan_port=vtep.port, vxlan_learning=0,
                  address=vtep.mac, mtu=vtep.mtu)
        kw[_local_key(vtep).removeprefix("IFLA_").lower()] = vtep.local_ip
        if underlay_idx is not None:
            kw["vxlan_link"] = underlay_idx
        try:
            ipr.link("add", **kw)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
            raise RuntimeError(  # the kernel allows one VXLAN device per (VNI, UDP port) in a namespace
                f"cannot create {vtep.name}: another VXLAN device already uses VNI {vtep.vni} on UDP port "
                f"{vtep.port} in this host's namespace. Docker Swarm's overlay networks do (VNI 4096 up, port "
                "4789): start the swarm with `docker swarm init --data-path-port 4790`") from e
        report.add(f"add {vtep.name}")
        msg = get_link(ipr, vtep.name)
        assert msg is not None
    idx = msg["index"]
    if msg.get("IFLA_ADDRESS") != vtep.mac or msg.get("IFLA_MTU") != vtep.mtu:
        ipr.link("set", index=idx, address=vtep.mac, mtu=vtep.mtu)
        report.add(f"set {vtep.name} mac/mtu")
    if not msg["flags"] & 1:
        ipr.link("set", index=idx, state="up")
        report.add(f"up {vtep.name}")
    addrs = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=socket.AF_INET)}
    if (vtep.ip, 32) not in addrs:
        for a, plen in addrs:
            ipr.addr("del", index=idx, address=a, prefixlen=plen)
        ipr.addr("add", index=idx, address=vtep.ip, prefixlen=32)
        report.add(f"address {vtep.ip} on {vtep.name}")
    write_sysctl(f"net/ipv4/conf/{vtep.name}/rp_filter", "0")
    write_sysctl(f"net/ipv6/conf/{vtep.name}/disable_ipv6", "0")  # decapsulated IPv6 pod packets
    return idx, created


def current_routes(rt: RtnlSocket, index_to_name: dict[int, str]) -> dict[Route, RouteState]:
    """Our routes (protocol RTPROT_TETHER) in the main table."""
    out = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for r in rt.routes(family, proto=RTPROT_TETHER):
            route = Route(r.dst, index_to_name.get(r.oif, "?") if r.oif is not None else "?", via=r.gateway,
                          onlink=bool(r.flags & RTNH_F_ONLINK),
                          scope="link" if r.scope == RT_SCOPE_LINK else "universe")
            out[route] = r
    return out


def route_allowed(route: Route, plan: Plan) -> bool:
    """A route the agent may install: through a device of its own, or a gateway route through the
    underlay device (direct routing); never a link-scope route on someone else's device."""
    if own_link(route.dev):
        return True
    return route.via is not None and (not plan.underlay_dev or route.dev == plan.underlay_dev)


def _add_route(rt: RtnlSocket, route: Route, oif: int, report: ApplyReport) -> bool:
    try:
        msg = nl.route(route.dst, oif, gateway=route.via, proto=RTPROT_TETHER, replace=True, onlink=route.onlink,
                       scope=RT_SCOPE_LINK if route.scope == "link" else nl.RT_SCOPE_UNIVERSE)
    except (ValueError, TypeError) as e:  # an address that is not one: this route only
        report.fail(f"route {route.dst} via {route.via} dev {route.dev}: {e}")
        return False
    (r,) = rt.run(msg)
    if r.error:
        report.fail(f"route {route.dst}{f' via {route.via}' if route.via else ''} dev {route.dev}: "
                    f"{os.strerror(r.error)}")
        return False
    report.add(f"route {route.dst} dev {route.dev}")
    return True


def _del_route(rt: RtnlSocket, route: Route, oif: int, report: ApplyReport) -> None:
    rt.run(nl.del_route(route.dst, oif, gateway=route.via, proto=RTPROT_TETHER))  # already gone: fine
    report.add(f"del route {route.dst}")


def _link_named(rt: RtnlSocket, name: str) -> nl.Link | None:
    """The link named `name` (one request, no dump), or None if there is none."""
    (r,) = rt.run(nl.get_link(name))
    if r.error == errno.ENODEV:
        return None
    return r.check().link


@dataclass
class Applied:
    """The kernel side of every object kind, one tracker each (dataplane.tracker): what this process
    last made the kernel hold, so the next plan is applied as a difference without dumping every
    link and route (a full dump on a host with hundreds of pods takes a while). A full resync starts
    from a fresh Applied whose trackers are reloaded from the kernel on the way."""

    vtep: DeltaTracker[str, Vtep | None] = field(default_factory=DeltaTracker)  # VTEP_NAME -> Vtep (None: unverified)
    interfaces: DeltaTracker[str, tuple[int, str] | None] = field(default_factory=DeltaTracker)  # -> (mtu, endpoint id)
    neighbours: DeltaTracker[str, tuple[str, int]] = field(default_factory=DeltaTracker)  # ip -> (MAC, NUD state)
    fdb: DeltaTracker[tuple[str, str], None] = field(default_factory=DeltaTracker)  # (MAC, remote VTEP)
    routes: DeltaTracker[Route, None] = field(default_factory=DeltaTracker)
    down: dict[str, int] = field(default_factory=dict)  # pod veths found down -> ifindex (raise_interfaces)

    def copy(self) -> Applied:
        return Applied(self.vtep.copy(), self.interfaces.copy(), self.neighbours.copy(), self.fdb.copy(),
                       self.routes.copy(), dict(self.down))


class _Links:
    """The kernel's links as one apply sees them: the whole dump on a full resync, otherwise each
    looked up by name on first use (the common difference, a pod came or went, needs a lookup or
    two, not a dump). Kept up to date with what the apply itself deletes or creates."""

    def __init__(self, rt: RtnlSocket, dump: bool) -> None:
        self.rt = rt
        self.complete = dump
        self.known: dict[str, nl.Link | None] = {link.name: link for link in rt.links()} if dump else {}

    def get(self, name: str) -> nl.Link | None:
        if name not in self.known:
            self.known[name] = None if self.complete else _link_named(self.rt, name)
        return self.known[name]

    def index(self, name: str) -> int | None:
        link = self.get(name)
        return link.index if link else None

    def names(self) -> dict[int, str]:
        return {link.index: name for name, link in self.known.items() if link is not None}


def apply_links(plan: Plan, *, keep_interfaces: Container[str] = frozenset(), netns: str | None = None,
                applied: Applied | None = None) -> tuple[ApplyReport, Applied]:
    """Make the kernel hold exactly the plan's owned links/routes/neighbours/FDB entries.
    With `applied` (the previous result) only the difference is written; without it, a full resync:
    the kernel side of every tracker is read back from the kernel first, then the same apply
    corrects it (start-up, periodic reconcile, after an error)."""
    resync = applied is None
    st = Applied() if applied is None else applied.copy()
    report = ApplyReport()
    with contextlib.closing(RtnlSocket(netns)) as rt, _LazyIpr(netns) as ipr:
        links = _Links(rt, dump=resync)
        if resync:
            for path, value in plan.sysctls:
                write_sysctl(path, value)
            st.vtep.reload({VTEP_NAME: None} if links.get(VTEP_NAME) else {})
            # our pod veths; a VM port's tap enters the tracker once applied (vif.py plugs and removes them)
            st.interfaces.reload({name: None for name in links.known
                                  if name and name.startswith(LINK_PREFIX) and name != VTEP_NAME})
        _apply_vtep(rt, ipr, links, plan, st, report)
        _apply_interfaces(rt, ipr, links, plan, st, keep_interfaces, report)
        vtep_idx = links.index(VTEP_NAME) if resync and plan.vtep is not None else None
        if vtep_idx is not None:
            st.neighbours.reload(_neighbours(rt, vtep_idx))
            st.fdb.reload(dict.fromkeys(_fdb_entries(rt, vtep_idx)))
        if plan.vtep is not None:
            _apply_peers(ipr, links, plan, st, report)
        if resync:
            st.routes.reload(dict.fromkeys(current_routes(rt, links.names())))
        _apply_routes(rt, links, plan, st, keep_interfaces, report)
    return report, st


def _apply_vtep(rt: RtnlSocket, ipr: _LazyIpr, links: _Links, plan: Plan, st: Applied, report: ApplyReport) -> None:
    writes, deletes = st.vtep.pending({VTEP_NAME: plan.vtep} if plan.vtep is not None else {})
    for name, vtep in writes:
        assert vtep is not None
        idx, created = ensure_vtep(ipr(), vtep, report)
        links.known[name] = nl.Link(idx, name, vtep.mac, vtep.mtu, 1)
        if created:  # a new device holds no neighbours or FDB entries yet
            st.neighbours.reload({})
            st.fdb.reload({})
        st.vtep.wrote(name, vtep)
    for name in deletes:
        if not rt.run(nl.del_link(name))[0].error:  # already gone: fine
            report.add(f"del {name}")
        links.known[name] = None
        st.vtep.deleted(name)
        st.neighbours.reload({})  # they went with the device
        st.fdb.reload({})


def _apply_interfaces(rt: RtnlSocket, ipr: _LazyIpr, links: _Links, plan: Plan, st: Applied,
                      keep: Container[str], report: ApplyReport) -> None:
    """Pod veths: their settings, and removal of the ones we own that nobody wants any more. An
    interface of another endpoint (a pod deleted and added again under the same name) is a new veth."""
    wanted = {i.name: (i.mtu, i.endpoint_id) for i in plan.interfaces if _own_interface(i.name, report)}
    writes, deletes = st.interfaces.pending(wanted)
    for name, (mtu, ep_id) in writes:  # type: ignore[misc]
        link = links.get(name)
        if link is None:
            continue  # being plugged, or gone: a later pass (or the reconcile) sees it
        if link.mtu != mtu:
            ipr().link("set", index=link.index, mtu=mtu)
            report.add(f"set {name}")
        if not link.flags & 1:
            st.down[name] = link.index
        host_side_sysctls(name)
        st.interfaces.wrote(name, (mtu, ep_id))
    for name in deletes:
        st.interfaces.deleted(name)
        st.down.pop(name, None)
        if name in keep or not own_link(name):
            continue
        i = links.index(name)
        if i is not None:
            rt.run(nl.del_link(i))  # already gone: fine
            report.add(f"del stale {name}")
            links.known[name] = None


def _apply_peers(ipr: _LazyIpr, links: _Links, plan: Plan, st: Applied, report: ApplyReport) -> None:
    """The other hosts' VTEPs: permanent neighbour entries and FDB entries on ours."""
    n_writes, n_deletes = st.neighbours.pending({n.ip: (n.lladdr, NUD_PERMANENT) for n in plan.neighbours})
    f_writes, f_deletes = st.fdb.pending_keys({(f.lladdr, f.dst) for f in plan.fdb})
    if not (n_writes or n_deletes or f_writes or f_deletes):
        return
    idx = links.index(VTEP_NAME)
    if idx is None:
        return  # not there: the next full pass creates it
    for ip, (mac, state) in n_writes:
        if _try(report, f"neigh {ip} {mac}", ipr().neigh, "replace", dst=ip, lladdr=mac, ifindex=idx, state=state):
            report.add(f"neigh {ip}")
            st.neighbours.wrote(ip, (mac, state))
    for ip in n_deletes:
        with contextlib.suppress(NetlinkError):
            ipr().neigh("del", dst=ip, ifindex=idx)
        report.add(f"del neigh {ip}")
        st.neighbours.deleted(ip)
    for mac, dst in f_writes:
        if _try(report, f"fdb {mac} -> {dst}", ipr().fdb, "append", ifindex=idx, lladdr=mac, dst=dst,
                state=NUD_PERMANENT):
            report.add(f"fdb {mac} -> {dst}")
            st.fdb.wrote((mac, dst))
    for mac, dst in f_deletes:
        with contextlib.suppress(NetlinkError):
            ipr().fdb("del", ifindex=idx, lladdr=mac, dst=dst)
        report.add(f"del fdb {mac} -> {dst}")
        st.fdb.deleted((mac, dst))


def _apply_routes(rt: RtnlSocket, links: _Links, plan: Plan, st: Applied, keep: Container[str],
                  report: ApplyReport) -> None:
    writes, deletes = st.routes.pending_keys(plan.routes)
    for route in writes:
        if not route_allowed(route, plan):
            report.fail(f"route {route.dst} dev {route.dev} refused: {route.dev!r} is not Tether's device")
            continue
        if route.dev in st.down:
            continue  # with its device, once up (raise_interfaces)
        oif = links.index(route.dev)
        if oif is None:
            continue  # its device is not there yet (a pod being plugged): stays pending, the next pass retries
        if _add_route(rt, route, oif, report):
            st.routes.wrote(route)
    for route in deletes:
        st.routes.deleted(route)
        if route.dev in keep:
            continue
        # None: the device is gone, and its routes with it; or ("?") newer than the dump, not ours to judge yet
        oif = links.index(route.dev)
        if oif is not None:
            _del_route(rt, route, oif, report)


def _own_interface(name: str, report: ApplyReport) -> bool:
    """Whether a planned interface is ours to configure; a foreign one is reported, not touched."""
    if own_link(name):
        return True
    report.fail(f"interface {name!r} refused: not Tether's device (MTU, sysctls, routes and removal are "
                "only ever applied to its own links)")
    return False


def raise_interfaces(plan: Plan, applied: Applied, netns: str | None = None, report: ApplyReport | None = None
                     ) -> list[str]:
    """Bring up the pod veths `apply_links` found down, and add the routes through them (a route
    cannot go through a device that is down): called after the nft table with their ingress chains
    (anti-spoofing) is in place, so a new pod sends nothing before it is checked. Updates `applied`,
    adds the routes and failures to `report` and returns the names brought up; a veth gone
    meanwhile is skipped (its routes wait for the next pass).

    The pod's own addresses also get permanent neighbour entries with its MAC (as Calico does): a
    veth just brought up drops what it sends until the kernel's link watcher has activated its
    queue, and an ARP request lost then is only retried after a second."""
    if not applied.down:
        return []
    report = ApplyReport() if report is None else report
    raised = []
    pins = {i.name: i for i in plan.interfaces if i.mac}
    with contextlib.closing(RtnlSocket(netns)) as rt:
        ups = rt.run(*(nl.link_up(i) for i in applied.down.values()))
        for (name, index), up in zip(applied.down.items(), ups, strict=True):
            if up.error:
                report.fail(f"up {name}: {os.strerror(up.error)}")
                continue
            raised.append(name)
            if name in pins:
                rt.run(*(nl.permanent_neighbour(index, ip, pins[name].mac) for ip in pins[name].ips))
            for route in sorted(r for r in plan.routes if r.dev == name):
                if _add_route(rt, route, index, report):
                    applied.routes.wrote(route)
    applied.down.clear()
    return raised


class _LazyIpr:
    """A pyroute2 IPRoute opened on first use: the common difference (a pod came or went: a link
    lookup and a route) needs none, and opening one costs ~0.5 ms of Python per apply."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self.ipr: IPRoute | None = None

    def __call__(self) -> IPRoute:
        if self.ipr is None:
            self.ipr = open_ipr(self.netns)
        return self.ipr

    def __enter__(self) -> _LazyIpr:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ipr is not None:
            self.ipr.close()


def _try(report: ApplyReport, what: str, op, *args, **kw) -> bool:
    """One netlink operation whose failure concerns it alone: reported, the others go on."""
    try:
        op(*args, **kw)
        return True
    except (NetlinkError, ValueError, TypeError, OSError) as e:
        report.fail(f"{what}: {e}")
        return False


def _neighbours(rt: RtnlSocket, idx: int) -> dict[str, tuple[str, int]]:
    """The neighbour entries on the VTEP: ip -> (MAC, NUD state)."""
    have = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for ip, mac, state in rt.neighbours(family, idx):
            if family == socket.AF_INET6 and not state & NUD_PERMANENT:
                continue  # the kernel's own (its multicast and neighbour discovery entries)
            if ip is not None:
                have[ip] = (mac, state)
    return have


def _fdb_entries(rt: RtnlSocket, idx: int) -> set[tuple[str, str]]:
    return {(mac, dst) for dst, mac, _state in rt.neighbours(AF_BRIDGE, idx) if mac and dst}
