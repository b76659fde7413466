"""A small cluster the fuzzers start from and restore after each accepted write, so generated
requests that name an existing object reach the code behind the 404s."""

from __future__ import annotations

from typing import Any

from tests.fuzz.harness import InProcessServer

SG_RULE = {"direction": "ingress", "protocol": "tcp", "port_range_min": 80, "port_range_max": 80}
OBJECTS: list[tuple[str, str, str, dict[str, Any]]] = [
    # (GET path that proves it exists, method, create path, body)
    ("/api/v1/hosts/h1", "PUT", "/api/v1/hosts/h1", {"name": "h1", "underlay_ip": "198.18.0.1"}),
    ("/api/v1/namespaces/x", "PUT", "/api/v1/namespaces/x", {"name": "x", "labels": {"team": "a"}}),
    ("/api/v1/networks/red", "PUT", "/api/v1/networks/red", {"name": "red", "subnets": [{"cidr": "10.1.0.0/16"}]}),
    ("/api/v1/namespaces/x/networkpolicies/p", "PUT", "/api/v1/namespaces/x/networkpolicies/p",
     {"name": "p", "namespace": "x", "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
    ("/api/v1/namespaces/x/services/s", "PUT", "/api/v1/namespaces/x/services/s",
     {"name": "s", "namespace": "x", "selector": {"app": "a"}, "ports": [{"port": 80}]}),
]


def _find(srv: InProcessServer, path: str, name: str) -> dict[str, Any] | None:
    r = srv.request("GET", path)
    items = r.json() if r.status_code == 200 else []
    return next((i for i in items if isinstance(i, dict) and i.get("name") == name), None)


def ensure(srv: InProcessServer) -> dict[str, dict[str, str]]:
    """Create whatever of the baseline is missing; answer the path parameters that name it, per
    path template of the OpenAPI schema."""
    for probe, method, path, body in OBJECTS:
        if srv.request("GET", probe).status_code == 404:
            srv.request(method, path, json=body)
    sg = _find(srv, "/api/v1/securitygroups", "web")
    if sg is None:
        sg = srv.request("POST", "/api/v1/securitygroups", json={"name": "web", "rules": [SG_RULE]}).json()
    if not sg.get("rules"):
        srv.request("POST", f"/api/v1/securitygroups/{sg['id']}/rules", json=SG_RULE)
        sg = srv.request("GET", f"/api/v1/securitygroups/{sg['id']}").json()
    ep = _find(srv, "/api/v1/endpoints", "a")
    if ep is None:
        ep = srv.request("POST", "/api/v1/endpoints", json={
            "name": "a", "network": "red", "host": "h1", "namespace": "x", "handle": "ca/eth0",
            "labels": {"app": "a"}, "security_groups": [sg["id"]]}).json()
    net = srv.request("GET", "/api/v1/networks/red").json()
    rule = sg["rules"][0]["id"] if sg.get("rules") else "none"
    subnet = net["subnets"][0]["id"] if net.get("subnets") else "none"
    return {
        "/api/v1/hosts/{name}": {"name": "h1"},
        "/api/v1/hosts/{name}/heartbeat": {"name": "h1"},
        "/api/v1/networks/{name}": {"name": "red"},
        "/api/v1/endpoints/{ep_id}": {"ep_id": ep.get("id", "none")},
        "/api/v1/endpoints/by-handle/{handle}": {"handle": ep.get("handle") or "ca/eth0"},
        "/api/v1/namespaces/{name}": {"name": "x"},
        "/api/v1/namespaces/{ns}/networkpolicies/{name}": {"ns": "x", "name": "p"},
        "/api/v1/securitygroups/{sg_id}": {"sg_id": sg["id"]},
        "/api/v1/securitygroups/{sg_id}/rules": {"sg_id": sg["id"]},
        "/api/v1/securitygroups/{sg_id}/rules/{rule_id}": {"sg_id": sg["id"], "rule_id": rule},
        "/api/v1/namespaces/{ns}/services/{name}": {"ns": "x", "name": "s"},
        "/v2.0/extensions/{alias}": {"alias": "security-group"},
        "/v2.0/networks/{net_id}": {"net_id": net.get("id", "none")},
        "/v2.0/subnets/{subnet_id}": {"subnet_id": subnet},
        "/v2.0/ports/{port_id}": {"port_id": ep.get("id", "none")},
        "/v2.0/security-groups/{sg_id}": {"sg_id": sg["id"]},
        "/v2.0/security-group-rules/{rule_id}": {"rule_id": rule},
    }
