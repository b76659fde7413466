"""Convergence: from CNI ADD returning on host A to the first successful ping from host B.

    .venv/bin/python -m bench.convergence [--pods 100]

A 2-host lab. A prober pod on h2 runs one process that pings (raw ICMP, every 1 ms) each address
it is given until the first echo reply; CLOCK_MONOTONIC is shared by all processes, so the driver's
"ADD returned" instant and the prober's "reply received" instant are directly comparable.
Two networks are measured in one run:
- `block26`: the default /26 IPAM blocks, so most new pods land in a block host B already routes;
- `block32`: one block per pod, the worst case: every pod needs a new route on host B.
Target: p99 <= 200 ms in both. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from tether.lab.cluster import Lab, sh
from tether.model import Network, Subnet

PROBER = r"""
import os, socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(0.001)
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF); t += t >> 16
    return ~t & 0xFFFF
ident = os.getpid() & 0xFFFF
print("ready", flush=True)
for line in sys.stdin:
    ip = line.strip()
    seq, deadline = 0, time.monotonic() + 10
    answer = None
    while time.monotonic() < deadline and answer is None:
        seq = (seq + 1) & 0xFFFF
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        s.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr), ident, seq), (ip, 0))
        end = time.monotonic() + 0.001
        while time.monotonic() < end:
            try:
                data, addr = s.recvfrom(2048)
            except socket.timeout:
                break
            if addr[0] == ip and data[20] == 0 and struct.unpack("!H", data[24:26])[0] == ident:
                answer = time.monotonic()
                break
    print(f"{ip} {answer} {seq}", flush=True)
"""


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(len(s) * q))] * 1000, 1)


def measure(lab: Lab, prober: subprocess.Popen, network: str, pods: int, tag: str) -> dict:
    lat: list[float] = []
    lost = 0
    for i in range(pods):
        ns = f"{lab.name}-h1-{tag}{i}"
        sh("ip", "netns", "add", ns)
        code, out = lab.cni("h1", "ADD", {"cniVersion": "1.0.0", "name": network, "type": "tether"},
                            container_id=ns, netns=f"/var/run/netns/{ns}")
        returned = time.monotonic()
        if code != 0:
            raise RuntimeError(f"ADD failed: {out}")
        ip = json.loads(out)["ips"][0]["address"].split("/")[0]
        assert prober.stdin and prober.stdout
        prober.stdin.write(ip + "\n")
        prober.stdin.flush()
        _ip, answer, _sent = prober.stdout.readline().split()
        if answer == "None":
            lost += 1
        else:
            lat.append(max(0.0, float(answer) - returned))
    return {"pods": pods, "never_reachable": lost, "p50_ms": _pct(lat, 0.5), "p90_ms": _pct(lat, 0.9),
            "p99_ms": _pct(lat, 0.99), "max_ms": round(max(lat) * 1000, 1) if lat else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=100)
    a = ap.parse_args()
    lab = Lab(f"bv{os.urandom(2).hex()}")
    prober = None
    try:
        lab.up(hosts=2, progress=lambda _m: None)
        c = lab.client()
        c.create_network(Network(name="block26", subnets=[Subnet(cidr="10.92.0.0/16")], encap="vxlan"))
        c.create_network(Network(name="block32", subnets=[Subnet(cidr="10.93.0.0/16")], encap="vxlan",
                                 block_size=32))
        results = {}
        for net in ("block26", "block32"):
            probe_pod = lab.run_pod("h2", f"probe-{net}", net)
            prober = subprocess.Popen(["ip", "netns", "exec", probe_pod.ns, sys.executable, "-I", "-S", "-c", PROBER],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert prober.stdout and prober.stdout.readline().strip() == "ready"
            results[net] = measure(lab, prober, net, a.pods, net[-2:])
            prober.stdin.close()  # type: ignore[union-attr]
            prober.wait(10)
            prober = None
    finally:
        if prober is not None:
            prober.kill()
            prober.wait()
        lab.down()
    out = {"benchmark": "convergence", "method": "CNI ADD on h1 returns -> first ICMP echo reply to a prober pod "
                                                 "on h2 that pings every 1 ms; shared CLOCK_MONOTONIC",
           **results, "target": "p99 <= 200 ms"}
    out["targets_met"] = all(r["p99_ms"] <= 200 and r["never_reachable"] == 0 for r in results.values())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
