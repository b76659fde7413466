"""NetworkPolicy at scale on one host: programming time, update latency, rule count, datapath cost.

    .venv/bin/python -m bench.policy [--policies 1000] [--endpoints 2000] [--changes 40] [--rounds 3]

One host namespace with 2,000 endpoints in the model (two of them real pods plugged like Tether's,
the rest only in the model) and 1,000 policies, each selecting one app label and allowing ingress
from the next app on a port, every tenth also restricting egress. It measures, in one run:
- programming from empty: the pure calculation (`compute_nft`) and the atomic `nft -j -f` apply;
- p50/p99 of one policy change (a port edit: a structure change, one chain flushed and refilled in
  an atomic batch) and of one label change (an element update), each calculation + apply, with the
  p50 of each part and how many applies replaced the whole table (`table_replaced`, should be 0);
- nft rule counts for (policies, endpoints) pairs, to show they add rather than multiply;
- pod-to-pod throughput (iperf3), request/response latency on one connection, and connect latency
  (a new connection per request, which walks the policy chains) with the ruleset vs no table at all,
  alternated per round. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

from bench.dataplane import Path, Procs, _plug_pod, measure_rr, measure_throughput, start_servers
from tether.agent.cache import Replica
from tether.agent.calc import HostContext, compute_nft
from tether.dataplane.nft import NftDataplane, delete_table
from tether.lab.cluster import nsx, sh
from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy, Subnet

CTX = HostContext("b", "eth0", 1500)
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


def model(n_pols: int, n_eps: int, real: dict[str, tuple[str, str, str]] | None = None) -> Replica:
    """`real` maps endpoint id -> (interface, ip, mac) of the plugged pods."""
    r = Replica()
    r.objects["Host"]["b"] = Host(name="b", underlay_ip="198.18.0.1")
    r.objects["Network"]["n"] = Network(name="n", subnets=[Subnet(cidr="10.0.0.0/8")])
    for ns in ("bench", "other"):
        r.objects["Namespace"][ns] = Namespace(name=ns, labels={"team": ns})
    for i in range(n_eps):
        iface, ip, mac = (real or {}).get(f"e{i}", (f"tthb{i:010d}", f"10.{1 + i // 65000}.{i // 250 % 260}."
                                                                     f"{i % 250 + 2}", None))
        ep = Endpoint(id=f"e{i}", name=f"e{i}", network="n", host="b", namespace="bench", ips=[ip], mac=mac,
                      interface=iface, labels={"app": f"a{i % n_pols}", "tier": "web"})
        r.objects["Endpoint"][ep.id] = ep
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
    plan = compute_nft(rep, CTX)
    t1 = time.perf_counter()
    report = dp.apply(plan)
    return t1 - t0, time.perf_counter() - t1, report.full


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=2000)
    ap.add_argument("--changes", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    a = ap.parse_args()
    prefix = f"bp{os.getpid() % 100000}"
    host, client, server = f"{prefix}-host", f"{prefix}-c", f"{prefix}-s"
    procs = Procs()
    out: dict = {"policies": a.policies, "endpoints": a.endpoints}
    try:
        sh("ip", "netns", "add", host)
        nsx(host, "ip", "link", "set", "lo", "up")
        nsx(host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # e0 is the server (app a0, allowed from app a1), e1 the client (app a1); both are real pods
        _plug_pod(host, server, "tthbsrv", "10.250.0.2", 1500)
        _plug_pod(host, client, "tthbcli", "10.250.0.3", 1500)
        mac = {ns: nsx(ns, "cat", "/sys/class/net/eth0/address").stdout.strip() for ns in (client, server)}
        real = {"e0": ("tthbsrv", "10.250.0.2", mac[server]), "e1": ("tthbcli", "10.250.0.3", mac[client])}
        rep = model(a.policies, a.endpoints, real)
        dp = NftDataplane(host)
        calc_s, apply_s, _ = timed(dp, rep)
        plan = compute_nft(rep, CTX)
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
        counts = {f"{p}x{e}": rules(compute_nft(model(p, e), CTX)) for p, e in
                  ((100, 200), (a.policies, 200), (100, a.endpoints), (a.policies, a.endpoints))}
        added = (counts[f"{a.policies}x200"] + counts[f"100x{a.endpoints}"] - counts["100x200"])
        out["rule_count"] = {**counts, "additive_prediction": added,
                             "product_would_be": a.policies * a.endpoints}

        # datapath: the ruleset vs no table at all, alternated
        path = Path("pod-to-pod", client, server, "10.250.0.2")
        start_servers(procs, path)
        procs.start(server, sys.executable, "-I", "-S", "-c", CRR_SCRIPT, "server", str(CRR_PORT))
        time.sleep(0.5)
        # the policies really decide: e1 (app a1) -> e0 (app a0) is allowed on the bench ports by p0
        plan = compute_nft(rep, CTX)
        samples: dict[str, dict[str, list[float]]] = {m: {"gbps": [], "rr_p50_us": [], "crr_p50_us": []}
                                                      for m in ("policy", "none")}
        for r in range(a.rounds):
            for mode in (("policy", "none") if r % 2 == 0 else ("none", "policy")):
                if mode == "policy":
                    dp.forget()
                    dp.apply(plan)
                else:
                    delete_table(host)
                    dp.forget()
                s = samples[mode]
                s["gbps"].append(measure_throughput(path, a.seconds))
                s["rr_p50_us"].append(measure_rr(path, 3000)["p50_us"])
                crr = json.loads(nsx(client, sys.executable, "-I", "-S", "-c", CRR_SCRIPT, "client", str(CRR_PORT),
                                     "10.250.0.2", "1500", timeout=120).stdout)
                s["crr_p50_us"].append(crr["p50_us"])
        med = {m: {k: round(statistics.median(v), 3) for k, v in s.items()} for m, s in samples.items()}
        out["datapath"] = {**med, "throughput_loss_pct": round(100 * (1 - med["policy"]["gbps"] /
                                                                       med["none"]["gbps"]), 2),
                           "rr_latency_added_pct": round(100 * (med["policy"]["rr_p50_us"] /
                                                                med["none"]["rr_p50_us"] - 1), 2),
                           "connect_latency_added_pct": round(100 * (med["policy"]["crr_p50_us"] /
                                                                     med["none"]["crr_p50_us"] - 1), 2)}
    finally:
        procs.stop()
        for ns in (client, server, host):
            sh("ip", "netns", "del", ns, check=False)
    out["host"] = socket.gethostname()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
