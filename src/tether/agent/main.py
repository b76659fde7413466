"""`tether agent`: one per host. Registers the host, mirrors the desired state, programs the kernel.

Lifetime: the CNI socket is served at once; the host registers and heartbeats a lease; a snapshot
then the watch stream feed the replica; each batch of changes recomputes the plan (pure) and applies
the difference. No kernel writes happen before the first full sync, and nothing is ever flushed: a
restarted agent with an unchanged plan changes nothing. When the server is unreachable, the datapath
stays as it is, and the agent reconnects and resyncs by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from typing import Any

from tether import __version__, heap, yielding
from tether.agent import extras as extras_
from tether.agent import replica_file
from tether.agent.cni.server import CniServer
from tether.agent.config import AgentConfig
from tether.agent.local_endpoints import LocalEndpoints
from tether.calc.host import HostContext, pickup_grace, rejudge_needed, rejudge_scope
from tether.calc.names import vtep_mac_for, vxlan_overhead
from tether.calc.planner import Planner
from tether.calc.replica import Replica
from tether.client import ApiError, AsyncTetherClient, ServerUnreachable
from tether.dataplane.links import Applied
from tether.model import Host, Network

log = logging.getLogger("tether.agent")
NOT_PREPARED = object()  # an extra without `prepare`: updated on the event loop (Agent._prepare_extras)
PREPARE_FAILED = object()  # its `prepare` raised: nothing to install
# seconds between two writes of this host's status that change only its applied revision: each is a
# Host event every agent receives (hosts squared events per change); the heartbeat carries the
# revision to the server at once instead (`Objects.observed_host`)
STATUS_INTERVAL = 10.0
# ... and, in a large cluster, at most this many such writes a second cluster-wide (each agent's
# interval grows with the hosts: 100 hosts writing every 10 s were 10 events a second to every agent,
# a third of the watch traffic per change; `status_interval`)
STATUS_WRITES_PER_S = 2.0
# seconds between two hand-backs of the heap's free memory after applies (`Agent._trim`): what a
# trim hands back the next apply faults in again (at 10,000 endpoints ~630 page faults, an apply
# 7.5 -> 10 ms of CPU), and every 2 s was every other change when changes come every second
TRIM_INTERVAL = 10.0
# the periodic reconcile: each wait is --reconcile-interval times a uniform factor in 1 +- RECONCILE_JITTER
# (agents started together, a whole lab or a rack after a power cut, do not read back in step) and at
# least the last pass's duration / RECONCILE_BUDGET (the share of one CPU it may take)
RECONCILE_JITTER = 0.2
RECONCILE_BUDGET = 0.01


def status_interval(hosts: int) -> float:
    """Seconds between two writes of a host's status that only move its applied revision."""
    return max(STATUS_INTERVAL, hosts / STATUS_WRITES_PER_S)


def reconcile_delay(interval: float, last_pass_s: float, rng: random.Random | None = None) -> float:
    """Seconds until the next reconcile pass: `interval` jittered, and never less than 100 x what the
    last pass took (wall time: on a saturated machine the passes stretch, and so does the wait)."""
    jittered = interval * (rng or random).uniform(1 - RECONCILE_JITTER, 1 + RECONCILE_JITTER)
    return max(jittered, last_pass_s / RECONCILE_BUDGET)


def underlay_of(ip: str, dev: str | None) -> tuple[str, int, str]:
    """(device, MTU, CIDR) of the interface holding the underlay address."""
    from pyroute2.iproute import IPRoute

    want = ipaddress.ip_address(ip)  # an IPv6 one may be written in any of its forms
    with IPRoute() as ipr:
        for a in ipr.get_addr():
            if a.get("IFA_ADDRESS") and ipaddress.ip_address(a.get("IFA_ADDRESS")) == want:
                link = ipr.get_links(a["index"])[0]
                name = link.get("IFLA_IFNAME")
                if dev and dev != name:
                    continue
                cidr = str(ipaddress.ip_network(f"{ip}/{a['prefixlen']}", strict=False))
                return name, link.get("IFLA_MTU"), cidr
    raise SystemExit(f"no interface in this network namespace has the underlay address {ip}; "
                     "check --underlay-ip (and --underlay-dev)")


def link_local_of(dev: str, table: str = "/proc/net/if_inet6") -> str | None:
    """The IPv6 link-local address of the underlay device, if it has one: peers route IPv6 pod
    blocks in `direct` mode through it (an IPv6 route cannot have an IPv4 next hop). Read from
    /proc, not netlink: the agent may be made inside a running event loop, where pyroute2's
    synchronous sockets refuse to work."""
    try:
        with open(table) as f:
            for line in f:
                hexaddr, _idx, _plen, scope, _flags, name = line.split()
                if name == dev and scope == "20":  # IFA_SCOPE link
                    return str(ipaddress.IPv6Address(bytes.fromhex(hexaddr)))
    except (OSError, ValueError):
        pass
    return None


