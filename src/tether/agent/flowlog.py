"""The agent's flow log: denied packets read from NFLOG, and per-policy drop counters.

Every drop rule of the policy fragment logs to NFLOG group `LOG_GROUP` with a prefix naming who
denied (`deny in np x/p1`, `spoofed source MAC`...). This service binds that group with a plain
netlink socket (no library speaks NFLOG), keeps the last records in memory, and answers on a unix
socket next to the CNI socket (`flows.sock`):
- a JSON line `{"cmd": "flows", "limit": N, "denied": true}` -> the recent records as JSON;
- `GET /metrics` (HTTP, e.g. `curl --unix-socket flows.sock http://agent/metrics`) -> Prometheus text
  with `tether_policy_dropped_packets_total{policy=...}` summed from the nft drop counters.
Without it (another listener on the group, no permission) the datapath still drops and counts.

With `--flows on` (the default) it also follows conntrack's NEW/DESTROY events of this host's pods
(read from ctnetlink, `tether.agent.ctevents`: allowed connections, the service backend they were
sent to, packets and bytes both ways; one `closed` record for a connection that opened and closed
between two pushes) and pushes these and the denied packets to the server once a second, which
names them for `tether flows` (`tether.flows` has the design). With `--metrics-listen HOST:PORT` the metrics
are also served over TCP. Counters never go backwards: nft resets a rule's counter when its chain
is rebuilt (another policy applied to the same pods), so the totals add up what each rule had
counted before it was replaced (`Monotonic`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import socket
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from tether.agent import ctevents, unix_socket
from tether.calc.names import LOG_GROUP
from tether.calc.policy import drop_owners
from tether.flows import GROUPED, is_noise, pack

if TYPE_CHECKING:
    from tether.agent.extras import AgentHandle

log = logging.getLogger("tether.agent.flowlog")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NLM_F_REQUEST = 1
NLM_F_ACK = 4
PUSH_INTERVAL = 1.0  # seconds between two pushes of flow records to the server
PUSH_BACKLOG = 20_000  # records kept for the server while it is unreachable
PUSH_MAX = 5000  # records per push (the server takes up to 10,000 grouped, `tether.flows.pack`) ...
PUSH_ALONE = 1000  # ... of which up to 1000 that cannot be grouped (denied packets)
CT_BATCH = 0.05  # seconds from conntrack's first waiting event to their read (see _ct_readable)
CT_DRAIN_MAX = 20_000  # events read before the event loop runs again
COUNTERS = ("packets", "bytes", "reply_packets", "reply_bytes")  # what a DESTROY adds to its NEW
_U32 = struct.Struct("=I")
SAMPLE_INTERVAL = 5.0  # seconds between reads of the drop counters once metrics are scraped
PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("HH", length, kind) + data + b"\0" * ((4 - length % 4) % 4)


def _config(group: int, *attrs: bytes, seq: int = 1) -> bytes:
    body = struct.pack("BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + b"".join(attrs)
    return struct.pack("IHHII", 16 + len(body), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                       NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def open_nflog(group: int = LOG_GROUP) -> socket.socket:
    """A non-blocking netlink socket bound to NFLOG `group`, copying the first 128 bytes of each packet."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.bind((0, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    for seq, msg in enumerate((
            _config(group, _attr(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND))),
            _config(group, _attr(NFULA_CFG_MODE, struct.pack(">IBB", 128, NFULNL_COPY_PACKET, 0)))), 1):
        s.send(msg[:8] + struct.pack("I", seq) + msg[12:])
        reply = s.recv(65536)
        _, mtype = struct.unpack_from("IH", reply)
        if mtype == 2:  # NLMSG_ERROR
            (err,) = struct.unpack_from("i", reply, 16)
            if err:
                s.close()
                raise OSError(-err, f"NFLOG group {group}: {os.strerror(-err)}")
    s.setblocking(False)
    return s


