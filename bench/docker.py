"""`docker run` latency on a Tether network vs Docker's own bridge network, same daemon, same run.

    .venv/bin/python -m bench.docker [--containers 50]

A 1-host lab with a private dockerd inside the host namespace (tether.lab.dockerd). Two networks
on that daemon: `-d tether --ipam-driver tether` and `-d bridge`. `docker run -d` (the CLI, as a
user runs it) is timed for `--containers` containers on each, alternating call by call so machine
noise hits both equally; then `docker rm -f` of each, timed the same way. Target: run p50 on Tether
<= 1.3x the bridge's. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from tether.lab.cluster import Lab
from tether.lab.dockerd import IMAGE, Dockerd, available

TARGET = 1.3


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(len(s) * q))] * 1000, 1)


def _stats(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": _pct(xs, 0.5), "p90_ms": _pct(xs, 0.9), "max_ms": _pct(xs, 1.0)}


def _timed(d: Dockerd, *args: str) -> float:
    t = time.perf_counter()
    d.docker(*args)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--containers", type=int, default=50)
    a = ap.parse_args()
    why = available()
    if why:
        raise SystemExit(why)
    lab = Lab(f"bd{os.getpid() % 100000:05d}")
    root = tempfile.mkdtemp(prefix="tether-bench-docker-")
    d: Dockerd | None = None
    try:
        lab.up(hosts=1, progress=lambda _m: None)  # the host credential suffices (a Docker-labelled network)
        d = Dockerd(lab.host("h1").ns, root, lab.docker_plugin_dir("h1"), lab.docker_socket("h1"))
        d.start()
        d.import_busybox()
        d.docker("network", "create", "-d", "tether", "--ipam-driver", "tether", "--subnet", "10.97.0.0/16", "tnet")
        d.docker("network", "create", "-d", "bridge", "--subnet", "10.98.0.0/16", "bnet")
        for net in ("tnet", "bnet"):  # warm-up: first-use costs (plugin activation, image layers) stay out
            d.docker("run", "-d", "--name", f"warm-{net}", "--network", net, IMAGE, "sleep", "100000")
        runs: dict[str, list[float]] = {"tether": [], "bridge": []}
        rms: dict[str, list[float]] = {"tether": [], "bridge": []}
        for i in range(a.containers):
            for kind, net in (("tether", "tnet"), ("bridge", "bnet")) if i % 2 == 0 else (("bridge", "bnet"),
                                                                                          ("tether", "tnet")):
                runs[kind].append(_timed(d, "run", "-d", "--name", f"{kind}-{i}", "--network", net, IMAGE,
                                         "sleep", "100000"))
        for i in range(a.containers):
            for kind in ("tether", "bridge") if i % 2 == 0 else ("bridge", "tether"):
                rms[kind].append(_timed(d, "rm", "-f", f"{kind}-{i}"))
        out = {"bench": "docker", "containers": a.containers,
               "docker_version": d.docker("version", "--format", "{{.Server.Version}}").stdout.strip(),
               "run": {k: _stats(v) for k, v in runs.items()}, "rm": {k: _stats(v) for k, v in rms.items()}}
        ratio = out["run"]["tether"]["p50_ms"] / out["run"]["bridge"]["p50_ms"]
        out["run_p50_ratio"] = round(ratio, 2)
        out["target"] = f"run p50 <= {TARGET}x bridge"
        out["meets_target"] = ratio <= TARGET
        print(json.dumps(out, indent=2))
    finally:
        if d is not None:
            d.cleanup()
        lab.down()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
