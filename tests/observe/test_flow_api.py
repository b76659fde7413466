"""The server's flow ring (issue 25): records a host pushes are named from the desired state (pods,
services), filtered, and followed with a cursor that holds the request until something new comes;
a host credential may push only its own host's records; the programming status route answers for
each kind and 404s with the kinds it knows."""

from __future__ import annotations

import threading
import time

from tests.fixtures.server import ServerProc
from tether.server.auth import host_rule


def test_pushed_flows_are_named_filtered_and_followed(sqlite_server: ServerProc) -> None:
    http = sqlite_server.http()
    assert http.put("/api/v1/hosts/h1", json={"name": "h1", "underlay_ip": "198.18.0.1"}).status_code in (200, 201)
    assert http.post("/api/v1/networks", json={"name": "n1", "subnets": [{"cidr": "10.1.0.0/16"}]}).status_code == 201
    assert http.put("/api/v1/namespaces/shop", json={"name": "shop"}).status_code in (200, 201)
    ips = []
    for name in ("client", "db"):
        r = http.post("/api/v1/endpoints", json={"name": name, "network": "n1", "host": "h1", "namespace": "shop"})
        assert r.status_code == 201, r.text
        ips.append(r.json()["ips"][0])
    records = [{"verdict": "deny", "proto": "tcp", "src": ips[0], "dst": ips[1], "dport": 5432,
                "reason": "deny in np shop/deny-db", "time": time.time()},
               {"verdict": "deny", "proto": "icmpv6", "src": "::", "dst": "ff02::1:ff00:1", "reason": "spoofed"},
               {"event": "new", "verdict": "allow", "proto": "udp", "src": ips[0], "dst": "8.8.8.8", "dport": 53}]
    assert http.post("/api/v1/hosts/h1/flows", json={"records": records}).json() == {"kept": 2}
    got = http.get("/api/v1/flows", params={"to": "shop/db"}).json()
    assert len(got["flows"]) == 1
    f = got["flows"][0]
    assert f["from"]["pod"] == "shop/client" and f["to"]["pod"] == "shop/db" and f["policy"] == "shop/deny-db"
    assert f["reporter"] == "h1"
    assert [x["dst"] for x in http.get("/api/v1/flows", params={"verdict": "allow"}).json()["flows"]] == ["8.8.8.8"]
    assert http.get("/api/v1/flows", params={"verdict": "maybe"}).status_code == 422

    # follow: a request after the last seq waits until a new record arrives
    last = got["last"]
    later = {"verdict": "deny", "proto": "tcp", "src": ips[0], "dst": ips[1], "dport": 5433, "reason": "x"}
    threading.Timer(0.5, lambda: sqlite_server.http().post("/api/v1/hosts/h1/flows", json={"records": [later]})).start()
    t0 = time.monotonic()
    new = http.get("/api/v1/flows", params={"after": last, "wait": 10}).json()
    assert [x["dport"] for x in new["flows"]] == [5433] and 0.3 < time.monotonic() - t0 < 9


def test_programming_status_answers_for_known_kinds_only(sqlite_server: ServerProc) -> None:
    http = sqlite_server.http()
    assert http.put("/api/v1/namespaces/default/networkpolicies/p1", json={
        "name": "p1", "namespace": "default", "spec": {"podSelector": {}}}).status_code in (200, 201)
    p = http.get("/api/v1/programming/NetworkPolicy/default/p1").json()
    assert p["total"] == 0 and p["programmed"] and p["summary"].startswith("enforced on 0/0 hosts")
    r = http.get("/api/v1/programming/Block/x")
    assert r.status_code == 404 and "NetworkPolicy" in r.text
    assert http.get("/api/v1/programming/NetworkPolicy/default/nope").status_code == 404


def test_a_host_may_push_only_its_own_flows_and_peer_reports() -> None:
    assert host_rule("h1", "POST", "/api/v1/hosts/h1/flows") is None
    assert host_rule("h1", "POST", "/api/v1/hosts/h1/peers") is None
    assert "may write only its own" in (host_rule("h1", "POST", "/api/v1/hosts/h2/flows") or "")
    assert host_rule("h1", "GET", "/ui") is not None, "the web page is for the admin token"


def test_grouped_records_are_named_once_and_names_follow_the_desired_state(sqlite_server: ServerProc) -> None:
    """An agent's push groups its connection records (`tether.flows.pack`); every row comes back
    as its own named record. The server keeps the names between pushes until the desired state
    changes: a pod created after a push is named in the next one."""
    from tether.flows import pack

    http = sqlite_server.http()
    assert http.put("/api/v1/hosts/h1", json={"name": "h1", "underlay_ip": "198.18.0.1"}).status_code in (200, 201)
    assert http.post("/api/v1/networks", json={"name": "n1", "subnets": [{"cidr": "10.1.0.0/16"}]}).status_code == 201
    client = http.post("/api/v1/endpoints", json={"name": "client", "network": "n1", "host": "h1"}).json()["ips"][0]
    server_ip = "10.1.200.7"

    def push(first: int) -> None:
        recs = [{"event": "new", "verdict": "allow", "proto": "tcp", "src": client, "dst": server_ip, "sport": s,
                 "dport": 80, "time": 1.0, "host": "h1"} for s in range(first, first + 3)]
        assert http.post("/api/v1/hosts/h1/flows", json=pack(recs)).json() == {"kept": 3}

    push(1000)
    got = http.get("/api/v1/flows").json()["flows"]
    assert [f["sport"] for f in got] == [1000, 1001, 1002]
    assert all(f["from"]["pod"] == "default/client" and f["to"] == {"network": "n1"} and f["reporter"] == "h1"
               for f in got)
    r = http.post("/api/v1/endpoints", json={"name": "web", "network": "n1", "host": "h1", "ips": [server_ip]})
    assert r.status_code == 201, r.text
    push(2000)
    got = http.get("/api/v1/flows", params={"to": "default/web"}).json()["flows"]
    assert [f["sport"] for f in got] == [2000, 2001, 2002]
    bad = {"groups": [{"common": {"src": client, "dst": server_ip, "proto": "tcp", "verdict": "allow"},
                       "columns": ["sport"], "rows": [[1], ["x"], [{"y": 1}]]}, "nonsense",
                      {"common": {"src": client, "dst": server_ip, "proto": "tcp", "dport": "x"}, "columns": [],
                       "rows": [[]]}]}
    assert http.post("/api/v1/hosts/h1/flows", json=bad).json() == {"kept": 2}
