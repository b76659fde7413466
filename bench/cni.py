"""CNI ADD/DEL latency: `tether` vs the reference `bridge` + `host-local` plugins, same run, same way.

    .venv/bin/python -m bench.cni [--pods 200] [--more 100] [--present 500] [--both-present]

A 1-host lab; both plugins are executed exactly as a runtime does (fork+exec of the plugin binary
with the CNI_* environment and the config on stdin), from one driver process running inside the
lab host's network namespace, alternating tether and reference call by call so machine noise hits
both equally. Phases:
  1. `--pods` ADDs from empty, then their DELs (p50/p99 each);
  2. ADD (untimed) up to `--present` pods, then `--more` timed ADDs and their timed DELs. Each
     plugin in turn (tether first) with only its own pods on the host: with both plugins' pods
     present, the reference's bridge floods every new port's IPv6 router solicitations and MLD
     reports to its 500 ports, and that softirq load on the same CPUs was most of the "growth" of
     Tether's ADDs (median 1.36x against 1.15x alone, sessions 12-13). `--both-present` measures
     this phase the old way: both plugins' pods present, calls alternating.
Each timed phase waits for the CPUs to be quiet first (QUIET_BUSY).
Targets: ADD p50 <= 1.5x and p99 <= 2x the reference; ADD p50 with `--present` pods <= 1.2x of phase 1.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.dns import wait_quiet
from tether.lab.cluster import Lab, sh
from tether.model import Network, Subnet

REF_DIR = "/usr/lib/cni"
# Each timed phase starts once the CPUs are mostly idle (at most QUIET_WAIT s), recorded in the output
# as "quiet": the untimed ADDs before the second one could leave work behind (the reference's new
# bridge ports send IPv6 router solicitations and MLD reports for seconds, flooded to every port;
# Tether's agent applies its last changes). So far the machine has always been quiet by then
QUIET_BUSY, QUIET_WAIT = 0.15, 60


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(len(s) * q))] * 1000, 2)


def _stats(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": _pct(xs, 0.5), "p99_ms": _pct(xs, 0.99)}


class Plugin:
    """One plugin binary and its config; `call` times one invocation."""

    def __init__(self, name: str, exe: str, config: dict, path: str) -> None:
        self.name, self.exe, self.stdin, self.path = name, exe, json.dumps(config).encode(), path

    def call(self, command: str, cid: str, netns: str) -> float:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
               "CNI_ARGS": "IgnoreUnknown=1", "CNI_PATH": self.path, "PATH": os.environ["PATH"]}
        t = time.perf_counter()
        r = subprocess.run([self.exe], input=self.stdin, capture_output=True, env=env, timeout=60)
        dt = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"{self.name} {command} {cid}: {r.stdout.decode()} {r.stderr.decode()}")
        return dt


def worker(spec: dict) -> dict:
    """Runs inside the lab host's network namespace (the driver re-executes itself there)."""
    plugins = [Plugin(**p) for p in spec["plugins"]]
    prefix = spec["prefix"]

    def netns(i: int) -> tuple[str, str]:
        name = f"{prefix}-{i}"  # created by the driver: a mount made here would be private to `ip netns exec`
        return name, f"/var/run/netns/{name}"

    times = {p.name: {k: [] for k in ("add", "del", "add_present", "del_present")} for p in plugins}
    def calls(command: str, start: int, stop: int, key: str | None, only: list[Plugin] = plugins) -> None:
        """`command` for sandboxes start..stop-1 of each plugin in `only`, timed under `key` (None: untimed)."""
        for i in range(start, stop):
            for p in only if i % 2 else reversed(only):  # alternate who goes first
                name, path = netns(i * 2 + (p is plugins[1]))
                dt = p.call(command, name, path)
                if key:
                    times[p.name][key].append(dt)

    n, more, present = spec["pods"], spec["more"], spec["present"]
    quiet = {"before_add": wait_quiet(QUIET_BUSY, QUIET_WAIT)}
    calls("ADD", 0, n, "add")
    calls("DEL", 0, n, "del")
    for group in [plugins] if spec["both_present"] else [[p] for p in plugins]:
        calls("ADD", 0, present, None, group)
        label = "before_add_present" if len(group) > 1 else f"before_add_present_{group[0].name}"
        quiet[label] = wait_quiet(QUIET_BUSY, QUIET_WAIT)
        calls("ADD", present, present + more, "add_present", group)
        calls("DEL", present, present + more, "del_present", group)
        calls("DEL", 0, present, None, group)  # untimed clean-up
    return {"times": times, "quiet": quiet}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=200)
    ap.add_argument("--more", type=int, default=100)
    ap.add_argument("--present", type=int, default=500)
    ap.add_argument("--both-present", action="store_true",
                    help="phase 2 with both plugins' pods present, calls alternating (the method before session 13)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    for exe in ("bridge", "host-local"):
        if not os.access(os.path.join(REF_DIR, exe), os.X_OK):
            sys.exit(f"the reference plugin {REF_DIR}/{exe} is missing (apt-get install containernetworking-plugins)")
    tag = os.urandom(2).hex()
    lab = Lab(f"bc{tag}")
    data_dir = tempfile.mkdtemp(prefix="tether-bench-hostlocal-")
    try:
        lab.up(hosts=1, progress=lambda _m: None)
        lab.client().create_network(Network(name="bench", subnets=[Subnet(cidr="10.90.0.0/16")], encap="vxlan"))
        h = lab.host("h1")
        tether = {"name": "tether", "exe": os.path.join(lab.dir, "cni-bin", "tether"),
                  "path": os.path.join(lab.dir, "cni-bin"),
                  "config": {"cniVersion": "1.0.0", "name": "bench", "type": "tether",
                             "agent_socket": lab.cni_socket("h1")}}
        ref = {"name": "bridge+host-local", "exe": os.path.join(REF_DIR, "bridge"), "path": REF_DIR,
               "config": {"cniVersion": "1.0.0", "name": "benchref", "type": "bridge", "bridge": f"bc{tag}br",
                          "isGateway": True, "ipMasq": False,
                          "ipam": {"type": "host-local", "subnet": "10.91.0.0/16", "dataDir": data_dir}}}
        spec = {"plugins": [tether, ref], "prefix": f"{lab.name}-h1-b", "pods": a.pods, "more": a.more,
                "present": a.present, "both_present": a.both_present}
        names = [f"{spec['prefix']}-{i}" for i in range(2 * (a.present + a.more))]
        for name in names:
            sh("ip", "netns", "add", name)
        t0 = time.time()
        r = subprocess.run(["ip", "netns", "exec", h.ns, sys.executable, "-m", "bench.cni", "--worker",
                            json.dumps(spec)], capture_output=True, text=True, timeout=3600,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if r.returncode != 0:
            sys.exit(f"worker failed: {r.stderr[-3000:]}")
        result = json.loads(r.stdout.strip().splitlines()[-1])
        times = result["times"]
        elapsed = time.time() - t0
    finally:
        lab.down()  # also removes the sandboxes, which are named under the lab
        shutil.rmtree(data_dir, ignore_errors=True)

    out: dict = {"benchmark": "cni", "pods": a.pods, "more": a.more, "present": a.present,
                 "elapsed_s": round(elapsed, 1), "quiet": result["quiet"],
                 "method": "fork+exec of each plugin binary with CNI_* env and stdin, from one process in the "
                           "lab host's netns, tether and reference alternating call by call; cniVersion 1.0.0; "
                           + ("phase 2 with both plugins' pods present, alternating" if a.both_present else
                              "phase 2 one plugin at a time, each with only its own pods present")}
    for name, t in times.items():
        out[name] = {k: _stats(v) for k, v in t.items() if v}
    tt, rr = out["tether"], out["bridge+host-local"]
    ratios = {"add_p50": round(tt["add"]["p50_ms"] / rr["add"]["p50_ms"], 3),
              "add_p99": round(tt["add"]["p99_ms"] / rr["add"]["p99_ms"], 3),
              "del_p50": round(tt["del"]["p50_ms"] / rr["del"]["p50_ms"], 3),
              "add_p50_growth_with_present": round(tt["add_present"]["p50_ms"] / tt["add"]["p50_ms"], 3),
              "reference_add_p50_growth_with_present": round(rr["add_present"]["p50_ms"] / rr["add"]["p50_ms"], 3),
              # the same growth in ms: what the present pods add to one ADD, ours against the reference's
              "add_p50_ms_added_with_present": round(tt["add_present"]["p50_ms"] - tt["add"]["p50_ms"], 2),
              "reference_add_p50_ms_added_with_present": round(rr["add_present"]["p50_ms"] - rr["add"]["p50_ms"], 2)}
    out["ratios"] = ratios
    out["targets"] = {"add_p50 <= 1.5x reference": ratios["add_p50"] <= 1.5,
                      "add_p99 <= 2x reference": ratios["add_p99"] <= 2.0,
                      "add_p50 growth with present pods <= 1.2x": ratios["add_p50_growth_with_present"] <= 1.2}
    out["targets_met"] = all(out["targets"].values())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
