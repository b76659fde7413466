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

from tether.dataplane.links import apply_links
from tether.dataplane.plan import RTPROT_TETHER, HostInterface, Plan, Route
from tether.dataplane.rtnl_batch import RtnlSocket


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
    assert names["tthkeep"]["mtu"] == 1400 and "UP" in names["tthkeep"]["flags"]
    routes = {r["dst"]: r for r in ip_json(ns, "route", "show")}
    assert "10.47.0.9" not in routes and routes["10.47.0.5"]["dev"] == "tthkeep" and "10.48.0.0/24" in routes
    assert done.interfaces == {"tthkeep": 1400} and Route("10.47.0.5/32", "tthkeep", scope="link") in done.routes
    again, _ = apply_links(plan, netns=path)  # nothing left to do: an unchanged plan changes nothing
    assert again.changes == [], again.changes
    assert report.changed
