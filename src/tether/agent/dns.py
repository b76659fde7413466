"""The agent's DNS server: cluster names from the local replica, everything else forwarded upstream
with a cache. It keeps answering while the server (or any other host) is down, because the replica
is local and loaded from disk at start.

Where it listens: one well-known link-local address (default 169.254.20.10, like NodeLocal DNS) on
a dummy device in the host's namespace. Pods reach it through their default route (the link-local
gateway), with no NAT in the path, so the conntrack race that drops one of two parallel A/AAAA
queries from one socket under DNAT cannot happen.

Why a thread for UDP: a blocking recvfrom/sendto loop answers cluster names several times faster
than an asyncio protocol; misses are handed to the event loop, which forwards them (dnspython).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from tether.agent import dns_records
from tether.agent.dns_records import Records

log = logging.getLogger("tether.agent.dns")

DNS_IP = "169.254.20.10"
DNS_DEVICE = "tether-dns"
MAX_CACHE = 10000
MAX_CACHE_TTL = 3600
UPSTREAM_TIMEOUT = 2.0


def upstreams_from_resolv_conf(path: str = "/etc/resolv.conf") -> list[str]:
    """The host's resolvers (never our own address, which would loop)."""
    out: list[str] = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and parts[1] != DNS_IP:
                out.append(parts[1])
    return out


@dataclass
class Cached:
    message: dns.message.Message
    stored: float
    expires: float


