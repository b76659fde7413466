"""Paired measurements for A-vs-B datapath benches on a noisy shared machine.

A single iperf3 stream between namespaces is CPU-bound and swings by +-50% from run to run here,
and a round's latency falls in one of two modes, so comparing separate runs of A and B cannot judge
5%. These helpers measure A and B inside one process, slice by slice:
- `interleaved_streams`: one bulk TCP connection per target (each made inside its own client
  namespace); the process sends on one at a time for a slice, rotating through the targets round
  after round (order reversed every other round), so each round compares the targets within about
  a second;
- `interleaved_rr`: the same rotation for 1-byte request/response on one connection per target;
  each round gives every target's p50 round trip;
- `crossover`: the ratio of two sides over rounds, with a 90% bootstrap interval and a verdict;
  given two phases in which the sides swapped roles, it cancels a difference between the two
  setups themselves (two identical labs differ by a few percent on their own).
Clients run on CPU 0 and servers on CPU 1 (`CLIENT_CPU`, `SERVER_CPU`), in every bench.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys

from tether.lab.cluster import sh

# Same CPU placement for every path: the sending side's softirq work runs on the client's CPU.
CLIENT_CPU, SERVER_CPU = ("taskset", "-c", "0"), ("taskset", "-c", "1" if (os.cpu_count() or 1) > 1 else "0")

SINK_PORT = 5301
ECHO_PORT = 5302

# Accepts any number of connections and discards what they send.
SINK = r"""
import socket, sys, threading
# IPv4 and IPv6 (bench/dataplane.py's IPv6 path) on one socket
s = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, backlog=16, dualstack_ipv6=True)
def drain(c):
    b = bytearray(1 << 20)
    while c.recv_into(b):
        pass
while True:
    c, _ = s.accept()
    threading.Thread(target=drain, args=(c,), daemon=True).start()
"""

# Echoes every byte back, any number of connections, each on its own thread.
ECHO = r"""
import socket, sys, threading
# IPv4 and IPv6 (bench/dataplane.py's IPv6 path) on one socket
s = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, backlog=16, dualstack_ipv6=True)
def echo(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(1)
        if not b:
            return
        c.sendall(b)
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""

# Shared by both clients: one connection per target [label, netns, ip, port], each made inside its
# netns (setns), then `rounds` + 1 rounds over the targets (round 0 warms up and is not counted).
_CONNECT = r"""
import ctypes, json, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
targets, rounds, arg = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
socks = []
for label, ns, ip, port in targets:
    fd = os.open("/run/netns/" + ns, os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns " + ns)
    os.close(fd)
    socks.append(socket.create_connection((ip, port), 5))
out = {t[0]: [] for t in targets}
clock = time.perf_counter
def order(r):
    return range(len(socks)) if r % 2 == 0 else range(len(socks) - 1, -1, -1)
"""

# Sends on one connection at a time for `arg` seconds; a round's figure is Gbit/s the kernel accepted.
STREAMS = _CONNECT + r"""
buf = memoryview(bytearray(1 << 20))
for r in range(rounds + 1):
    for i in order(r):
        send, sent, t0 = socks[i].send, 0, clock()
        end = t0 + arg
        while True:
            sent += send(buf)
            now = clock()
            if now >= end:
                break
        if r:
            out[targets[i][0]].append(sent * 8 / (now - t0) / 1e9)
print(json.dumps(out))
"""

# `arg` 1-byte round trips on one connection at a time; a round's figure is their p50 in us.
PINGPONG = _CONNECT + r"""
n = int(arg)
for s in socks:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for r in range(rounds + 1):
    for i in order(r):
        c, times = socks[i], []
        for _ in range(n):
            t = clock()
            c.sendall(b"x")
            if not c.recv(1):
                raise SystemExit("server closed")
            times.append(clock() - t)
        if r:
            times.sort()
            out[targets[i][0]].append(times[n // 2] * 1e6)
print(json.dumps(out))
"""

Target = tuple[str, str, str, int]  # label, client netns, server ip, port


def add_arguments(ap: argparse.ArgumentParser, stream_rounds: int, rr_rounds: int, note: str = "") -> None:
    """The command-line options of the interleaved measurements, with a bench's defaults."""
    ap.add_argument("--stream-rounds", type=int, default=stream_rounds, help=f"interleaved stream rounds{note}")
    ap.add_argument("--slice", type=float, default=0.3, help="seconds each stream sends per round")
    ap.add_argument("--rr-rounds", type=int, default=rr_rounds, help=f"interleaved request/response rounds{note}")
    ap.add_argument("--round-trips", type=int, default=300, help="round trips per path per request/response round")


def start_sink_and_echo(server_ns: str, sink_port: int = SINK_PORT, echo_port: int = ECHO_PORT
                        ) -> list[subprocess.Popen]:
    """SINK and ECHO in `server_ns`, on the server CPU; the caller stops them by PID."""
    return [subprocess.Popen(["ip", "netns", "exec", server_ns, *SERVER_CPU, sys.executable, "-I", "-S", "-c", script,
                              str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
            for script, port in ((SINK, sink_port), (ECHO, echo_port))]


def _run(script: str, targets: list[Target], rounds: int, arg: float, per_round_s: float) -> dict[str, list[float]]:
    r = sh(*CLIENT_CPU, sys.executable, "-I", "-S", "-c", script, json.dumps(targets), str(rounds), str(arg),
           timeout=rounds * per_round_s * len(targets) + 120)
    return json.loads(r.stdout)


def interleaved_streams(targets: list[Target], rounds: int, slice_s: float) -> dict[str, list[float]]:
    """Gbit/s per round for every target (see STREAMS); targets should point at a SINK."""
    return _run(STREAMS, targets, rounds, slice_s, slice_s)


def interleaved_rr(targets: list[Target], rounds: int, round_trips: int) -> dict[str, list[float]]:
    """p50 round trip (us) per round for every target (see PINGPONG); targets should point at an ECHO."""
    return _run(PINGPONG, targets, rounds, round_trips, round_trips * 0.001)


def crossover(phases: list[tuple[list[float], list[float]]], low: float = 0.95, high: float = 1.05,
              resamples: int = 2000) -> dict:
    """The ratio of side b to side a, from per-round pairs [(b rounds, a rounds), ...] of one or
    more phases: per phase the median of the per-round ratios; the estimate is their geometric mean,
    so when the two setups swapped roles between phases, a difference between the setups themselves
    enters once as d and once as 1/d and cancels. 90% interval: bootstrap, each phase's rounds
    resampled with replacement, fixed seed. The verdict compares the interval with [low, high]."""
    per_phase = [[b / a for b, a in zip(bs, as_, strict=True) if a] for bs, as_ in phases]
    rng = random.Random(0)

    def estimate(samples: list[list[float]]) -> float:
        return math.prod(statistics.median(x) for x in samples) ** (1 / len(samples))

    boot = sorted(estimate([rng.choices(x, k=len(x)) for x in per_phase]) for _ in range(resamples))
    lo, hi = boot[int(resamples * 0.05)], boot[int(resamples * 0.95)]
    verdict = ("within" if lo >= low and hi <= high else
               "outside" if hi < low or lo > high else "noise too large to judge")
    return {"ratio": round(estimate(per_phase), 3), "interval_90": [round(lo, 3), round(hi, 3)],
            "bounds": [low, high], "verdict": verdict, "per_phase": [round(statistics.median(x), 3) for x in per_phase]}
