"""Plugging a pod with batched netlink requests (dataplane.rtnl_batch), in throwaway namespaces (the
code runs with its thread in a scratch "host" namespace, as the agent lives in its host's): the
kernel state is what the datapath expects, each request of a batch is answered on its own, a
leftover of an earlier attempt is replaced, and a failure leaves nothing behind."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Callable

import pytest

from tether.calc.names import POD_GATEWAY
from tether.dataplane import rtnl_batch as nl
from tether.dataplane.netns import opened_in
from tether.dataplane.pods import AttachError, address_pod, attach_pod, plug_link

pytestmark = pytest.mark.root  # network namespaces


def ip_json(ns: str, *args: str) -> list[dict]:
    r = subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(r.stdout or "[]")


def links(ns: str) -> set[str]:
    return {link["ifname"] for link in ip_json(ns, "link", "show")}


def test_a_plugged_pod_has_what_the_datapath_expects(netns: Callable[[], str]) -> None:
    host, pod = netns(), netns()
    got = opened_in(host, lambda: attach_pod(pod_netns=f"/var/run/netns/{pod}", ifname="eth0", host_ifname="tthpp0",
                                          ips=["10.9.0.5", "fd00:9::5"], mac="02:00:00:00:09:05", mtu=1400))
    (outside,) = ip_json(host, "link", "show", "tthpp0")
    (eth0,) = ip_json(pod, "link", "show", "eth0")
    assert got.host_mac == outside["address"] and got.mac == eth0["address"] == "02:00:00:00:09:05"
    # the host side comes up with the pod's ingress chain (the agent's apply), not here
    assert "UP" not in outside["flags"] and "UP" in eth0["flags"] and outside["mtu"] == eth0["mtu"] == 1400
    assert "UP" in ip_json(pod, "link", "show", "lo")[0]["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in ip_json(pod, "addr", "show", "eth0")[0]["addr_info"]
             if a.get("scope") == "global"}
    assert addrs == {("10.9.0.5", 32), ("fd00:9::5", 128)}
    routes = {(r["dst"], r.get("gateway"), r.get("scope")) for r in ip_json(pod, "route", "show")}
    assert routes == {("default", POD_GATEWAY, None), (POD_GATEWAY, None, "link")}
    (neigh,) = ip_json(pod, "neigh", "show", POD_GATEWAY)
    assert neigh["lladdr"] == got.host_mac and neigh["state"] == ["PERMANENT"]
    # and so do the host's routes to it (a route cannot go through a device that is down)
    assert ip_json(host, "route", "show", "10.9.0.5") + ip_json(host, "-6", "route", "show", "fd00:9::5") == []
    sysctl = subprocess.run(["ip", "netns", "exec", host, "sysctl", "-n", "net.ipv4.conf.tthpp0.proxy_arp"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert sysctl == "1"


def test_each_request_of_a_batch_is_answered_on_its_own(netns: Callable[[], str]) -> None:
    ns = netns()

    def batch() -> list[nl.Request]:
        sock = nl.RtnlSocket()
        try:
            return sock.run(nl.link_up("lo"), nl.link_up("nosuch0"), nl.get_link("lo"))
        finally:
            sock.close()

    up, missing, look = opened_in(ns, batch)
    assert (up.error, missing.error, look.error) == (0, errno.ENODEV, 0)
    assert look.link is not None and look.link.index == 1 and look.link.mac == "00:00:00:00:00:00"
    with pytest.raises(OSError, match="bring up nosuch0"):
        missing.check()


def test_a_leftover_host_side_is_replaced_and_a_clash_in_the_pod_is_explained(netns: Callable[[], str]) -> None:
    host, pod = netns(), netns()
    path = f"/var/run/netns/{pod}"
    opened_in(host, lambda: attach_pod(pod_netns=path, ifname="eth0", host_ifname="tthpp1", ips=["10.9.0.6"],
                                    mac=None, mtu=1450))
    # the same host-side name again (a retried ADD): the old pair goes, the new one is made
    opened_in(host, lambda: attach_pod(pod_netns=path, ifname="eth1", host_ifname="tthpp1", ips=["10.9.0.6"],
                                    mac=None, mtu=1450))
    assert links(pod) == {"lo", "eth1"}
    # another host-side name but an interface name the pod already has: nothing is made
    with pytest.raises(AttachError, match="eth1 already exists .* pick another CNI_IFNAME"):
        opened_in(host, lambda: plug_link(pod_netns=path, ifname="eth1", host_ifname="tthpp2", mac=None, mtu=1450))
    assert links(host) == {"lo", "tthpp1"} and links(pod) == {"lo", "eth1"}


def test_a_failed_addressing_removes_the_veth(netns: Callable[[], str]) -> None:
    host, pod = netns(), netns()
    path = f"/var/run/netns/{pod}"

    def plug_then_fail() -> None:
        link = plug_link(pod_netns=path, ifname="eth0", host_ifname="tthpp3", mac=None, mtu=1450)
        address_pod(link, ["10.9.0.7", "10.9.0.7"])  # the second add of the same address: EEXIST

    with pytest.raises(AttachError, match="add address 10.9.0.7"):
        opened_in(host, plug_then_fail)
    assert links(host) == {"lo"} and links(pod) == {"lo"}


def test_a_docker_veth_keeps_its_peer_in_the_host_namespace_and_replaces_a_leftover(netns: Callable[[], str]) -> None:
    """The same plug for Docker (`pod_netns` None): the peer stays down in this namespace for dockerd
    to move; the host side holds the IPv6 gateway; a leftover peer of an earlier attempt is replaced;
    a peer name that is not ours is refused, and nothing is made."""
    host = netns()
    subprocess.run(["ip", "-n", host, "link", "add", "tdk0a1b2c", "type", "veth", "peer", "name", "tdkold"], check=True,
                   timeout=30)
    with pytest.raises(AttachError, match="eth5"):
        opened_in(host, lambda: plug_link(pod_netns=None, ifname="eth5", host_ifname="tthpp8", mac=None, mtu=1400))
    assert "tthpp8" not in links(host)
    link = opened_in(host, lambda: plug_link(pod_netns=None, ifname="tdk0a1b2c", host_ifname="tthpp9",
                                             mac="02:00:00:00:09:09", mtu=1400, gateway6=True))
    link.close()
    (outside,) = ip_json(host, "link", "show", "tthpp9")
    (peer,) = ip_json(host, "link", "show", "tdk0a1b2c")
    assert "tdkold" not in links(host) and link.host_mac == outside["address"]
    assert peer["address"] == "02:00:00:00:09:09"
    assert "UP" not in outside["flags"] and "UP" not in peer["flags"] and outside["mtu"] == peer["mtu"] == 1400
    assert peer.get("link") == "tthpp9" and outside.get("link") == "tdk0a1b2c"
    addrs = {a["local"] for a in ip_json(host, "addr", "show", "tthpp9")[0]["addr_info"]}
    assert addrs == {"fe80::1"}
