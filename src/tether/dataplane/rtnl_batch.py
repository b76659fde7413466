"""Batched rtnetlink requests, for the few that plug a pod (the CNI ADD's critical path).

pyroute2 0.9's `IPRoute` runs an asyncio loop for every request and encodes through generic
message classes: about half a millisecond of Python per request, and plugging a pod takes ten,
which made the veth the longest part of an ADD here (bench/cni.py; pyroute2's classes alone still
cost 2.5 ms of the 4.4 of a plug). So these seven fixed messages (rtnetlink(7): ifinfomsg,
ifaddrmsg, rtmsg, ndmsg and their attributes) are packed here with `struct`, and a plain netlink
socket sends each step's requests in one `sendto` and reads their acknowledgements together. The
kernel handles the messages of a batch one after the other, exactly as if sent separately, and
answers each on its own: one failing does not stop the next.

The full read-back of the periodic reconcile dumps every link and route of the host, and pyroute2
decodes every attribute of every message: 1.3 s of Python for 2,000 links, holding the GIL while
CNI requests wait. `RtnlSocket.links`, `.routes` and `.neighbours` dump the same with the fields the
dataplane compares, parsed here (the neighbour and FDB dumps list every device's entries; only the
VTEP's are decoded). Everything else uses pyroute2.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from tether.dataplane.netns import socket_in

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
ERRNO = struct.Struct("=i")
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFA_F_NODAD = 0x02
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst len, src len, tos, table, protocol, scope, type, flags
NDMSG = struct.Struct("=BxxxiHBB")  # family, index, state, flags, type
RTATTR = struct.Struct("=HH")  # length, type

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
CREATE = NLM_F_CREATE | NLM_F_EXCL
REPLACE = NLM_F_CREATE | NLM_F_REPLACE
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR = 16, 17, 18, 20
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE, RTM_NEWNEIGH, RTM_GETNEIGH = 24, 25, 26, 28, 30
AF_BRIDGE = 7  # a neighbour dump of this family lists the forwarding database (FDB)
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_NET_NS_FD = 1, 3, 4, 18, 20, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE, RTA_VIA = 1, 4, 5, 15, 18
NDA_DST, NDA_LLADDR = 1, 2
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete: any scope
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80


@dataclass(frozen=True, slots=True)
class Link:
    """A link as a lookup or a dump answers it: what plugging and applying use."""

    index: int
    name: str
    mac: str | None
    mtu: int | None
    flags: int
    alias: str = ""


@dataclass(frozen=True, slots=True)
class RouteState:
    """One route of a dump: what the dataplane compares."""

    dst: str  # "10.1.0.5/32"
    oif: int | None
    gateway: str | None
    proto: int
    scope: int
    flags: int
    table: int


@dataclass
class Request:
    """One message of a batch, and after `RtnlSocket.run` what the kernel answered to it."""

    what: str  # for error messages: "create veth tth1234"
    type: int
    body: bytes  # the message after its netlink header
    flags: int = 0
    error: int = 0  # the errno the kernel answered (0: done)
    link: Link | None = None  # the answer to a link lookup

    def check(self) -> Request:
        if self.error:
            raise OSError(self.error, f"{self.what}: {os.strerror(self.error)}")
        return self


class RtnlSocket:
    """A NETLINK_ROUTE socket, in the given network namespace (a path) or this thread's."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC)  # NETLINK_ROUTE
        self.sock.bind((0, 0))
        self.sock.settimeout(10)  # the kernel answers at once; a lost answer becomes an error, not a hang
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def run(self, *requests: Request) -> list[Request]:
        """Send the requests in one batch and fill in each one's error (and link)."""
        if not requests:
            return []
        by_seq = {}
        out = bytearray()
        for r in requests:
            self.seq += 1
            out += HEADER.pack(HEADER.size + len(r.body), r.type, NLM_F_REQUEST | NLM_F_ACK | r.flags, self.seq, 0)
            out += r.body
            by_seq[self.seq] = r
        self.sock.sendto(out, (0, 0))  # to the kernel
        pending = set(by_seq)
        while pending:
            data = self.sock.recv(65536)
            offset = 0
            while offset + HEADER.size <= len(data):
                length, mtype, _flags, seq, _port = HEADER.unpack_from(data, offset)
                if length < HEADER.size:
                    break
                r = by_seq.get(seq)
                if r is not None and mtype == NLMSG_ERROR:
                    r.error = -ERRNO.unpack_from(data, offset + HEADER.size)[0]
                    pending.discard(seq)
                elif r is not None and mtype == RTM_NEWLINK:
                    r.link = _link(data[offset + HEADER.size:offset + length])
                offset += _align(length)
        return list(requests)


    def dump(self, mtype: int, body: bytes) -> Iterator[tuple[int, bytes]]:
        """(type, message after its netlink header) for each message of a dump."""
        self.seq += 1
        seq = self.seq
        self.sock.sendto(HEADER.pack(HEADER.size + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body,
                         (0, 0))
        while True:
            data = self.sock.recv(1 << 18)
            offset = 0
            while offset + HEADER.size <= len(data):
                length, rtype, _flags, rseq, _port = HEADER.unpack_from(data, offset)
                if length < HEADER.size:
                    break
                if rseq == seq:
                    if rtype == NLMSG_DONE:
                        return
                    if rtype == NLMSG_ERROR:
                        err = -ERRNO.unpack_from(data, offset + HEADER.size)[0]
                        if err:
                            raise OSError(err, f"netlink dump {mtype}: {os.strerror(err)}")
                    else:
                        yield rtype, data[offset + HEADER.size:offset + length]
                offset += _align(length)

    def links(self) -> list[Link]:
        """Every link of the namespace."""
        return [_link(msg) for rtype, msg in self.dump(RTM_GETLINK, IFINFOMSG.pack(0, 0, 0, 0, 0))
                if rtype == RTM_NEWLINK]

    def routes(self, family: int, table: int = RT_TABLE_MAIN, proto: int | None = None) -> list[RouteState]:
        """The routes of one family in `table` (and of protocol `proto`, if given)."""
        out = []
        for rtype, msg in self.dump(RTM_GETROUTE, RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            if rtype != RTM_NEWROUTE:
                continue
            fam, dst_len, _src_len, _tos, tbl, rproto, scope, _type, flags = RTMSG.unpack_from(msg)
            if proto is not None and rproto != proto:
                continue
            attrs = _attrs(msg, RTMSG.size, (RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE, RTA_VIA))
            if RTA_TABLE in attrs:
                tbl = struct.unpack("=I", attrs[RTA_TABLE])[0]
            if tbl != table:
                continue
            dst = attrs.get(RTA_DST)
            any_addr = "0.0.0.0" if fam == socket.AF_INET else "::"
            gw = attrs.get(RTA_GATEWAY)
            if gw is None and RTA_VIA in attrs:  # a next hop of the other family: family (u16), address
                gw = attrs[RTA_VIA][2:]
            out.append(RouteState(f"{ipaddress.ip_address(dst) if dst else any_addr}/{dst_len}",
                                  struct.unpack("=I", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None,
                                  str(ipaddress.ip_address(gw)) if gw else None, rproto, scope, flags, tbl))
        return out


    def neighbours(self, family: int, index: int) -> list[tuple[str | None, str | None, int]]:
        """(address, MAC, NUD state) of each neighbour entry of one device; family AF_BRIDGE: its FDB
        entries (address: the remote VTEP, when the entry has one)."""
        out = []
        for rtype, msg in self.dump(RTM_GETNEIGH, NDMSG.pack(family, index, 0, 0, 0)):
            if rtype != RTM_NEWNEIGH:
                continue
            _fam, ifindex, state, _flags, _type = NDMSG.unpack_from(msg)
            if ifindex != index:  # the kernel filters by device only in strict mode: here
                continue
            attrs = _attrs(msg, NDMSG.size, (NDA_DST, NDA_LLADDR))
            dst, mac = attrs.get(NDA_DST), attrs.get(NDA_LLADDR)
            ip = socket.inet_ntop(socket.AF_INET if len(dst) == 4 else socket.AF_INET6, dst) if dst else None
            out.append((ip, mac.hex(":") if mac else None, state))
        return out


def _attrs(msg: bytes, offset: int, wanted: tuple[int, ...]) -> dict[int, bytes]:
    """The payloads of the wanted top-level attributes of a message."""
    out = {}
    end = len(msg)
    while offset + RTATTR.size <= end:
        n, kind = RTATTR.unpack_from(msg, offset)
        if n < RTATTR.size:
            break
        if kind in wanted:
            out[kind] = msg[offset + RTATTR.size:offset + n]
        offset += (n + 3) & ~3  # _align, inlined: this loop runs for every attribute of a dump
    return out


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    n = RTATTR.size + len(payload)
    return RTATTR.pack(n, kind) + payload + bytes(_align(n) - n)


def _u32(v: int) -> bytes:
    return struct.pack("=I", v)


def _name(s: str) -> bytes:
    return s.encode() + b"\0"


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _ip(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def _family(ip: str) -> int:
    return socket.AF_INET if ipaddress.ip_address(ip).version == 4 else socket.AF_INET6


def _link(msg: bytes) -> Link:
    """An RTM_NEWLINK message, answer or dump (its other attributes are skipped)."""
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(msg)
    attrs = _attrs(msg, IFINFOMSG.size, (IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_IFALIAS))
    mac = attrs.get(IFLA_ADDRESS)
    return Link(index, _text(attrs.get(IFLA_IFNAME, b"")), mac.hex(":") if mac else None,
                struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else None, flags,
                _text(attrs.get(IFLA_IFALIAS, b"")))


def _text(attr: bytes) -> str:
    """A NUL-terminated string attribute."""
    return attr.rstrip(b"\0").decode(errors="replace")


# --- the messages ------------------------------------------------------------------------------


def veth(host_ifname: str, peer_ifname: str, peer_netns_fd: int | None, mtu: int, peer_mac: str | None) -> Request:
    """A veth with its peer made directly in another namespace (None: this one), both ends down (the
    kernel refuses to bring a peer up while it creates it there, ENOTCONN; the host side comes up
    once the pod's ingress chain exists: `links.raise_interfaces`)."""
    peer = (IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(peer_ifname))
            + (_attr(IFLA_NET_NS_FD, _u32(peer_netns_fd)) if peer_netns_fd is not None else b"")
            + _attr(IFLA_MTU, _u32(mtu))
            + (_attr(IFLA_ADDRESS, _mac(peer_mac)) if peer_mac else b""))
    info = _attr(IFLA_INFO_KIND, b"veth") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer))
    body = (IFINFOMSG.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(host_ifname))
            + _attr(IFLA_MTU, _u32(mtu)) + _attr(IFLA_LINKINFO, info))
    return Request(f"create veth {host_ifname}", RTM_NEWLINK, body, CREATE)


