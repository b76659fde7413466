"""Applying a Plan's links, routes, neighbours and FDB entries with netlink, by difference.

Only what Tether owns is touched: the VTEP and pod veths (names with our prefix, `plan.own_link`),
routes with our protocol number, neighbour and FDB entries on the VTEP. That holds whatever the
plan says, on the full and the incremental pass alike: a planned interface or link-scope route on a
device that is not ours is refused and reported as a failure, never applied. An unchanged plan changes nothing, so an
agent restart is invisible to traffic. Link lookups, routes and dumps go through rtnl_batch (they
are on every apply's path, and the dumps on every reconcile's); the VTEP, its neighbours and FDB
entries, which change with hosts rather than pods, through pyroute2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Container
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tether.dataplane import rtnl_batch as nl
from tether.dataplane.netns import ipr_in, open_ipr
from tether.dataplane.plan import (
    LINK_PREFIX,
    RTPROT_TETHER,
    VTEP_NAME,
    FdbEntry,
    Neighbour,
    Plan,
    Route,
    Vtep,
    own_link,
)
from tether.dataplane.pods import get_link, host_side_sysctls, write_sysctl
from tether.dataplane.rtnl_batch import NUD_PERMANENT, RT_SCOPE_LINK, RTNH_F_ONLINK, RouteState, RtnlSocket

AF_BRIDGE = 7
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


def _vxlan_matches(ipr: IPRoute, msg, vtep: Vtep, underlay_idx: int | None) -> bool:
    data = _linkinfo(msg)
    return (data.get("IFLA_VXLAN_ID") == vtep.vni and data.get("IFLA_VXLAN_LOCAL") == vtep.local_ip
            and data.get("IFLA_VXLAN_PORT") == vtep.port and not data.get("IFLA_VXLAN_LEARNING")
            and (underlay_idx is None or data.get("IFLA_VXLAN_LINK") == underlay_idx))


def ensure_vtep(ipr: IPRoute, vtep: Vtep, report: ApplyReport) -> int:
    underlay = get_link(ipr, vtep.underlay_dev)
    underlay_idx = underlay["index"] if underlay else None
    msg = get_link(ipr, vtep.name)
    if msg is not None and (_kind(msg) != "vxlan" or not _vxlan_matches(ipr, msg, vtep, underlay_idx)):
        ipr.link("del", index=msg["index"])
        report.add(f"recreate {vtep.name}")
        msg = None
    if msg is None:
        kw = dict(ifname=vtep.name, kind="vxlan", vxlan_id=vtep.vni, vxlan_local=vtep.local_ip,
                  vxlan_port=vtep.port, vxlan_learning=0, address=vtep.mac, mtu=vtep.mtu)
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
    return idx


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
    """What this process last made the kernel hold, so the next plan is applied as a difference
    without dumping every link and route (pyroute2 parses ~0.4 ms per message: a full dump on a host
    with hundreds of pods takes a second). The periodic reconcile does the full comparison."""

    vtep: Vtep | None = None
    routes: set[Route] = field(default_factory=set)
    neighbours: set[Neighbour] = field(default_factory=set)
    fdb: set[FdbEntry] = field(default_factory=set)
    interfaces: dict[str, tuple[int, str]] = field(default_factory=dict)  # pod veth -> (mtu, endpoint id)
    down: dict[str, int] = field(default_factory=dict)  # pod veths found down -> ifindex (raise_interfaces)


def apply_links(plan: Plan, *, keep_interfaces: Container[str] = frozenset(), netns: str | None = None,
                remove_stale: bool = True, applied: Applied | None = None) -> tuple[ApplyReport, Applied]:
    """Make the kernel hold exactly the plan's owned links/routes/neighbours/FDB entries.
    With `applied` (the previous result) only the difference is written; without it, the kernel is
    read back in full and corrected (start-up, periodic reconcile, after an error)."""
    if applied is not None:
        with contextlib.closing(RtnlSocket(netns)) as rt, _LazyIpr(netns) as ipr:
            return _apply_delta(rt, ipr, plan, applied, keep_interfaces)
    report = ApplyReport()
    done = Applied(vtep=plan.vtep, neighbours=set(plan.neighbours), fdb=set(plan.fdb))
    with ipr_in(netns) as ipr, contextlib.closing(RtnlSocket(netns)) as rt:
        for path, value in plan.sysctls:
            write_sysctl(path, value)
        links = {link.name: link for link in rt.links()}
        vtep_idx = None
        if plan.vtep is not None:
            vtep_idx = ensure_vtep(ipr, plan.vtep, report)
        elif VTEP_NAME in links:
            ipr.link("del", index=links[VTEP_NAME].index)
            report.add(f"del {VTEP_NAME}")

        # pod interfaces: settings, and removal of veths we own that nobody wants any more
        wanted = {i.name: i for i in plan.interfaces if _own_interface(i.name, report)}
        for name, link in links.items():
            if not name or not name.startswith(LINK_PREFIX) or name == VTEP_NAME:
                continue
            if name in wanted:
                i = wanted[name]
                done.interfaces[name] = (i.mtu, i.endpoint_id)
                if link.mtu != i.mtu:
                    ipr.link("set", index=link.index, mtu=i.mtu)
                    report.add(f"set {name}")
                if not link.flags & 1:
                    done.down[name] = link.index
                host_side_sysctls(name)  # full passes are rare (start, reconcile): checking them all is fine
            elif remove_stale and name not in keep_interfaces:
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=link.index)
                report.add(f"del stale {name}")

        if report.changed:  # links came or went: look again
            links = {link.name: link for link in rt.links()}
        index_of = {name: link.index for name, link in links.items()}
        name_of = {v: k for k, v in index_of.items()}

        if vtep_idx is not None:
            _apply_neighbours(ipr, vtep_idx, plan.neighbours, report)
            _apply_fdb(ipr, vtep_idx, plan.fdb, report)

        have = current_routes(rt, name_of)
        for route in sorted(plan.routes):
            if route in have:
                done.routes.add(route)
                continue
            if not route_allowed(route, plan):
                report.fail(f"route {route.dst} dev {route.dev} refused: {route.dev!r} is not Tether's device")
                continue
            oif = index_of.get(route.dev)
            if oif is None or route.dev in done.down:
                continue  # its device is not there yet (a pod being plugged): next pass; or not up yet
            if _add_route(rt, route, oif, report):
                done.routes.add(route)
        for route, state in have.items():
            # "?": a device newer than our link list (a pod plugged meanwhile): not ours to judge yet
            if route not in plan.routes and route.dev not in keep_interfaces and route.dev != "?" and state.oif:
                _del_route(rt, route, state.oif, report)
    return report, done


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
                    applied.routes.add(route)
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


def _apply_delta(rt: RtnlSocket, ipr: _LazyIpr, plan: Plan, st: Applied, keep: Container[str]
                 ) -> tuple[ApplyReport, Applied]:
    report = ApplyReport()
    st = Applied(st.vtep, set(st.routes), set(st.neighbours), set(st.fdb), dict(st.interfaces), dict(st.down))
    if plan.vtep != st.vtep:
        if plan.vtep is not None:
            ensure_vtep(ipr(), plan.vtep, report)
        else:
            vt = _link_named(rt, VTEP_NAME)
            if vt is not None:
                rt.run(nl.del_link(vt.index))
                report.add(f"del {VTEP_NAME}")
            st.neighbours.clear()
            st.fdb.clear()
        st.vtep = plan.vtep

    index: dict[str, int | None] = {}

    def idx(name: str) -> int | None:
        if name not in index:
            link = _link_named(rt, name)
            index[name] = link.index if link else None
        return index[name]

    # an interface of another endpoint (a pod deleted and added again under the same name) is a new veth
    wanted = {i.name: (i.mtu, i.endpoint_id) for i in plan.interfaces if _own_interface(i.name, report)}
    for name, (mtu, ep_id) in wanted.items():
        if st.interfaces.get(name) == (mtu, ep_id):
            continue
        link = _link_named(rt, name)
        index[name] = link.index if link else None  # its routes come next
        if link is None:
            continue  # being plugged, or gone: a later pass (or the reconcile) sees it
        if link.mtu != mtu:
            ipr().link("set", index=link.index, mtu=mtu)
            report.add(f"set {name}")
        if not link.flags & 1:
            st.down[name] = link.index
        host_side_sysctls(name)
        st.interfaces[name] = (mtu, ep_id)
    for name in [n for n in st.interfaces if n not in wanted]:
        del st.interfaces[name]
        st.down.pop(name, None)
        if name in keep or not own_link(name):
            continue
        i = idx(name)
        if i is not None:
            rt.run(nl.del_link(i))  # already gone: fine
            report.add(f"del stale {name}")
            index[name] = None

    same_peers = plan.neighbours == st.neighbours and plan.fdb == st.fdb
    vtep_idx = idx(VTEP_NAME) if plan.vtep is not None and not same_peers else None
    if vtep_idx is not None:
        for n in sorted(plan.neighbours - st.neighbours):
            if _try(report, f"neigh {n.ip} {n.lladdr}", ipr().neigh, "replace", dst=n.ip, lladdr=n.lladdr,
                    ifindex=vtep_idx, state=NUD_PERMANENT):
                report.add(f"neigh {n.ip}")
        for n in sorted(st.neighbours - plan.neighbours):
            with contextlib.suppress(NetlinkError):
                ipr().neigh("del", dst=n.ip, ifindex=vtep_idx)
            report.add(f"del neigh {n.ip}")
        st.neighbours = set(plan.neighbours)
        for f in sorted(plan.fdb - st.fdb):
            if _try(report, f"fdb {f.lladdr} -> {f.dst}", ipr().fdb, "append", ifindex=vtep_idx, lladdr=f.lladdr,
                    dst=f.dst, state=NUD_PERMANENT):
                report.add(f"fdb {f.lladdr} -> {f.dst}")
        for f in sorted(st.fdb - plan.fdb):
            with contextlib.suppress(NetlinkError):
                ipr().fdb("del", ifindex=vtep_idx, lladdr=f.lladdr, dst=f.dst)
            report.add(f"del fdb {f.lladdr} -> {f.dst}")
        st.fdb = set(plan.fdb)

    for route in sorted(plan.routes - st.routes):
        if route.dev in st.down:
            continue  # with its device, once up (raise_interfaces)
        if not route_allowed(route, plan):
            report.fail(f"route {route.dst} dev {route.dev} refused: {route.dev!r} is not Tether's device")
            continue
        oif = idx(route.dev)
        if oif is None:
            continue  # its device is not there yet: stays outside `st`, so the next pass retries
        if _add_route(rt, route, oif, report):
            st.routes.add(route)
    for route in sorted(st.routes - plan.routes):
        st.routes.discard(route)
        if route.dev in keep:
            continue
        oif = idx(route.dev)
        if oif is None:
            continue  # the device is gone, and its routes with it
        _del_route(rt, route, oif, report)
    return report, st


def _try(report: ApplyReport, what: str, op, *args, **kw) -> bool:
    """One netlink operation whose failure concerns it alone: reported, the others go on."""
    try:
        op(*args, **kw)
        return True
    except (NetlinkError, ValueError, TypeError, OSError) as e:
        report.fail(f"{what}: {e}")
        return False


def _apply_neighbours(ipr: IPRoute, idx: int, wanted: frozenset[Neighbour], report: ApplyReport) -> None:
    have = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for n in ipr.get_neighbours(ifindex=idx, family=family):
            if family == socket.AF_INET6 and not n["state"] & NUD_PERMANENT:
                continue  # the kernel's own (its multicast and neighbour discovery entries)
            have[n.get("NDA_DST")] = (n.get("NDA_LLADDR"), n["state"])
    want = {n.ip: n.lladdr for n in wanted}
    for ip, mac in want.items():
        if have.get(ip) != (mac, NUD_PERMANENT):
            if _try(report, f"neigh {ip} {mac}", ipr.neigh, "replace", dst=ip, lladdr=mac, ifindex=idx,
                    state=NUD_PERMANENT):
                report.add(f"neigh {ip}")
    for ip in have:
        if ip not in want:
            with contextlib.suppress(NetlinkError):
                ipr.neigh("del", dst=ip, ifindex=idx)
            report.add(f"del neigh {ip}")


def _fdb_entries(ipr: IPRoute, idx: int) -> set[tuple[str, str]]:
    out = set()
    for n in ipr.get_neighbours(family=AF_BRIDGE, ifindex=idx):
        if n["ifindex"] != idx:
            continue
        mac, dst = n.get("NDA_LLADDR"), n.get("NDA_DST")
        if mac and dst:
            out.add((mac, dst))
    return out


def _apply_fdb(ipr: IPRoute, idx: int, wanted: frozenset[FdbEntry], report: ApplyReport) -> None:
    have = _fdb_entries(ipr, idx)
    want = {(f.lladdr, f.dst) for f in wanted}
    for mac, dst in want - have:
        if _try(report, f"fdb {mac} -> {dst}", ipr.fdb, "append", ifindex=idx, lladdr=mac, dst=dst,
                state=NUD_PERMANENT):
            report.add(f"fdb {mac} -> {dst}")
    for mac, dst in have - want:
        with contextlib.suppress(NetlinkError):
            ipr.fdb("del", ifindex=idx, lladdr=mac, dst=dst)
        report.add(f"del fdb {mac} -> {dst}")

