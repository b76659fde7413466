"""The messages rtnl_batch packs by hand read back, through pyroute2's own decoders, as the requests
pyroute2 would have made; and a link answer yields its index, MAC, MTU and flags."""

from __future__ import annotations

import socket

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from tether.dataplane import rtnl_batch as nl


def decoded(cls, req: nl.Request):
    """The request as pyroute2 reads it (a netlink header in front of the body)."""
    msg = cls(nl.HEADER.pack(nl.HEADER.size + len(req.body), req.type, nl.NLM_F_REQUEST | req.flags, 1, 0) + req.body)
    msg.decode()
    return msg


def test_a_veth_with_its_peer_in_another_namespace() -> None:
    req = nl.veth("tth0123456789", "eth0", 7, 1450, "02:00:00:00:00:01")
    m = decoded(ifinfmsg, req)
    assert (req.type, req.flags) == (nl.RTM_NEWLINK, nl.NLM_F_CREATE | nl.NLM_F_EXCL)
    assert m.get_attr("IFLA_IFNAME") == "tth0123456789" and m.get_attr("IFLA_MTU") == 1450
    assert not m["flags"] & nl.IFF_UP  # up once the pod's ingress chain exists (links.raise_interfaces)
    info = m.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "veth"
    peer = info.get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert peer.get_attr("IFLA_IFNAME") == "eth0" and peer.get_attr("IFLA_NET_NS_FD") == 7
    assert peer.get_attr("IFLA_MTU") == 1450 and peer.get_attr("IFLA_ADDRESS") == "02:00:00:00:00:01"


def test_links_by_index_and_by_name() -> None:
    up = decoded(ifinfmsg, nl.link_up(1))
    assert up["index"] == 1 and up["flags"] & nl.IFF_UP and up["change"] == nl.IFF_UP
    named = decoded(ifinfmsg, nl.link_up("eth0"))
    assert named["index"] == 0 and named.get_attr("IFLA_IFNAME") == "eth0"
    assert decoded(ifinfmsg, nl.get_link("tthx")).get_attr("IFLA_IFNAME") == "tthx"
    assert decoded(ifinfmsg, nl.del_link(42))["index"] == 42
    by_name = decoded(ifinfmsg, nl.del_link("tthx"))
    assert by_name["index"] == 0 and by_name.get_attr("IFLA_IFNAME") == "tthx"


def test_addresses_routes_and_the_gateway_neighbour() -> None:
    a4 = decoded(ifaddrmsg, nl.address(3, "10.1.2.3"))
    assert (a4["family"], a4["prefixlen"], a4["index"]) == (socket.AF_INET, 32, 3)
    assert a4.get_attr("IFA_LOCAL") == a4.get_attr("IFA_ADDRESS") == "10.1.2.3"
    a6 = decoded(ifaddrmsg, nl.address(3, "fd00::3"))
    assert (a6["family"], a6["prefixlen"], a6.get_attr("IFA_ADDRESS")) == (socket.AF_INET6, 128, "fd00::3")
    gw = decoded(rtmsg, nl.route("169.254.1.1/32", 3, scope=nl.RT_SCOPE_LINK))
    assert (gw["dst_len"], gw["scope"], gw["table"], gw["type"]) == (32, nl.RT_SCOPE_LINK, 254, nl.RTN_UNICAST)
    assert gw.get_attr("RTA_DST") == "169.254.1.1" and gw.get_attr("RTA_OIF") == 3
    default = decoded(rtmsg, nl.route("0.0.0.0/0", 3, gateway="169.254.1.1"))
    assert default["dst_len"] == 0 and default.get_attr("RTA_DST") is None
    assert default.get_attr("RTA_GATEWAY") == "169.254.1.1"
    host = nl.route("fd00::3/128", 9, scope=nl.RT_SCOPE_LINK, proto=201, replace=True)
    h = decoded(rtmsg, host)
    assert host.flags == nl.NLM_F_CREATE | nl.NLM_F_REPLACE
    assert (h["family"], h["dst_len"], h["proto"], h.get_attr("RTA_DST")) == (socket.AF_INET6, 128, 201, "fd00::3")
    onlink = decoded(rtmsg, nl.route("10.2.0.0/24", 4, gateway="169.254.64.2", proto=201, replace=True, onlink=True))
    assert onlink["flags"] == nl.RTNH_F_ONLINK and onlink.get_attr("RTA_GATEWAY") == "169.254.64.2"
    gone = nl.del_route("10.2.0.0/24", 4, gateway="169.254.64.2", proto=201)
    d = decoded(rtmsg, gone)
    assert (gone.type, gone.flags) == (nl.RTM_DELROUTE, 0)
    assert (d["dst_len"], d["proto"], d["scope"], d["type"], d["table"]) == (24, 201, nl.RT_SCOPE_NOWHERE, 0, 254)
    assert (d.get_attr("RTA_DST"), d.get_attr("RTA_OIF"), d.get_attr("RTA_GATEWAY")) == ("10.2.0.0", 4, "169.254.64.2")
    n = decoded(ndmsg, nl.permanent_neighbour(3, "169.254.1.1", "ee:ee:ee:ee:ee:01"))
    assert (n["ifindex"], n["state"]) == (3, nl.NUD_PERMANENT)
    assert n.get_attr("NDA_DST") == "169.254.1.1" and n.get_attr("NDA_LLADDR") == "ee:ee:ee:ee:ee:01"


def test_a_link_answer_gives_its_index_mac_mtu_and_flags() -> None:
    answer = ifinfmsg()
    answer["index"] = 17
    answer["flags"] = nl.IFF_UP
    answer["attrs"] = [("IFLA_IFNAME", "tthx"), ("IFLA_MTU", 1450), ("IFLA_ADDRESS", "02:aa:bb:cc:dd:ee")]
    answer.encode()
    link = nl._link(bytes(answer.data[nl.HEADER.size:]))
    assert (link.index, link.mac, link.mtu, link.flags) == (17, "02:aa:bb:cc:dd:ee", 1450, nl.IFF_UP)
