"""What flow recording costs (issue 25): TCP connect rate and bulk throughput between two pods on
two hosts, with the agents' connection recording (conntrack events read from ctnetlink) on and
off, in the same run, and the CPU the agents and the server spend per 1000 connections.

Recording is switched on every agent through its flows socket (`{"cmd": "record", "on": ...}`),
slice by slice, in an order that alternates round after round, so both sides share the machine's
noise; the verdict compares the medians. Budget: recording keeps >= 95% of both figures.

    sudo .venv/bin/python -m bench.flows [--rounds 8] [--slice 1.5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

if not __package__:  # run as a file, bench/ leads sys.path and bench/dns.py hides dnspython
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tether import jsonline  # noqa: E402
from tether.lab.cluster import Lab, nsx, wait_for  # noqa: E402
from tether.model import Network, NetworkPolicy, Subnet  # noqa: E402

PORT = 5401
PUSH_DELAY = 1.2  # a connect slice's records are pushed within a push interval (agent/flowlog.py)

SERVER = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(512)
def drain(c):
    b = bytearray(1 << 20)
    try:
        while c.recv_into(b):
            pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=drain, args=(c,), daemon=True).start()
"""

# one measurement per line read on stdin: "connect SECONDS" -> connections/s, "bulk SECONDS" -> Gbit/s
CLIENT = r"""
import socket, sys, time
ip, port = sys.argv[1], int(sys.argv[2])
buf = b"x" * (1 << 16)
for line in sys.stdin:
    what, secs = line.split()
    end = time.perf_counter() + float(secs)
    n = 0
    t0 = time.perf_counter()
    if what == "connect":
        while time.perf_counter() < end:
            c = socket.create_connection((ip, port)); c.close(); n += 1
        print(n / (time.perf_counter() - t0), flush=True)
    else:
        c = socket.create_connection((ip, port))
        while time.perf_counter() < end:
            c.sendall(buf); n += len(buf)
        c.close()
        print(n * 8 / (time.perf_counter() - t0) / 1e9, flush=True)
"""


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (whatever an agent or the server runs is counted with it)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def cpu_of(pids: dict[str, int]) -> dict[str, dict[int, float]]:
    """CPU seconds (user + system) so far of each named process tree, per process."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, dict[int, float]] = {}
    for role, pid in pids.items():
        for p in tree(pid):
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{p}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            key = "conntrack" if comm == "conntrack" else role
            out.setdefault(key, {})[p] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_delta(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    return {k: sum(v - before.get(k, {}).get(p, 0.0) for p, v in procs.items()) for k, procs in after.items()}


def record(lab: Lab, on: bool) -> None:
    for h in lab.state.hosts:
        path = f"{lab.agent_dir(h.name)}/flows.sock"
        got = jsonline.request(path, {"cmd": "record", "on": on}, 5)
        assert got == {"recording": on}, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--slice", type=float, default=1.5, help="seconds per measurement")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    lab = Lab(f"bf{os.urandom(2).hex()}")
    procs: list[subprocess.Popen] = []
    try:
        lab.up(hosts=2, progress=lambda _m: None)
        lab.client().create_network(Network(name="benchflows", subnets=[Subnet(cidr="10.47.0.0/16")], encap="vxlan"))
        cli = lab.run_pod("h1", "cli", "benchflows")
        srv = lab.run_pod("h2", "srv", "benchflows", labels={"app": "srv"})
        # a policy on the server: the kernel tracks its connections (pods under no policy and no
        # service are forwarded without conntrack, so there would be nothing to record)
        lab.client().apply(NetworkPolicy(name="allow-srv", namespace="default", spec={
            "podSelector": {"matchLabels": {"app": "srv"}}, "ingress": [{}], "policyTypes": ["Ingress"]}))
        procs.append(subprocess.Popen(["ip", "netns", "exec", srv.ns, sys.executable, "-c", SERVER, str(PORT)]))
        wait_for(lambda: f":{PORT}" in nsx(srv.ns, "ss", "-Hltn", check=False).stdout, 10, "the server")
        wait_for(lambda: lab.ping("h1/cli", srv.ip), 15, "the path")
        client = subprocess.Popen(["ip", "netns", "exec", cli.ns, sys.executable, "-c", CLIENT, srv.ip, str(PORT)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(client)
        assert client.stdin is not None and client.stdout is not None

        def measure(what: str) -> float:
            client.stdin.write(f"{what} {a.slice}\n")  # type: ignore[union-attr]
            client.stdin.flush()  # type: ignore[union-attr]
            return float(client.stdout.readline())  # type: ignore[union-attr]

        samples: dict[bool, dict[str, list[float]]] = {True: {"connect": [], "bulk": []},
                                                       False: {"connect": [], "bulk": []}}
        # the CPU the agents, the server and conntrack spend during the connect slices, per 1000
        # connections: the cost itself, which the machine's other load does not blur as it does rates
        pids = {f"agent {h.name}": h.agent_pid for h in lab.state.hosts if h.agent_pid}
        pids["server"] = lab.state.server_pid or 0
        pids["pods"] = client.pid  # the connections' own cost: the client pod's process ...
        pids["pods "] = procs[0].pid  # ... and the server pod's
        spent: dict[bool, dict[str, float]] = {True: {}, False: {}}
        conns: dict[bool, float] = {True: 0.0, False: 0.0}
        measure("connect")  # warm up
        load = os.getloadavg()[0]
        for r in range(a.rounds):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                record(lab, on)
                time.sleep(0.3)
                for what in ("connect", "bulk"):
                    before = cpu_of(pids)
                    samples[on][what].append(measure(what))
                    if what == "connect":
                        time.sleep(PUSH_DELAY)  # what the connections recorded costs to push and name
                        for k, v in cpu_delta(before, cpu_of(pids)).items():
                            spent[on][k] = spent[on].get(k, 0.0) + v
                        conns[on] += samples[on][what][-1] * a.slice
        record(lab, True)
        out: dict = {"load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}
        for what, unit in (("connect", "connections/s"), ("bulk", "Gbit/s")):
            off, on = statistics.median(samples[False][what]), statistics.median(samples[True][what])
            out[what] = {"off": round(off, 3), "on": round(on, 3), "ratio": round(on / off, 3), "unit": unit}
        out["cpu_ms_per_1000_connections"] = {
            ("on" if on else "off"): {k: round(v * 1e6 / max(conns[on], 1), 2) for k, v in sorted(spent[on].items())}
            for on in (False, True)}
        cpu = out["cpu_ms_per_1000_connections"]
        for side in cpu.values():  # one entry for both pods
            side["pods"] = round(side.pop("pods", 0.0) + side.pop("pods ", 0.0), 2)
        extra = sum(v for k, v in cpu["on"].items() if k != "pods") - \
            sum(v for k, v in cpu["off"].items() if k != "pods")
        # what recording adds, as a share of what the connections cost the pods themselves: the
        # slowdown of a host whose CPU is all in use, which rates on a shared machine blur
        out["cpu_added_vs_pods"] = round(extra / max(cpu["on"]["pods"], 1e-9), 3)
        out["within_budget"] = all(out[w]["ratio"] >= 0.95 for w in ("connect", "bulk"))
        out["cpu_within_budget"] = out["cpu_added_vs_pods"] <= 0.05  # the same budget, on a host whose CPU is all used
        flows = lab.client().request("GET", "/api/v1/flows", params={"limit": 1})
        out["flows_recorded"] = flows["last"]
        if a.json:
            print(json.dumps(out))
        else:
            for what in ("connect", "bulk"):
                o = out[what]
                print(f"{what:8} off {o['off']:10.2f}  on {o['on']:10.2f} {o['unit']:14} ratio {o['ratio']:.3f}")
            for side, costs in out["cpu_ms_per_1000_connections"].items():
                print(f"cpu ms per 1000 connections, recording {side:3}: " +
                      ", ".join(f"{k} {v}" for k, v in costs.items()))
            print(f"recording adds {out['cpu_added_vs_pods']:.1%} of the pods' own CPU per connection; "
                  f"load average {out['load_before']} before, {out['load_after']} after")
            print(f"flows recorded by the server: {out['flows_recorded']}; "
                  f"{'within' if out['within_budget'] else 'OVER'} the 5% budget")
        sys.exit(0 if out["within_budget"] else 1)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        lab.down()


if __name__ == "__main__":
    main()
