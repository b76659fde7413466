"""NetworkPolicy at scale on one host: programming time, update latency, rule count, datapath cost.

    .venv/bin/python -m bench.policy [--policies 1000] [--endpoints 2000] [--changes 40]

A host namespace with 2,000 endpoints in the model (two of them real pods plugged like Tether's,
the rest only in the model) and 1,000 policies, each selecting one app label and allowing ingress
from the next app on a port, every tenth also restricting egress. It measures, in one run:
- programming from empty: the pure calculation (`compute_nft`) and the atomic `nft -j -f` apply;
- p50/p99 of one policy change (a port edit: a structure change, one chain flushed and refilled in
  an atomic batch) and of one label change (an element update), each calculation + apply, with the
  p50 of each part and how many applies replaced the whole table (`table_replaced`, should be 0);
- nft rule counts for (policies, endpoints) pairs, to show they add rather than multiply;
- the datapath with that ruleset vs none: bulk throughput, request/response latency (1-byte round
  trips on one connection) and connect latency (a new connection per request, which walks the
  policy chains), client pod -> server pod, both selected by policies (so tracked). "None" is
  Tether's table for the same 2,000 endpoints with no policy at all, in a cluster with one service
  (every Kubernetes cluster has `kubernetes` and `kube-dns`): what the 1,000 policies cost
  (`ruleset_vs_no_policies`, the judged target; both sides hold the service, so both have
  conntrack and the nat chains and the ratio is the policies' cost alone). Without any service,
  policy or masquerading network Tether's table leaves conntrack out altogether (`needs_state`),
  so the same pair without the service (`ruleset_vs_no_policies_stateless`, reported) also
  measures registering conntrack, which any stateful firewall pays (conntrack alone below). Two
  identical host namespaces (A and B, each with
  its two pods) are measured as a crossover: phase 1 has the ruleset on A and the other setup on
  B, phase 2 the other way round. Streams and round trips run interleaved in one process
  (bench.paired: each round compares the two within about a second), connects alternate per
  round. Each ratio is the geometric mean of the phases' medians of per-round ratios, with a 90%
  bootstrap interval; the target is judged on the intervals: throughput >= 0.95 and
  request/response latency <= 1.05. Clients on CPU 0, servers on CPU 1; the bench waits for a
  quiet machine before each measurement (`quiet`).
- for reference, the same measurement of the ruleset (without the service) vs no table at all
  (`ruleset_vs_no_table`: all of Tether's table, anti-spoofing and conntrack included;
  `--no-table-reference` skips it) and of conntrack alone (a table
  with one forward chain that accepts established traffic) vs no table: the floor that any
  stateful firewall pays here (`conntrack_only_vs_no_table`; `--no-conntrack-reference` skips it).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from bench import paired
from bench.dataplane import _plug_pod
from bench.dns import wait_quiet
from bench.paired import CLIENT_CPU, SERVER_CPU, crossover, interleaved_rr, interleaved_streams, start_sink_and_echo
from tether.calc.host import HostContext
from tether.calc.planner import Planner
from tether.calc.replica import Replica
from tether.dataplane.nft import NftDataplane, delete_table
from tether.lab.cluster import nsx, sh, stop_pid, wait_for
from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy, Service, ServiceBackend, ServicePort, Subnet

CTX = HostContext("b", "eth0", 1500)
PLANNER = Planner()  # one agent's calculation: what a plan leaves, the next reuses
CRR_PORT = 5203
CRR_SCRIPT = r"""
import json, socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
if mode == "server":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    while True:
        c, _ = s.accept()
        c.recv(1)
        c.sendall(b"x")
        c.close()