class ForwardCache:
    """Upstream answers by (name, type, class), served with their TTLs counted down."""

    def __init__(self, limit: int = MAX_CACHE) -> None:
        self.entries: dict[tuple[str, int, int], Cached] = {}
        self.limit = limit
        self.hits = 0
        self.misses = 0

    @staticmethod
    def ttl_of(msg: dns.message.Message) -> int:
        if msg.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return 0
        if msg.answer:
            return min(rrset.ttl for rrset in msg.answer)
        soa = [r for r in msg.authority if r.rdtype == dns.rdatatype.SOA]
        if soa:  # negative caching (RFC 2308)
            return min(soa[0].ttl, soa[0][0].minimum)
        return 0

    def put(self, key: tuple[str, int, int], msg: dns.message.Message, now: float) -> None:
        ttl = min(self.ttl_of(msg), MAX_CACHE_TTL)
        if ttl <= 0:
            return
        if len(self.entries) >= self.limit:
            for k in [k for k, v in self.entries.items() if v.expires <= now] or list(self.entries)[:self.limit // 10]:
                self.entries.pop(k, None)
        self.entries[key] = Cached(msg, now, now + ttl)

    def get(self, key: tuple[str, int, int], query_id: int, now: float) -> bytes | None:
        c = self.entries.get(key)
        if c is None or c.expires <= now:
            self.misses += 1
            return None
        self.hits += 1
        age = int(now - c.stored)
        msg = dns.message.from_wire(c.message.to_wire())
        for section in (msg.answer, msg.authority, msg.additional):
            for rrset in section:
                rrset.ttl = max(0, rrset.ttl - age)
        msg.id = query_id
        return msg.to_wire()


class DnsServer:
    """UDP and TCP on `ip:port` in the agent's network namespace."""

    def __init__(self, ip: str, port: int, upstreams: list[str], records: Records | None = None) -> None:
        self.ip, self.port = ip, port
        self.upstreams = upstreams
        self.records = records or Records()
        self.cache = ForwardCache()
        self.queries = 0
        self.forwarded = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._stop = threading.Event()
        self._inflight: dict[tuple[str, int, int], asyncio.Future] = {}
        self._revision = -1
        self._tasks: set[asyncio.Future] = set()

    # --- lifetime ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        udp.bind((self.ip, self.port))
        self._udp = udp
        self.port = udp.getsockname()[1]
        self._thread = threading.Thread(target=self._serve_udp, name="dns-udp", daemon=True)
        self._thread.start()
        self._tcp = await asyncio.start_server(self._serve_tcp, self.ip, self.port, reuse_address=True)
        log.warning("DNS on %s:%d (udp+tcp), upstream %s", self.ip, self.port, ", ".join(self.upstreams) or "none")

    async def close(self) -> None:
        self._stop.set()
        if self._tcp is not None:
            self._tcp.close()
        if self._thread is not None:  # wake the blocking recvfrom with one datagram
            with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"", (self.ip, self.port))
            await asyncio.to_thread(self._thread.join, 2)
        if self._udp is not None:
            self._udp.close()

    def update(self, replica: Any) -> None:
        """Rebuild the cluster records when the replica changed (called after each applied plan)."""
        if replica.revision == self._revision:
            return
        self._revision = replica.revision
        self.records = dns_records.build(replica.endpoints, replica.services, replica.networks.values(),
                                         serial=replica.revision)

    # --- UDP: the fast path in a thread -----------------------------------------------------------

    def _serve_udp(self) -> None:
        sock = self._udp
        assert sock is not None and self._loop is not None
        recv, send, respond = sock.recvfrom, sock.sendto, dns_records.respond
        loop = self._loop
        while True:
            try:
                data, addr = recv(4096)
            except OSError:
                return
            if self._stop.is_set():
                return
            self.queries += 1
            try:
                out = respond(self.records, data)
            except Exception:  # noqa: BLE001 - a malformed packet must not stop the server
                log.exception("answering a query failed")
                continue
            if out is not None:
                with contextlib.suppress(OSError):
                    send(out, addr)
                continue
            loop.call_soon_threadsafe(self._forward_udp, data, addr)

    def _forward_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        async def run() -> None:
            out = await self.resolve(data)
            if out is not None and self._udp is not None:
                if len(out) > 512 and not _has_edns(data):
                    out = _truncated(out)
                with contextlib.suppress(OSError):
                    self._udp.sendto(out, addr)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    # --- TCP --------------------------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), 10)
                data = await reader.readexactly(struct.unpack("!H", head)[0])
                self.queries += 1
                out = dns_records.respond(self.records, data)
                if out is None:
                    out = await self.resolve(data)
                if out is None:
                    return
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    # --- forwarding -------------------------------------------------------------------------------

    async def resolve(self, data: bytes) -> bytes | None:
        """Answer a non-cluster query from the cache or the upstream resolvers (SERVFAIL if none answer)."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return dns_records.error(data, dns_records.FORMERR)
        if not query.question:
            return dns_records.error(data, dns_records.FORMERR)
        q = query.question[0]
        key = (q.name.to_text().lower(), q.rdtype, q.rdclass)
        now = time.monotonic()
        hit = self.cache.get(key, query.id, now)
        if hit is not None:
            return hit
        fut = self._inflight.get(key)
        if fut is None:  # one upstream query for many identical client queries
            fut = asyncio.get_running_loop().create_future()
            self._inflight[key] = fut
            try:
                msg = await self._ask_upstreams(query)
                if msg is not None:
                    self.cache.put(key, msg, time.monotonic())
                fut.set_result(msg)
            except Exception as e:  # noqa: BLE001 - reported as SERVFAIL
                fut.set_result(None)
                log.warning("forwarding %s failed: %s", key[0], e)
            finally:
                self._inflight.pop(key, None)
        msg = await asyncio.shield(fut)
        if msg is None:
            fail = dns.message.make_response(query)
            fail.set_rcode(dns.rcode.SERVFAIL)
            return fail.to_wire()
        msg = dns.message.from_wire(msg.to_wire())
        msg.id = query.id
        return msg.to_wire()

    async def _ask_upstreams(self, query: dns.message.Message) -> dns.message.Message | None:
        self.forwarded += 1
        for upstream in self.upstreams:
            try:
                msg = await dns.asyncquery.udp(query, upstream, timeout=UPSTREAM_TIMEOUT)
                if msg.flags & dns.flags.TC:
                    msg = await dns.asyncquery.tcp(query, upstream, timeout=UPSTREAM_TIMEOUT)
                return msg
            except (dns.exception.DNSException, OSError) as e:
                log.warning("upstream %s did not answer: %s", upstream, e)
        return None


def _has_edns(data: bytes) -> bool:
    return len(data) >= 12 and struct.unpack_from("!H", data, 10)[0] > 0


def _truncated(out: bytes) -> bytes:
    """Header and question only, with TC set, so the client retries over TCP."""
    msg = dns.message.from_wire(out)
    msg.flags |= dns.flags.TC
    msg.answer, msg.authority, msg.additional = [], [], []
    return msg.to_wire()


async def start(agent: Any) -> list[DnsServer]:
    """Agent extra: bring up the address, start serving, and tell pods (CNI `dns`) where we are."""
    cfg = agent.cfg
    ip = getattr(cfg, "dns_ip", None) or os.environ.get("TETHER_DNS_IP", DNS_IP)
    if ip in ("off", "none"):
        return []
    port = int(getattr(cfg, "dns_port", 0) or 53)
    upstreams = list(getattr(cfg, "upstream_dns", None) or []) or upstreams_from_resolv_conf()
    from tether.dataplane.dns_address import ensure_address

    await asyncio.to_thread(ensure_address, ip)
    server = DnsServer(ip, port, upstreams)
    server.update(agent.replica)  # answer from the replica loaded from disk, even before the first sync
    await server.start()
    agent.dns_ip = ip
    return [server]