@contextlib.contextmanager
def background_priority(enabled: bool = True, nice: int = 10) -> Any:
    """Run the calling thread at a lower CPU priority for a while: the periodic full reconcile (a
    read-back of every link and the whole nft table, 60-150 ms of CPU) must not delay the work that
    answers pods at once (the DNS worker process) on a busy host. Linux nice values are per thread.
    Only for that: a niced thread that holds the GIL and loses its CPU holds up every thread of the
    agent (CNI answers are protected from applies by `yielding` instead)."""
    if not enabled:
        yield
        return
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(before, nice))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # raising the priority back needs CAP_SYS_NICE (the agent is root)
            os.setpriority(os.PRIO_PROCESS, tid, before)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.host = cfg.host
        self.replica = Replica()
        self.client = AsyncTetherClient(cfg.server, cfg.token, ca_file=cfg.ca_file)
        # pyroute2's synchronous sockets refuse to run inside an event loop: look up before it starts
        underlay = cfg.underlay or underlay_of(cfg.underlay_ip, cfg.underlay_dev)
        self.underlay_dev, self.underlay_mtu, self.underlay_cidr = underlay
        # what the front ends (CNI here, Docker and VM ports as extras) share of the agent
        self.local = LocalEndpoints(self.host, self.replica, self.underlay_mtu, self.kick,
                                    vxlan_overhead(cfg.underlay_ip),
                                    indexed=lambda rep: self.planner.local_endpoints(rep))
        self.cni = CniServer(self.local, self.client, cfg.cni_socket, dns=self.dns_config, not_ready=self.not_ready)
        self.underlay_ip6 = link_local_of(self.underlay_dev)
        from tether.dataplane.nft import NftDataplane

        self.nft = NftDataplane()
        self._dirty = asyncio.Event()
        self._apply_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._synced_once = False
        self.connected = False
        self.last_sync = 0.0
        self.applies = 0
        self.lists = 0  # full lists (snapshots) taken from the server
        self._from_disk = False  # the replica was loaded from the copy on disk at start
        self._catch_up = 0  # started from the disk copy: no kernel writes before this revision
        self.resumes = 0  # watches resumed from the replica's revision after a cut, without a list
        self.dns_ip: str | None = None
        self.dns_search: list[str] = []
        self._plan_ms = 0.0
        self._kicks = 0  # bumped by every kick(): local changes to the replica come with one
        self._applied_kicks = -1  # the _kicks of the replica the last finished apply planned from
        self._reported_rev = 0  # the applied_revision the server holds for this host
        self._status_at = 0.0  # monotonic time of the last status write
        self._status_task: asyncio.Task | None = None
        self._now = False  # the pending kick asked not to wait
        self.planner = Planner()  # the calculation, with what one plan leaves for the next
        self._extra_errors: dict[str, str] = {}  # optional service -> its last update error (logged once)
        self._plan_cache: tuple[tuple, Any] | None = None  # (what the plan was computed from, plan)
        self._links_applied: Applied | None = None
        self.reconcile_ms = 0.0  # wall time of the last reconcile pass's kernel work (reconcile_delay)
        self._judged: frozenset[str] = frozenset()  # calc.rejudge_scope of the last apply
        self._saved_rev, self._saved_at = -1, 0.0
        # the copy on disk: a base written whole now and then, and the events applied since appended
        self.disk = replica_file.DiskCopy(self.replica_path)
        # what the last apply could not do, reported in the host's status (`_report_status`)
        self._quarantined: tuple = ()  # plan.quarantined of the last plan
        self._failures: list[str] = []  # kernel operations that failed in the last apply
        self._logged_failures: set[str] = set()  # logged at WARNING once, until they stop failing
        self._since: dict[tuple, Any] = {}  # problem -> when it was first seen
        self._status_sent: tuple | None = None  # what the server holds (None: unknown, write it)
        # the replica revision of the last apply that did not fail, sent with every heartbeat: the
        # server shows this host's endpoints `active` up to it (`_beat_now`: send one at once)
        self.applied_revision = 0
        self._apply_ok = False
        self._beat_sent = -1
        self._beat_now = asyncio.Event()
        self._extras: list[extras_.Extra] = []  # started by run()
        self._trimmed_at = 0.0  # monotonic time of the last heap trim
        self._untrimmed = False  # an apply ended since then

    # --- small services used by the front ends ----------------------------------------------------

    def kick(self, gather: bool = True) -> None:
        """Ask for a plan recomputation soon: after a short pause that gathers a burst of watch events
        into one apply, or at once (`gather=False`: a local change, such as a pod just plugged)."""
        self._kicks += 1
        self._now = self._now or not gather
        self._dirty.set()

    def ready(self) -> bool:
        return self._synced_once and self.connected

    def sync_state(self) -> str:
        if not self._synced_once:
            return "never synced"
        return "connected" if self.connected else f"server unreachable since {time.time() - self.last_sync:.0f}s"

    def not_ready(self) -> str | None:
        """Why pods cannot be added yet (CNI STATUS), or None."""
        return None if self.ready() else self.sync_state()

    def dns_config(self, net: Network | None, namespace: str | None = None) -> dict[str, Any]:
        """The CNI result's `dns`: the runtime writes it into the pod's resolv.conf."""
        from tether.calc.dns_records import NDOTS, search_path

        if not self.dns_ip:
            return {}
        search = search_path(namespace, net.name, net.dns_domain) if net else []
        return {"nameservers": [self.dns_ip], "search": search + self.dns_search, "options": [f"ndots:{NDOTS}"]}

    # --- lifetime ---------------------------------------------------------------------------------

    async def run(self) -> None:
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        t0 = time.monotonic()
        if self.disk.load(self.replica):
            log.info("loaded the last replica (revision %d, %d endpoints) from disk in %.2f s", self.replica.revision,
                     len(self.replica.objects["Endpoint"]), time.monotonic() - t0)
            self._from_disk = self.replica.revision > 0
            heap.trim()
        await self.cni.start()
        log.warning("agent %s up: underlay %s on %s (mtu %d), CNI socket %s", self.host, self.cfg.underlay_ip,
                    self.underlay_dev, self.underlay_mtu, self.cfg.cni_socket)
        await self._start_extras()
        heap.settle()
        tasks = [asyncio.create_task(t) for t in (self._sync_loop(), self._apply_loop(), self._heartbeat_loop(),
                                                  self._reconcile_loop())]
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        await self.cni.close()
        self._save_replica(force=True, final=True)
        await self._stop_extras()
        await self.client.close()
        log.warning("agent %s stopped (datapath left in place)", self.host)

    def stop(self) -> None:
        self._stop.set()

    @property
    def replica_path(self) -> str:
        return os.path.join(self.cfg.state_dir, "replica.json")

    async def _start_extras(self) -> None:
        """Optional services (DNS, metrics...) that live in their own modules (`extras.EXTRAS`)."""
        self._extras = await extras_.start(self)

    async def _stop_extras(self) -> None:
        for e in self._extras:
            try:
                await e.close()
            except Exception as exc:  # noqa: BLE001 - stop the others too
                log.warning("stopping %s failed: %s: %s", type(e).__name__, type(exc).__name__, exc)

    async def _register(self) -> int:
        """Register the host; its write's revision (every change before it is at most that)."""
        host = Host(name=self.host, underlay_ip=self.cfg.underlay_ip, underlay_cidr=self.underlay_cidr,
                    underlay_ip6=self.underlay_ip6, vtep_mac=vtep_mac_for(self.host), dns_ip=self.dns_ip,
                    agent_version=__version__, labels=self.cfg.labels)
        registered = await self.client.register_host(host)
        await self.client.heartbeat(self.host, self.cfg.heartbeat_ttl)
        return registered.revision

    async def _sync_loop(self) -> None:
        backoff = 0.2
        failed = ""  # the last reason a sync failed, logged once until it changes or a sync succeeds
        # the replica is in sync up to its revision: watch on from there, no list. At start, the copy
        # on disk is too (a restart: its events are replayed, not 10,000 objects listed and parsed)
        resume = self._from_disk
        while True:
            try:
                registered = await self._register()
                self._status_sent = None  # a new server, or a host re-created: report again
                if resume:
                    log.info("watching again from revision %d", self.replica.revision)
                    if not self._synced_once:
                        # the disk copy may be a second behind what is programmed: no kernel writes
                        # until the replica has caught up with the host's own registration
                        self._catch_up = registered
                else:
                    snap = await self.client.snapshot()
                    self.replica.load_snapshot(snap, consume=True)
                    self.disk.relisted()  # no log leads from the old base to this replica
                    del snap
                    heap.trim()
                    self.lists += 1
                    log.info("synced at revision %d", self.replica.revision)
                    self.kick()
                self.connected = True
                self.last_sync = time.time()
                self._synced_once = self._synced_once or not resume
                backoff = 0.2
                failed = ""
                resume = True
                await self._follow()
                resume = False  # the server said the history the replica needs is gone: list again
            except (ServerUnreachable, ApiError, OSError) as e:
                if self.connected:
                    log.warning("lost the server (%s); keeping the datapath, retrying", e)
                    # no more events until it is back: from now on the disk copy is what a restarted
                    # agent serves, so write the tail the 1 s throttle skipped (the heartbeat's
                    # catch-up comes up to 5 s later: an agent restarted sooner lost the last changes)
                    self._save_replica(force=True)
                elif str(e) != failed:  # e.g. at start: say why no pod can be added yet
                    log.warning("cannot sync with the server (%s); keeping the datapath, retrying", e)
                failed = str(e)
                self.connected = False
            except Exception:  # noqa: BLE001 - never die: retry
                log.exception("sync failed")
                self.connected = False
                resume = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _follow(self) -> None:
        """Follow the watch stream from the replica's revision; returns only when the server says
        the replica must be listed again (the history after its revision is compacted, or the
        store was restored). A stream cut for falling behind, or one that breaks, resumes from
        the replica's revision: one missed event never costs a full list."""
        while True:
            async for ev in self.client.watch(self.replica.revision):
                if ev["type"] == "resync":
                    if ev.get("relist", True):  # a server without `relist` meant: list again
                        log.warning("the server cannot replay the watch from revision %d (%s): full resync",
                                    self.replica.revision, ev.get("reason") or ev.get("compact_revision"))
                        return
                    self.resumes += 1
                    log.warning("watch cut (%s); watching again from revision %d",
                                ev.get("reason") or ev.get("error"), self.replica.revision)
                    if ev.get("error"):
                        await asyncio.sleep(0.5)  # a store failure: do not spin on it
                    break
                if ev["type"] == "bookmark":
                    self.last_sync = time.time()
                    continue
                changed = self.replica.apply_event(ev)
                self.disk.record(ev)  # even unchanged: a host's status report is kept, not planned
                if changed:
                    self.kick()
                else:
                    self._unchanged_since_apply()
                    if self.replica.acted > self._reported_rev:
                        self._report_soon()  # e.g. the echo of a CNI ADD's endpoint, applied already
                self.last_sync = time.time()
                if not self._synced_once and self.replica.revision >= self._catch_up:
                    log.info("caught up at revision %d from the copy on disk", self.replica.revision)
                    self._synced_once = True
                    self.kick(gather=False)

    async def _apply_loop(self) -> None:
        while True:
            await self._dirty.wait()
            if not self._now:
                await asyncio.sleep(0.005)  # gather a burst of events into one apply
            await self._after_cni_requests()
            self._dirty.clear()
            self._now = False
            if not self._synced_once:
                continue  # no kernel writes before the first full sync
            await self.apply()

    async def _after_cni_requests(self, patience: float = 0.1) -> None:
        """Wait (a little) for the CNI requests in progress to answer: an apply is tens of ms of
        Python, and run alongside an ADD it doubles the ADD's time (one GIL, bench/cni.py). The
        runtime waits for the ADD; the apply only makes the pod reachable a few ms later. Requests
        that arrive once the apply has begun make it pause at its checkpoints (`yielding`)."""
        deadline = time.monotonic() + patience
        while yielding.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.002)

    async def apply(self, verify: bool = False) -> None:
        async with self._apply_lock:
            ctx = HostContext(self.host, self.underlay_dev, self.underlay_mtu)
            # planned on the worker thread from a copy: on the event loop the plan (O(objects), ~9 ms
            # with 500 endpoints) held up the CNI requests that arrived meanwhile
            key = (self.replica.revision, self._kicks, len(self.replica.objects["Endpoint"]), ctx)
            kicks = self._kicks
            view = self.replica.view()
            keep = self.local.protected()
            try:
                await asyncio.to_thread(self._apply_sync, view, key, keep, verify)
                self._apply_ok = True
                self._applied(view)
            except Exception as e:  # noqa: BLE001 - the next pass retries
                self._apply_ok = False
                log.exception("applying the plan failed")
                self.nft.forget()
                self._note_failures([*self._failures, f"apply: {type(e).__name__}: {e}"[:500]])
            self.applies += 1
            self._applied_kicks = kicks
            await self._report_status(view.revision, view.acted)
            self._save_replica()
            extras = self._extras
            installs = await asyncio.to_thread(self._prepare_extras, extras, view)
            for e, install in zip(extras, installs, strict=True):
                if install is None or install is PREPARE_FAILED:
                    continue  # nothing changed for it, or its prepare failed (already logged)
                try:
                    if install is NOT_PREPARED:
                        e.update(self.replica)
                    else:
                        install()
                    self._extra_errors.pop(type(e).__name__, None)
                except Exception as exc:  # noqa: BLE001 - optional services never stop the datapath
                    self._extra_failed(type(e).__name__, exc)
            self._untrimmed = True
            # the first plan, nft batch and DNS records after a start are built whole, and each
            # reconcile pass reads the kernel's state back: hand back what those left free at once
            self._trim(now=verify or self.applies == 1)

    def _trim(self, now: bool = False) -> None:
        """Hand the heap's free memory back to the system after applies (`heap.trim`: 0.1-0.4 ms at
        10,000 endpoints): at once after a big transient (`now`), else at most every TRIM_INTERVAL,
        checked after applies and at every heartbeat (at least every 5 s: the last apply of a
        burst). Trimmed only after the first apply and each reconcile, an agent at 10,000 endpoints
        was seen holding 6 MB more than a trim then handed back (what other threads freed later)."""
        t = time.monotonic()
        if now or (self._untrimmed and t - self._trimmed_at >= TRIM_INTERVAL):
            heap.trim()
            self._trimmed_at, self._untrimmed = t, False

    def _extra_failed(self, name: str, exc: Exception) -> None:
        """An optional service's update failed: logged with its traceback once per distinct error
        (not on every apply while it keeps failing), and again when the error changes."""
        text = f"{type(exc).__name__}: {exc}"
        if self._extra_errors.get(name) != text:
            self._extra_errors[name] = text
            log.error("updating %s failed (logged once until the error changes)", name, exc_info=exc)

    def _prepare_extras(self, extras: list[extras_.Extra], view: Replica) -> list[Any]:
        """On the apply thread, the O(objects) part of the extras' updates (an extra's `prepare`,
        such as rebuilding the DNS records) from the apply's copy of the replica; each returns what
        to run on the event loop (or None: nothing changed). NOT_PREPARED: the extra has no `prepare`."""
        out: list[Any] = []
        failed: list[tuple[str, Exception]] = []
        with yielding.background():
            for e in extras:
                try:
                    out.append(e.prepare(view) if isinstance(e, extras_.Preparing) else NOT_PREPARED)
                except Exception as exc:  # noqa: BLE001 - optional services never stop the datapath
                    failed.append((type(e).__name__, exc))
                    out.append(PREPARE_FAILED)
        for name, exc in failed:
            self._extra_failed(name, exc)
        return out

    def _plan(self, view: Replica, key: tuple) -> Any:
        """The plan for the replica as it was when the apply began. The periodic reconcile finds
        the replica unchanged and reuses the last plan: computing it is O(objects), tens of ms with a
        few hundred endpoints, which would compete with the DNS worker for a CPU every 30 s."""
        if self._plan_cache is not None and self._plan_cache[0] == key:
            self._plan_ms = 0.0
            return self._plan_cache[1]
        t0 = time.perf_counter()
        plan = self.planner.plan(view, key[-1])
        self._plan_ms = (time.perf_counter() - t0) * 1000
        self._plan_cache = (key, plan)
        return plan

    def _save_replica(self, force: bool = False, final: bool = False) -> None:
        """The replica on disk lets a restarted agent serve before it reaches the server. A save
        appends the events applied since the last one (O(change)), and now and then writes the whole
        replica (O(objects), `replica_file`); each costs a write, so during bursts the agent saves
        at most once a second (and at every stop, `final`: folding a long log in then)."""
        now = time.monotonic()
        if self.replica.revision == self._saved_rev or (not force and now - self._saved_at < 1.0):
            return
        with contextlib.suppress(OSError):
            self.disk.save(self.replica, replica_file.FINAL_COMPACT_AT if final else replica_file.COMPACT_AT)
            self._saved_rev, self._saved_at = self.replica.revision, now

    def _apply_sync(self, view: Replica, key: tuple, keep, verify: bool) -> None:
        t0 = time.monotonic()
        with background_priority(verify), yielding.background():
            plan = self._plan(view, key)
            scope = rejudge_scope(view, self.host, plan.nft, self.planner.local_endpoints(view))
            self._rejudge(view, scope, self._apply_plan(plan, keep, verify, pickup_grace(scope - self._judged)))
        if verify:
            self.reconcile_ms = (time.monotonic() - t0) * 1000

    def _rejudge(self, view: Replica, scope: frozenset[str], nrep) -> None:
        """After a policy change, mark the connections of the pods it may concern (before or after
        it, `scope`: calc.rejudge_scope) for judging again, so established ones the policies now
        forbid stop; those of pods tracked from now on as picked up mid-stream (docs/ARCHITECTURE.md,
        "What a policy change does to existing connections")."""
        from tether.dataplane.conntrack import rejudge

        needed = rejudge_needed(nrep)
        before, self._judged = self._judged, scope
        subnets = [sn.cidr for n in view.networks.values() for sn in n.subnets]
        if scope - before:  # newly tracked: their entries' direction is unknown
            rejudge(scope - before, picked=True, subnets=subnets)
        if needed and (scope & before or before - scope):
            rejudge((scope & before) | (before - scope), subnets=subnets)

    def _apply_plan(self, plan, keep, verify: bool, extra_nft: list[dict] | None = None):
        from tether.agent import quarantine_report
        from tether.dataplane.links import apply_links, raise_interfaces

        quarantine_report.note(plan.quarantined, self.host)
        self._quarantined = plan.quarantined
        self._failures = []
        t0 = time.perf_counter()
        # links and routes first: a new pod's route is what other hosts wait for (convergence)
        # full read-back at start, on every reconcile and after a failure; otherwise by difference
        previous = None if verify else self._links_applied
        self._links_applied = None  # if this raises, the next pass is a full one
        lrep, self._links_applied = apply_links(plan, keep_interfaces=keep, applied=previous)
        t1 = time.perf_counter()
        yielding.checkpoint()
        if verify:
            same = self.nft.verify(plan.nft)
            log.debug("nft verified by %s in %.1f ms: %s", self.nft.last_verify, self.nft.verify_ms,
                      "as applied" if same else "differs, re-applying")
        nrep = self.nft.apply(plan.nft, extra_nft)
        raised = raise_interfaces(plan, self._links_applied, report=lrep)  # after their ingress chains (pod_ingress)
        if raised:
            lrep.add(f"up {', '.join(raised[:5])}" + (f" and {len(raised) - 5} more" if len(raised) > 5 else ""))
        t2 = time.perf_counter()
        self.apply_ms = (t2 - t0) * 1000 + self._plan_ms  # metrics: how long the last apply took
        if nrep.changed or lrep.changed:
            log.info("applied (plan %.0f ms, links %.0f ms, nft %.0f ms): %s", self._plan_ms, (t1 - t0) * 1000,
                     (t2 - t1) * 1000, "; ".join(lrep.changes + nrep.changes)[:500])
        self._note_failures(lrep.failures + nrep.failures)
        return nrep

    def _note_failures(self, failures: list[str]) -> None:
        """Keep the failed kernel operations of this apply for the host's status; each is logged at
        WARNING when it first fails (not on every retry) and when it stops failing."""
        self._failures = failures
        now = set(failures)
        for f in sorted(now - self._logged_failures):
            log.warning("kernel operation failed: %s", f[:500])
        for f in sorted(self._logged_failures - now):
            log.warning("kernel operation no longer fails: %s", f[:500])
        self._logged_failures = now

    def host_status(self, revision: int) -> Any:
        """The HostStatus of the last apply: quarantined objects and failed kernel operations."""
        from tether.model import HostStatus, Problem, now

        def since(key: tuple) -> Any:
            return self._since.setdefault(key, now())

        problems = [Problem(kind=q.kind[:64], name=q.name[:256], reason=q.reason[:1024], since=since(("q", q)))
                    for q in self._quarantined[:500]]
        failed = []
        for f in self._failures[:200]:
            what, _, why = f.partition(": ")
            failed.append(Problem(kind="operation", name=what[:256], reason=(why or f)[:1024], since=since(("f", f))))
        live = {("q", q) for q in self._quarantined} | {("f", f) for f in self._failures}
        for k in [k for k in self._since if k not in live]:
            del self._since[k]
        return HostStatus(problems=problems, failed_ops=failed, applied_revision=revision, updated_at=now())

    async def _report_status(self, revision: int, acted: int) -> None:
        """Write the host's status when what it reports has changed: its problems, or the revision
        applied once a change other than a status report was applied (the programming status of
        every object, `tether.server.programming`). Each write is a Host event every agent
        receives, so a new applied revision alone goes in a heartbeat at once (the server keeps it
        in memory) and in a write at most every `status_interval` (the last one later: what another
        server, or this one after a restart, reads)."""
        st = self.host_status(revision)
        key = (tuple((p.kind, p.name, p.reason) for p in st.problems),
               tuple((p.name, p.reason) for p in st.failed_ops))
        fresh = acted > self._reported_rev
        if (key == self._status_sent and not fresh) or not self.connected:
            return
        if key == self._status_sent:
            if self.applied_revision > self._beat_sent:
                self._beat_now.set()
            if time.monotonic() - self._status_at < status_interval(len(self.replica.hosts)):
                self._report_soon()
                return
        try:
            self._status_at = time.monotonic()
            await self.client.request("PUT", f"/api/v1/hosts/{self.host}/status",
                                      content=st.model_dump_json())
            self._status_sent = key
            self._reported_rev = max(self._reported_rev, revision)
        except (ApiError, ServerUnreachable) as e:
            log.warning("could not report this host's status (retried after the next apply): %s", e)

    def _unchanged_since_apply(self) -> None:
        """An event that changed nothing (the echo of a pod's endpoint this agent already planned):
        when no change waits to be applied either, what is programmed is the replica at its new
        revision, and the echo's endpoint may now be shown `active`."""
        if self._apply_ok and not self._dirty.is_set() and not self._apply_lock.locked():
            self._applied(self.replica)

    def _applied(self, view: Replica) -> None:
        """Note the revision now programmed; a local endpoint still shown pending gets a heartbeat
        at once, so it shows `active` within moments rather than at the next beat."""
        self.applied_revision = view.revision
        mine = self.planner.local_endpoints(view)  # this host's, when the planner knows them: not all
        if any(e.host == self.host and e.status == "pending" and e.revision > self._beat_sent
               for e in (view.objects["Endpoint"] if mine is None else mine).values()):
            self._beat_now.set()
    def _report_soon(self) -> None:
        if self._status_task is None or self._status_task.done():
            self._status_task = asyncio.get_running_loop().create_task(self._report_later())

    async def _report_later(self) -> None:
        """Report the applied revision when no apply is due (one that is due reports it itself)."""
        await asyncio.sleep(max(0.0, self._status_at + status_interval(len(self.replica.hosts)) - time.monotonic()))
        async with self._apply_lock:
            if self._applied_kicks == self._kicks and not self._dirty.is_set():
                await self._report_status(self.replica.revision, self.replica.acted)

    async def _heartbeat_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self.cfg.heartbeat_ttl / 3)
            self._beat_now.clear()
            self._save_replica()  # the tail of a burst that the throttle skipped
            self._trim()  # what the last apply of a burst freed (beats also follow applies: not each time)
            if not self.connected:
                continue
            revision = self.applied_revision
            try:
                await self.client.request("POST", f"/api/v1/hosts/{self.host}/heartbeat",
                                          json={"ttl": self.cfg.heartbeat_ttl, "applied_revision": revision})
                self._beat_sent = revision
            except (ApiError, ServerUnreachable) as e:
                log.warning("heartbeat failed: %s", e)

    async def _reconcile_loop(self) -> None:
        """Every --reconcile-interval (jittered, and stretched when a pass is slow: reconcile_delay),
        read the kernel's state back and correct it. The nft table is listed only when something
        else committed to nftables in this namespace since the agent's last write (`NftDataplane.verify`)."""
        while True:
            await asyncio.sleep(reconcile_delay(self.cfg.reconcile_interval, self.reconcile_ms / 1000))
            if self._synced_once:
                await self.apply(verify=True)


