"""An agent's nft apply per change at two table sizes (issue 29): does it cost in proportion to the table?

    sudo .venv/bin/python -m bench.nft_apply [--repeat 5] [--sizes small,big]

For each size (bench/calc_scale.py's synthetic replicas: `small` 1,000 endpoints / 10 hosts / 100
policies / 50 services, `big` 10,000 / 100 / 1,000 / 500), host h0's plan is computed by the
planner and loaded through the agent's `NftDataplane` into the `inet tether` table of a throwaway
network namespace (the machine's real `nft`). Then each change is made in the replica, planned
(not timed) and applied through the same `NftDataplane`, as the agent does; only the apply is
timed: wall time and CPU of this process plus its waited-for children (`ip netns exec ... nft`,
whose system time includes the kernel's work on the batch). Changes, each done then undone (both
timed, `+` and `-`):
- `member`: a remote endpoint joins the largest selector set (one element added, then removed);
- `endpoint_local`, `service`, `host`: bench/calc_scale.py's changes (a local pod: its ingress
  chain, rules and map entries; a service's backends; a host's VTEP peer).
With strace on the machine (unless `--no-trace`), one more untimed round of each change runs `nft`
under strace and records what it asked the kernel to dump before its batch (`fetched`: dump
requests by kind, bytes received). Prints one JSON object: per size, the table (sets, elements,
chains, rules), the load, and per change the median CPU ms (all, and of `nft` alone) and wall ms;
`ratio_big_small` of the CPU per change (issue 29's target for an agent's work per change: <=
1.5). Each size's namespace is deleted at the end, whatever happens.

The periodic reconcile's cost at each size (`verify`, unless `--no-verify`), in the same run:
`NftDataplane.verify` of the loaded table when another process has committed to nftables in the
namespace since the agent's last write (a throwaway `inet bench_other<n>` table added first: a
full `nft -j list table` and its comparison, what every verify cost before generations were
used) and right after it (the ruleset generation is the agent's: one GETGEN round trip). And the
links' full read-back of the same reconcile (`links`): `dataplane.links.apply_links` with no memory
(dumps of links, routes, the VTEP's neighbours and FDB, then the comparison) against a namespace
holding h0's plan (a veth `eth0` underlay, one veth per local pod, the VTEP with a neighbour and
FDB entry per remote host, a route per remote block and local pod), next to an apply by difference
with nothing to do. It runs in a child process started inside the namespace (`ip netns exec`:
the read-back writes the plan's sysctls, which must be the namespace's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench import calc_scale as cs
from tether.calc.planner import Planner
from tether.calc.replica import Replica
from tether.dataplane import nft as nft_dp
from tether.dataplane.links import apply_links
from tether.dataplane.nft import NftDataplane

DUMP = re.compile(r"nlmsg_type=NFNL_SUBSYS_NFTABLES<<8\|NFT_MSG_(GET\w+), nlmsg_flags=[^,]*NLM_F_DUMP")
RECEIVED = re.compile(r"^\d+\s+recvmsg\(.*\)\s+=\s+(\d+)$", re.M)


def cpu() -> tuple[float, float]:
    """(CPU s of this process, CPU s of its waited-for children)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


class Host:
    """Host h0's planner and nft dataplane, applying into namespace `ns`."""

    def __init__(self, rep: Replica, ns: str) -> None:
        self.rep, self.planner, self.nft = rep, Planner(), NftDataplane(ns)

    def apply(self) -> dict[str, float]:
        plan = self.planner.plan(self.rep.view(), cs.CTX).nft
        (s0, c0), w0 = cpu(), time.perf_counter()
        report = self.nft.apply(plan)
        (s1, c1), w1 = cpu(), time.perf_counter()
        if report.failures:
            raise RuntimeError(f"nft apply refused parts of the plan: {report.failures}")
        return {"cpu_ms": (s1 - s0 + c1 - c0) * 1000, "nft_cpu_ms": (c1 - c0) * 1000, "wall_ms": (w1 - w0) * 1000,
                "full": float(report.full), "commands": float(report.changed)}


def member_change(rep: Replica, planner: Planner, n_eps: int, n_hosts: int) -> Callable[[Replica], Callable[[], None]]:
    """A change that adds one element to the largest selector set: a new remote endpoint with the
    labels and namespace of one of the set's members."""
    plan = planner.plan(rep.view(), cs.CTX).nft
    biggest = max((s for s in plan.sets if s.name.startswith("sel-")), key=lambda s: len(s.elements))
    by_ip = {ep.ips[0]: ep for ep in rep.objects["Endpoint"].values()}
    model = next(by_ip[str(e).split("/")[0]] for e in sorted(biggest.elements, key=str)
                 if str(e).split("/")[0] in by_ip and by_ip[str(e).split("/")[0]].host != cs.ME)

    def make(r: Replica) -> Callable[[], None]:
        ep = cs.endpoint(n_eps + 5, 1, n_eps // n_hosts + 2).model_copy(
            update={"labels": dict(model.labels), "namespace": model.namespace})
        r.objects["Endpoint"][ep.id] = ep
        r.revision += 1

        def undo() -> None:
            r.objects["Endpoint"].pop(ep.id, None)
            r.revision += 1
        return undo
    return make


