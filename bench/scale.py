"""Scale: a small and a big cluster measured in one run, the big one's figures against the small one's.

    .venv/bin/python -m bench.scale                       # 10 h/1,000 ep/100 np/50 svc vs 100 h/10,000/1,000/500
    .venv/bin/python -m bench.scale --small 5,300,30,15 --large 10,1000,100,50   # development sizes
    .venv/bin/python -m bench.scale --hosts 5 --endpoints 300 --hosts 10 --endpoints 1000

Each size is its own lab (`tether lab up --lean`, real agents in their own namespaces), populated by
`tether.lab.scale` through the REST API (endpoints without kernel interfaces; see that module), plus
real pods carrying probes: a `probe` pod on each of up to 10 sampled hosts and a `prober` pod on h1
(host A). Then, per size:
- new pod: CNI ADD on h1 returns -> first ICMP echo reply seen by each sampled host's probe pod
  (tether.lab.icmp_watch, raw ICMP every 2 ms, CLOCK_MONOTONIC shared with this process);
- policy: a new NetworkPolicy selecting the probe pods is created (deny all ingress) -> the last reply
  the prober on h1 gets from each; then changed to admit the prober -> the first reply from each
  (the sampled hosts' agents enforce it), then changed to select no pod; each change made once every
  host applied the one before; p50/p99 over both directions;
- cost per change: `--changes` changes (an endpoint added, a policy edited, a service edited, in
  turn), each waited for until every host reports it applied (GET /hosts, status.applied_revision);
  CPU (utime+stime, children included: nft) of every agent and of the server from /proc/<pid>/stat
  over the phase, less what they spend with no change (measured for IDLE_S just before: heartbeats,
  status reports), divided by the changes (`..._raw`: without that subtraction); the bytes a
  watcher of /api/v1/watch received meanwhile (one agent's share of the fan-out) per change;
- RSS: every agent's (max, median) and the server's, after the changes;
- restart: the agent of one sampled host killed (SIGKILL) and started again while a TCP stream
  (tests/lab/tcp_stream.py) from the prober on h1 to that host's probe pod runs; time from the
  start to CNI STATUS ready and its own applied revision (the flows socket's metrics) at or past the
  store's; the stream must never break.
Targets (issue 29), evaluated on the big size against the small one in `targets`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

from bench.procstat import cpu_s, rss_mb
from tether.client import ApiError
from tether.lab.cluster import Lab, wait_for
from tether.lab.scale import LARGE, NETWORK, SMALL, Size, objects, populate
from tether.model import Endpoint, NetworkPolicy, Service, ServicePort

HERE = os.path.dirname(os.path.abspath(__file__))
WATCH = os.path.join(os.path.dirname(HERE), "src", "tether", "lab", "icmp_watch.py")
STREAM = os.path.join(os.path.dirname(HERE), "tests", "lab", "tcp_stream.py")
SAMPLED = 10
PROBE_S = 60  # how long a probe waits for a reply (or for silence) before counting it missing
IDLE_S = 10.0  # seconds of no change measured before the changes, subtracted from their CPU (a reconcile pass
# comes every ~30 s per agent: over 3 s the idle rate of 100 agents caught too few of them to be steady)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(len(s) * q))] * 1000, 1)


def sampled_hosts(lab: Lab, n: int = SAMPLED) -> list[str]:
    """Up to n hosts other than h1, spread evenly over the lab (both underlay subnets)."""
    others = [h.name for h in lab.state.hosts[1:]]
    if len(others) <= n:
        return others
    return [others[round(k * (len(others) - 1) / (n - 1))] for k in range(n)]


def applied(lab: Lab) -> dict[str, int]:
    c = lab.client()
    try:
        return {h["name"]: (h.get("status") or {}).get("applied_revision", 0) for h in c.list_raw("Host")}
    finally:
        c.close()


def settle(lab: Lab, revision: int, timeout: float = 900) -> float:
    """Seconds until every host reports `revision` applied. Asked every 0.1 s at first, then less
    often (a tenth of the time waited so far, at most 1 s): the asking costs the server CPU that the
    per-change figures include, and a change can take minutes at the big size."""
    t0 = time.monotonic()
    while min(applied(lab).values(), default=0) < revision:
        waited = time.monotonic() - t0
        if waited > timeout:
            raise TimeoutError(f"not every host applied revision {revision} within {timeout} s: {applied(lab)}")
        time.sleep(min(1.0, 0.1 + waited / 10))
    return time.monotonic() - t0


def store_revision(lab: Lab) -> int:
    """The store's revision now: the one a write of a scratch object gets."""
    c = lab.client()
    try:
        ns = c.apply(NetworkPolicy(name="bench-mark", namespace="default",
                                   spec={"podSelector": {"matchLabels": {"bench": "none"}}}))
        return ns.revision
    finally:
        c.close()


