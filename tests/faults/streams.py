"""A long-lived TCP stream between two lab pods, started by the fault tests before their fault: its
exit code says whether an established flow broke (tests/lab/tcp_stream.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from tether.lab.cluster import Lab, wait_for

STREAM = os.path.join(os.path.dirname(__file__), "..", "lab", "tcp_stream.py")


def popen_in(ns: str, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def tcp_stream(lab: Lab, sender, receiver, receiver_ref: str, port: int, seconds: float,
               procs: list[subprocess.Popen]) -> subprocess.Popen:
    """`sender` streams to `receiver` (lab pods; `receiver_ref` is "host/name") for `seconds`; both
    processes go into `procs` for the caller to stop. The sending process is returned."""
    procs.append(popen_in(receiver.ns, sys.executable, STREAM, "serve", str(port)))
    wait_for(lambda: f":{port}" in lab.exec(receiver_ref, "ss", "-Hltn").stdout, 10, "the stream server")
    stream = popen_in(sender.ns, sys.executable, STREAM, "send", receiver.ip, str(port), str(seconds))
    procs.append(stream)
    return stream
