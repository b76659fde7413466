"""The agent's DNS server: cluster names from the local replica, everything else forwarded upstream
with a cache. It keeps answering while the server (or any other host) is down, because the replica
is local and loaded from disk at start.

Where it listens: one well-known link-local address (default 169.254.20.10, like NodeLocal DNS) on
a dummy device in the host's namespace. Pods reach it through their default route (the link-local
gateway), with no NAT in the path, so the conntrack race that drops one of two parallel A/AAAA
queries from one socket under DNAT cannot happen.

Why a worker process for UDP: a blocking recvfrom/sendto loop answers cluster names several times
faster than an asyncio protocol, and it runs in its own small process (`python -m tether.agent.dns`,
sharing the bound socket) rather than in a thread of the agent, because a thread shares the agent's
GIL: whenever the agent computes (a reconcile pass, a plan, a heartbeat) an I/O thread that gives
the GIL up on every recvfrom/sendto gets it back only after the switch interval (5 ms), so it
answers about one query per 5 ms for as long as the agent computes (the "convoy effect"; measured:
2-3 ms stalls at every 5 s heartbeat, 60-150 ms stalls at every 30 s reconcile pass).

The worker holds its own copy of the records. The agent sends it, over a unix stream pair, all of
them (a pickled `Records`) when it starts and after each change only what changed (a pickled
`dns_records.Delta`: the owners whose records changed, the names that came or went), numbered by
generation; the worker patches its copy with a delta made from the generation it has, and for any
other (a change it never got) asks the agent for all the records again (a "gap" frame), so a lost
message can never leave stale names. Pickling all the records after each change was ~15 ms of the
agent's CPU per change at 10,000 endpoints, and the DNS work per change ~37 ms in all, now ~1.3 ms
(bench/calc_scale.py). Misses go
back over a unix datagram pair to the agent's event loop, which forwards them (dnspython) and
replies on the shared socket; when the agent is too busy to take them they are dropped (the client
retries), never queued in front of cluster answers. The worker exits when the records pair closes
(the agent stopped or died); the agent starts a new worker when one dies. TCP (rare: clients retrying
an answer truncated over UDP, which is one larger than 512 bytes or the query's EDNS size) is served
by the event loop, with the same answers as UDP, bare Docker names included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from tether.calc import dns_records
from tether.calc.dns_records import Records

if TYPE_CHECKING:
    from tether.agent.extras import AgentHandle

log = logging.getLogger("tether.agent.dns")

DNS_IP = "169.254.20.10"
DNS_DEVICE = "tether-dns"
MAX_CACHE = 10000
MAX_CACHE_TTL = 3600
UPSTREAM_TIMEOUT = 2.0
WORKER_RESTART_DELAY = 1.0
FRAME = struct.Struct("!Ic")  # agent -> worker stream: payload length, kind; then the payload
RECORDS = b"R"  # a pickled Records: all of them, replacing the worker's
DELTA = b"D"  # a pickled dns_records.Delta: what changed since the generation it names
GAP = b"G"  # worker -> agent: a delta did not follow the generation it has (payload: GENERATION); send all
GENERATION = struct.Struct("!q")
FULL_CHECK_S = 600.0  # how often the records kept change by change are checked against a cold build
MISS = struct.Struct("!4sH")  # worker -> agent datagram: the client's address and port, then the query


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
    """UDP (in a worker process) and TCP (on the event loop) on `ip:port` in the agent's namespace."""

    def __init__(self, ip: str, port: int, upstreams: list[str], records: Records | None = None) -> None:
        self.ip, self.port = ip, port
        self.upstreams = upstreams
        self.records = records or Records()
        self.cache = ForwardCache()
        self.tcp_queries = 0
        self.forwarded = 0
        self.worker_starts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: socket.socket | None = None
        self._worker: subprocess.Popen | None = None
        self._to_worker: asyncio.StreamWriter | None = None
        self._from_worker: asyncio.StreamReader | None = None
        self._misses: socket.socket | None = None
        self._worker_task: asyncio.Task | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._closing = False
        self._inflight: dict[tuple[str, int, int], asyncio.Future] = {}
        self._revision = -1
        self._builder = dns_records.RecordBuilder()  # the records kept change by change, on the apply thread
        self._checked_at = time.monotonic()  # when they were last compared with a cold build
        self._journal_at: tuple | None = None  # where the last update read the replica's journal (calc.planner)
        self.docker_search: dict[str, tuple[str, ...]] = {}  # container address -> search path (dns_records)
        self.full_sends = 0  # all the records sent to the worker (start, restart, gap, networks changed)
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
        await self._spawn_worker()
        self._worker_task = asyncio.ensure_future(self._worker_loop())
        self._tcp = await asyncio.start_server(self._serve_tcp, self.ip, self.port, reuse_address=True)
        log.warning("DNS on %s:%d (udp+tcp), upstream %s", self.ip, self.port, ", ".join(self.upstreams) or "none")

    async def close(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.close()
        if self._worker_task is not None:
            self._worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker_task
        await self._stop_worker()
        if self._udp is not None:
            self._udp.close()

    def update(self, replica: Any) -> None:
        """Rebuild the cluster records when the replica changed."""
        install = self.prepare(replica)
        if install is not None:
            install()

    def prepare(self, view: Any) -> Callable[[], None] | None:
        """What changed in the records for a copy of the replica, worked out and encoded for the
        worker on the agent's apply thread; what it returns patches our records and sends the worker
        the delta, on the event loop. None when the replica has not changed since the last records.

        Every FULL_CHECK_S the records kept change by change are compared with a cold build, the
        oracle (O(endpoints), ~0.1 s at 10,000): a difference is a defect, logged, and the cold
        build replaces them everywhere."""
        if view.revision == self._revision:
            return None
        from tether.calc.planner import changes_since  # not at the top: the DNS worker needs no models

        revision = view.revision
        endpoints, services = _objects(view, "Endpoint"), _objects(view, "Service")
        changed, here = changes_since(view, None, self._journal_at)  # what changed, as the planner reads it
        self._journal_at = None  # if the update raises, the next one passes over every object
        delta = self._builder.update(endpoints, services, view.networks.values(), serial=revision, changed=changed)
        self._journal_at = here
        if delta.base is not None and time.monotonic() - self._checked_at > FULL_CHECK_S:
            self._checked_at = time.monotonic()
            cold = dns_records.RecordBuilder(self._builder.ttl, self._builder.skipped)
            full = cold.update(endpoints, services, view.networks.values(), serial=revision)
            kept, cold_records = self._builder.records(), full.records()
            if (kept.rrs, kept.existing) != (cold_records.rrs, cold_records.existing) or \
                    self._builder.search() != full.search:
                log.warning("DNS: the records kept change by change differ from a cold build (a defect, please "
                            "report it); serving the cold build")
                self._builder, delta = cold, full
        if delta.base == delta.generation:  # nothing DNS shows changed: the worker keeps its answer memo
            return functools.partial(setattr, self, "_revision", revision)
        records = delta.records() if delta.base is None else None
        payload = (_frame(RECORDS, records) if records is not None  # O(records): the networks changed, or the first
                   else _frame(DELTA, dataclasses.replace(delta, search={})))

        def install() -> None:  # installs run in the order of their applies (the apply lock)
            self._revision = revision
            if records is not None:  # a full set
                self.records = records
                self.docker_search = dict(delta.search)  # type: ignore[arg-type]
                if self._to_worker is not None:
                    self.full_sends += 1
                self._send(payload)
            elif self.records.apply(delta):
                for ip, path in delta.search.items():
                    if path is None:
                        self.docker_search.pop(ip, None)
                    else:
                        self.docker_search[ip] = path
                self._send(payload)
            else:  # an install before this one did not run: our records are not the delta's base
                log.warning("DNS: the records missed a change (generation %d, the change is from %s); "
                            "rebuilding them", self.records.generation, delta.base)
                self.records = self._builder.records()
                self.docker_search = self._builder.search()
                self._send_records()
        return install

    # --- UDP: the fast path in a worker process ---------------------------------------------------

    async def _spawn_worker(self) -> None:
        assert self._udp is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        misses, misses_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        misses.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        fds = (self._udp.fileno(), theirs.fileno(), misses_theirs.fileno())
        try:
            self._worker = subprocess.Popen([sys.executable, "-m", "tether.agent.dns", "--udp-worker", *map(str, fds)],
                                            pass_fds=fds, stdin=subprocess.DEVNULL)
        except OSError:
            ours.close()
            misses.close()
            raise
        finally:  # the worker holds the only copies: it sees EOF when the agent goes away
            theirs.close()
            misses_theirs.close()
        self.worker_starts += 1
        self._from_worker, self._to_worker = await asyncio.open_unix_connection(sock=ours)
        misses.setblocking(False)
        self._misses = misses
        assert self._loop is not None
        self._loop.add_reader(misses.fileno(), self._take_misses)
        self._send_records()

    async def _stop_worker(self) -> None:
        if self._misses is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._misses.fileno())
            self._misses.close()
            self._misses = None
        if self._to_worker is not None:
            self._to_worker.close()  # the worker exits on EOF
            self._to_worker = None
        p, self._worker = self._worker, None
        if p is not None:
            try:
                await asyncio.to_thread(p.wait, 2)
            except subprocess.TimeoutExpired:
                p.kill()
                await asyncio.to_thread(p.wait)

    def _send_records(self) -> None:
        """All the records to the worker (O(records)): at its start, after a gap, when the networks changed."""
        if self._to_worker is None or self._to_worker.is_closing():
            return
        self.full_sends += 1
        self._send(_frame(RECORDS, dataclasses.replace(self.records, memo={})))

    def _send(self, frame: bytes) -> None:
        if self._to_worker is not None and not self._to_worker.is_closing():
            self._to_worker.write(frame)

    def _take_misses(self) -> None:
        assert self._misses is not None
        for _ in range(256):  # then let the loop run other work
            try:
                msg = self._misses.recv(8192)
            except OSError:  # BlockingIOError: nothing more waiting
                return
            if len(msg) < MISS.size:
                continue
            ip, port = MISS.unpack_from(msg)
            self._forward_udp(msg[MISS.size:], (socket.inet_ntoa(ip), port))

    async def _worker_loop(self) -> None:
        """Send all the records when the worker reports a gap; start a new worker when one dies
        (EOF on the records pair is its end)."""
        while True:
            assert self._from_worker is not None
            buf = bytearray()
            with contextlib.suppress(ConnectionError):
                while chunk := await self._from_worker.read(4096):
                    buf += chunk
                    for kind, payload in _frames(buf):
                        if kind == GAP:
                            has = GENERATION.unpack(payload)[0] if len(payload) == GENERATION.size else None
                            log.warning("the DNS worker missed a change of its records (it has generation %s, "
                                        "ours is %d): sending it all of them", has, self.records.generation)
                            self._send_records()
            if self._closing:
                return
            code = self._worker.poll() if self._worker is not None else None
            log.error("the DNS worker stopped (exit status %s); starting another", code)
            await self._stop_worker()
            await asyncio.sleep(WORKER_RESTART_DELAY)
            try:
                await self._spawn_worker()
            except OSError as e:
                log.error("cannot start the DNS worker: %s", e)

    def _forward_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        async def run() -> None:
            out = await self.answer_miss(data, addr[0])
            if out is not None and self._udp is not None:
                if len(out) > 512:
                    out = fit_udp(out, data)
                with contextlib.suppress(OSError):
                    self._udp.sendto(out, addr)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    # --- TCP --------------------------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Queries over TCP answer as over UDP, bare Docker names included (Docker's embedded resolver
        forwards a container's TCP query over TCP, from the container's address), never truncated."""
        peer = writer.get_extra_info("peername")
        client = peer[0] if peer else ""
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), 10)
                data = await reader.readexactly(struct.unpack("!H", head)[0])
                self.tcp_queries += 1
                out = dns_records.respond(self.records, data)
                if out is None:
                    out = await self.answer_miss(data, client)
                if out is None:
                    return
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    # --- forwarding -------------------------------------------------------------------------------

    async def answer_miss(self, data: bytes, client: str) -> bytes | None:
        """What the records alone did not answer: a bare name through the asking container's search
        path (Docker containers, by their address), else the upstream resolvers."""
        out = dns_records.answer_bare(self.records, data, self.docker_search.get(client))
        if out is None:
            out = await self.resolve(data)
        return out

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


def _frame(kind: bytes, obj: Any) -> bytes:
    """One frame of the agent -> worker stream: a pickled Records (without its answer memo, which
    the worker builds itself) or Delta."""
    payload = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(payload), kind) + payload


def _objects(view: Any, kind: str) -> Any:
    """The replica's objects of a kind by key (the builder finds what changed by key), or the
    plain list of a replica-like object."""
    objects = getattr(view, "objects", None)
    if objects is not None:
        return objects[kind]
    return view.endpoints if kind == "Endpoint" else view.services


def udp_limit(query: bytes) -> int:
    """The largest UDP answer the asker takes: 512 bytes (RFC 1035), or the payload size its EDNS OPT
    record advertises (RFC 6891, never below 512)."""
    if len(query) < 12 or struct.unpack_from("!H", query, 10)[0] == 0:
        return 512
    try:
        msg = dns.message.from_wire(query)
    except dns.exception.DNSException:
        return 512
    return max(512, msg.payload) if msg.edns >= 0 else 512


def fit_udp(out: bytes, query: bytes) -> bytes:
    """`out` when it fits the asker's UDP limit, else header and question only with TC set, so the
    client (glibc, musl, Docker's embedded resolver) asks again over TCP and gets it all."""
    if len(out) <= udp_limit(query):
        return out
    msg = dns.message.from_wire(out)
    msg.flags |= dns.flags.TC
    msg.answer, msg.authority, msg.additional = [], [], []
    return msg.to_wire()


def _frames(buf: bytearray) -> list[tuple[bytes, bytes]]:
    """Take the complete frames off the front of `buf`."""
    out, i = [], 0
    while len(buf) - i >= FRAME.size:
        size, kind = FRAME.unpack_from(buf, i)
        if len(buf) - i - FRAME.size < size:
            break
        out.append((kind, bytes(buf[i + FRAME.size:i + FRAME.size + size])))
        i += FRAME.size + size
    del buf[:i]
    return out


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def udp_worker(udp_fd: int, pair_fd: int, misses_fd: int) -> None:
    """The worker process: answer cluster names on the agent's UDP socket, hand misses back.

    One thread reads the pair (EOF: the agent is gone, exit at once): all the records, or a delta
    that patches them in place (`Records.apply`, safe while the main thread answers from them); a
    delta that does not follow the generation we have, or that cannot be read, is reported to the
    agent (GAP) and deltas are ignored until all the records come again. When several frames are
    waiting, those before the last full set are skipped (a burst costs one load). The main thread is
    the recvfrom/respond/sendto loop, alone with its GIL. Garbage collection: the loop allocates no
    cycles, and the records are frozen out of the collector's view after each load or patch, so a
    collection never walks them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C goes to the agent, which closes us
    udp = socket.socket(fileno=udp_fd)
    pair = socket.socket(fileno=pair_fd)
    misses = socket.socket(fileno=misses_fd)
    loaded = threading.Event()
    holder: list[Records] = [Records()]

    def control() -> None:
        buf = bytearray()
        pending: list[tuple[bytes, bytes]] = []
        waiting = False  # for all the records, after a gap

        def gap() -> None:
            nonlocal waiting
            waiting = True
            with contextlib.suppress(OSError):
                pair.sendall(FRAME.pack(GENERATION.size, GAP) + GENERATION.pack(holder[0].generation))

        while True:
            chunk = pair.recv(1 << 20)
            if not chunk:
                os._exit(0)
            buf += chunk
            pending += _frames(buf)
            if not pending or _readable(pair):  # more on its way: take it all in one go
                continue
            frames, pending = pending, []
            fulls = [i for i, (kind, _payload) in enumerate(frames) if kind == RECORDS]
            full = False
            for kind, payload in frames[fulls[-1]:] if fulls else frames:
                try:
                    if kind == RECORDS:
                        holder[0], waiting, full = pickle.loads(payload), False, True
                        loaded.set()
                    elif kind == DELTA and not waiting and not holder[0].apply(pickle.loads(payload)):
                        log.warning("DNS worker: a change of the records does not follow generation %d; "
                                    "asking for all of them", holder[0].generation)
                        gap()
                except Exception:  # noqa: BLE001 - keep the records we have, ask for all of them
                    log.exception("loading new DNS records failed")
                    gap()
            if full:
                gc.collect()
            gc.freeze()

    threading.Thread(target=control, name="dns-control", daemon=True).start()
    loaded.wait()  # the agent sends its records first: never answer NXDOMAIN from an empty table
    recv, send, respond, miss = udp.recvfrom, udp.sendto, dns_records.respond, misses.send
    pack, aton, dontwait = MISS.pack, socket.inet_aton, socket.MSG_DONTWAIT
    dropped = 0
    while True:
        try:
            data, addr = recv(4096)
        except OSError:
            return
        try:
            out = respond(holder[0], data)
        except Exception:  # noqa: BLE001 - a malformed packet must not stop the server
            log.exception("answering a query failed")
            continue
        if out is not None:
            if len(out) > 512:  # rare (many addresses): truncated to what the asker takes
                with contextlib.suppress(Exception):
                    out = fit_udp(out, data)
            with contextlib.suppress(OSError):
                send(out, addr)
            continue
        try:
            miss(pack(aton(addr[0]), addr[1]) + data, dontwait)
        except BlockingIOError:  # the agent is behind: drop, the client retries
            dropped += 1
            if dropped & (dropped - 1) == 0:
                log.warning("DNS worker: %d queries to forward dropped (the agent is busy)", dropped)
        except OSError:
            os._exit(0)


async def start(agent: AgentHandle) -> list[DnsServer]:
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


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--udp-worker":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    udp_worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
