"""Connection flows come from ctnetlink (`tether.agent.ctevents`), not a `conntrack -E` process:
in a scratch namespace, a TCP connection to a DNATed address is seen as a NEW event with both
tuples (the backend after DNAT) and a DESTROY event with packets and bytes both ways; the flow log
makes the two one `closed` record; with recording off, no socket listens."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

# Runs inside the namespace: a server on 10.9.0.2:8080 reached through 10.9.0.3:80 (DNAT), one
# connection that sends 3000 bytes and gets 5 back; TIME_WAIT lasts 1 s, so DESTROY comes soon.
SCRIPT = r"""
import asyncio, json, socket, subprocess, threading, time
from types import SimpleNamespace
from tether.agent import ctevents
from tether.agent.flowlog import FlowLog

def sh(*cmd):
    subprocess.run(cmd, check=True)

sh("ip", "link", "set", "lo", "up")
sh("ip", "addr", "add", "10.9.0.1/24", "dev", "lo")
sh("nft", "add table ip t; add chain ip t out { type nat hook output priority -100; }; "
          "add rule ip t out ip daddr 10.9.0.3 tcp dport 80 dnat to 10.9.0.2:8080")
with open("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait", "w") as f:
    f.write("1")

async def main():
    raw = ctevents.open_events()
    agent = SimpleNamespace(cfg=SimpleNamespace(flows=True), connected=False)
    flows = FlowLog("h1", "/nonexistent/flows.sock", agent=agent)
    flows._local = {"10.9.0.2"}
    flows.set_recording(True)
    srv = socket.socket()
    srv.bind(("10.9.0.2", 8080)); srv.listen()
    def serve():
        c, _ = srv.accept()
        n = 0
        while n < 3000:
            n += len(c.recv(65536))
        c.sendall(b"hello"); c.close()
    threading.Thread(target=serve, daemon=True).start()
    def client():
        c = socket.socket()
        c.bind(("10.9.0.1", 0))
        c.connect(("10.9.0.3", 80))
        c.sendall(b"x" * 3000)
        assert c.recv(100) == b"hello"
        c.close()
    await asyncio.to_thread(client)
    events = []
    buf = bytearray(65536)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(e["event"] == "destroy" for e in events):
        await asyncio.sleep(0.2)
        while True:
            try:
                n = raw.recv_into(buf)
            except BlockingIOError:
                break
            rec = ctevents.parse_event(buf, 0, 1.0)
            if rec is not None and rec["dst"] == "10.9.0.3":
                # the kernel's layout is the one the fast path reads, and both paths agree
                fast = ctevents._fast(buf, 20, n, ctevents._FAST[4], rec["event"], 1.0)
                rec["fast"] = fast == rec
                events.append(rec)
    await asyncio.sleep(0.3)  # the flow log reads CT_BATCH after the first waiting event
    recorded = list(flows.records)
    flows.set_recording(False)
    off = flows._ct_sock is None
    await flows.close()
    print(json.dumps({"events": events, "recorded": recorded, "off": off}))

asyncio.run(main())
"""


def test_ctnetlink_events_carry_both_tuples_and_the_destroys_counters(netns: Callable[[], str]) -> None:
    ns = netns()
    run = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    events = got["events"]
    assert [e["event"] for e in events] == ["new", "destroy"], events
    for e in events:
        assert (e["proto"], e["src"], e["dst"], e["dport"], e["backend"], e["backend_port"]) == \
            ("tcp", "10.9.0.1", "10.9.0.3", 80, "10.9.0.2", 8080), e
        assert e["sport"] > 1024
        assert e["fast"], "the kernel's message took the slow path, or the two paths disagree"
    new, destroy = events
    assert "packets" not in new, "counters come with DESTROY only"
    # client -> server: SYN, ACK, data (3000 bytes in one or more segments), FIN, ACK...
    assert destroy["packets"] >= 4 and destroy["bytes"] >= 3000 + 4 * 40, destroy
    assert destroy["reply_packets"] >= 3 and 5 + 3 * 40 <= destroy["reply_bytes"] < 3000, destroy
    recorded = got["recorded"]
    assert len(recorded) == 1, recorded
    rec = recorded[0]
    assert rec["event"] == "closed" and rec["host"] == "h1" and rec["ended"] >= rec["time"]
    assert {k: rec[k] for k in ("src", "dst", "sport", "dport", "backend", "backend_port", "packets", "bytes",
                                 "reply_packets", "reply_bytes")} == \
        {k: destroy[k] for k in ("src", "dst", "sport", "dport", "backend", "backend_port", "packets", "bytes",
                                 "reply_packets", "reply_bytes")}
    assert got["off"], "recording off closes the socket (the kernel then makes no events)"
