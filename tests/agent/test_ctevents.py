"""Connection flows come from ctnetlink (`tether.agent.ctevents`), not a `conntrack -E` process:
in a scratch namespace, a TCP connection (IPv4 and IPv6) to a DNATed address is seen as a NEW event with both
tuples (the backend after DNAT) and a DESTROY event with packets and bytes both ways; the flow log
makes the two one `closed` record; with recording off, no socket listens."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

# Runs inside the namespace, for IPv4 and IPv6: a server on .2:8080 reached through .3:80 (DNAT),
# one connection that sends 3000 bytes and gets 5 back, then conntrack's table is flushed (DESTROY:
# the kernel's reaper may take a minute to forget a closed connection).
SCRIPT = r"""
import asyncio, json, socket, struct, subprocess, threading, time
from types import SimpleNamespace
from tether.agent import ctevents
from tether.agent.flowlog import FlowLog

FAMILIES = {"4": (socket.AF_INET, "10.9.0.", "ip", "ip daddr 10.9.0.3 tcp dport 80 dnat to 10.9.0.2:8080"),
            "6": (socket.AF_INET6, "fd00::", "ip6", "ip6 daddr fd00::3 tcp dport 80 dnat to [fd00::2]:8080")}

def sh(*cmd):
    subprocess.run(cmd, check=True)

sh("ip", "link", "set", "lo", "up")
sh("ip", "addr", "add", "10.9.0.1/24", "dev", "lo")
for a in ("fd00::1", "fd00::2"):
    sh("ip", "addr", "add", a + "/128", "dev", "lo", "nodad")
sh("ip", "-6", "route", "add", "local", "fd00::3", "dev", "lo")
for _, _, fam, rule in FAMILIES.values():
    sh("nft", f"add table {fam} t; add chain {fam} t out {{ type nat hook output priority -100; }}; "
              f"add rule {fam} t out {rule}")

async def one(version):
    family, net, _, _ = FAMILIES[version]
    raw = ctevents.open_events()
    agent = SimpleNamespace(cfg=SimpleNamespace(flows=True), connected=False)
    flows = FlowLog("h1", "/nonexistent/flows.sock", agent=agent)
    flows._local = {net + "2"}
    flows.set_recording(True)
    srv = socket.socket(family)
    srv.bind((net + "2", 8080)); srv.listen()
    def serve():
        c, _ = srv.accept()
        n = 0
        while n < 3000:
            n += len(c.recv(65536))
        c.sendall(b"hello"); c.close()
    threading.Thread(target=serve, daemon=True).start()
    def client():
        c = socket.socket(family)
        c.bind((net + "1", 0))
        c.connect((net + "3", 80))
        c.sendall(b"x" * 3000)
        assert c.recv(100) == b"hello"
        c.close()
    await asyncio.to_thread(client)
    await asyncio.sleep(0.5)  # the last ACKs
    flush = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctevents.NETLINK_NETFILTER)
    flush.send(struct.pack("=IHHII", 20, ctevents.MSG_DELETE, 1 | 4, 1, 0) + bytes([family, 0, 0, 0]))
    assert struct.unpack_from("=i", flush.recv(4096), 16)[0] == 0, "the flush failed"
    flush.close()
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
            if rec is not None and rec["dst"] == net + "3":
                # the kernel's layout is the one the fast path reads, and both paths agree
                fast = ctevents._fast(buf, 20, n, ctevents._FAST[4 if version == "4" else 16], rec["event"], 1.0)
                rec["fast"] = fast == rec
                events.append(rec)
    raw.close()
    srv.close()
    await asyncio.sleep(0.3)  # the flow log reads CT_BATCH after the first waiting event
    recorded = list(flows.records)
    flows.set_recording(False)
    off = flows._ct_sock is None
    await flows.close()
    return {"events": events, "recorded": recorded, "off": off}

async def main():
    print(json.dumps({v: await one(v) for v in FAMILIES}))

asyncio.run(main())
"""


def test_ctnetlink_events_carry_both_tuples_and_the_destroys_counters(netns: Callable[[], str]) -> None:
    ns = netns()
    run = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for version, got in json.loads(run.stdout).items():
        net = "10.9.0." if version == "4" else "fd00::"
        events = got["events"]
        assert [e["event"] for e in events] == ["new", "destroy"], (version, events)
        for e in events:
            assert (e["proto"], e["src"], e["dst"], e["dport"], e["backend"], e["backend_port"]) == \
                ("tcp", net + "1", net + "3", 80, net + "2", 8080), e
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
        fields = ("src", "dst", "sport", "dport", "backend", "backend_port", "packets", "bytes", "reply_packets",
                  "reply_bytes")
        assert {k: rec[k] for k in fields} == {k: destroy[k] for k in fields}
        assert got["off"], "recording off closes the socket (the kernel then makes no events)"
