"""ICMP echo from inside the agent (path health, `agent/peers.py`): no `ping` process per probe.

Path health sends a few Don't-Fragment echoes per peer every round; as `ping` processes that was
~3 process starts a second per host (a 100-host lab on one machine: 56 pings alive at once, ~300
starts a second). Here every probe of a family and device shares one raw socket registered with the
asyncio loop: a request is written, its future waits for the reply matched by the socket's identifier,
the sequence number and the source address (a raw socket sees every echo reply of the namespace, so
the rest are skipped; a kernel filter, ICMP_FILTER / ICMP6_FILTER, lets only echo replies through).

`ping` keeps the contract of `ping -M do -s SIZE-28 [-I DEV]`: `size` is the whole IP packet,
Don't Fragment is set (IP_PMTUDISC_DO; IPv6: IPV6_PMTUDISC_DO and IPV6_DONTFRAG, so the kernel does
not fragment locally either), and a packet too big for the route is refused at send (EMSGSIZE): "not
carried", as `ping` reported it. A device binds the socket to it (SO_BINDTODEVICE): the request
leaves and the reply is read only through that device. RTTs come from the kernel's receive
timestamp (SO_TIMESTAMPNS), so a busy event loop does not lengthen them.

The lab's `lab/icmp_watch.py` keeps its own few lines of ICMP: it runs as `python -I -S` (standard
library only, to start in ~20 ms), so it cannot import this module.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from tether.dataplane.netns import opened_in

# Linux values the socket module does not name
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO = 23, 2
SOL_RAW, ICMP_FILTER = 255, 1
ICMP6_FILTER = 1
SO_TIMESTAMPNS = 35

ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}
HEADERS = {4: 20 + 8, 6: 40 + 8}  # IP + ICMP header bytes: the payload is the packet size minus these
RECV_SIZE = 65535
T = TypeVar("T")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`: 0 over a packet whose checksum field is right."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(version: int, ident: int, seq: int, size: int) -> bytes:
    """An echo request whose IP packet is `size` bytes long (at least the headers). ICMPv6's checksum
    covers a pseudo-header with the addresses, so the kernel fills it in (always, on raw ICMPv6
    sockets); ICMPv4's is computed here."""
    payload = bytes(max(0, size - HEADERS[version]))
    head = struct.pack("!BBHHH", ECHO_REQUEST[version], 0, 0, ident, seq)
    if version == 6:
        return head + payload
    return struct.pack("!BBHHH", ECHO_REQUEST[4], 0, checksum(head + payload), ident, seq) + payload


def echo_reply(version: int, data: bytes) -> tuple[int, int] | None:
    """(identifier, sequence) of an echo reply as a raw socket reads it (IPv4: with its IP header;
    IPv6: the ICMPv6 message alone, its checksum checked by the kernel), None for anything else: other
    types, truncated packets, a bad ICMPv4 checksum."""
    if version == 4:
        if len(data) < 20 or data[0] >> 4 != 4:
            return None
        data = data[(data[0] & 0x0F) * 4:]
    if len(data) < 8 or data[0] != ECHO_REPLY[version] or data[1] != 0:
        return None
    if version == 4 and checksum(data) != 0:
        return None
    ident, seq = struct.unpack_from("!HH", data, 4)
    return ident, seq


def answered(version: int, data: bytes, source: str, ident: int, waiting: Mapping[int, str]) -> int | None:
    """The sequence number of the echo waiting on this socket that `data` (from `source`) answers:
    an echo reply with the socket's identifier, a sequence in `waiting` (sequence -> the address
    probed) and from that address; None for another process's echo, a late or a stray reply."""
    got = echo_reply(version, data)
    if got is None or got[0] != ident or waiting.get(got[1]) != source:
        return None
    return got[1]


def reply_filter(version: int) -> tuple[int, int, bytes]:
    """The setsockopt (level, option, value) that lets only echo replies reach a raw socket: a set
    bit blocks an ICMP type (ICMP_FILTER: types 0-31 in one word; ICMP6_FILTER: 256 bits)."""
    if version == 4:
        return SOL_RAW, ICMP_FILTER, struct.pack("=I", 0xFFFFFFFF & ~(1 << ECHO_REPLY[4]))
    words = [0xFFFFFFFF] * 8
    words[ECHO_REPLY[6] >> 5] &= ~(1 << (ECHO_REPLY[6] & 31))
    return socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *words)


