"""Cluster-name DNS: the agent's resolver vs dnsmasq serving the same names from a hosts file.

    .venv/bin/python -m bench.dns [--names 500] [--seconds 6] [--rounds 2]

One lab host with a real agent; `--names` endpoints and a tenth as many services are created through
the API, so the agent answers them from its replica. dnsmasq runs in the same host namespace on a
second link-local address with a hosts file holding the same names (A and PTR), with its cache on.
dnsperf runs in a pod namespace, so queries cross the pod's veth like a pod's own lookups. Each
server is measured for `--rounds` alternating rounds at full speed (queries/s, average latency);
then the agent at half of its own maximum rate with per-query latencies (`dnsperf -v`) for p50/p99,
and dnsmasq at that same rate as the baseline (the machine is shared: its load average is reported).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import re
import signal
import statistics
import subprocess

from tether.agent.dns import DNS_IP
from tether.lab.cluster import Lab, nsx, stop_pid, wait_for
from tether.model import Endpoint, Network, Service, ServicePort, Subnet

DNSMASQ_IP = "169.254.20.11"


def dnsperf(ns: str, server: str, queries: str, seconds: float, qps: int | None = None,
            verbose: bool = False) -> dict:
    cmd = ["dnsperf", "-s", server, "-d", queries, "-l", str(seconds), "-q", "200"]
    if qps:
        cmd += ["-Q", str(qps)]
    if verbose:
        cmd.append("-v")
    out = nsx(ns, *cmd, timeout=seconds + 60).stdout
    res: dict = {"qps": float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1)),
                 "lost": int(re.search(r"Queries lost:\s+(\d+)", out).group(1)),
                 "avg_latency_ms": float(re.search(r"Average Latency \(s\):\s+([\d.]+)", out).group(1)) * 1000}
    if verbose:
        lat = sorted(float(m) * 1000 for m in re.findall(r"^> NOERROR \S+ \S+ ([\d.]+)$", out, re.M))
        if lat:
            res["p50_ms"] = lat[len(lat) // 2]
            res["p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            res["answered"] = len(lat)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    lab = Lab(f"bd{os.getpid() % 10000}")
    dnsmasq = None
    try:
        lab.up(hosts=1, progress=lambda _m: None)
        c = lab.client()
        net = "bench"
        c.create_network(Network(name=net, subnets=[Subnet(cidr="10.81.0.0/16")]))
        client = lab.run_pod("h1", "client", net)
        hosts: list[tuple[str, str]] = []
        for i in range(a.names):
            ip = str(ipaddress.ip_address("10.81.128.0") + i)
            c.create_endpoint(Endpoint(name=f"ep{i}", network=net, ips=[ip]))
            hosts.append((ip, f"ep{i}.{net}.tether.local"))
        for i in range(max(1, a.names // 10)):
            svc = c.apply(Service(name=f"svc{i}", selector={"app": f"a{i}"}, ports=[ServicePort(port=80)]))
            hosts.append((svc.cluster_ip, f"svc{i}.default.svc.tether.local"))  # type: ignore[attr-defined]
        d = os.path.join(lab.dir, "bench-dns")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "hosts"), "w") as f:
            f.writelines(f"{ip} {name}\n" for ip, name in hosts)
        rng = random.Random(1)
        with open(os.path.join(d, "queries"), "w") as f:
            for _ in range(20000):
                ip, name = rng.choice(hosts)
                if rng.random() < 0.9:
                    f.write(f"{name} A\n")
                else:
                    f.write(f"{ipaddress.ip_address(ip).reverse_pointer} PTR\n")
        queries = os.path.join(d, "queries")
        host_ns = lab.host("h1").ns
        nsx(host_ns, "ip", "addr", "add", f"{DNSMASQ_IP}/32", "dev", "lo")
        dnsmasq = subprocess.Popen(["ip", "netns", "exec", host_ns, "dnsmasq", "--no-daemon", "--no-resolv",
                                    "--no-hosts", f"--addn-hosts={d}/hosts", f"--listen-address={DNSMASQ_IP}",
                                    "--bind-interfaces", "--port=53", "--local-ttl=30", "--cache-size=10000"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        last = hosts[-1][1]
        probe = ["python3", "-c", f"import socket,dns.message,dns.query; print(dns.query.udp("
                 f"dns.message.make_query('{last}','A'),'{{}}',timeout=1).answer)"]
        for server in (DNS_IP, DNSMASQ_IP):
            cmd = [*probe[:2], probe[2].replace("{}", server)]
            wait_for(lambda cmd=cmd: "IN A" in nsx(client.ns, "/work/main/.venv/bin/python", *cmd[1:],
                                                   check=False).stdout, 60, f"{server} to know the names")
        runs: dict[str, list[dict]] = {"agent": [], "dnsmasq": []}
        for r in range(a.rounds):
            order = [("agent", DNS_IP), ("dnsmasq", DNSMASQ_IP)]
            for label, server in order if r % 2 == 0 else order[::-1]:
                runs[label].append(dnsperf(client.ns, server, queries, a.seconds))
        agent_qps = statistics.median(x["qps"] for x in runs["agent"])
        dnsmasq_qps = statistics.median(x["qps"] for x in runs["dnsmasq"])
        half = dnsperf(client.ns, DNS_IP, queries, a.seconds, qps=int(agent_qps / 2), verbose=True)
        half_dnsmasq = dnsperf(client.ns, DNSMASQ_IP, queries, a.seconds, qps=int(agent_qps / 2), verbose=True)
        result = {
            "names": len(hosts),
            "agent": {"qps": round(agent_qps), "avg_latency_ms": round(statistics.median(
                x["avg_latency_ms"] for x in runs["agent"]), 3), "lost": sum(x["lost"] for x in runs["agent"]),
                "runs": runs["agent"]},
            "dnsmasq": {"qps": round(dnsmasq_qps), "avg_latency_ms": round(statistics.median(
                x["avg_latency_ms"] for x in runs["dnsmasq"]), 3), "runs": runs["dnsmasq"]},
            "agent_vs_dnsmasq_qps": round(agent_qps / dnsmasq_qps, 3),
            "agent_at_half_max": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in half.items()},
            "dnsmasq_at_same_rate": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in half_dnsmasq.items()},
            "load_average": os.getloadavg()[0],
            "targets": {"qps_ratio_min": 0.5, "p99_ms_max_at_half_rate": 2.0},
        }
        result["meets_targets"] = (result["agent_vs_dnsmasq_qps"] >= 0.5
                                   and half.get("p99_ms", 1e9) <= 2.0)
        print(json.dumps(result, indent=1))
    finally:
        if dnsmasq is not None:
            stop_pid(dnsmasq.pid, signal.SIGTERM)
        lab.down()


if __name__ == "__main__":
    main()