def _ifinfo(link: int | str, flags: int = 0) -> bytes:
    """An ifinfomsg for the interface with this index or name (the kernel looks a name up itself)."""
    if isinstance(link, int):
        return IFINFOMSG.pack(0, 0, link, flags, flags)
    return IFINFOMSG.pack(0, 0, 0, flags, flags) + _attr(IFLA_IFNAME, _name(link))


def get_link(ifname: str) -> Request:
    return Request(f"look up {ifname}", RTM_GETLINK, _ifinfo(ifname))


def del_link(link: int | str) -> Request:
    """Remove the interface with this index or name (a veth goes with its peer)."""
    return Request(f"remove {link}", RTM_DELLINK, _ifinfo(link))


def link_up(link: int | str) -> Request:
    """Bring up the interface with this index or name."""
    return Request(f"bring up {link}", RTM_NEWLINK, _ifinfo(link, IFF_UP))


def address(index: int, ip: str) -> Request:
    """A host address (/32, /128). IPv6 without duplicate address detection (IFA_F_NODAD): IPAM
    made it unique, and a tentative address could not be a source for the first second."""
    a = ipaddress.ip_address(ip)
    body = IFADDRMSG.pack(_family(ip), a.max_prefixlen, 0 if a.version == 4 else IFA_F_NODAD, RT_SCOPE_UNIVERSE,
                          index)
    if a.version == 4:
        body += _attr(IFA_LOCAL, a.packed)
    body += _attr(IFA_ADDRESS, a.packed)
    return Request(f"add address {ip}", RTM_NEWADDR, body, CREATE)