def parse_packet(data: bytes) -> dict[str, Any] | None:
    """One NFULNL_MSG_PACKET netlink message -> a flow record."""
    _length, mtype = struct.unpack_from("IH", data)
    if mtype != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
        return None
    off = 16 + 4
    attrs: dict[int, bytes] = {}
    while off + 4 <= len(data):
        alen, akind = struct.unpack_from("HH", data, off)
        if alen < 4:
            break
        attrs[akind & 0x7FFF] = data[off + 4: off + alen]
        off += (alen + 3) & ~3
    rec: dict[str, Any] = {"time": time.time(), "verdict": "deny"}
    rec["reason"] = attrs.get(NFULA_PREFIX, b"").rstrip(b"\0").decode(errors="replace").strip()
    for key, kind in (("interface", NFULA_IFINDEX_INDEV), ("out_interface", NFULA_IFINDEX_OUTDEV)):
        if kind in attrs:
            with contextlib.suppress(OSError):
                rec[key] = socket.if_indextoname(struct.unpack(">I", attrs[kind][:4])[0])
    pkt = attrs.get(NFULA_PAYLOAD, b"")
    if len(pkt) >= 20 and pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 0xF) * 4
        proto = pkt[9]
        rec.update(src=str(ipaddress.IPv4Address(pkt[12:16])), dst=str(ipaddress.IPv4Address(pkt[16:20])),
                   proto=PROTOS.get(proto, str(proto)))
        if proto in (6, 17, 132) and len(pkt) >= ihl + 4:
            rec["sport"], rec["dport"] = struct.unpack_from(">HH", pkt, ihl)
    elif len(pkt) >= 40 and pkt[0] >> 4 == 6:
        proto = pkt[6]
        rec.update(src=str(ipaddress.IPv6Address(pkt[8:24])), dst=str(ipaddress.IPv6Address(pkt[24:40])),
                   proto=PROTOS.get(proto, str(proto)))
        if proto in (6, 17, 132) and len(pkt) >= 44:
            rec["sport"], rec["dport"] = struct.unpack_from(">HH", pkt, 40)
    return rec


class Monotonic:
    """Totals that never go backwards over counters that reset: when a counter reads less than it
    did (its rule was replaced, so it restarted at 0), what it had counted is kept as a base; a
    counter that disappears keeps its last total. Between two reads a replaced rule's last few
    packets may be missed (the agent reads every SAMPLE_INTERVAL once metrics are scraped)."""

    def __init__(self, cap: int = 50_000) -> None:
        self.last: dict[str, int] = {}
        self.base: dict[str, int] = {}
        self.cap = cap

    def update(self, raw: dict[str, int]) -> dict[str, int]:
        for key, value in raw.items():
            before = self.last.get(key)
            if before is not None and value < before:
                self.base[key] = self.base.get(key, 0) + before
            self.last[key] = value
        for key in [k for k in self.last if k not in raw]:  # gone: its total stays as its base
            self.base[key] = self.base.get(key, 0) + self.last.pop(key)
        if len(self.base) > self.cap:  # bound the memory; the totals per owner are what is exported
            self.base = dict(list(self.base.items())[-self.cap:])
        return {k: self.base.get(k, 0) + self.last.get(k, 0) for k in {*self.base, *self.last}}


def drop_metrics(host: str, counts: dict[str, int]) -> str:
    """Prometheus text: packets dropped per policy / group / cause, from `nft.counters()` (through
    `Monotonic`, so a total never goes down)."""
    per: dict[str, int] = {}
    for key, packets in counts.items():
        for owner in drop_owners(key.split("/", 1)[1] if "/" in key else key):
            per[owner] = per.get(owner, 0) + packets
    lines = ["# HELP tether_policy_dropped_packets_total Packets dropped, by the policy, security group or check "
             "that denied them.", "# TYPE tether_policy_dropped_packets_total counter"]
    for owner, n in sorted(per.items()):
        lines.append(f'tether_policy_dropped_packets_total{{host="{host}",policy="{owner}"}} {n}')
    return "\n".join(lines) + "\n"


