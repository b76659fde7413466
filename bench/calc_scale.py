"""Agent CPU per change, in-process, at two cluster sizes (issue 29): does it grow with the cluster?

    .venv/bin/python -m bench.calc_scale [--repeat 5] [--sizes small,big]

Synthetic replicas (no kernel, no server): `small` is 1,000 endpoints / 10 hosts / 100 policies / 50
services, `big` 10,000 / 100 / 1,000 / 500 (policies with pod and namespace selectors and ports,
services selecting one app of a namespace each, as in the scale lab: at the big size the services'
maps hold an entry for every endpoint). One agent (host h0) runs, for one change of each
kind, everything its apply path does per change (agent/main.py): the replica's `view()` copy, the
plan (`Planner.plan`), `rejudge_scope`, the nft dataplane's difference (`NftDataplane.apply` with
the nft call stubbed out: the batch it would send is built), the links difference (`apply_links`'s
tracker comparisons), the DNS extra's `prepare` and its install (the records' delta worked out,
encoded for the DNS worker and applied to the agent's records; no worker runs) and the disk copy of
the replica (`_save_replica`, agent/replica_file.py): `save_replica` is the change's watch event
recorded and appended to the log (a real file in a temporary directory) plus its amortised share of
the compaction, the base's full write (`compaction_ms`, measured once per size and also reported on
its own) times the event's bytes over the base's (the log is folded into the base once it outgrows
it, so each logged byte pays that share of one full write). Each change is measured `--repeat` times
on its own (applied, timed, undone) after a warm-up apply, so the planner's memos and the
dataplane's memory are those of a running agent. Times are the thread's CPU time. Prints one JSON
object: CPU ms per part and per change kind at each size, and the ratio big/small of the total per
change kind (issue 29's target: <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from tether.agent.dns import DnsServer
from tether.agent.replica_file import DiskCopy
from tether.calc.host import HostContext, rejudge_scope
from tether.calc.planner import Planner
from tether.calc.replica import Replica
from tether.dataplane import nft as nft_dp
from tether.dataplane.links import Applied
from tether.dataplane.tracker import DeltaTracker
from tether.model import (
    Block,
    Endpoint,
    Host,
    Namespace,
    Network,
    NetworkPolicy,
    Service,
    ServicePort,
    Subnet,
    key_of,
)

SIZES = {"small": (1_000, 10, 100, 50), "big": (10_000, 100, 1_000, 500)}  # endpoints, hosts, policies, services
NAMESPACES = 10
APPS = 50  # distinct app labels per namespace
ME = "h0"
CTX = HostContext(ME, "eth0", 1500)


def host(i: int) -> Host:
    return Host(name=f"h{i}", underlay_ip=f"198.18.{i // 250}.{i % 250 + 1}", underlay_cidr="198.18.0.0/16",
                vtep_ip=f"169.254.{i // 250}.{i % 250 + 1}", vtep_mac=f"0e:00:00:00:{i // 256:02x}:{i % 256:02x}")


def block(i: int) -> Block:
    """Host i's block: 10.(i // 256).(i % 256).0/24."""
    cidr = f"10.{i // 256}.{i % 256}.0/24"
    return Block(name=f"pods:{cidr.replace('/', '_')}", network="pods", cidr=cidr, host=f"h{i}")


def endpoint_ip(h: int, slot: int) -> str:
    return f"10.{h // 256}.{h % 256}.{slot + 1}"


def endpoint(i: int, h: int, slot: int) -> Endpoint:
    ns = i % NAMESPACES
    local = h == 0
    return Endpoint(id=f"e{i}", name=f"e{i}", network="pods", host=f"h{h}", namespace=f"ns{ns}",
                    ips=[endpoint_ip(h, slot)], labels={"app": f"a{i // NAMESPACES % APPS}", "tier": f"t{i % 3}"},
                    interface=f"tth{i:011x}" if local else None, mac=f"0a:58:00:{i >> 16 & 255:02x}:"
                    f"{i >> 8 & 255:02x}:{i & 255:02x}" if local else None, owner={"type": "cni"})


def policy(j: int, port: int = 0) -> NetworkPolicy:
    ns = j % NAMESPACES
    app = j // NAMESPACES % APPS
    peers: list[dict] = [{"podSelector": {"matchLabels": {"app": f"a{(app + 1) % APPS}"}}}]
    if j % 4 == 0:
        peers.append({"namespaceSelector": {"matchLabels": {"team": f"t{(ns + 1) % 3}"}},
                      "podSelector": {"matchLabels": {"tier": "t1"}}})
    spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": f"a{app}", "tier": f"t{j % 3}"}},
                            "ingress": [{"from": peers, "ports": [{"port": 8000 + j % 50 + port, "protocol": "TCP"}]}]}
    if j % 10 == 5:
        spec["policyTypes"] = ["Ingress", "Egress"]
        spec["egress"] = [{"to": [{"namespaceSelector": {}}], "ports": [{"port": 53, "protocol": "UDP"}]}]
    return NetworkPolicy(id=f"p{j}", name=f"p{j}", namespace=f"ns{ns}", spec=spec)