def traced_nft(fetched: list[dict[str, Any]]) -> Callable[[list[dict], str | None], None]:
    """A stand-in for `nft.run_nft` that runs the same `nft` under strace and records what it asked
    the kernel to dump (request kinds) and how many bytes it received."""
    def run(commands: list[dict], netns: str | None = None) -> None:
        if not commands:
            return
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as trace:
            cmd = ["strace", "-f", "-qq", "-s", "8", "-e", "trace=sendto,sendmsg,recvmsg", "-o", trace.name,
                   "nft", "-j", "-f", "-"]
            if netns:
                cmd = ["ip", "netns", "exec", netns, *cmd]
            r = subprocess.run(cmd, input=json.dumps({"nftables": commands}), capture_output=True, text=True)
            if r.returncode != 0:
                raise nft_dp.NftError(f"nft failed: {r.stderr.strip()[:2000]}")
            text = trace.read()
        fetched.append({"dumps": dict(Counter(DUMP.findall(text))),
                        "received_kb": round(sum(int(n) for n in RECEIVED.findall(text)) / 1024, 1)})
    return run


def table_size(h: Host) -> dict[str, int]:
    plan = h.planner.plan(h.rep.view(), cs.CTX).nft
    return {"sets": len(plan.sets), "elements": sum(len(s.elements) for s in plan.sets),
            "largest_set": max(len(s.elements) for s in plan.sets), "chains": len(plan.chains),
            "rules": sum(len(c.rules) for c in plan.chains)}


