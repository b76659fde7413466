"""Flow records (issue 25): conntrack events (ctnetlink messages) parse into records with the service backend and
counters; IPv6 DAD/MLD noise is filtered; both ends are named from the desired state; the CLI's
filters match pods, namespaces and services; drop counters never go backwards across a rule's
replacement (the reset that made a policy's counter fall to 0)."""

from __future__ import annotations

import socket
import struct

from tether.agent import ctevents
from tether.agent.ctevents import parse_event
from tether.agent.flowlog import Monotonic, drop_metrics
from tether.flows import Names, is_noise, label, matches, pack, policy_of_prefix, unpack_group
from tether.model import Endpoint, Network, Service, Subnet

NEW = {"event": "new", "verdict": "allow", "proto": "tcp", "src": "10.1.0.5", "dst": "10.96.0.10", "sport": 51002,
       "dport": 80, "time": 1796624053.443666, "backend": "10.1.0.9", "backend_port": 8080}


def attr(kind: int, data: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(data), kind) + data + b"\0" * (-len(data) % 4)


def ct_tuple(src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    kinds = (3, 4) if family == socket.AF_INET6 else (1, 2)
    ip = attr(0x8000 | 1, attr(kinds[0], socket.inet_pton(family, src)) + attr(kinds[1], socket.inet_pton(family, dst)))
    ports = attr(2, struct.pack(">H", sport)) + attr(3, struct.pack(">H", dport)) if proto in (6, 17) else b""
    return ip + attr(0x8000 | 2, attr(1, bytes([proto])) + ports)


def ct_message(kind: int, flags: int, orig: bytes, reply: bytes, counters: tuple[int, ...] = ()) -> bytes:
    """A ctnetlink event as the kernel sends it (type 0x100 NEW, 0x102 DELETE), with the attributes
    a record needs and two it does not (status, id)."""
    body = attr(0x8000 | 1, orig) + attr(0x8000 | 2, reply) + attr(3, struct.pack(">I", 0x18e))
    if counters:
        p, b, rp, rb = counters
        body += attr(0x8000 | 9, attr(1, struct.pack(">Q", p)) + attr(2, struct.pack(">Q", b)))
        body += attr(0x8000 | 10, attr(1, struct.pack(">Q", rp)) + attr(2, struct.pack(">Q", rb)))
    body += attr(12, struct.pack(">I", 12345))
    return struct.pack("=IHHII", 20 + len(body), kind, flags, 0, 0) + bytes([2, 0, 0, 0]) + body


def test_a_conntrack_event_becomes_a_record_with_its_backend_and_counters() -> None:
    new = ct_message(0x100, 0x400 | 0x200, ct_tuple("10.1.0.5", "10.96.0.10", 6, 51002, 80),
                     ct_tuple("10.1.0.9", "10.1.0.5", 6, 8080, 51002))
    r = parse_event(b"\0" * 8 + new, 8, now=1796624053.443666)
    assert r == NEW
    assert ctevents._fast(new, 20, len(new), ctevents._FAST[4], "new", 1796624053.443666) == NEW, \
        "the usual message is read in one unpack"
    destroy = ct_message(0x102, 0, ct_tuple("fd00::5", "fd00::9", 17, 4000, 53),
                         ct_tuple("fd00::9", "fd00::5", 17, 53, 4000), (2, 120, 1, 90))
    d = parse_event(destroy)
    assert d is not None and d["event"] == "destroy" and "backend" not in d
    assert (d["proto"], d["src"], d["dst"], d["sport"], d["dport"]) == ("udp", "fd00::5", "fd00::9", 4000, 53)
    assert (d["packets"], d["bytes"], d["reply_packets"], d["reply_bytes"]) == (2, 120, 1, 90)
    assert ctevents._fast(destroy, 20, len(destroy), ctevents._FAST[16], "destroy", 0.0) == d
    ping = parse_event(ct_message(0x102, 0, ct_tuple("10.1.0.5", "10.1.0.9", 1, 0, 0),
                                  ct_tuple("10.1.0.9", "10.1.0.5", 1, 0, 0)))
    assert ping is not None and ping["proto"] == "icmp" and "sport" not in ping
    update = ct_message(0x100, 0, ct_tuple("10.1.0.5", "10.1.0.9", 6, 1, 2), ct_tuple("10.1.0.9", "10.1.0.5", 6, 2, 1))
    assert parse_event(update) is None, "an update (NEW without NLM_F_CREATE) is not a record"


def test_ipv6_neighbour_discovery_and_mld_are_noise() -> None:
    assert is_noise({"proto": "icmpv6", "src": "::", "dst": "ff02::1:ff00:5"})
    assert is_noise({"proto": "icmpv6", "src": "fe80::1", "dst": "ff02::16"})
    assert not is_noise({"proto": "icmpv6", "src": "fd00::5", "dst": "fd00::6"})
    assert not is_noise({"proto": "tcp", "src": "10.1.0.5", "dst": "10.1.0.6"})


def names() -> Names:
    eps = [Endpoint(name="web-1", namespace="shop", network="n1", host="h2", ips=["10.1.0.9"]),
           Endpoint(name="client", namespace="default", network="n1", host="h1", ips=["10.1.0.5"])]
    svc = Service(name="web", namespace="shop", cluster_ip="10.96.0.10", ports=[{"port": 80, "target_port": 8080}])
    return Names.of(eps, [svc], [Network(name="n1", subnets=[Subnet(cidr="10.1.0.0/16")])], {"h1": "198.18.0.1"})


def test_both_ends_are_named_and_filters_match_pods_namespaces_and_services() -> None:
    n = names()
    r = dict(NEW)
    r["from"], r["to"], r["backend_of"] = n.describe(r["src"]), n.describe(r["dst"]), n.describe(r["backend"])
    assert r["from"] == {"pod": "default/client", "namespace": "default", "network": "n1", "host": "h1"}
    assert r["to"] == {"service": "shop/web", "namespace": "shop"}
    assert r["backend_of"]["pod"] == "shop/web-1"
    assert n.describe("198.18.0.1") == {"host": "h1", "node": True}
    assert n.describe("10.1.200.1") == {"network": "n1"} and n.describe("8.8.8.8") == {"external": True}
    assert label(r["to"], r["dst"]) == "svc:shop/web" and label({}, "8.8.8.8") == "8.8.8.8"
    for want in ("default/client", "default", "client", "10.1.0.5"):
        assert matches(r, src=want), want
    for want in ("svc:shop/web", "shop/web", "shop/web-1", "shop"):
        assert matches(r, dst=want), want
    assert not matches(r, src="shop") and not matches(r, verdict="deny") and matches(r, verdict="allow")


def test_a_denied_packet_names_its_policy_from_the_log_prefix() -> None:
    assert policy_of_prefix("deny in np shop/deny-db") == "shop/deny-db"
    assert policy_of_prefix("deny out sg web") == "sg:web"
    assert policy_of_prefix("spoofed source address") == "antispoof"


def test_drop_counters_never_go_backwards_when_a_rule_is_replaced() -> None:
    m = Monotonic()
    key = "ep-in-x/deny in np shop/deny-db"
    assert m.update({key: 5})[key] == 5
    assert m.update({key: 0})[key] == 5, "the chain was rebuilt by another policy: its counter restarted"
    assert m.update({key: 3})[key] == 8
    assert m.update({})[key] == 8, "a rule that disappears keeps its total"
    assert m.update({key: 1})[key] == 9
    text = drop_metrics("h1", m.update({key: 2}))
    assert 'tether_policy_dropped_packets_total{host="h1",policy="shop/deny-db"} 10' in text


def test_a_connection_opened_and_closed_between_two_pushes_is_one_record_with_its_counters() -> None:
    """Half the records for the agent, the server and the ring (bench/flows.py: recording's cost);
    a connection whose NEW was already pushed still gets its own DESTROY record."""
    import asyncio
    from types import SimpleNamespace

    from tether.agent.flowlog import FlowLog

    def line(event: str, sport: int, packets: int = 0, nbytes: int = 0) -> dict:
        rec = {"event": event.lower(), "verdict": "allow", "proto": "tcp", "src": "10.1.0.5", "dst": "10.1.0.9",
               "sport": sport, "dport": 80, "time": 1796624053.5}
        if packets:
            rec.update(packets=packets, bytes=nbytes, reply_packets=packets, reply_bytes=nbytes)
        return rec

    pushed: list[dict] = []

    async def request(method: str, path: str, content: str) -> None:
        import json

        body = json.loads(content)
        pushed.extend(body.get("records", []))
        for g in body["groups"]:
            common, columns, rows = unpack_group(g, 100)
            pushed.extend({**common, **dict(zip(columns, row, strict=True))} for row in rows)

    agent = SimpleNamespace(cfg=SimpleNamespace(flows=True), connected=True, client=SimpleNamespace(request=request))
    f = FlowLog("h2", "/nonexistent/flows.sock", agent=agent)
    f._local = {"10.1.0.9"}
    f._connections([line("NEW", 1000), line("DESTROY", 1000, 3, 180), line("NEW", 1001)])
    assert [(r["event"], r["sport"]) for r in f.outbox] == [("closed", 1000), ("new", 1001)]
    closed = f.outbox[0]
    assert (closed["packets"], closed["bytes"], closed["reply_packets"], closed["time"]) == (3, 180, 3, 1796624053.5)

    async def one_push() -> None:
        import tether.agent.flowlog as fl

        fl.PUSH_INTERVAL, before = 0.0, fl.PUSH_INTERVAL
        task = asyncio.get_running_loop().create_task(f._push_loop())
        try:
            while f.outbox:
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            fl.PUSH_INTERVAL = before

    asyncio.run(one_push())
    f._connections([line("DESTROY", 1001, 1, 60)])
    assert [(r["event"], r["sport"]) for r in pushed] == [("closed", 1000), ("new", 1001)]
    assert [(r["event"], r["sport"], r["packets"]) for r in f.outbox] == [("destroy", 1001, 1)]
    assert len(f.records) == 3


def test_a_push_groups_connection_records_and_keeps_every_field() -> None:
    """What the server gets back from a push is what the agent recorded: grouped connection
    records (named and judged once per group) and a denied packet as it is; a malformed group or
    row is skipped, not taken."""
    recs = [{**NEW, "sport": 51000 + i, "time": 1.0 + i, "host": "h1"} for i in range(3)]
    recs.append({**NEW, "event": "closed", "ended": 9.0, "packets": 3, "bytes": 180, "reply_packets": 2,
                 "reply_bytes": 90, "host": "h1"})
    recs.append({"verdict": "deny", "proto": "tcp", "src": "10.1.0.5", "dst": "10.1.0.9", "reason": "deny in np a/b",
                 "interface": "veth1", "time": 2.0})
    body = pack(recs)
    assert len(body["groups"]) == 2 and body["records"] == [recs[-1]]
    back = []
    for g in body["groups"]:
        common, columns, rows = unpack_group(g, 100)
        back += [{**common, **dict(zip(columns, row, strict=True))} for row in rows]
    assert sorted(back, key=lambda r: r["time"]) == sorted(recs[:-1], key=lambda r: r["time"])
    bad = {"common": {"src": "10.1.0.5", "from": {"pod": "x"}}, "columns": ["sport", "time"],
           "rows": [[1, 2.0], [1, {"x": 1}], [1], "no", [3, 4.0]]}
    assert unpack_group(bad, 100) == ({"src": "10.1.0.5"}, ["sport", "time"], [[1, 2.0], [3, 4.0]])
    assert unpack_group(bad, 1)[2] == [[1, 2.0]], "no more rows than the push has room for"
    assert unpack_group({**bad, "columns": ["sport", "reason"]}, 100) == ({}, [], []), "only numeric columns"
    assert unpack_group([1, 2], 100) == ({}, [], [])
