"""Conntrack's NEW and DESTROY events, read from ctnetlink (no `conntrack -E` process).

The agent records every connection its host's pods make (`tether.agent.flowlog`). Reading the
kernel's events from a netlink socket bound to the NFNLGRP_CONNTRACK_NEW and _DESTROY groups of the
agent's own network namespace, and decoding only the attributes a record needs (both tuples and
the DESTROY's counters) with `struct`, costs the host a fraction of what a `conntrack -E` process
printing text for the agent to parse again did (bench/flows.py; bench/NOTES.md#flows). pyroute2's
generic decoder (`NFCTSocket`) is not used here: it costs ~0.4 ms a message, more than the
connection itself.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_DELETE = 2
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_DESTROY = 3
NLM_F_CREATE = 0x400
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY = 1, 2, 9, 10
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
MSG_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
MSG_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 58: "icmpv6", 132: "sctp", 136: "udplite"}
PORTED = {6, 17, 33, 132, 136}  # protocols whose tuples carry ports
RCVBUF = 8 << 20  # events of one read interval at tens of thousands of connections a second

_HDR = struct.Struct("=IHH")  # nlmsghdr's length, type, flags
_ATTR = struct.Struct("=HH")
_PORTS = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_ntop = socket.inet_ntop
_V4, _V6 = socket.AF_INET, socket.AF_INET6


def _hdr(length: int, kind: int) -> int:
    """An attribute header (native byte order, as the kernel writes it) read as a big-endian
    integer, the way the fast path's `struct` reads it."""
    return int.from_bytes(struct.pack("=HH", length, kind), "big")


# The usual event: IPv4 or IPv6, TCP/UDP/SCTP, both tuples first in the order the kernel writes
# them (ctnetlink_dump_tuples: addresses, then protocol and ports). One unpack reads both tuples;
# the headers it reads with them must equal these, or the generic walk below decodes the message.
_FAST = {}
for _family, _alen, _src, _dst in ((4, 4, CTA_IP_V4_SRC, CTA_IP_V4_DST), (16, 16, CTA_IP_V6_SRC, CTA_IP_V6_DST)):
    _ip = 4 + 2 * (4 + _alen)
    _tuple_len = 4 + _ip + 28
    _one = f"I I I{_alen}s I{_alen}s I IB3x IH2x IH2x"
    _FAST[_family] = (struct.Struct(">" + _one + " " + _one), 2 * _tuple_len,
                      tuple(_hdr(*h) for h in ((_tuple_len, 0x8000 | CTA_TUPLE_ORIG), (_ip, 0x8000 | CTA_TUPLE_IP),
                                               (4 + _alen, _src), (4 + _alen, _dst), (28, 0x8000 | CTA_TUPLE_PROTO),
                                               (5, CTA_PROTO_NUM), (6, CTA_PROTO_SRC_PORT),
                                               (6, CTA_PROTO_DST_PORT))),
                      socket.AF_INET if _family == 4 else socket.AF_INET6)
_REPLY_HDR = {f: _hdr(4 + 2 * (4 + f) + 28 + 4, 0x8000 | CTA_TUPLE_REPLY) for f in (4, 16)}


def open_events(rcvbuf: int = RCVBUF) -> socket.socket:
    """A non-blocking netlink socket receiving this network namespace's conntrack NEW and DESTROY
    events. Needs CAP_NET_ADMIN; raises OSError otherwise."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                      NETLINK_NETFILTER)
    try:
        try:  # root may exceed net.core.rmem_max, which the events of a busy interval need
            s.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((0, (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))))
    except OSError:
        s.close()
        raise
    return s


def _tuple(buf: Any, off: int, end: int) -> tuple[str, str, int, int, int]:
    """(src, dst, protocol number, sport, dport) of a CTA_TUPLE_* attribute's payload."""
    src = dst = ""
    proto = sport = dport = 0
    while off + 4 <= end:
        alen, kind = _ATTR.unpack_from(buf, off)
        if alen < 4:
            break
        kind &= NLA_TYPE_MASK
        inner, stop = off + 4, off + alen
        if kind == CTA_TUPLE_IP:
            while inner + 4 <= stop:
                blen, bkind = _ATTR.unpack_from(buf, inner)
                if blen < 4:
                    break
                bkind &= NLA_TYPE_MASK
                if bkind == CTA_IP_V4_SRC:
                    src = _ntop(_V4, buf[inner + 4:inner + 8])
                elif bkind == CTA_IP_V4_DST:
                    dst = _ntop(_V4, buf[inner + 4:inner + 8])
                elif bkind == CTA_IP_V6_SRC:
                    src = _ntop(_V6, buf[inner + 4:inner + 20])
                elif bkind == CTA_IP_V6_DST:
                    dst = _ntop(_V6, buf[inner + 4:inner + 20])
                inner += (blen + 3) & ~3
        elif kind == CTA_TUPLE_PROTO:
            while inner + 4 <= stop:
                blen, bkind = _ATTR.unpack_from(buf, inner)
                if blen < 4:
                    break
                bkind &= NLA_TYPE_MASK
                if bkind == CTA_PROTO_NUM:
                    proto = buf[inner + 4]
                elif bkind == CTA_PROTO_SRC_PORT:
                    (sport,) = _PORTS.unpack_from(buf, inner + 4)
                elif bkind == CTA_PROTO_DST_PORT:
                    (dport,) = _PORTS.unpack_from(buf, inner + 4)
                inner += (blen + 3) & ~3
        off += (alen + 3) & ~3
    return src, dst, proto, sport, dport