def credentials(a: argparse.Namespace, servers: list[str]) -> tuple[str | None, str | None]:
    """(token, CA file) of this agent: --token/--token-file, else the host credential in the state
    dir, which a first start with --join-token makes."""
    from tether.join import CA_FILE, CREDENTIAL_FILE, JoinError, join

    ca_file = a.ca_file
    if not ca_file and os.path.exists(os.path.join(a.state_dir, CA_FILE)):
        ca_file = os.path.join(a.state_dir, CA_FILE)
    if a.token_file:
        with open(a.token_file) as f:
            return f.read().strip(), ca_file
    if a.token:
        return a.token, ca_file
    path = os.path.join(a.state_dir, CREDENTIAL_FILE)
    if not os.path.exists(path) and a.join_token:
        for attempt in range(30):  # the server may be starting too
            try:
                path, ca_file = join(servers, a.join_token, a.host, a.state_dir, ca_file, a.ca_hash)
                log.warning("joined as host %s: credential in %s", a.host, path)
                break
            except JoinError as e:
                raise SystemExit(f"cannot join: {e}") from None
            except ApiError as e:
                raise SystemExit(f"cannot join: {e.detail} (HTTP {e.status})") from None
            except ServerUnreachable as e:
                if attempt == 29:
                    raise SystemExit(f"cannot join: {e}") from None
                time.sleep(1)
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip(), ca_file
    if any(s.startswith("https://") for s in servers):
        raise SystemExit(f"no credential: this host has not joined ({path} does not exist); run `tether host join` "
                         "or pass --join-token (or --token/--token-file)")
    return None, ca_file


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tether agent", description="Run the Tether agent on this host: programs "
                                "routes, VXLAN, nftables and answers CNI requests.")
    p.add_argument("--server", action="append",
                   help="API address: https://host:port, or unix:///path on the server's machine; several as "
                        "a,b,c or --server repeated (the agent moves to the next when one is down, resuming its "
                        "watch where it was) (default: env TETHER_SERVER, else unix:///run/tether/server.sock)")
    p.add_argument("--ca-file", help="cluster CA the servers' certificates are verified against (default: "
                                     "<state-dir>/ca.crt, written by `tether host join`)")
    p.add_argument("--token", default=os.environ.get("TETHER_TOKEN"),
                   help="API bearer token (default: this host's credential, <state-dir>/credential)")
    p.add_argument("--token-file", help="read the token from this file")
    p.add_argument("--join-token", default=os.environ.get("TETHER_JOIN_TOKEN"),
                   help="bootstrap token (tether host token create): at first start, join and keep this host's "
                        "own credential in <state-dir>/credential (env TETHER_JOIN_TOKEN)")
    p.add_argument("--ca-hash", help="sha256:... pin of the cluster CA, to fetch and trust it when joining")
    p.add_argument("--host", default=socket.gethostname(), help="this host's name (a DNS label)")
    p.add_argument("--underlay-ip", required=True,
                   help="this host's address on the underlay network, IPv4 or IPv6 (tunnels and direct routes use "
                        "its family; every host of a cluster needs one of the same family)")
    p.add_argument("--underlay-dev", help="device holding the underlay address (default: found by address)")
    p.add_argument("--state-dir", default="/var/lib/tether-agent")
    p.add_argument("--cni-socket", default="/run/tether/cni.sock")
    p.add_argument("--label", action="append", default=[], help="host label k=v (repeatable)")
    p.add_argument("--reconcile-interval", type=float, default=30.0, metavar="SECONDS",
                   help="how often the kernel's state (links, routes, neighbours, FDB, the nft table) is read "
                        "back and corrected. Each wait is this x 0.8-1.2 at random (agents started together "
                        "spread out) and at least 100 x what the last pass took (at most ~1%% of a CPU). The nft "
                        "table is listed only when nftables' ruleset generation shows a commit other than the "
                        "agent's own since its last write, and at least every 10 minutes (default: 30)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--dns-ip", help="address the agent's DNS answers on (default 169.254.20.10; 'off' disables)")
    p.add_argument("--dns-port", type=int, default=53)
    p.add_argument("--upstream-dns", action="append", default=[],
                   help="resolver for non-cluster names (repeatable; default: /etc/resolv.conf)")
    p.add_argument("--flows", choices=("on", "off"), default="on",
                   help="record connections (conntrack events, with their NAT) and denied packets, named by "
                        "the server, for `tether flows` (off: denied packets stay on the local flows socket only)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="also serve Prometheus metrics over HTTP on this TCP address (e.g. 0.0.0.0:9402); "
                        "without it they are only on the flows socket next to the CNI socket")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if logging.getLogger().level > logging.DEBUG:  # httpx logs every request at INFO: one per CNI ADD/DEL
        logging.getLogger("httpx").setLevel(logging.WARNING)
    from tether.client import server_list

    try:
        servers = server_list(a.server or [os.environ.get("TETHER_SERVER", "unix:///run/tether/server.sock")])
    except ValueError as e:
        raise SystemExit(str(e)) from None
    token, ca_file = credentials(a, servers)
    cfg = AgentConfig(server=",".join(servers), host=a.host, ca_file=ca_file, underlay_ip=a.underlay_ip,
                      underlay_dev=a.underlay_dev,
                      state_dir=a.state_dir, cni_socket=a.cni_socket, token=token,
                      reconcile_interval=a.reconcile_interval,
                      dns_ip=a.dns_ip, dns_port=a.dns_port, upstream_dns=a.upstream_dns,
                      flows=a.flows == "on", metrics_listen=a.metrics_listen,
                      labels=dict(x.split("=", 1) for x in a.label if "=" in x),
                      underlay=underlay_of(a.underlay_ip, a.underlay_dev))

    async def run() -> None:
        agent = Agent(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    # the event loop answers CNI and DNS while worker threads run netlink and nft work: hand the GIL
    # over sooner than the default 5 ms, so an answer that is ready does not wait for a worker
    sys.setswitchinterval(0.001)
    asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