def service(k: int, extra: int = 0) -> Service:
    """Service k selects one app of one namespace, as the scale lab's do (tether.lab.scale): at the
    big size every endpoint is a backend of one of them (20 each), so the services' maps hold an
    entry per endpoint of the cluster. `extra` changes its target port."""
    return Service(name=f"s{k}", namespace=f"ns{k % NAMESPACES}", network="pods",
                   cluster_ip=f"10.250.{k // 250}.{k % 250 + 1}", selector={"app": f"a{k // NAMESPACES % APPS}"},
                   ports=[ServicePort(name="http", port=80, target_port=8080 + extra)])


def replica(n_eps: int, n_hosts: int, n_pols: int, n_svcs: int) -> Replica:
    r = Replica()
    o = r.objects
    o["Network"]["pods"] = Network(name="pods", subnets=[Subnet(cidr="10.0.0.0/8")], block_size=24)
    for ns in range(NAMESPACES):
        o["Namespace"][f"ns{ns}"] = Namespace(name=f"ns{ns}", labels={"team": f"t{ns % 3}"})
    for i in range(n_hosts):
        o["Host"][f"h{i}"] = host(i)
        b = block(i)
        o["Block"][b.store_name()] = b
    for i in range(n_eps):
        h, slot = i % n_hosts, i // n_hosts
        ep = endpoint(i, h, slot)
        o["Endpoint"][ep.id] = ep
    for j in range(n_pols):
        p = policy(j)
        o["NetworkPolicy"][p.store_name()] = p
    for k in range(n_svcs):
        s = service(k)
        o["Service"][s.store_name()] = s
    r.revision = r.acted = 1
    r.synced = True
    return r


# --- the agent's per-apply work, without the kernel --------------------------------------------------

class Agent:
    """What agent/main.py keeps between applies, with the kernel calls left out."""

    def __init__(self, rep: Replica, state_dir: str, events: list[dict]) -> None:
        self.replica = rep
        self.disk = DiskCopy(os.path.join(state_dir, "replica.json"))
        self.events = events  # the watch events of the changes made since the last apply
        self.compaction_ms = 0.0  # the base's full write, measured by `compaction`
        self.planner = Planner()
        self.nft = nft_dp.NftDataplane()
        self.applied = Applied()
        self.judged: frozenset[str] = frozenset()
        self.dns = DnsServer("127.0.0.1", 0, [])  # never started: no socket, no worker
        self.sent: list[dict] = []

    def apply(self) -> dict[str, float]:
        t: dict[str, float] = {}

        def part(name: str, fn: Callable[[], Any]) -> Any:
            t0 = time.thread_time()  # CPU time: what issue 29 judges, and steady on a busy machine
            out = fn()
            t[name] = t.get(name, 0.0) + (time.thread_time() - t0) * 1000
            return out

        view = part("view", self.replica.view)
        plan = part("plan", lambda: self.planner.plan(view, CTX))
        scope = part("rejudge_scope", lambda: rejudge_scope(view, ME, plan.nft, self.planner.local_endpoints(view)))
        self.judged = scope
        part("links", lambda: self._links(plan))
        part("nft", lambda: self.nft.apply(plan.nft))
        part("dns_prepare", lambda: self._dns(view))
        t["save_replica"] = t.get("save_replica", 0.0) + part("save_replica", self._save)
        t["total"] = sum(t.values())
        return t

    def compaction(self) -> tuple[float, int]:
        """One full write of the base (what a compaction costs): CPU ms, and the base's bytes."""
        t0 = time.thread_time()
        self.disk.save_full(self.replica)
        self.compaction_ms = (time.thread_time() - t0) * 1000
        return self.compaction_ms, os.path.getsize(self.disk.path)

    def _save(self) -> float:
        """Record the events and append them (at most once a second in the agent: here, per change);
        returns their share of the next compaction, in ms (their bytes over the base's)."""
        for ev in self.events:
            self.disk.record(ev)
        self.events.clear()
        logged = self.disk.pending_bytes
        self.disk.save(self.replica)
        return self.compaction_ms * logged / max(os.path.getsize(self.disk.path), 1)

    def _links(self, plan: Any) -> None:
        """apply_links's work when the kernel takes every write: copy, compare, record."""
        st = self.applied.copy()
        for tracker, desired in ((st.interfaces, {i.name: (i.mtu, i.endpoint_id) for i in plan.interfaces}),
                                 (st.neighbours, {n.ip: (n.lladdr, 128) for n in plan.neighbours})):
            writes, deletes = tracker.pending(desired)
            for k, v in writes:
                tracker.wrote(k, v)
            for k in deletes:
                tracker.deleted(k)
        for tracker2, keys in ((st.fdb, {(f.lladdr, f.dst) for f in plan.fdb}), (st.routes, plan.routes)):
            tr: DeltaTracker = tracker2
            writes2, deletes2 = tr.pending_keys(keys)
            for k in writes2:
                tr.wrote(k)
            for k in deletes2:
                tr.deleted(k)
        self.applied = st

    def _dns(self, view: Replica) -> None:
        install = self.dns.prepare(view)
        if install is not None:
            install()