class Watcher:
    """Counts the bytes of /api/v1/watch, as one agent receives them."""

    def __init__(self, lab: Lab, after: int) -> None:
        self.bytes = 0
        self.events = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(lab.server_url, lab.token, after), daemon=True)
        self._t.start()

    def _run(self, url: str, token: str, after: int) -> None:
        try:
            with httpx.stream("GET", url + "/api/v1/watch", params={"after_revision": after},
                              headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(10, read=None)) as r:
                for chunk in r.iter_bytes():
                    self.bytes += len(chunk)
                    self.events += chunk.count(b"\n")
                    if self._stop.is_set():
                        return
        except httpx.HTTPError:
            pass

    def stop(self) -> None:
        self._stop.set()


def start_watch(ns: str) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-I", "-S", WATCH], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout and p.stdout.readline().strip() == "ready"
    return p


def ask(p: subprocess.Popen, cmd: str) -> dict[str, float | None]:
    assert p.stdin and p.stdout
    p.stdin.write(cmd + "\n")
    p.stdin.flush()
    return {k: (None if v == "None" else float(v)) for k, v in (kv.split("=") for kv in p.stdout.readline().split())}


def new_pod(lab: Lab, probes: dict[str, Any], trials: int) -> dict:
    watchers = {h: start_watch(p.ns) for h, p in probes.items()}
    lat, lost = [], 0
    try:
        for i in range(trials):
            pod = lab.run_pod("h1", f"new{i}", NETWORK, labels={"role": "new"})
            returned = time.monotonic()
            for p in watchers.values():  # all at once: each prober starts pinging as soon as it reads
                assert p.stdin
                p.stdin.write(f"up {pod.ip} {PROBE_S}\n")
                p.stdin.flush()
            for p in watchers.values():
                assert p.stdout
                t = p.stdout.readline().split("=")[1].strip()
                if t == "None":
                    lost += 1
                else:
                    lat.append(max(0.0, float(t) - returned))
    finally:
        for p in watchers.values():
            p.stdin.close()  # type: ignore[union-attr]
            p.wait(10)
    return {"samples": len(lat), "never_reachable": lost, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
            "max_ms": pct(lat, 1.0)}


GUARD = "probe-guard"


