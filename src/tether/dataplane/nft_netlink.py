"""Set and map element changes sent to the kernel over netlink, without running `nft`.

Each `nft -f` run is a process (`ip netns exec`, nft, libnftables, the JSON parser) that, in nft
1.0.6, first fetches from the kernel what its commands might need: a `delete element` the table's
chains, sets and objects and the elements of every interval set, a `flush set` the sets. An
agent's usual change is a few elements of plain sets and maps (a pod joins a selector set, a
backend is added to a service's maps); through nft that cost a few ms of process and, before,
a flush and refill of the whole set when one element left it: in proportion to the table
(bench/nft_apply.py, bench/NOTES.md#nft_apply). Here such a change is one nfnetlink batch
(atomic, as nft's) with one NEWSETELEM or DELSETELEM message per set and change, on a netlink
socket the dataplane keeps in its namespace: its cost is that of the elements that changed.

The same socket reads the namespace's nftables ruleset generation (NFT_MSG_GETGEN: NFTA_GEN_ID, a
32-bit counter the kernel bumps on every committed transaction in the namespace, whoever commits
it): one request and one small answer, with which the dataplane's periodic verify skips listing
the whole table when nothing was committed since its own last write (`NftDataplane.verify`).

Only elements of non-interval sets whose key and value types are listed in `FIELDS` (verdict maps
too) are encoded; anything else raises `Unencodable` and the dataplane uses nft. Field encodings
are nft's (nft(8) "DATA TYPES"): addresses in network order, `inet_service` 16 bits big-endian,
`inet_proto` one byte, `mark` 32 bits host order, `ifname` 16 bytes zero-padded; in a
concatenation each field is padded to 4 bytes.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import select
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tether.dataplane.netns import opened_in

NETLINK_NETFILTER = 12
NETLINK_CAP_ACK = 10  # socket option: errors do not echo the whole request back
SOL_NETLINK = 270
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLA_F_NESTED = 0x8000
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_GEN_ID = 1
NLA_TYPE_MASK = 0x3FFF  # an attribute's type without its NESTED and NET_BYTEORDER flags
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
VERDICT_CODES = {"accept": 1, "drop": 0, "continue": -1, "return": -5, "jump": -3, "goto": -4}
PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
NLATTR = struct.Struct("=HH")
MAX_ATTR = 60_000  # an attribute's length is 16 bits: larger element lists are split into messages
MAX_BATCH = 150_000  # below the socket's default send buffer; larger changes go through nft


class Unencodable(ValueError):
    """An element this module does not encode (the dataplane then uses nft)."""


def _address(v: Any, version: int) -> bytes:
    if not isinstance(v, str):
        raise Unencodable(f"not an address: {v!r}")
    if "/" in v:
        net = ipaddress.ip_network(v, strict=False)
        if net.prefixlen != net.max_prefixlen:
            raise Unencodable(f"a prefix in a plain set: {v}")
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = net.network_address
    else:
        addr = ipaddress.ip_address(v)
    if addr.version != version:
        raise Unencodable(f"IPv{addr.version} address {v} in an IPv{version} field")
    return addr.packed


def _ifname(v: Any) -> bytes:
    b = str(v).encode()
    if len(b) >= 16 or "*" in str(v):
        raise Unencodable(f"not an interface name: {v!r}")
    return b.ljust(16, b"\0")


def _proto(v: Any) -> bytes:
    n = PROTOCOLS.get(v) if isinstance(v, str) else v
    if not isinstance(n, int) or not 0 <= n < 256:
        raise Unencodable(f"not a protocol: {v!r}")
    return bytes((n,))


def _port(v: Any) -> bytes:
    if not isinstance(v, int) or not 0 <= v < 65536:
        raise Unencodable(f"not a port: {v!r}")
    return v.to_bytes(2, "big")


def _mark(v: Any) -> bytes:
    if not isinstance(v, int) or not 0 <= v < 1 << 32:
        raise Unencodable(f"not a mark: {v!r}")
    return v.to_bytes(4, sys.byteorder)


FIELDS = {"ipv4_addr": lambda v: _address(v, 4), "ipv6_addr": lambda v: _address(v, 6), "ifname": _ifname,
          "inet_proto": _proto, "inet_service": _port, "mark": _mark}


def _field(typ: str, v: Any) -> bytes:
    enc = FIELDS.get(typ)
    if enc is None:
        raise Unencodable(f"element type {typ} is not encoded here")
    return enc(v)


def key_bytes(typ: str | tuple[str, ...], v: Any) -> bytes:
    """A set key as the kernel compares it."""
    if isinstance(typ, str):
        return _field(typ, v)
    if not isinstance(v, tuple) or len(v) != len(typ):
        raise Unencodable(f"{v!r} is not a {' . '.join(typ)}")
    out = b""
    for t, x in zip(typ, v, strict=True):
        f = _field(t, x)
        out += f.ljust((len(f) + 3) // 4 * 4, b"\0")
    return out


def _attr(kind: int, payload: bytes) -> bytes:
    return NLATTR.pack(NLATTR.size + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _nested(kind: int, payload: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, payload)


def _verdict(v: Any) -> bytes:
    if not isinstance(v, str):
        raise Unencodable(f"not a verdict: {v!r}")
    verb, _, target = v.partition(" ")
    if verb not in VERDICT_CODES or bool(target) != (verb in ("jump", "goto")):
        raise Unencodable(f"not a verdict: {v!r}")
    body = _attr(NFTA_VERDICT_CODE, struct.pack(">i", VERDICT_CODES[verb]))
    if target:
        body += _attr(NFTA_VERDICT_CHAIN, target.encode() + b"\0")
    return _nested(NFTA_DATA_VERDICT, body)


def element_bytes(key_type: str | tuple[str, ...], map_type: str | tuple[str, ...] | None, e: Any,
                  with_data: bool) -> bytes:
    """One NFTA_LIST_ELEM: the key, and for an entry added to a map (`with_data`; `e` is then a
    (key, value) pair), its value."""
    if map_type is None or not with_data:
        return _nested(NFTA_LIST_ELEM, _nested(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, key_bytes(key_type, e))))
    if not isinstance(e, tuple) or len(e) != 2:
        raise Unencodable(f"not a map entry: {e!r}")
    key, value = e
    if map_type == "verdict":
        data = _verdict(value)
    elif isinstance(map_type, str):
        data = _attr(NFTA_DATA_VALUE, _field(map_type, value))
    else:
        raise Unencodable(f"map values of type {map_type} are not encoded here")
    return _nested(NFTA_LIST_ELEM, _nested(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, key_bytes(key_type, key)))
                   + _nested(NFTA_SET_ELEM_DATA, data))


@dataclass(frozen=True)
class Change:
    """Elements added to or deleted from one set (added map entries are (key, value) pairs, deleted
    ones their keys)."""

    add: bool
    set_name: str
    key_type: str | tuple[str, ...]
    map_type: str | tuple[str, ...] | None
    flags: tuple[str, ...]
    elements: tuple[Any, ...]


def _message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    return HEADER.pack(HEADER.size + len(payload), kind, flags, seq, 0) + payload


def _nfgen(family: int, res_id: int = 0) -> bytes:
    return struct.pack("=BBH", family, 0, socket.htons(res_id))


@dataclass(frozen=True)
class Batch:
    """An encoded batch: its bytes, the set each message's sequence number is for (to name it in an
    error), and the changes it holds."""

    data: bytes
    names: dict[int, str]
    changes: tuple[Change, ...]


def encode(table: str, changes: Iterable[Change], seq: int = 1) -> Batch:
    """One nfnetlink batch applying `changes` in order. Raises Unencodable for what only nft can do."""
    changes = tuple(changes)
    parts = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, _nfgen(socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES))]
    names: dict[int, str] = {}
    head = _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
    for c in changes:
        if "interval" in c.flags:
            raise Unencodable(f"{c.set_name} is an interval set")
        kind = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if c.add else NFT_MSG_DELSETELEM)
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if c.add else 0)
        elems = [element_bytes(c.key_type, c.map_type, e, c.add) for e in c.elements]
        start = 0
        while start < len(elems):  # one message per MAX_ATTR bytes of elements
            size, end = 0, start
            while end < len(elems) and (end == start or size + len(elems[end]) <= MAX_ATTR):
                size += len(elems[end])
                end += 1
            seq += 1
            names[seq] = c.set_name
            payload = (_nfgen(NFPROTO_INET) + head + _attr(NFTA_SET_ELEM_LIST_SET, c.set_name.encode() + b"\0")
                       + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, b"".join(elems[start:end])))
            parts.append(_message(kind, flags, seq, payload))
            start = end
    seq += 1
    parts.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, _nfgen(socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES)))
    data = b"".join(parts)
    if len(data) > MAX_BATCH:
        raise Unencodable(f"{len(data)} bytes of elements: one batch through nft")
    return Batch(data, names, changes)


def generation_request(seq: int) -> bytes:
    """NFT_MSG_GETGEN: asks for the namespace's ruleset generation (nft's own `mnl_genid_get`)."""
    return _message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST, seq, _nfgen(socket.AF_UNSPEC))


def next_generation(gen: int) -> int:
    """The generation after `gen`: the kernel's counter is 32 bits and skips 0 when it wraps."""
    return gen + 1 if gen < 0xFFFFFFFF else 1