def changes(n_eps: int, n_hosts: int, events: list[dict]) -> dict[str, Callable[[Replica], Callable[[], None]]]:
    """Change kind -> a function that makes the change in the replica and returns its undo; each
    adds the watch event that brings it to `events` (as the agent's watch parses it)."""

    def event(rep: Replica, kind: str, name: str, obj: Any | None) -> None:
        ev = {"type": "put" if obj is not None else "delete", "kind": kind, "key": key_of(kind, name),
              "revision": rep.revision}
        if obj is not None:
            ev["object"] = obj.model_dump(mode="json")
        events.append(ev)

    def put(rep: Replica, kind: str, name: str, obj: Any) -> Callable[[], None]:
        old = rep.objects[kind].get(name)
        rep.objects[kind][name] = obj
        rep.revision += 1
        event(rep, kind, name, obj)

        def undo() -> None:
            if old is None:
                rep.objects[kind].pop(name, None)
            else:
                rep.objects[kind][name] = old
            rep.revision += 1
            event(rep, kind, name, old)
        return undo

    slot = n_eps // n_hosts + 1  # a free address in the host's block

    def remote_ep(rep: Replica) -> Callable[[], None]:
        ep = endpoint(n_eps + 1, 1, slot)
        return put(rep, "Endpoint", ep.id, ep)

    def local_ep(rep: Replica) -> Callable[[], None]:
        ep = endpoint(n_eps + 2, 0, slot)
        return put(rep, "Endpoint", ep.id, ep)

    def policy_change(rep: Replica) -> Callable[[], None]:
        p = policy(3, port=1)
        return put(rep, "NetworkPolicy", p.store_name(), p)

    def service_change(rep: Replica) -> Callable[[], None]:
        s = service(3, extra=1)
        return put(rep, "Service", s.store_name(), s)

    def host_added(rep: Replica) -> Callable[[], None]:
        h = host(n_hosts)
        b = block(n_hosts)
        undo_h = put(rep, "Host", h.name, h)
        undo_b = put(rep, "Block", b.store_name(), b)

        def undo() -> None:
            undo_b()
            undo_h()
        return undo

    return {"endpoint_remote": remote_ep, "endpoint_local": local_ep, "policy": policy_change,
            "service": service_change, "host": host_added}


def measure(size: str, repeat: int) -> dict[str, Any]:
    n_eps, n_hosts, n_pols, n_svcs = SIZES[size]
    t0 = time.perf_counter()
    rep = replica(n_eps, n_hosts, n_pols, n_svcs)
    events: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="calc_scale.") as state_dir:
        agent = Agent(rep, state_dir, events)
        cold = agent.apply()  # its save writes the base whole (nothing on disk yet)
        agent.apply()  # warm
        compaction_ms, base_bytes = agent.compaction()
        out: dict[str, Any] = {"build_s": round(time.perf_counter() - t0, 1), "cold_ms": round(cold["total"], 1),
                               "compaction_ms": round(compaction_ms, 1), "base_kb": base_bytes // 1024}
        out.update(_changes(agent, rep, n_eps, n_hosts, events, repeat))
    return out


def _changes(agent: Agent, rep: Replica, n_eps: int, n_hosts: int, events: list[dict],
             repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, make in changes(n_eps, n_hosts, events).items():
        runs = []
        for _ in range(repeat):
            undo = make(rep)
            runs.append(agent.apply())
            undo()
            agent.apply()
        parts = {p: round(statistics.median(r[p] for r in runs), 2) for p in runs[0]}
        out[kind] = parts
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--sizes", default="small,big")
    a = p.parse_args()
    nft_dp.run_nft = lambda commands, netns=None: None  # no kernel: the batch is built, not sent
    nft_dp.run_elements = lambda sock, batch: None  # the same for element-only batches (encoded, not sent)
    nft_dp.list_table = lambda netns=None, terse=False: None
    nft_dp.read_generation = lambda sock: None  # nor the namespace's generation read
    result: dict[str, Any] = {}
    for size in a.sizes.split(","):
        result[size] = measure(size, a.repeat)
    if "small" in result and "big" in result:
        result["ratio_big_small"] = {k: round(result["big"][k]["total"] / max(result["small"][k]["total"], 1e-3), 2)
                                     for k in result["small"] if isinstance(result["small"][k], dict)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