def med(runs: list[dict[str, float]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def verify_costs(h: Host, repeat: int) -> dict[str, Any]:
    """Median CPU and wall ms of a verify that lists the table (another table was just added in the
    namespace) and of the one after it (the generation is ours again)."""
    plan = h.planner.plan(h.rep.view(), cs.CTX).nft
    runs: dict[str, list[dict[str, float]]] = {"listing": [], "generation": []}
    for i in range(repeat):
        subprocess.run(["ip", "netns", "exec", h.nft.netns, "nft", "add", "table", "inet", f"bench_other{i}"],
                       check=True, timeout=30)
        for want in ("listing", "generation"):
            (s0, c0), w0 = cpu(), time.perf_counter()
            ok = h.nft.verify(plan)
            (s1, c1), w1 = cpu(), time.perf_counter()
            if not ok or h.nft.last_verify != want:
                raise RuntimeError(f"verify: expected a {want} that finds the table intact, "
                                   f"got {h.nft.last_verify} ok={ok}")
            runs[want].append({"cpu_ms": (s1 - s0 + c1 - c0) * 1000, "nft_cpu_ms": (c1 - c0) * 1000,
                               "wall_ms": (w1 - w0) * 1000})
    out: dict[str, Any] = {k: {m: med(v, m) for m in ("cpu_ms", "nft_cpu_ms", "wall_ms")} for k, v in runs.items()}
    out["cpu_ratio"] = round(out["listing"]["cpu_ms"] / max(out["generation"]["cpu_ms"], 1e-3), 1)
    return out


def plumb(ns: str, plan: Any) -> None:
    """What the agent's host namespace holds besides its own objects: an underlay device (a veth) with
    the host's address, and a veth per local pod (up, as after a CNI ADD); the read-back makes the rest."""
    vtep = plan.vtep
    lines = ["link set lo up", f"link add {cs.CTX.underlay_dev} type veth peer name bpul",
             f"link set {cs.CTX.underlay_dev} up", "link set bpul up"]
    if vtep is not None:
        lines.append(f"addr add {vtep.local_ip}/16 dev {cs.CTX.underlay_dev}")
    for k, i in enumerate(sorted(plan.interfaces, key=lambda i: i.name)):
        lines += [f"link add {i.name} mtu {i.mtu} type veth peer name bp{k}", f"link set {i.name} up",
                  f"link set bp{k} up"]
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True,
                   timeout=120)


def links_child(size: str, repeat: int) -> dict[str, Any]:
    """Inside the namespace (`ip netns exec`): h0's plan applied once, then `repeat` times the full
    read-back (no memory) and an apply by difference; medians of this process's CPU and wall ms."""
    n_eps, n_hosts, n_pols, n_svcs = cs.SIZES[size]
    plan = Planner().plan(cs.replica(n_eps, n_hosts, n_pols, n_svcs).view(), cs.CTX)
    first, applied = apply_links(plan)
    if first.failures:
        raise RuntimeError(f"links apply failed: {first.failures[:5]}")
    full: list[dict[str, float]] = []
    delta: list[dict[str, float]] = []
    for _ in range(repeat):
        for runs, memory in ((full, None), (delta, applied)):
            (s0, _), w0 = cpu(), time.perf_counter()
            report, applied = apply_links(plan, applied=memory)
            (s1, _), w1 = cpu(), time.perf_counter()
            if report.changed or report.failures:
                raise RuntimeError(f"a read-back of an unchanged plan changed something: {report.changes[:5]}")
            runs.append({"cpu_ms": (s1 - s0) * 1000, "wall_ms": (w1 - w0) * 1000})
    return {"objects": {"interfaces": len(plan.interfaces), "routes": len(plan.routes),
                        "neighbours": len(plan.neighbours), "fdb": len(plan.fdb)},
            "full_readback": {m: med(full, m) for m in ("cpu_ms", "wall_ms")},
            "by_difference": {m: med(delta, m) for m in ("cpu_ms", "wall_ms")}}


def links_costs(size: str, ns: str, repeat: int) -> dict[str, Any]:
    n_eps, n_hosts, n_pols, n_svcs = cs.SIZES[size]
    plumb(ns, Planner().plan(cs.replica(n_eps, n_hosts, n_pols, n_svcs).view(), cs.CTX))
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "bench.nft_apply", "--links-child", size,
                        "--repeat", str(repeat)], capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode != 0:
        raise RuntimeError(f"links read-back in {ns} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


def measure(size: str, repeat: int, kinds: list[str], trace: bool, verify: bool = True) -> dict[str, Any]:
    n_eps, n_hosts, n_pols, n_svcs = cs.SIZES[size]
    ns = f"tnfa{os.getpid()}{size[0]}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        rep = cs.replica(n_eps, n_hosts, n_pols, n_svcs)
        h = Host(rep, ns)
        out: dict[str, Any] = {"table": table_size(h)}
        load = h.apply()
        out["load"] = {k: round(load[k], 1) for k in ("cpu_ms", "nft_cpu_ms", "wall_ms")}
        h.apply()  # warm: nothing to change
        makers = {"member": member_change(rep, h.planner, n_eps, n_hosts), **cs.changes(n_eps, n_hosts, [])}
        fetch: dict[str, Any] = {}
        for kind in kinds if trace else []:  # once each, untimed: what nft fetched
            seen: list[dict[str, Any]] = []
            real, nft_dp.run_nft = nft_dp.run_nft, traced_nft(seen)  # type: ignore[assignment]
            try:
                back = makers[kind](rep)
                h.apply()
                fetch[kind + "+"] = seen[-1] if seen else "no nft run"
                seen.clear()
                back()
                h.apply()
                fetch[kind + "-"] = seen[-1] if seen else "no nft run"
            finally:
                nft_dp.run_nft = real
        for kind in kinds:
            do: list[dict[str, float]] = []
            undo: list[dict[str, float]] = []
            for _ in range(repeat):
                back = makers[kind](rep)
                do.append(h.apply())
                back()
                undo.append(h.apply())
            for sign, runs in (("+", do), ("-", undo)):
                if any(r["full"] for r in runs):
                    raise RuntimeError(f"{kind}{sign} replaced the whole table: not an incremental apply")
                out[kind + sign] = {"cpu_ms": med(runs, "cpu_ms"), "nft_cpu_ms": med(runs, "nft_cpu_ms"),
                                    "wall_ms": med(runs, "wall_ms"), "commands": med(runs, "commands")}
                if kind + sign in fetch:
                    out[kind + sign]["fetched"] = fetch[kind + sign]
        if verify:
            out["verify"] = verify_costs(h, repeat)
            out["links"] = links_costs(size, ns, repeat)
        return out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="times each change is done and undone (medians)")
    p.add_argument("--sizes", default="small,big", help="of bench/calc_scale.py's SIZES, comma-separated")
    p.add_argument("--changes", default="member,endpoint_local,service,host",
                   help="comma-separated: member, endpoint_local, service, host, endpoint_remote, policy")
    p.add_argument("--no-trace", action="store_true",
                   help="skip the one untimed round per change under strace that records what nft fetched")
    p.add_argument("--no-netlink", action="store_true",
                   help="element-only changes through nft too (what they cost without dataplane/nft_netlink.py)")
    p.add_argument("--no-verify", action="store_true", help="skip the reconcile's costs (verify, links read-back)")
    p.add_argument("--links-child", metavar="SIZE", help=argparse.SUPPRESS)  # links_costs, inside the namespace
    a = p.parse_args()
    if a.links_child:
        print(json.dumps(links_child(a.links_child, a.repeat)))
        return
    if a.no_netlink and hasattr(nft_dp, "netlink_changes"):
        nft_dp.netlink_changes = lambda changed: None  # type: ignore[attr-defined]
    trace = not a.no_trace and shutil.which("strace") is not None
    version = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    result: dict[str, Any] = {"nft": version, "netlink": hasattr(nft_dp, "netlink_changes") and not a.no_netlink}
    kinds = a.changes.split(",")
    for size in a.sizes.split(","):
        result[size] = measure(size, a.repeat, kinds, trace, not a.no_verify)
    if "small" in result and "big" in result:
        result["ratio_big_small"] = {k: round(result["big"][k]["cpu_ms"] / max(result["small"][k]["cpu_ms"], 1e-3), 2)
                                     for k in result["small"] if k[-1] in "+-"}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