def peer_metrics(host: str, agent: Any) -> list[str]:
    """Path health per peer (`tether.agent.peers`): reachable, round trip, path MTU, problems, and
    the overlay. Each metric's samples as one group, as the text format wants."""
    health = next((e for e in getattr(agent, "_extras", []) if type(e).__name__ == "PeerHealth"), None)
    if health is None or not health.results:
        return []
    metrics = (("tether_peer_up", "1 when the peer answers on the underlay.",
                lambda r: 1 if r["underlay"]["ok"] else 0),
               ("tether_peer_rtt_milliseconds", "Round trip of a full-size ping to the peer.",
                lambda r: r["underlay"].get("rtt_ms")),
               ("tether_peer_path_mtu_bytes", "The largest packet the underlay path to the peer carries.",
                lambda r: r.get("path_mtu")),
               ("tether_peer_problems", "Problems found on the path (e.g. a network too large for it).",
                lambda r: len(r.get("problems", []))),
               ("tether_peer_overlay_up", "1 when the peer's VTEP answers through the VXLAN tunnel.",
                lambda r: (1 if r["overlay"]["ok"] else 0) if "overlay" in r else None))
    lines = []
    for name, text, value in metrics:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
        for peer, r in sorted(health.results.items()):
            v = value(r)
            if v is not None:
                lines.append(f'{name}{{host="{host}",peer="{peer}"}} {v}')
    return lines