def kernel_time(ancdata: list[tuple[int, int, bytes]]) -> float | None:
    """The receive time (CLOCK_REALTIME seconds) the kernel stamped on a packet (SO_TIMESTAMPNS)."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack_from("@qq", data)
            return sec + nsec / 1e9
    return None


@dataclass
class _Echo:
    future: asyncio.Future[float | None]
    source: str
    sent: float = 0.0


@dataclass
class _Socket:
    """One raw socket (a family, maybe a device), its identifier and the echoes waiting on it."""
    sock: socket.socket
    version: int
    ident: int
    ifindex: int | None
    pending: dict[int, _Echo] = field(default_factory=dict)
    seq: int = 0

    @property
    def waiting(self) -> dict[int, str]:
        return {seq: echo.source for seq, echo in self.pending.items()}

    def next_seq(self) -> int:
        for _ in range(0x10000):
            self.seq = (self.seq + 1) & 0xFFFF
            if self.seq not in self.pending:
                return self.seq
        raise RuntimeError("65,536 echo requests in flight on one socket: each must be answered or time out first")


class Pinger:
    """Echo requests over raw sockets opened on first use, one per (family, device), read by the
    running asyncio loop. `netns`: open them in that namespace (tests, benches); None: this one."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sockets: dict[tuple[int, str | None], _Socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf = bytearray(RECV_SIZE)
        self._ancsize = socket.CMSG_SPACE(16)

    async def ping(self, ip: str, size: int, dev: str | None = None, timeout: float = 1.0) -> float | None:
        """Round trip in ms of one Don't-Fragment echo of `size` bytes of IP packet (through `dev`
        when given), None if lost within `timeout`, refused as too big, or `dev` is missing.
        Raises OSError when no raw socket can be opened (the agent needs CAP_NET_RAW)."""
        version = 6 if ":" in ip else 4
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        try:
            source = socket.inet_ntop(family, socket.inet_pton(family, ip))
        except OSError:
            return None
        s = self._socket(version, dev)
        if s is None:
            return None
        seq = s.next_seq()
        echo = _Echo(asyncio.get_running_loop().create_future(), source)
        s.pending[seq] = echo
        try:
            echo.sent = time.time()
            try:
                s.sock.sendto(echo_request(version, s.ident, seq, size), (source, 0))
            except OSError:  # EMSGSIZE (larger than the path with DF), unreachable, no buffer: not carried
                return None
            async with asyncio.timeout(timeout):
                return await echo.future
        except TimeoutError:
            return None
        finally:
            s.pending.pop(seq, None)

    def close(self) -> None:
        for key in list(self._sockets):
            self._drop(key)

    def _in_ns(self, make: Callable[[], T]) -> T:
        return make() if self.netns is None else opened_in(self.netns, make)

    def _socket(self, version: int, dev: str | None) -> _Socket | None:
        """The socket for (family, device); None when the device does not exist. A device deleted
        and made again (a new index) gets a new socket: a bound socket keeps the old index."""
        key = (version, dev)
        ifindex = None
        if dev is not None:
            try:
                ifindex = self._in_ns(lambda: socket.if_nametoindex(dev))
            except OSError:
                self._drop(key)
                return None
        s = self._sockets.get(key)
        if s is not None and s.ifindex == ifindex:
            return s
        self._drop(key)
        try:
            s = self._open(version, dev, ifindex)
        except OSError as e:
            if e.errno == errno.ENODEV:  # gone between the lookup and the bind
                return None
            raise OSError(e.errno, f"cannot open a raw ICMP socket for path health ({e.strerror}): the "
                                   "agent needs root (CAP_NET_RAW)") from e
        self._sockets[key] = s
        return s

    def _open(self, version: int, dev: str | None, ifindex: int | None) -> _Socket:
        family, proto = ((socket.AF_INET6, socket.IPPROTO_ICMPV6) if version == 6
                         else (socket.AF_INET, socket.IPPROTO_ICMP))
        sock = self._in_ns(lambda: socket.socket(family, socket.SOCK_RAW, proto))
        try:
            sock.setblocking(False)
            if version == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DONTFRAG, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            sock.setsockopt(*reply_filter(version))
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            if dev is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
            loop = asyncio.get_running_loop()
            if self._loop is not None and self._loop is not loop:
                raise RuntimeError("a Pinger serves one event loop: make one per loop")
            self._loop = loop
            taken = {other.ident for other in self._sockets.values()}  # distinct: each socket sees the others' replies
            ident = next(i for i in iter(lambda: random.randrange(1, 0x10000), None) if i not in taken)
            s = _Socket(sock, version, ident, ifindex)
            loop.add_reader(sock.fileno(), self._readable, s)
        except BaseException:
            sock.close()
            raise
        return s

    def _drop(self, key: tuple[int, str | None]) -> None:
        s = self._sockets.pop(key, None)
        if s is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(s.sock.fileno())
        s.sock.close()
        for echo in s.pending.values():  # its socket is gone: lost, as far as anyone can tell
            if not echo.future.done():
                echo.future.set_result(None)

    def _readable(self, s: _Socket) -> None:
        """Every packet waiting on the socket: those answering one of our echoes complete it."""
        while True:
            try:
                n, ancdata, _flags, addr = s.sock.recvmsg_into([self._buf], self._ancsize)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error queued for the socket: the waiting echo times out
                continue
            seq = answered(s.version, bytes(memoryview(self._buf)[:n]), addr[0], s.ident, s.waiting)
            echo = s.pending.get(seq) if seq is not None else None
            if echo is None or echo.future.done():
                continue
            at = kernel_time(ancdata) or time.time()
            echo.future.set_result(round(max(0.0, at - echo.sent) * 1000, 3))