def route(dst: str, index: int, *, gateway: str | None = None, scope: int = RT_SCOPE_UNIVERSE,
          proto: int = RTPROT_BOOT, replace: bool = False, onlink: bool = False) -> Request:
    """A route to `dst` ("10.0.0.1/32", "0.0.0.0/0") out of interface `index`, via `gateway` or on link."""
    body = _rtmsg(dst, index, gateway, proto, scope, RTN_UNICAST, RTNH_F_ONLINK if onlink else 0)
    return Request(f"{'replace' if replace else 'add'} route {dst}", RTM_NEWROUTE, body, REPLACE if replace else CREATE)


def del_route(dst: str, index: int, *, gateway: str | None = None, proto: int = 0) -> Request:
    """Remove the route to `dst` out of interface `index` (and via `gateway`, of protocol `proto`:
    0 matches any), whatever its scope and type, as `ip route del` asks."""
    return Request(f"remove route {dst}", RTM_DELROUTE, _rtmsg(dst, index, gateway, proto, RT_SCOPE_NOWHERE, 0, 0))


def _rtmsg(dst: str, index: int, gateway: str | None, proto: int, scope: int, rtype: int, flags: int) -> bytes:
    net = ipaddress.ip_network(dst)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    body = RTMSG.pack(family, net.prefixlen, 0, 0, RT_TABLE_MAIN, proto, scope, rtype, flags)
    if net.prefixlen:
        body += _attr(RTA_DST, net.network_address.packed)
    body += _attr(RTA_OIF, _u32(index))
    if gateway:
        gw = ipaddress.ip_address(gateway)
        if gw.version == net.version:
            body += _attr(RTA_GATEWAY, gw.packed)
        else:  # an IPv4 route via an IPv6 next hop (an IPv6 underlay): RTA_VIA, family first
            body += _attr(RTA_VIA, struct.pack("=H", _family(gateway)) + gw.packed)
    return body


def permanent_neighbour(index: int, ip: str, mac: str) -> Request:
    body = NDMSG.pack(_family(ip), index, NUD_PERMANENT, 0, 0) + _attr(NDA_DST, _ip(ip)) + _attr(NDA_LLADDR, _mac(mac))
    return Request(f"set neighbour {ip}", RTM_NEWNEIGH, body, REPLACE)