class FlowLog:
    """Reads NFLOG into a ring buffer; serves it and the drop metrics on a unix socket."""

    def __init__(self, host: str, path: str, size: int = 2000, agent: Any = None) -> None:
        self.host = host
        self.path = path
        self.agent = agent
        self.records: deque[dict[str, Any]] = deque(maxlen=size)
        self.outbox: deque[dict[str, Any]] = deque(maxlen=PUSH_BACKLOG)  # not yet pushed to the server
        self.counts = {"allow": 0, "deny": 0, "pushed": 0, "lost": 0, "missed": 0}
        self.drops = Monotonic()
        self._local: set[str] = set()  # addresses of this host's endpoints (conntrack events kept)
        self._pending: dict[tuple, dict[str, Any]] = {}  # NEW records in the outbox, by connection
        self._tasks: list[asyncio.Task] = []
        self._ct_sock: socket.socket | None = None  # conntrack's events, while recording
        self._ct_handle: asyncio.Handle | None = None  # the coming read of the events
        self._ct_buf = bytearray(1 << 16)
        self._ct_warned = 0.0
        self.metrics_server: asyncio.AbstractServer | None = None
        self._scraped = False
        self._endpoints: Any = ()  # the replica's endpoints as of the last update (see `name`)
        self._names: dict[str, str] | None = {}
        self.sock: socket.socket | None = None
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.sock = open_nflog()
            loop.add_reader(self.sock.fileno(), self._readable)
        except OSError as e:
            log.warning("flow log disabled (%s); drops are still counted", e)
        # an explicit mode, not the umask's: records name pods and addresses (root and its group)
        self.server = await unix_socket.start_server(unix_socket.ConnectionCap(32).wrap(self._serve), self.path,
                                                     0o660)
        cfg = getattr(self.agent, "cfg", None)
        listen = getattr(cfg, "metrics_listen", None)
        if listen:
            host, _, port = listen.rpartition(":")
            try:
                self.metrics_server = await asyncio.start_server(
                    unix_socket.ConnectionCap(32).wrap(self._serve_metrics), host.strip("[]") or "0.0.0.0",
                    int(port))
                log.info("metrics on http://%s/metrics", listen)
            except (OSError, ValueError) as e:
                log.warning("cannot serve metrics on %s (%s); they are still on %s", listen, e, self.path)
        self._tasks.append(asyncio.get_running_loop().create_task(self._sample_loop()))
        if getattr(cfg, "flows", False):
            self.set_recording(True)
            self._tasks.append(asyncio.get_running_loop().create_task(self._push_loop()))

    def set_recording(self, on: bool) -> None:
        """Start or stop following conntrack (the flows socket's `{"cmd": "record", "on": false}`: the
        cost of recording, measured by bench/flows.py, can be switched off without a restart)."""
        running = self._ct_sock is not None
        if on and not running:
            self._start_conntrack()
        elif not on and running:
            self._stop_conntrack()  # no listener: the kernel stops making the events (nf_conntrack_events=2)

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(256):
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ENOBUFS: we fell behind; keep going
                log.debug("nflog: %s", e)
                return
            off = 0
            while off + 16 <= len(data):
                (length,) = struct.unpack_from("I", data, off)
                if length < 16:
                    break
                rec = parse_packet(data[off:off + length])
                if rec is not None and not is_noise(rec):
                    rec["host"] = self.host
                    rec["src_name"] = self.name(rec.get("src", ""))
                    rec["dst_name"] = self.name(rec.get("dst", ""))
                    self.records.append(rec)
                    self._keep(rec)
                off += (length + 3) & ~3

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The TCP listener: metrics only (records and switches stay on the local socket)."""
        await self._serve(reader, writer, local=False)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, local: bool = True) -> None:
        try:
            line = (await asyncio.wait_for(reader.readline(), 5)).decode(errors="replace")
            if not local and not line.startswith("GET "):
                writer.write(b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            elif line.startswith("GET "):
                body = (await self.metrics()).encode()
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
            else:
                req = json.loads(line or "{}")
                if req.get("cmd") == "record":
                    self.set_recording(bool(req.get("on")))
                    writer.write((json.dumps({"recording": bool(req.get("on"))}) + "\n").encode())
                    await writer.drain()
                    return
                recs = [r for r in self.records if not req.get("denied") or r.get("verdict") == "deny"]
                recs = [{**r, "when": time.strftime("%H:%M:%S", time.localtime(r["time"]))}
                        for r in recs[-int(req.get("limit", 50)):]]  # local time, when asked (not per record)
                writer.write((json.dumps(recs) + "\n").encode())
            await writer.drain()
        except (ValueError, OSError, TimeoutError) as e:
            log.debug("flows socket: %s", e or type(e).__name__)
        finally:
            writer.close()

    def _keep(self, rec: dict[str, Any]) -> None:
        """Count a record and queue it for the server (when flows are pushed)."""
        self.counts["allow" if rec.get("verdict") == "allow" else "deny"] += 1
        if getattr(getattr(self.agent, "cfg", None), "flows", False):
            if len(self.outbox) == self.outbox.maxlen:
                self.counts["lost"] += 1
            self.outbox.append(rec)

    async def metrics(self) -> str:
        """The agent's Prometheus text: drops by owner, flows, quarantined objects, applies."""
        from tether.agent.quarantine_report import metrics
        from tether.dataplane.nft import counters

        self._scraped = True
        totals = self.drops.update(await asyncio.to_thread(counters))
        a = self.agent
        lines = ["# HELP tether_flows_recorded_total Connections (allow) and denied packets (deny) recorded.",
                 "# TYPE tether_flows_recorded_total counter"]
        for verdict in ("allow", "deny"):
            lines.append(f'tether_flows_recorded_total{{host="{self.host}",verdict="{verdict}"}} '
                         f"{self.counts[verdict]}")
        lines += ["# HELP tether_flows_pushed_total Flow records sent to the server.",
                  "# TYPE tether_flows_pushed_total counter",
                  f'tether_flows_pushed_total{{host="{self.host}"}} {self.counts["pushed"]}',
                  "# HELP tether_flows_lost_total Flow records dropped because the server could not take them.",
                  "# TYPE tether_flows_lost_total counter",
                  f'tether_flows_lost_total{{host="{self.host}"}} {self.counts["lost"]}',
                  "# HELP tether_flows_missed_total Times conntrack events were dropped before the agent read them.",
                  "# TYPE tether_flows_missed_total counter",
                  f'tether_flows_missed_total{{host="{self.host}"}} {self.counts["missed"]}']
        if a is not None:
            lines += ["# HELP tether_agent_applies_total Plans applied by this agent.",
                      "# TYPE tether_agent_applies_total counter",
                      f'tether_agent_applies_total{{host="{self.host}"}} {getattr(a, "applies", 0)}',
                      "# HELP tether_agent_applied_revision The store revision of the last applied plan.",
                      "# TYPE tether_agent_applied_revision gauge",
                      f'tether_agent_applied_revision{{host="{self.host}"}} {getattr(a, "applied_revision", 0)}',
                      "# HELP tether_agent_plan_milliseconds Time the last plan took to compute.",
                      "# TYPE tether_agent_plan_milliseconds gauge",
                      f'tether_agent_plan_milliseconds{{host="{self.host}"}} {getattr(a, "_plan_ms", 0.0):.3f}',
                      "# HELP tether_agent_apply_milliseconds Time the last apply took (plan, links, nft).",
                      "# TYPE tether_agent_apply_milliseconds gauge",
                      f'tether_agent_apply_milliseconds{{host="{self.host}"}} {getattr(a, "apply_ms", 0.0):.3f}',
                      "# HELP tether_agent_connected 1 while the agent follows the server's watch.",
                      "# TYPE tether_agent_connected gauge",
                      f'tether_agent_connected{{host="{self.host}"}} {1 if getattr(a, "connected", False) else 0}']
        lines += peer_metrics(self.host, a)
        return drop_metrics(self.host, totals) + metrics(self.host) + "\n".join(lines) + "\n"

    async def _sample_loop(self) -> None:
        """Once metrics are scraped, read the drop counters every SAMPLE_INTERVAL so that a rule
        replaced between two scrapes loses few packets from its total."""
        from tether.dataplane.nft import counters

        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            if self._scraped:
                with contextlib.suppress(Exception):
                    self.drops.update(await asyncio.to_thread(counters))

    def _start_conntrack(self) -> None:
        """Follow conntrack's NEW/DESTROY events of this host's pods (allowed connections) from
        ctnetlink (`tether.agent.ctevents`)."""
        # packets and bytes in DESTROY events (a per-network-namespace setting)
        with contextlib.suppress(OSError), open("/proc/sys/net/netfilter/nf_conntrack_acct", "w") as f:
            f.write("1")
        try:
            self._ct_sock = ctevents.open_events()
        except OSError as e:
            log.warning("connection flows are not recorded: cannot subscribe to conntrack events (%s); the "
                        "agent needs CAP_NET_ADMIN and the nf_conntrack_netlink module (modprobe "
                        "nf_conntrack_netlink)", e)
            return
        asyncio.get_running_loop().add_reader(self._ct_sock.fileno(), self._ct_readable)

    def _stop_conntrack(self) -> None:
        if self._ct_handle is not None:
            self._ct_handle.cancel()
            self._ct_handle = None
        if self._ct_sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._ct_sock.fileno())
            self._ct_sock.close()
            self._ct_sock = None

    def _ct_readable(self) -> None:
        """Events are waiting: read them CT_BATCH seconds from now, all at once. A reader woken per
        event woke the event loop once per event, most of what recording cost at thousands of
        connections a second (bench/flows.py); meanwhile the socket's buffer (RCVBUF) holds them."""
        assert self._ct_sock is not None
        asyncio.get_running_loop().remove_reader(self._ct_sock.fileno())
        self._ct_handle = asyncio.get_running_loop().call_later(CT_BATCH, self._ct_drain)

    def _ct_drain(self) -> None:
        """Read every waiting event (one per datagram) into records; their time is the read's, at
        most CT_BATCH after the kernel's."""
        self._ct_handle = None
        sock, buf = self._ct_sock, self._ct_buf
        if sock is None:
            return
        recv_into, parse, now, recs = sock.recv_into, ctevents.parse_event, time.time(), []
        more = False
        for _ in range(CT_DRAIN_MAX):
            try:
                n = recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    log.warning("conntrack events: %s; connection flows are no longer recorded", e)
                    self._stop_conntrack()
                    return
                # the kernel dropped events the buffer could not hold: those connections go unrecorded
                self.counts["missed"] += 1
                if time.monotonic() - self._ct_warned > 60:
                    self._ct_warned = time.monotonic()
                    log.warning("conntrack events were lost (the agent read them too slowly); some "
                                "connections are missing from the flow records")
                continue
            off = 0
            while off + 20 <= n:
                (length,) = _U32.unpack_from(buf, off)
                if length < 20 or off + length > n:
                    break
                rec = parse(buf, off, now)
                if rec is not None:
                    recs.append(rec)
                off += (length + 3) & ~3
        else:
            more = True
        if recs:
            self._connections(recs)
        loop = asyncio.get_running_loop()
        if more:  # a flood: let the event loop run, then go on reading
            self._ct_handle = loop.call_soon(self._ct_drain)
        else:
            loop.add_reader(sock.fileno(), self._ct_readable)

    def _connections(self, recs: list[dict[str, Any]]) -> None:
        """Records from conntrack's events (`ctevents.parse_event`), the ones of this host's pods. A
        connection that opens and closes before the next push (most of them: a request) becomes one
        record: its NEW record, not yet sent, takes the DESTROY's counters and `event: closed`; the
        agent, the server and the ring handle half the records (bench/flows.py measures what
        recording costs)."""
        local, host, pending = self._local, self.host, self._pending
        push = bool(getattr(getattr(self.agent, "cfg", None), "flows", False))
        keep, out = self.records.append, self.outbox
        kept = 0
        for rec in recs:
            src, dst = rec["src"], rec["dst"]
            if (src not in local and dst not in local and rec.get("backend") not in local) or \
                    (":" in src and is_noise(rec)):
                continue
            key = (rec["proto"], src, dst, rec.get("sport"), rec.get("dport"))
            if rec["event"] == "destroy":
                opened = pending.pop(key, None)
                if opened is not None:
                    for k in COUNTERS:
                        if k in rec:
                            opened[k] = rec[k]
                    opened["event"], opened["ended"] = "closed", rec["time"]
                    continue
            rec["host"] = host
            keep(rec)
            kept += 1
            if push:
                if len(out) == out.maxlen:
                    self.counts["lost"] += 1
                out.append(rec)
                if rec["event"] == "new":
                    if len(pending) >= PUSH_BACKLOG:  # the server is away and the outbox overflows: start over
                        pending.clear()
                    pending[key] = rec
        self.counts["allow"] += kept

    async def _push_loop(self) -> None:
        """Send what was recorded since the last push to the server, once a second."""
        while True:
            await asyncio.sleep(PUSH_INTERVAL)
            a = self.agent
            if not self.outbox or a is None or not getattr(a, "connected", False):
                continue
            batch, alone = [], 0
            while self.outbox and len(batch) < PUSH_MAX and alone < PUSH_ALONE:
                r = self.outbox.popleft()
                batch.append(r)
                alone += not r.keys() <= GROUPED
            for r in batch:  # sent: a later DESTROY is a record of its own
                if r.get("event") == "new":
                    self._pending.pop((r["proto"], r["src"], r["dst"], r.get("sport"), r.get("dport")), None)
            try:
                await a.client.request("POST", f"/api/v1/hosts/{self.host}/flows", content=json.dumps(pack(batch)))
                self.counts["pushed"] += len(batch)
            except Exception as e:  # noqa: BLE001 - the records are put back and sent later
                log.warning("could not push %d flow records to the server (kept, retried): %s", len(batch), e)
                self.outbox.extendleft(reversed(batch))

    def update(self, replica: Any) -> None:
        """Called after every apply: keeps the endpoints (one list copy) and forgets the names, which
        `name` rebuilds when a record next needs one. Building them here cost the event loop a dict
        entry per address for every pod added, while most hosts log no flow between two changes."""
        self._endpoints, self._names = list(replica.endpoints), None
        local = getattr(self.agent, "local", None)  # this host's endpoints from the planner's index
        mine = local.here(replica) if local is not None else (ep for ep in self._endpoints if ep.host == self.host)
        self._local = {a for ep in mine for a in ep.ips}

    def name(self, ip: str) -> str:
        """`namespace/name` of the endpoint holding `ip` ("" if none), so records name who was involved."""
        if self._names is None:
            self._names = {a: f"{ep.namespace}/{ep.name}" for ep in self._endpoints for a in ep.ips}
        return self._names.get(ip, "")

    async def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
        if self.server is not None:
            self.server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        for t in self._tasks:
            t.cancel()
        self._stop_conntrack()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


async def start(agent: AgentHandle) -> list[FlowLog]:
    path = os.path.join(os.path.dirname(agent.cfg.cni_socket) or ".", "flows.sock")
    flows = FlowLog(agent.host, path, agent=agent)
    await flows.start()
    return [flows]
