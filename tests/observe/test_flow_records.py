"""Flow records (issue 25): conntrack events parse into records with the service backend and
counters; IPv6 DAD/MLD noise is filtered; both ends are named from the desired state; the CLI's
filters match pods, namespaces and services; drop counters never go backwards across a rule's
replacement (the reset that made a policy's counter fall to 0)."""

from __future__ import annotations

from tether.agent.flowlog import Monotonic, drop_metrics
from tether.flows import Names, is_noise, label, matches, parse_conntrack, policy_of_prefix
from tether.model import Endpoint, Network, Service, Subnet

NEW = ("[1796624053.443666]\t    [NEW] tcp      6 120 SYN_SENT src=10.1.0.5 dst=10.96.0.10 sport=51002 dport=80 "
       "[UNREPLIED] src=10.1.0.9 dst=10.1.0.5 sport=8080 dport=51002 id=1752794155")
DESTROY = ("[1796624060.0]\t [DESTROY] udp      17 src=10.1.0.5 dst=10.1.0.9 sport=4000 dport=53 packets=2 bytes=120 "
           "src=10.1.0.9 dst=10.1.0.5 sport=53 dport=4000 packets=1 bytes=90")


def test_a_conntrack_event_becomes_a_record_with_its_backend_and_counters() -> None:
    r = parse_conntrack(NEW)
    assert r is not None
    assert (r["event"], r["verdict"], r["proto"], r["src"], r["dst"], r["sport"], r["dport"]) == \
        ("new", "allow", "tcp", "10.1.0.5", "10.96.0.10", 51002, 80)
    assert r["backend"] == "10.1.0.9" and r["backend_port"] == 8080 and r["time"] == 1796624053.443666
    d = parse_conntrack(DESTROY)
    assert d is not None and d["event"] == "destroy" and "backend" not in d
    assert (d["packets"], d["bytes"], d["reply_packets"], d["reply_bytes"]) == (2, 120, 1, 90)
    assert parse_conntrack("conntrack v1.4.7 (conntrack-tools): 2 flow events have been shown.") is None


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
    r = parse_conntrack(NEW)
    assert r is not None
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

    def line(event: str, sport: int, counters: str = "") -> bytes:
        return (f"[1796624053.5]\t [{event}] tcp      6 120 SYN_SENT src=10.1.0.5 dst=10.1.0.9 sport={sport} "
                f"dport=80 {counters} src=10.1.0.9 dst=10.1.0.5 sport=80 dport={sport} {counters}").encode()

    pushed: list[dict] = []

    async def request(method: str, path: str, content: str) -> None:
        import json

        pushed.extend(json.loads(content)["records"])

    agent = SimpleNamespace(cfg=SimpleNamespace(flows=True), connected=True, client=SimpleNamespace(request=request))
    f = FlowLog("h2", "/nonexistent/flows.sock", agent=agent)
    f._local = {"10.1.0.9"}
    f._conntrack_lines([line("NEW", 1000), line("DESTROY", 1000, "packets=3 bytes=180"), line("NEW", 1001)])
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
    f._conntrack_lines([line("DESTROY", 1001, "packets=1 bytes=60")])
    assert [(r["event"], r["sport"]) for r in pushed] == [("closed", 1000), ("new", 1001)]
    assert [(r["event"], r["sport"], r["packets"]) for r in f.outbox] == [("destroy", 1001, 1)]
    assert len(f.records) == 3