def policy(lab: Lab, prober: Any, probes: dict[str, Any], trials: int) -> dict:
    """Each trial: a new policy denying the probe pods' ingress (created), then changed to admit
    the prober, then changed to select no pod; each change is made on a settled cluster (every
    host applied the last one), so what is measured is that change alone, not the tail of the
    one before on the other hosts (a deny created while 90 agents were still applying the last
    trial's reset waited behind them)."""
    ips = ",".join(p.ip for p in probes.values())
    w = start_watch(prober.ns)
    c = lab.client()
    lat_deny: list[float] = []
    lat_allow: list[float] = []
    unenforced = 0
    names = [f"{GUARD}-{i}" for i in range(trials)]
    try:
        before = ask(w, f"up {ips} {PROBE_S}")
        if any(v is None for v in before.values()):
            raise RuntimeError(f"probe pods unreachable from h1 before the policy: {before}")
        for name in names:
            deny = {"podSelector": {"matchLabels": {"role": "probe"}}, "policyTypes": ["Ingress"]}
            t0 = time.monotonic()
            rev = c.apply(NetworkPolicy(name=name, namespace="default", spec=deny)).revision
            for t in ask(w, f"down {ips} {PROBE_S} 1.0").values():
                lat_deny.append(max(0.0, (t or t0) - t0))
            if max(lat_deny[-len(probes):]) >= PROBE_S - 1:
                unenforced += 1
            settle(lab, rev)
            allow = {**deny, "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "prober"}}}]}]}
            t0 = time.monotonic()
            rev = c.apply(NetworkPolicy(name=name, namespace="default", spec=allow)).revision
            for t in ask(w, f"up {ips} {PROBE_S}").values():
                if t is None:
                    unenforced += 1
                else:
                    lat_allow.append(max(0.0, t - t0))
            settle(lab, rev)
            none = {"podSelector": {"matchLabels": {"role": "no-such-pod"}}, "policyTypes": ["Ingress"]}
            settle(lab, c.apply(NetworkPolicy(name=name, namespace="default", spec=none)).revision)
            ask(w, f"up {ips} {PROBE_S}")
    finally:
        for name in names:
            with contextlib.suppress(ApiError):
                c.delete("NetworkPolicy", f"default/{name}")
        c.close()
        w.stdin.close()  # type: ignore[union-attr]
        w.wait(10)
    both = lat_deny + lat_allow
    return {"samples": len(both), "not_enforced": unenforced, "p50_ms": pct(both, 0.5), "p99_ms": pct(both, 0.99),
            "deny_p99_ms": pct(lat_deny, 0.99), "allow_p99_ms": pct(lat_allow, 0.99), "max_ms": pct(both, 1.0)}


def changes(lab: Lab, size: Size, n: int) -> dict:
    """n changes, each applied everywhere before the next; CPU, watch bytes per change."""
    from tether.lab.scale import objects as population

    rng = random.Random(29)
    pop = population(Size(size.hosts, 0, max(1, size.policies), max(1, size.services)),
                     [h.name for h in lab.state.hosts])
    c = lab.client()
    agents = [h.agent_pid for h in lab.state.hosts]
    rev0 = store_revision(lab)
    settle(lab, rev0)
    watcher = Watcher(lab, rev0)
    time.sleep(0.5)
    # what agents and server spend with no change (heartbeats, status, the periodic reconcile), to subtract
    idle0, idle_srv0, it0 = sum(cpu_s(p) for p in agents), cpu_s(lab.state.server_pid), time.monotonic()
    time.sleep(IDLE_S)
    idle_rate = (sum(cpu_s(p) for p in agents) - idle0) / (time.monotonic() - it0) / len(agents)
    idle_srv_rate = (cpu_s(lab.state.server_pid) - idle_srv0) / (time.monotonic() - it0)
    cpu0 = [cpu_s(p) for p in agents]
    srv0 = cpu_s(lab.state.server_pid)
    watched0 = watcher.bytes, watcher.events  # what came during the idle measurement is not counted
    t0 = time.monotonic()
    waits = []
    by_kind: dict[str, list[float]] = {"endpoint_added": [], "policy_edited": [], "service_edited": []}
    try:
        for i in range(n):
            kind = i % 3
            before = sum(cpu_s(p) for p in agents)
            if kind == 0:
                host = rng.choice(lab.state.hosts).name
                rev = c.create_endpoint(Endpoint(name=f"chg{i}", network=NETWORK, host=host, namespace="scale-0",
                                                 labels={"app": "a1", "gen": "change"})).revision
            elif kind == 1:
                p = pop.policies[rng.randrange(len(pop.policies))]
                spec = json.loads(json.dumps(p.spec))
                spec["ingress"][0]["ports"][0]["port"] = 8000 + i
                rev = c.apply(NetworkPolicy(name=p.name, namespace=p.namespace, spec=spec)).revision
            else:
                s = pop.services[rng.randrange(len(pop.services))]
                rev = c.apply(Service(name=s.name, namespace=s.namespace, network=NETWORK, selector=s.selector,
                                      ports=[ServicePort(name="http", port=80, target_port=8000 + i)])).revision
            waits.append(settle(lab, rev))
            by_kind[list(by_kind)[kind]].append((sum(cpu_s(p) for p in agents) - before) / len(agents))
    finally:
        c.close()
    wall = time.monotonic() - t0
    time.sleep(0.3)
    watcher.stop()
    per_agent = [(cpu_s(p) - c0) / n for p, c0 in zip(agents, cpu0, strict=True)]
    srv = (cpu_s(lab.state.server_pid) - srv0) / n
    return {"changes": n, "agent_cpu_ms_per_change": round(max(0.0, statistics.mean(per_agent) - idle_rate * wall / n)
                                                            * 1000, 2),
            "agent_cpu_ms_per_change_raw": round(statistics.mean(per_agent) * 1000, 2),
            "agent_cpu_ms_per_change_max": round(max(per_agent) * 1000, 2),
            "agent_idle_cpu_ms_per_s": round(idle_rate * 1000, 2),
            # where the agents' CPU goes, by kind of change (mean per agent, idle included)
            "agent_cpu_ms_by_kind": {k: round(statistics.mean(v) * 1000, 1) if v else None for k, v in by_kind.items()},
            "server_cpu_ms_per_change": round(max(0.0, srv - idle_srv_rate * wall / n) * 1000, 2),
            "server_cpu_ms_per_change_raw": round(srv * 1000, 2),
            "watch_bytes_per_change": round((watcher.bytes - watched0[0]) / n),
            "watch_events_per_change": round((watcher.events - watched0[1]) / n, 1),
            "applied_everywhere_p50_ms": pct(waits, 0.5), "wall_s": round(wall, 1)}


def agent_applied_revision(lab: Lab, host: str) -> int:
    sock = os.path.join(os.path.dirname(lab.cni_socket(host)), "flows.sock")
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=2) as h:
        for line in h.get("http://agent/metrics").text.splitlines():
            if line.startswith("tether_agent_applied_revision"):
                return int(float(line.split()[-1]))
    return 0