def _counters(buf: Any, off: int, end: int) -> tuple[int, int]:
    packets = nbytes = 0
    while off + 4 <= end:
        alen, kind = _ATTR.unpack_from(buf, off)
        if alen < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind == CTA_COUNTERS_PACKETS:
            (packets,) = _U64.unpack_from(buf, off + 4)
        elif kind == CTA_COUNTERS_BYTES:
            (nbytes,) = _U64.unpack_from(buf, off + 4)
        off += (alen + 3) & ~3
    return packets, nbytes


def parse_event(buf: Any, off: int = 0, now: float = 0.0) -> dict[str, Any] | None:
    """One ctnetlink event message at `off` in `buf` -> a flow record (None: not a NEW or DESTROY).

    The record is the one `tether.flows` describes: the original tuple is the client's view (src ->
    dst, dst maybe a service VIP); the reply tuple's source is where the connection really went
    (the backend after DNAT); a DESTROY carries packets and bytes both ways (nf_conntrack_acct)."""
    length, mtype, flags = _HDR.unpack_from(buf, off)
    if mtype == MSG_DELETE:
        event = "destroy"
    elif mtype == MSG_NEW and flags & NLM_F_CREATE:  # without the flag: an update
        event = "new"
    else:
        return None
    end = off + length
    pos = off + 20  # nlmsghdr (16) + nfgenmsg (4)
    fast = _FAST.get(4 if buf[off + 16] == _V4 else 16)
    if fast is not None and pos + fast[1] <= end:
        rec = _fast(buf, pos, end, fast, event, now)
        if rec is not None:
            return rec
    orig = reply = None
    counters: dict[int, tuple[int, int]] = {}
    while pos + 4 <= end:
        alen, kind = _ATTR.unpack_from(buf, pos)
        if alen < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind == CTA_TUPLE_ORIG:
            orig = _tuple(buf, pos + 4, pos + alen)
        elif kind == CTA_TUPLE_REPLY:
            reply = _tuple(buf, pos + 4, pos + alen)
        elif kind in (CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY):
            counters[kind] = _counters(buf, pos + 4, pos + alen)
        pos += (alen + 3) & ~3
    if orig is None or not orig[0]:
        return None
    src, dst, proto, sport, dport = orig
    rec: dict[str, Any] = {"event": event, "verdict": "allow", "proto": PROTOS.get(proto) or str(proto),
                           "src": src, "dst": dst, "time": now}
    if proto in PORTED:
        rec["sport"], rec["dport"] = sport, dport
    if CTA_COUNTERS_ORIG in counters:
        rec["packets"], rec["bytes"] = counters[CTA_COUNTERS_ORIG]
    if CTA_COUNTERS_REPLY in counters:
        rec["reply_packets"], rec["reply_bytes"] = counters[CTA_COUNTERS_REPLY]
    if reply is not None and reply[0] and reply[0] != dst:
        rec["backend"] = reply[0]
        if proto in PORTED:
            rec["backend_port"] = reply[3]
    return rec


def _fast(buf: Any, pos: int, end: int, fast: tuple, event: str, now: float) -> dict[str, Any] | None:
    """`parse_event` for the usual message (see _FAST); None when it is not one."""
    layout, size, want, family = fast
    (h0, h1, h2, src, h3, dst, h4, h5, proto, h6, sport, h7, dport,
     r0, r1, r2, rsrc, r3, _rdst, r4, r5, _rproto, r6, rsport, r7, _rdport) = layout.unpack_from(buf, pos)
    if (h0, h1, h2, h3, h4, h5, h6, h7) != want or (r1, r2, r3, r4, r5, r6, r7) != want[1:] or \
            r0 != _REPLY_HDR[len(src)] or proto not in PORTED:
        return None
    dst_s = _ntop(family, dst)
    rec: dict[str, Any] = {"event": event, "verdict": "allow", "proto": PROTOS[proto], "src": _ntop(family, src),
                           "dst": dst_s, "time": now, "sport": sport, "dport": dport}
    if rsrc != dst:
        rec["backend"], rec["backend_port"] = _ntop(family, rsrc), rsport
    if event == "destroy":
        pos += size
        while pos + 4 <= end:
            alen, kind = _ATTR.unpack_from(buf, pos)
            if alen < 4:
                break
            kind &= NLA_TYPE_MASK
            if kind == CTA_COUNTERS_ORIG:
                rec["packets"], rec["bytes"] = _counters(buf, pos + 4, pos + alen)
            elif kind == CTA_COUNTERS_REPLY:
                rec["reply_packets"], rec["reply_bytes"] = _counters(buf, pos + 4, pos + alen)
            pos += (alen + 3) & ~3
    return rec