else:
    ip, n = sys.argv[3], int(sys.argv[4])
    out = []
    for i in range(n):
        t = time.perf_counter_ns()
        c = socket.create_connection((ip, port), 5)
        c.sendall(b"x")
        c.recv(1)
        c.close()
        out.append(time.perf_counter_ns() - t)
    out.sort()
    print(json.dumps({"n": n, "p50_us": out[n // 2] / 1000, "p99_us": out[n * 99 // 100] / 1000}))
"""


def model(n_pols: int, n_eps: int, real: dict[str, tuple[str, str, str]] | None = None,
          service: bool = False) -> Replica:
    """`real` maps endpoint id -> (interface, ip, mac) of the plugged pods; `service` adds one
    service (on endpoints the datapath pairs do not use) as every Kubernetes cluster has."""
    r = Replica()
    r.objects["Host"]["b"] = Host(name="b", underlay_ip="198.18.0.1")
    r.objects["Network"]["n"] = Network(name="n", subnets=[Subnet(cidr="10.0.0.0/8")])
    for ns in ("bench", "other"):
        r.objects["Namespace"][ns] = Namespace(name=ns, labels={"team": ns})
    for i in range(n_eps):
        iface, ip, mac = (real or {}).get(f"e{i}", (f"tthb{i:010d}", f"10.{1 + i // 65000}.{i // 250 % 260}."
                                                                     f"{i % 250 + 2}", None))
        ep = Endpoint(id=f"e{i}", name=f"e{i}", network="n", host="b", namespace="bench", ips=[ip], mac=mac,
                      interface=iface, labels={"app": f"a{i % max(n_pols, 1)}", "tier": "web"})
        r.objects["Endpoint"][ep.id] = ep
    if service:  # two backends that no measured connection touches, the same whatever the policies
        backends = [ServiceBackend(ip=r.objects["Endpoint"][f"e{i}"].ips[0], endpoint=f"e{i}") for i in (10, 11)]
        svc = Service(name="kubernetes", namespace="default", network="n", cluster_ip="10.96.0.1",
                      backends=backends, ports=[ServicePort(name="https", port=443, target_port=6443)])
        r.objects["Service"][svc.store_name()] = svc
    for j in range(n_pols):
        spec: dict = {"podSelector": {"matchLabels": {"app": f"a{j}"}}, "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": f"a{(j + 1) % n_pols}"}}},
                      {"namespaceSelector": {"matchLabels": {"team": "other"}}}],
             "ports": [{"port": 5201 + j % 3, "endPort": 5203}, {"port": 80}]}]}
        if j % 10 == 5:
            spec["policyTypes"] = ["Ingress", "Egress"]
            spec["egress"] = [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]
        pol = NetworkPolicy(id=f"p{j}", name=f"p{j}", namespace="bench", spec=spec)
        r.objects["NetworkPolicy"][pol.store_name()] = pol
    return r


def rules(plan) -> int:
    return sum(len(c.rules) for c in plan.chains)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def timed(dp: NftDataplane, rep: Replica) -> tuple[float, float, bool]:
    t0 = time.perf_counter()
    plan = PLANNER.nft(rep, CTX)
    t1 = time.perf_counter()
    report = dp.apply(plan)
    return t1 - t0, time.perf_counter() - t1, report.full


SERVER_IP, CLIENT_IP = "10.250.0.2", "10.250.0.3"
CT_TABLE = "tether_bench_ct"
SINK_PORT, ECHO_PORT = 5201, 5202  # inside the bench ports that policy p0 opens to the client


@dataclass
class Side:
    """One host namespace with the two real pods: e0 the server (app a0, which p0 opens to app a1)
    and e1 the client (app a1); `real` is what the model needs to know of them."""
    host: str
    client: str
    server: str
    real: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    procs: list = field(default_factory=list)


def build_side(name: str) -> Side:
    side = Side(name, f"{name}-c", f"{name}-s")
    sh("ip", "netns", "add", side.host)
    nsx(side.host, "ip", "link", "set", "lo", "up")
    nsx(side.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    _plug_pod(side.host, side.server, "tthbsrv", SERVER_IP, 1500)
    _plug_pod(side.host, side.client, "tthbcli", CLIENT_IP, 1500)
    # the client's TCP keeps its window across the idle gaps of the interleaved streams
    nsx(side.client, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0")
    mac = {ns: nsx(ns, "cat", "/sys/class/net/eth0/address").stdout.strip() for ns in (side.client, side.server)}
    side.real = {"e0": ("tthbsrv", SERVER_IP, mac[side.server]), "e1": ("tthbcli", CLIENT_IP, mac[side.client])}
    side.procs = start_sink_and_echo(side.server, SINK_PORT, ECHO_PORT)
    side.procs.append(subprocess.Popen(["ip", "netns", "exec", side.server, *SERVER_CPU, sys.executable, "-I", "-S",
                                        "-c", CRR_SCRIPT, "server", str(CRR_PORT)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True))
    for port in (SINK_PORT, ECHO_PORT, CRR_PORT):
        wait_for(lambda port=port: f":{port} " in nsx(side.server, "ss", "-Hltn").stdout, 10, f"port {port}")
    return side


def connect_p50(side: Side, n: int) -> float:
    r = nsx(side.client, *CLIENT_CPU, sys.executable, "-I", "-S", "-c", CRR_SCRIPT, "client", str(CRR_PORT),
            SERVER_IP, str(n), timeout=120)
    return json.loads(r.stdout)["p50_us"]


CONNTRACK_ONLY = ("add table inet {t}; add chain inet {t} forward {{ type filter hook forward priority 0; }}; "
                  "add rule inet {t} forward ct state established,related accept")


def install(side: Side, what: str, a) -> None:
    """Give `side` the bench's ruleset ("rules"), Tether's table for the same endpoints without any
    policy ("no policies"), each with one service (" + service": conntrack and nat chains in both),
    only conntrack (one forward chain accepting established traffic: what any stateful firewall
    pays), or no table at all ("no table")."""
    delete_table(side.host)
    nsx(side.host, "nft", "delete", "table", "inet", CT_TABLE, check=False)
    setup = what.removesuffix(" + service")
    if setup in ("rules", "no policies"):
        pols = a.policies if setup == "rules" else 0
        rep = model(pols, a.endpoints, side.real, service=setup != what)
        NftDataplane(side.host).apply(PLANNER.nft(rep, CTX))
    elif what == "conntrack":
        nsx(side.host, "nft", CONNTRACK_ONLY.format(t=CT_TABLE))


def measure_pair(sides: list[Side], what: str, base: str, a, busy: list[float]) -> dict:
    """`what` vs `base`, as a crossover: in phase 1 side A holds `what` and B `base`, in phase 2
    the other way round; every figure is measured on both sides in the same round (bench.paired),
    and each ratio (`what` / `base`) is the geometric mean of the phases'."""
    phases: dict[str, list[tuple[list[float], list[float]]]] = {"gbps": [], "rr_p50_us": [], "connect_p50_us": []}
    for with_it, without in ((sides[0], sides[1]), (sides[1], sides[0])):
        install(without, base, a)
        install(with_it, what, a)
        for side in sides:  # the policies really decide: e1 (app a1) -> e0 (app a0) is allowed on TCP
            nsx(side.client, sys.executable, "-c", f"import socket; socket.create_connection(('{SERVER_IP}', "
                f"{SINK_PORT}), 2)")
        pair = ((what, with_it), (base, without))
        busy.append(wait_quiet(a.quiet_busy, a.quiet_wait)["busy_before"])
        g = interleaved_streams([(label, side.client, SERVER_IP, SINK_PORT) for label, side in pair],
                                a.stream_rounds // 2, a.slice)
        busy.append(wait_quiet(a.quiet_busy, a.quiet_wait)["busy_before"])
        rr = interleaved_rr([(label, side.client, SERVER_IP, ECHO_PORT) for label, side in pair],
                            a.rr_rounds // 2, a.round_trips)
        crr: dict[str, list[float]] = {what: [], base: []}
        for r in range(a.connect_rounds // 2):
            for label, side in (pair if r % 2 == 0 else pair[::-1]):
                crr[label].append(connect_p50(side, a.connects))
        for fig, values in (("gbps", g), ("rr_p50_us", rr), ("connect_p50_us", crr)):
            phases[fig].append((values[what], values[base]))
    return {"medians": {fig: {label: round(statistics.median(v for ph in p for v in ph[i]), 3)
                              for i, label in enumerate((what, base))} for fig, p in phases.items()},
            "throughput_ratio": crossover(phases["gbps"], 0.95, math.inf),
            "rr_latency_ratio": crossover(phases["rr_p50_us"], 0, 1.05),
            "connect_latency_ratio": crossover(phases["connect_p50_us"], 0, 1.05)}


def measure_datapath(sides: list[Side], a) -> dict:
    busy: list[float] = []
    out: dict = {"method": "two identical host namespaces, crossover (one setup on A and the other on B, then "
                           "swapped); interleaved in one process: bulk streams in slices, 1-byte round trips; "
                           "connects alternated per round; ratios are first setup / second (bench.paired.crossover)"}
    out["ruleset_vs_no_policies"] = measure_pair(sides, "rules + service", "no policies + service", a, busy)
    out["ruleset_vs_no_policies_stateless"] = measure_pair(sides, "rules", "no policies", a, busy)
    if a.table_reference:
        out["ruleset_vs_no_table"] = measure_pair(sides, "rules", "no table", a, busy)
    if a.conntrack_reference:
        out["conntrack_only_vs_no_table"] = measure_pair(sides, "conntrack", "no table", a, busy)
    for side in sides:
        install(side, "no table", a)
    out["cpu_busy_before"] = busy
    out["quiet"] = all(b <= a.quiet_busy for b in busy)
    judged = out["ruleset_vs_no_policies"]
    out["target"] = ("the ruleset vs none (Tether's table for the same endpoints and one service, without "
                     "policies): throughput "
                     "loss <= 5% and request/response latency added <= 5% (90% intervals)")
    out["target_met"] = (judged["throughput_ratio"]["verdict"] == "within" and
                         judged["rr_latency_ratio"]["verdict"] == "within")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=2000)
    ap.add_argument("--changes", type=int, default=40)
    paired.add_arguments(ap, stream_rounds=300, rr_rounds=200, note=" (both phases)")
    ap.add_argument("--connect-rounds", type=int, default=40, help="connect latency rounds (both phases)")
    ap.add_argument("--connects", type=int, default=300, help="connects per round")
    ap.add_argument("--no-conntrack-reference", dest="conntrack_reference", action="store_false",
                    help="skip measuring conntrack alone (one forward chain) vs no table, the floor of any "
                         "stateful firewall")
    ap.add_argument("--no-table-reference", dest="table_reference", action="store_false",
                    help="skip measuring the ruleset vs no table at all")
    ap.add_argument("--quiet-busy", type=float, default=0.2, help="CPU share other work may use (default 0.2)")
    ap.add_argument("--quiet-wait", type=float, default=120, help="longest wait for it (s)")
    a = ap.parse_args()
    prefix = f"bp{os.getpid() % 100000}"
    sides: list[Side] = []
    out: dict = {"policies": a.policies, "endpoints": a.endpoints}
    try:
        sides = [build_side(f"{prefix}a"), build_side(f"{prefix}b")]
        host = sides[0].host
        rep = model(a.policies, a.endpoints, sides[0].real)
        dp = NftDataplane(host)
        calc_s, apply_s, _ = timed(dp, rep)
        plan = PLANNER.nft(rep, CTX)
        out["program_from_empty"] = {"calc_s": round(calc_s, 3), "apply_s": round(apply_s, 3),
                                     "rules": rules(plan), "chains": len(plan.chains), "sets": len(plan.sets),
                                     "set_elements": sum(len(s.elements) for s in plan.sets)}

        pol_times, full, pol_parts = [], [], []
        for k in range(a.changes):
            pol = rep.objects["NetworkPolicy"][f"bench/p{7 + k % 5}"]
            spec = json.loads(json.dumps(pol.spec))
            spec["ingress"][0]["ports"][1]["port"] = 8080 + k  # every change is a real one
            rep.objects["NetworkPolicy"][pol.store_name()] = pol.model_copy(update={"spec": spec})
            c, ap_s, f = timed(dp, rep)
            pol_times.append(c + ap_s)
            pol_parts.append((c, ap_s))
            full.append(f)
        label_times, lfull, label_parts = [], [], []
        for k in range(a.changes):
            key = f"e{100 + k}"
            ep = rep.objects["Endpoint"][key]
            rep.objects["Endpoint"][key] = ep.model_copy(update={"labels": {**ep.labels, "app": f"a{(k * 7) % 50}"}})
            c, ap_s, f = timed(dp, rep)
            label_times.append(c + ap_s)
            label_parts.append((c, ap_s))
            lfull.append(f)
        out["policy_change_s"] = {"p50": round(pct(pol_times, 0.5), 4), "p99": round(pct(pol_times, 0.99), 4),
                                  "calc_p50": round(pct([x[0] for x in pol_parts], 0.5), 4),
                                  "apply_p50": round(pct([x[1] for x in pol_parts], 0.5), 4),
                                  "table_replaced": sum(full)}
        out["label_change_s"] = {"p50": round(pct(label_times, 0.5), 4), "p99": round(pct(label_times, 0.99), 4),
                                 "calc_p50": round(pct([x[0] for x in label_parts], 0.5), 4),
                                 "apply_p50": round(pct([x[1] for x in label_parts], 0.5), 4),
                                 "table_replaced": sum(lfull)}
        counts = {f"{p}x{e}": rules(PLANNER.nft(model(p, e), CTX)) for p, e in
                  ((100, 200), (a.policies, 200), (100, a.endpoints), (a.policies, a.endpoints))}
        added = (counts[f"{a.policies}x200"] + counts[f"100x{a.endpoints}"] - counts["100x200"])
        out["rule_count"] = {**counts, "additive_prediction": added,
                             "product_would_be": a.policies * a.endpoints}

        out["datapath"] = measure_datapath(sides, a)
    finally:
        for side in sides:
            for proc in side.procs:
                stop_pid(proc.pid)
        for side in sides:
            for ns in (side.client, side.server, side.host):
                sh("ip", "netns", "del", ns, check=False)
    out["host"] = socket.gethostname()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