def restart(lab: Lab, prober: Any, host: str, probe: Any, stream_s: float) -> dict:
    srv = subprocess.Popen(["ip", "netns", "exec", probe.ns, sys.executable, STREAM, "serve", "5001"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stream = None
    try:
        wait_for(lambda: ":5001" in lab.exec(f"{host}/probe", "ss", "-Hltn").stdout, 10, "the stream server")
        stream = subprocess.Popen(["ip", "netns", "exec", prober.ns, sys.executable, STREAM, "send", probe.ip,
                                   "5001", str(stream_s)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        revision = store_revision(lab)
        lab.kill_agent(host, signal.SIGKILL)
        time.sleep(0.5)
        t0 = time.monotonic()
        lab.start_agent(host, wait=False)
        ready = None

        def programmed() -> bool:
            nonlocal ready
            if ready is None and lab.agent_status(host) == 0:
                ready = time.monotonic() - t0
            return ready is not None and agent_applied_revision(lab, host) >= revision

        wait_for(programmed, 900, f"the restarted agent on {host} to program revision {revision}")
        took = time.monotonic() - t0
        out, _ = stream.communicate(timeout=stream_s + 60)  # the stream runs its whole stream_s
    finally:
        for p in (stream, srv):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    return {"host": host, "cni_ready_s": round(ready or 0, 2), "programmed_s": round(took, 2),
            "stream_unbroken": stream.returncode == 0, "stream": out.strip()[-200:],
            # the stream started 1.5 s before the agent did: did it run until the agent was programmed?
            "stream_covered_restart": took + 1.5 < stream_s}


def run_size(size: Size, trials: int, n_changes: int, say, quiet_populate: bool = False,
             stream_s: float = 20) -> dict:
    lab = Lab(f"sc{os.urandom(2).hex()}")
    out: dict[str, Any] = {"size": size.__dict__}
    try:
        t0 = time.monotonic()
        lab.up(hosts=size.hosts, lean=True, progress=lambda m: say(f"[{size.label()}] {m}"),
               server_args=["--dead-host-grace", "7200"] if quiet_populate else None)  # outlive stopped agents
        out["lab_up_s"] = round(time.monotonic() - t0, 1)
        out["agent_rss_mb_empty"] = max(rss_mb(h.agent_pid) for h in lab.state.hosts)
        say(f"[{size.label()}] lab up in {out['lab_up_s']} s; populating")
        pop = objects(size, [h.name for h in lab.state.hosts])
        t0 = time.monotonic()
        if quiet_populate:  # agents stopped while the population is written, then started on all of it
            for h in lab.state.hosts:
                lab.kill_agent(h.name, signal.SIGTERM)
        out["populate_s"] = populate(lab.server_url, lab.token, pop, progress=lambda m: say(f"[{size.label()}] {m}"))
        if quiet_populate:
            t1 = time.monotonic()
            # each starts on the whole population, while the running ones plan every host that joins
            lab.start_agents(lambda m: say(f"[{size.label()}] {m}"), 10, timeout=900)
            out["agents_start_on_population_s"] = round(time.monotonic() - t1, 1)
        out["settled_s"] = round(settle(lab, store_revision(lab), timeout=1800) + time.monotonic() - t0, 1)
        sampled = sampled_hosts(lab)
        probes = {h: lab.run_pod(h, "probe", NETWORK, labels={"role": "probe"}) for h in sampled}
        prober = lab.run_pod("h1", "prober", NETWORK, labels={"role": "prober"})
        settle(lab, store_revision(lab))
        say(f"[{size.label()}] new pod reachability")
        out["new_pod"] = new_pod(lab, probes, trials)
        say(f"[{size.label()}] policy enforcement")
        out["policy"] = policy(lab, prober, probes, max(1, trials // 2))
        say(f"[{size.label()}] cost per change")
        out["cost"] = changes(lab, size, n_changes)
        agents = sorted(rss_mb(h.agent_pid) for h in lab.state.hosts)
        out["rss_mb"] = {"agent_max": agents[-1], "agent_median": statistics.median(agents),
                         "server": rss_mb(lab.state.server_pid)}
        say(f"[{size.label()}] agent restart on {sampled[0]}")
        out["restart"] = restart(lab, prober, sampled[0], probes[sampled[0]], stream_s)
    finally:
        lab.down()
    return out


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def memory_need(small: dict, large: Size) -> float:
    """MB the large size's agents will hold: the small size's empty agent plus its RSS per endpoint."""
    empty = small["agent_rss_mb_empty"]
    per_ep = max(0.0, small["rss_mb"]["agent_median"] - empty) / max(1, small["size"]["endpoints"])
    return large.hosts * (empty + per_ep * large.endpoints)


def target(value: float | None, limit: float) -> dict:
    return {"value": value, "limit": limit, "met": value is not None and value <= limit}


def evaluate(small: dict, large: dict) -> dict:
    hosts_ratio = large["size"]["hosts"] / small["size"]["hosts"]

    def growth(key: str) -> float | None:
        a, b = small["cost"][key], large["cost"][key]
        return round(b / a, 2) if a else None

    r = large["restart"]
    restart_s = r["programmed_s"] if r["stream_unbroken"] and r["stream_covered_restart"] else None
    return {
        "new_pod_p99_ms": target(large["new_pod"]["p99_ms"] if not large["new_pod"]["never_reachable"] else None, 300),
        "policy_p99_ms": target(large["policy"]["p99_ms"] if not large["policy"]["not_enforced"] else None, 500),
        "agent_cpu_per_change_growth": target(growth("agent_cpu_ms_per_change"), 1.5),
        "server_cpu_per_change_growth": target(growth("server_cpu_ms_per_change"), round(1.5 * hosts_ratio, 2)),
        "agent_rss_mb": target(large["rss_mb"]["agent_max"], 120),
        "server_rss_mb": target(large["rss_mb"]["server"], 500),
        "restart_programmed_s_stream_unbroken": target(restart_s, 5),
    }


def size_arg(text: str) -> Size:
    parts = [int(x) for x in text.split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: give HOSTS,ENDPOINTS,POLICIES,SERVICES, e.g. 10,1000,100,50")
    return Size(*parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=size_arg, help="HOSTS,ENDPOINTS,POLICIES,SERVICES (default 10,1000,100,50)")
    ap.add_argument("--large", type=size_arg, help="HOSTS,ENDPOINTS,POLICIES,SERVICES (default 100,10000,1000,500)")
    ap.add_argument("--hosts", type=int, action="append", default=[],
                    help="with --endpoints, twice: the small then the large size (policies = endpoints/10, "
                         "services = endpoints/20)")
    ap.add_argument("--endpoints", type=int, action="append", default=[])
    ap.add_argument("--trials", type=int, default=10, help="new pods (x sampled hosts = samples); policy: half")
    ap.add_argument("--changes", type=int, default=30, help="changes for the CPU and watch-bytes figures")
    ap.add_argument("--stream-s", type=float, default=20,
                    help="seconds of the TCP stream through the restarted agent's host (must outlast the restart)")
    ap.add_argument("--force", action="store_true",
                    help="run the large size even if its agents would need more memory than the machine has")
    ap.add_argument("--quiet-populate", action="store_true",
                    help="stop the agents while the population is registered, then start them on it (in waves): "
                         "registering 10,000 endpoints while 100 agents recompute on every change takes hours "
                         "as long as the agents' per-change work is O(cluster)")
    a = ap.parse_args()
    small, large = a.small or SMALL, a.large or LARGE
    if a.hosts or a.endpoints:
        if len(a.hosts) != 2 or len(a.endpoints) != 2:
            ap.error("--hosts and --endpoints come in pairs, twice: "
                     "--hosts 5 --endpoints 300 --hosts 10 --endpoints 1000")
        small, large = (Size(h, e, e // 10, e // 20) for h, e in zip(a.hosts, a.endpoints, strict=True))
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"{time.monotonic() - t0:7.1f}s {msg}", file=sys.stderr, flush=True)

    results = {"small": run_size(small, a.trials, a.changes, say, a.quiet_populate, a.stream_s)}
    need, have = memory_need(results["small"], large), mem_available_mb()
    say(f"the large size needs ~{need:.0f} MB of agent memory by the small size's figures; {have:.0f} MB available")
    if need > 0.85 * have and not a.force:
        raise SystemExit(f"the large size {large.label()} would need ~{need:.0f} MB for its agents (extrapolated from "
                         f"the small size's RSS per endpoint) and the machine has {have:.0f} MB available: it would "
                         "run the machine out of memory. Free memory, choose a smaller --large, or --force")
    results["large"] = run_size(large, a.trials, a.changes, say, a.quiet_populate, a.stream_s)
    out = {"benchmark": "scale", "method": "two labs in one run (small then large); real agents (--lean), "
                                           "endpoints registered through the API, real probe pods; see the "
                                           "module docstring", **results,
           "targets": evaluate(results["small"], results["large"]), "took_s": round(time.monotonic() - t0)}
    out["targets_met"] = all(t["met"] for t in out["targets"].values())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
