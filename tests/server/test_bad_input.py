"""Bad input gets a 4xx that says what to fix, and leaves the store exactly as it was."""

from __future__ import annotations

import pytest

GOOD_NET = {"name": "red", "subnets": [{"cidr": "10.1.0.0/16"}]}


def state(http) -> dict:
    snap = http.get("/api/v1/snapshot").json()
    return sorted((o["kind"], o["object"]["name"], o["object"]["revision"]) for o in snap["objects"])


@pytest.fixture
def http(server):
    h = server.http()
    assert h.post("/api/v1/networks", json=GOOD_NET).status_code == 201
    assert h.put("/api/v1/hosts/h1", json={"name": "h1", "underlay_ip": "198.18.0.1"}).status_code in (200, 201)
    assert h.post("/api/v1/endpoints", json={"name": "a", "network": "red", "host": "h1"}).status_code == 201
    assert h.put("/api/v1/namespaces/x", json={"name": "x"}).status_code == 201
    return h


CASES = [
    # (method, path, body-or-raw, status, words in the message)
    ("POST", "/api/v1/networks", b"{not json", 422, "JSON"),
    ("POST", "/api/v1/networks", {"name": "n", "subnets": "10.0.0.0/8"}, 422, "subnets"),
    ("POST", "/api/v1/networks", {"name": "n", "subnets": [{"cidr": "10.300.0.0/16"}]}, 422, "invalid CIDR"),
    ("POST", "/api/v1/networks", {"name": "n", "subnets": [{"cidr": "10.2.0.1/16"}]}, 422, "invalid CIDR"),
    ("POST", "/api/v1/networks", {"name": "n", "subnets": [{"cidr": "10.2.0.0/16"}], "colour": "blue"}, 422,
     "colour: unknown field"),
    ("POST", "/api/v1/networks", {"name": "n", "subnets": [{"cidr": "10.1.128.0/24"}]}, 409, "overlaps 'red'"),
    ("POST", "/api/v1/networks", {"name": "n", "subnets": [{"cidr": "10.2.0.0/16", "gateway": "10.3.0.1"}]}, 422,
     "outside its subnet"),
    ("POST", "/api/v1/networks", {"name": "Not_A_Label", "subnets": [{"cidr": "10.2.0.0/16"}]}, 422, "DNS label"),
    ("POST", "/api/v1/networks", GOOD_NET, 409, "already exists"),
    ("POST", "/api/v1/networks", {"name": "n", "subnets": [{"cidr": "10.2.0.0/16"}], "mtu": "big"}, 422, "mtu"),
    ("DELETE", "/api/v1/networks/red", None, 409, "still has 1 endpoints"),
    ("DELETE", "/api/v1/networks/nope", None, 404, "not found"),
    ("POST", "/api/v1/endpoints", {"name": "b", "network": "nope"}, 400, "does not exist"),
    ("POST", "/api/v1/endpoints", {"name": "b", "network": "red", "host": "ghost"}, 400, "not registered"),
    ("POST", "/api/v1/endpoints", {"name": "a", "network": "red"}, 409, "already exists"),
    ("POST", "/api/v1/endpoints", {"name": "b", "network": "red", "ips": ["10.9.0.1"]}, 400, "outside network"),
    ("POST", "/api/v1/endpoints", {"name": "b", "network": "red", "ips": ["10.1.0.1"]}, 409, "already in use"),
    ("POST", "/api/v1/endpoints", {"name": "b", "network": "red", "ips": ["bogus"]}, 422, "not an IP"),
    ("POST", "/api/v1/endpoints", {"name": "b", "network": "red", "security_groups": ["sg-x"]}, 400,
     "does not exist"),
    ("POST", "/api/v1/endpoints", {"name": "b", "network": "red", "namespace": "nope"}, 400, "namespace"),
    ("POST", "/api/v1/endpoints", {"name": "b", "network": "red", "labels": {"bad key!": "v"}}, 422, "label key"),
    ("POST", "/api/v1/endpoints", {"name": "b", "network": "red", "flavour": 1}, 422, "unknown field"),
    ("PATCH", "/api/v1/endpoints/none", {"labels": {}}, 404, "not found"),
    ("PUT", "/api/v1/hosts/h2", {"name": "h2", "underlay_ip": "not-an-ip"}, 422, "underlay_ip"),
    ("PUT", "/api/v1/hosts/h2", {"name": "h3", "underlay_ip": "198.18.0.3"}, 400, "differs"),
    ("PUT", "/api/v1/namespaces/x", {"name": "x", "extra": 1}, 422, "unknown field"),
    ("PUT", "/api/v1/namespaces/y/networkpolicies/p", {"name": "p", "namespace": "y", "spec": {}}, 400,
     "namespace 'y' does not exist"),
    ("PUT", "/api/v1/namespaces/x/networkpolicies/p", {"name": "p", "namespace": "x", "spec": []}, 422, "spec"),
    ("POST", "/api/v1/securitygroups", {"name": "s", "rules": [{"direction": "sideways"}]}, 422, "direction"),
    ("POST", "/api/v1/securitygroups", {"name": "s", "rules": [{"direction": "ingress", "remote_group_id": "zz"}]},
     400, "remote group"),
    ("PUT", "/api/v1/namespaces/x/services/s", {"name": "s", "namespace": "x", "cluster_ip": "192.0.2.1"}, 400,
     "outside the service range"),
    ("PUT", "/api/v1/namespaces/x/services/s", {"name": "s", "namespace": "x", "ports": [{"port": 70000}]}, 422,
     "port"),
    ("GET", "/api/v1/watch", None, 422, "after_revision"),
]


@pytest.mark.parametrize("method,path,body,status,words", CASES, ids=[f"{c[0]} {c[1]} {c[3]}" for c in CASES])
def test_bad_request_is_refused_with_a_useful_message_and_changes_nothing(http, method, path, body, status, words):
    before = state(http)
    if isinstance(body, bytes):
        kw = {"content": body, "headers": {"content-type": "application/json"}}
    else:
        kw = {"json": body} if body is not None else {}
    r = http.request(method, path, **kw)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["detail"].lower(), r.text
    assert state(http) == before


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token_is_refused_for_every_resource(server, token):
    h = server.http(token=token)
    for path in ["/api/v1/networks", "/api/v1/endpoints", "/api/v1/hosts", "/api/v1/namespaces",
                 "/api/v1/networkpolicies", "/api/v1/securitygroups", "/api/v1/services", "/api/v1/blocks",
                 "/api/v1/snapshot"]:
        r = h.get(path)
        assert r.status_code == 401 and "token" in r.json()["detail"]
    r = h.post("/api/v1/networks", json=GOOD_NET)
    assert r.status_code == 401
    assert server.http().get("/api/v1/networks").json() == []


def test_token_file_is_private_and_openapi_is_served(server):
    import os
    import stat

    mode = stat.S_IMODE(os.stat(os.path.join(server.state_dir, "token")).st_mode)
    assert mode == 0o600
    spec = server.http().get("/openapi.json").json()
    assert "/api/v1/networks" in spec["paths"] and "/api/v1/watch" in spec["paths"]