def parse_generation(data: bytes, seq: int) -> int | None:
    """The NFTA_GEN_ID of the NFT_MSG_NEWGEN answer numbered `seq` among the messages in `data`
    (None: not among them). Raises OSError if the kernel answered that request with an error."""
    off = 0
    while off + HEADER.size <= len(data):
        length, kind, _, mseq, _ = HEADER.unpack_from(data, off)
        if length < HEADER.size:
            break
        if mseq == seq and kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, off + HEADER.size)
            if err:
                raise OSError(-err, f"reading the nftables generation: {os.strerror(-err)}")
        elif mseq == seq and kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            at, end = off + HEADER.size + 4, off + length  # after the nfgenmsg
            while at + NLATTR.size <= end:
                alen, atype = NLATTR.unpack_from(data, at)
                if alen < NLATTR.size:
                    break
                if atype & NLA_TYPE_MASK == NFTA_GEN_ID and alen >= NLATTR.size + 4:
                    return int.from_bytes(data[at + NLATTR.size:at + NLATTR.size + 4], "big")
                at += (alen + 3) // 4 * 4
            raise OSError(errno.EPROTO, "the kernel's generation answer has no NFTA_GEN_ID")
        off += (length + 3) // 4 * 4
    return None


class ElementSocket:
    """A netfilter netlink socket in one namespace (None: the caller's), opened on first use: element
    batches (`send`) and the ruleset generation (`generation`)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._seq = itertools.count(1 << 30)  # generation requests, apart from the batches' numbers

    def _open(self) -> socket.socket:
        def make() -> socket.socket:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock = opened_in(self.netns, make) if self.netns else make()
        sock.bind((0, 0))
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        except OSError:
            pass
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, batch: Batch) -> None:
        """Sends one batch made by `encode` (applied atomically) and raises OSError naming the sets
        whose messages the kernel refused."""
        if self._sock is None:
            self._sock = self._open()
        sock = self._sock
        try:
            sock.sendto(batch.data, (0, 0))
            # the kernel handles the batch inside sendto: every answer is queued when it returns
            failures: list[str] = []
            while True:
                try:
                    data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                off = 0
                while off + HEADER.size <= len(data):
                    length, kind, _, seq, _ = HEADER.unpack_from(data, off)
                    if kind == NLMSG_ERROR:
                        (err,) = struct.unpack_from("=i", data, off + HEADER.size)
                        if err:
                            failures.append(f"{batch.names.get(seq, '?')}: {os.strerror(-err)}")
                    off += (length + 3) // 4 * 4 if length else len(data)
        except OSError:
            self.close()
            raise
        if failures:
            raise OSError(errno.EINVAL, "element batch refused (" + "; ".join(failures) + ")")

    def generation(self, timeout: float = 2.0) -> int:
        """The namespace's nftables ruleset generation (one GETGEN round trip). Raises OSError."""
        if self._sock is None:
            self._sock = self._open()
        sock = self._sock
        seq = next(self._seq) & 0xFFFFFFFF
        try:
            sock.sendto(generation_request(seq), (0, 0))
            while True:  # the kernel answers inside sendto; the wait is only a guard
                if not select.select([sock], [], [], timeout)[0]:
                    raise OSError(errno.ETIMEDOUT, "no answer from the kernel to a generation request")
                gen = parse_generation(sock.recv(1 << 16), seq)
                if gen is not None:
                    return gen
        except OSError:
            self.close()
            raise
