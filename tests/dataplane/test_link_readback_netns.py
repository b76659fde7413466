"""The full read-back of links and routes (the reconcile's pass, dataplane.links.apply_links with no
memory of the last apply) through rtnl_batch's dumps, in throwaway namespaces: the dumps report what
`ip` reports, and a full pass corrects MTU and state, removes our stale veths and routes, and leaves
what is not ours alone."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Callable

import pytest

from tether.calc.names import RTPROT_TETHER
from tether.calc.plan import HostInterface, Plan, Route
from tether.dataplane.links import apply_links, raise_interfaces
from tether.dataplane.rtnl_batch import RtnlSocket

pytestmark = pytest.mark.root  # network namespaces


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, timeout=30, capture_output=True)


def ip_json(ns: str, *args: str) -> list[dict]:
    r = subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(r.stdout or "[]")


def test_link_and_route_dumps_match_what_ip_reports(netns: Callable[[], str]) -> None:
    ns = netns()
    ip(ns, "link", "set", "lo", "up")
    for i in range(40):  # enough for a dump of several messages per read
        ip(ns, "link", "add", f"tthdump{i}", "mtu", str(1300 + i), "type", "veth", "peer", "name", f"tpdump{i}")
    ip(ns, "link", "set", "tthdump3", "up", "alias", "tether-vif:port-3")
    ip(ns, "route", "add", "10.44.0.3/32", "dev", "tthdump3", "proto", str(RTPROT_TETHER), "scope", "link")
    ip(ns, "route", "add", "10.45.0.0/16", "via", "10.44.0.3", "dev", "tthdump3", "proto", str(RTPROT_TETHER),
       "onlink")
    ip(ns, "route", "add", "10.46.0.0/16", "dev", "tthdump3")  # not ours (proto boot)
    ip(ns, "-6", "route", "add", "fd00:44::3/128", "dev", "tthdump3", "proto", str(RTPROT_TETHER))
    with contextlib.closing(RtnlSocket(f"/var/run/netns/{ns}")) as rt:
        links = {link.name: link for link in rt.links()}
        ours4 = rt.routes(socket.AF_INET, proto=RTPROT_TETHER)
        ours6 = rt.routes(socket.AF_INET6, proto=RTPROT_TETHER)
        every4 = rt.routes(socket.AF_INET)
    want = {link["ifname"]: link for link in ip_json(ns, "link", "show")}
    assert set(links) == set(want)
    for name, link in links.items():
        assert (link.index, link.mtu, bool(link.flags & 1)) == (want[name]["ifindex"], want[name]["mtu"],
                                                               "UP" in want[name]["flags"]), name
    assert links["tthdump3"].alias == "tether-vif:port-3" and links["tthdump4"].alias == ""
    idx = links["tthdump3"].index
    assert sorted((r.dst, r.oif, r.gateway, r.proto, bool(r.flags & 4)) for r in ours4) == [
        ("10.44.0.3/32", idx, None, RTPROT_TETHER, False), ("10.45.0.0/16", idx, "10.44.0.3", RTPROT_TETHER, True)]
    assert [(r.dst, r.oif) for r in ours6] == [("fd00:44::3/128", idx)]
    assert "10.46.0.0/16" in {r.dst for r in every4} and all(r.table == 254 for r in every4)


def test_a_full_pass_corrects_ours_and_leaves_the_rest(netns: Callable[[], str]) -> None:
    ns = netns()
    path = f"/var/run/netns/{ns}"
    ip(ns, "link", "add", "tthkeep", "mtu", "1500", "type", "veth", "peer", "name", "tpkeep")  # wrong MTU, down
    ip(ns, "link", "add", "tthstale", "type", "veth", "peer", "name", "tpstale")  # ours, not in the plan
    ip(ns, "link", "add", "other0", "type", "veth", "peer", "name", "other1")  # not ours
    ip(ns, "link", "set", "tthstale", "up")
    ip(ns, "route", "add", "10.47.0.9/32", "dev", "tthstale", "proto", str(RTPROT_TETHER), "scope", "link")
    ip(ns, "link", "set", "other0", "up")
    ip(ns, "route", "add", "10.48.0.0/24", "dev", "other0")
    plan = Plan(routes=frozenset({Route("10.47.0.5/32", "tthkeep", scope="link")}),
                interfaces=frozenset({HostInterface("tthkeep", 1400)}))
    report, done = apply_links(plan, netns=path)
    names = {link["ifname"]: link for link in ip_json(ns, "link", "show")}
    assert "tthstale" not in names and "other0" in names and "other1" in names
    # a pod veth that is down stays down, without its routes, until its ingress chain is there (the
    # agent applies the nft table between the two calls)
    assert names["tthkeep"]["mtu"] == 1400 and "UP" not in names["tthkeep"]["flags"]
    assert "10.47.0.5" not in {r["dst"] for r in ip_json(ns, "route", "show")}
    assert raise_interfaces(plan, done, netns=path) == ["tthkeep"] and not done.down
    assert "UP" in {link["ifname"]: link for link in ip_json(ns, "link", "show")}["tthkeep"]["flags"]
    routes = {r["dst"]: r for r in ip_json(ns, "route", "show")}
    assert "10.47.0.9" not in routes and routes["10.47.0.5"]["dev"] == "tthkeep" and "10.48.0.0/24" in routes
    assert done.interfaces.kernel == {"tthkeep": (1400, "")}
    assert Route("10.47.0.5/32", "tthkeep", scope="link") in done.routes
    again, _ = apply_links(plan, netns=path)  # nothing left to do: an unchanged plan changes nothing
    assert again.changes == [], again.changes
    assert report.changed


def test_a_difference_adds_and_removes_only_what_changed(netns: Callable[[], str]) -> None:
    """The per-event path (`applied` given): a new pod's route, an onlink route via a peer, the
    route and veth of a pod that went; a route whose device is not there yet waits for a later pass."""
    ns = netns()
    path = f"/var/run/netns/{ns}"
    ip(ns, "link", "set", "lo", "up")  # an onlink gateway must not be a local-table address
    for name in ("tthd1", "tthd2", "tthd3"):
        ip(ns, "link", "add", name, "type", "veth", "peer", "name", name.replace("tth", "tp"))
    first = Plan(routes=frozenset({Route("10.49.0.1/32", "tthd1", scope="link"),
                                   Route("10.49.0.2/32", "tthd2", scope="link")}),
                 interfaces=frozenset({HostInterface("tthd1", 1450), HostInterface("tthd2", 1450),
                                       HostInterface("tthd3", 1450)}))
    _, done = apply_links(first, netns=path)
    raise_interfaces(first, done, netns=path)
    second = Plan(routes=frozenset({Route("10.49.0.1/32", "tthd1", scope="link"),
                                    Route("10.49.0.3/32", "tthd3", scope="link"),
                                    Route("10.50.0.0/24", "tthd3", via="10.49.0.3", onlink=True),
                                    Route("10.49.0.4/32", "tthd4", scope="link")}),  # tthd4: not plugged yet
                  interfaces=frozenset({HostInterface("tthd1", 1450), HostInterface("tthd3", 1400)}))
    report, after = apply_links(second, netns=path, applied=done)
    raise_interfaces(second, after, netns=path)
    routes = {r["dst"]: r for r in ip_json(ns, "route", "show")}
    assert set(routes) == {"10.49.0.1", "10.49.0.3", "10.50.0.0/24"}, routes
    assert routes["10.50.0.0/24"]["gateway"] == "10.49.0.3" and "onlink" in routes["10.50.0.0/24"]["flags"]
    assert routes["10.49.0.3"]["protocol"] in (str(RTPROT_TETHER), "201")
    names = {link["ifname"]: link for link in ip_json(ns, "link", "show")}
    assert "tthd2" not in names and names["tthd3"]["mtu"] == 1400 and "UP" in names["tthd3"]["flags"]
    assert Route("10.49.0.4/32", "tthd4", scope="link") not in after.routes  # retried on the next pass
    assert "del stale tthd2" in report.changes
    ip(ns, "link", "add", "tthd4", "type", "veth", "peer", "name", "tpd4")
    ip(ns, "link", "set", "tthd4", "up")  # as the CNI ADD leaves it
    later, _ = apply_links(second, netns=path, applied=after)
    assert later.changes == ["route 10.49.0.4/32 dev tthd4"]
    assert "10.49.0.4" in {r["dst"] for r in ip_json(ns, "route", "show")}


def test_an_ipv6_underlay_gets_its_vtep_fdb_and_ipv4_routes_via_ipv6(netns: Callable[[], str]) -> None:
    """A host with only an IPv6 underlay address: the VTEP's local address is IPv6 (its own VXLAN
    attribute), FDB entries point at IPv6 peers, and IPv4 pod blocks routed directly leave via an
    IPv6 next hop (RTA_VIA). A full pass reads all of it back as the plan says: nothing to redo."""
    from tether.calc.plan import FdbEntry, Neighbour, Vtep

    ns = netns()
    path = f"/var/run/netns/{ns}"
    ip(ns, "link", "set", "lo", "up")
    ip(ns, "link", "add", "ul6", "type", "veth", "peer", "name", "ul6p")
    ip(ns, "link", "set", "ul6", "up")
    ip(ns, "link", "set", "ul6p", "up")
    ip(ns, "addr", "add", "fd00:77::1/64", "dev", "ul6", "nodad")
    mac = "02:aa:00:00:00:02"
    plan = Plan(vtep=Vtep("tth.vxlan", 4096, "fd00:77::1", "ul6", "02:aa:00:00:00:01", "169.254.64.1", 1430),
                fdb=frozenset({FdbEntry(mac, "fd00:77::2", "tth.vxlan")}),
                neighbours=frozenset({Neighbour("169.254.64.2", mac, "tth.vxlan")}),
                routes=frozenset({Route("10.51.0.0/26", "tth.vxlan", via="169.254.64.2", onlink=True),
                                  Route("10.52.0.0/26", "ul6", via="fd00:77::2"),
                                  Route("fd52::/122", "ul6", via="fd00:77::2")}),
                underlay_dev="ul6")
    report, _ = apply_links(plan, netns=path)
    assert not report.failures, report.failures
    (vx,) = ip_json(ns, "-d", "link", "show", "tth.vxlan")
    info = vx["linkinfo"]["info_data"]
    assert info["local6"] == "fd00:77::1" and vx["mtu"] == 1430
    fdb = subprocess.run(["ip", "netns", "exec", ns, "bridge", "fdb", "show", "dev", "tth.vxlan"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    assert f"{mac} dst fd00:77::2" in fdb, fdb
    (via6,) = [r for r in ip_json(ns, "route", "show") if r["dst"] == "10.52.0.0/26"]
    assert via6["via"] == {"family": "inet6", "host": "fd00:77::2"} and via6["dev"] == "ul6", via6
    again, _ = apply_links(plan, netns=path)  # the read-back (full pass) matches: nothing rewritten
    assert again.changes == [], again.changes


def test_the_vteps_neighbours_and_fdb_are_read_back_and_stray_entries_corrected(netns: Callable[[], str]) -> None:
    """The full pass reads the VTEP's neighbour and FDB entries with rtnl_batch's dump (every
    device's entries come back; only the VTEP's count): an entry added behind Tether's back on the
    VTEP is removed, one deleted is put back, and entries on other devices are left alone."""
    from tether.calc.plan import FdbEntry, Neighbour, Vtep

    ns = netns()
    path = f"/var/run/netns/{ns}"
    ip(ns, "link", "set", "lo", "up")
    ip(ns, "link", "add", "ul4", "type", "veth", "peer", "name", "ul4p")
    ip(ns, "link", "set", "ul4", "up")
    ip(ns, "addr", "add", "198.18.9.1/24", "dev", "ul4")
    ip(ns, "neigh", "add", "198.18.9.7", "lladdr", "02:bb:00:00:00:07", "dev", "ul4", "nud", "permanent")  # not ours
    peers = {f"02:aa:00:00:00:{i:02x}": (f"198.18.9.{i}", f"169.254.64.{i}") for i in range(2, 6)}
    plan = Plan(vtep=Vtep("tth.vxlan", 4096, "198.18.9.1", "ul4", "02:aa:00:00:00:01", "169.254.64.1", 1450),
                fdb=frozenset(FdbEntry(mac, under, "tth.vxlan") for mac, (under, _) in peers.items()),
                neighbours=frozenset(Neighbour(vtep, mac, "tth.vxlan") for mac, (_, vtep) in peers.items()),
                underlay_dev="ul4")
    report, _ = apply_links(plan, netns=path)
    assert not report.failures, report.failures
    idx = ip_json(ns, "link", "show", "tth.vxlan")[0]["ifindex"]
    with contextlib.closing(RtnlSocket(path)) as rt:
        neigh = {(n, mac) for n, mac, _ in rt.neighbours(socket.AF_INET, idx)}
        fdb = {(mac, dst) for dst, mac, _ in rt.neighbours(7, idx) if dst}
    assert neigh == {(vtep, mac) for mac, (_, vtep) in peers.items()}
    assert fdb == {(mac, under) for mac, (under, _) in peers.items()}
    ip(ns, "neigh", "del", "169.254.64.3", "dev", "tth.vxlan")
    ip(ns, "neigh", "add", "169.254.64.99", "lladdr", "02:aa:00:00:00:99", "dev", "tth.vxlan", "nud", "permanent")
    subprocess.run(["ip", "netns", "exec", ns, "bridge", "fdb", "append", "02:aa:00:00:00:99", "dev", "tth.vxlan",
                    "dst", "198.18.9.99"], check=True, timeout=30)
    fixed, _ = apply_links(plan, netns=path)
    assert "neigh 169.254.64.3" in fixed.changes and "del neigh 169.254.64.99" in fixed.changes, fixed.changes
    assert "del fdb 02:aa:00:00:00:99 -> 198.18.9.99" in fixed.changes, fixed.changes
    vtep_neigh = {n["dst"] for n in ip_json(ns, "neigh", "show", "dev", "tth.vxlan")}
    assert vtep_neigh == {vtep for _, vtep in peers.values()}
    assert "198.18.9.7" in {n["dst"] for n in ip_json(ns, "neigh", "show", "dev", "ul4")}
    again, _ = apply_links(plan, netns=path)
    assert again.changes == [], again.changes
