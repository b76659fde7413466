"""Golden plans: replicas that cover every feature the calculation knows, made through the real
API (so defaults and validation are the server's), and what each host's plan is for them.

`python -m tests.calc.golden --plans` recomputes the stored plans from the stored replicas (so the
diff shows only what the code changed); do that only for a change that is meant to change plans,
and say why in the commit. Without `--plans` the replicas are made again through the API too (new
ids and timestamps: a noisy diff), for a change to the scenarios. `test_golden_plans` checks that the calculation still
produces exactly these plans: a refactor that changes one byte of one plan fails it."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HOSTS = ("h1", "h2", "h3")
SCENARIOS = ("rich", "plain", "v6only")


def canonical(value: Any) -> Any:
    """Plans as JSON with a fixed order: frozensets are sorted (their iteration order depends on
    the process's string hash seed), bytes are hex; fields outside equality (a set's token and
    delta: bookkeeping for the dataplane) are left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value) if f.compare}
    if isinstance(value, (frozenset, set)):
        items = [canonical(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "__dict__"):
        return canonical(vars(value))
    return str(value)


def _cluster(srv: Any, scenario: str) -> None:
    def call(method: str, path: str, body: dict | None = None) -> Any:
        r = srv.request(method, path, json=body)
        assert r.status_code < 300, (method, path, body, r.status_code, r.text)
        return r.json() if r.content else None

    for i, h in enumerate(HOSTS):
        body: dict[str, Any] = {"name": h, "underlay_ip": f"198.18.0.{i + 1}", "underlay_cidr": "198.18.0.0/24",
                                "dns_ip": "169.254.20.10"}
        if scenario != "plain":
            body["underlay_ip6"] = f"fd18::{i + 1}"
        call("PUT", f"/api/v1/hosts/{h}", body)
    for ns, labels in (("x", {"ns": "x"}), ("y", {"ns": "y", "team": "b"})):
        call("PUT", f"/api/v1/namespaces/{ns}", {"name": ns, "labels": labels})
    if scenario == "v6only":
        call("PUT", "/api/v1/networks/six", {"name": "six", "subnets": [{"cidr": "fd66::/64"}]})
        nets = ["six"]
    else:
        call("PUT", "/api/v1/networks/red", {"name": "red", "subnets": [{"cidr": "10.1.0.0/16"}], "nat_outgoing": True})
        call("PUT", "/api/v1/networks/blue", {"name": "blue", "subnets": [{"cidr": "10.2.0.0/16"}], "encap": "direct",
                                              "mtu": 1400})
        call("PUT", "/api/v1/networks/auto", {"name": "auto", "subnets": [{"cidr": "10.3.0.0/16"}], "encap": "auto"})
        nets = ["red", "blue", "auto"]
        if scenario == "rich":
            call("PUT", "/api/v1/networks/dual", {"name": "dual", "subnets": [{"cidr": "10.4.0.0/16"},
                                                                              {"cidr": "fd44::/64"}],
                                                  "nat_outgoing": True, "block_size": 28})
            nets.append("dual")
    groups: list[str] = []
    if scenario == "rich":
        web = call("POST", "/api/v1/securitygroups", {"name": "web", "rules": [
            {"direction": "ingress", "protocol": "tcp", "port_range_min": 80, "port_range_max": 90},
            {"direction": "ingress", "protocol": "icmp", "remote_ip_prefix": "10.0.0.0/8"},
            {"direction": "ingress", "ethertype": "IPv6", "protocol": "icmpv6"},
            {"direction": "egress"}]})
        db = call("POST", "/api/v1/securitygroups", {"name": "db", "rules": [
            {"direction": "ingress", "protocol": "udp", "port_range_min": 53, "port_range_max": 53}]})
        call("POST", f"/api/v1/securitygroups/{db['id']}/rules",
             {"direction": "ingress", "protocol": "tcp", "remote_group_id": web["id"]})
        groups = [web["id"], db["id"]]
    n = 0
    for net in nets:
        for ns in ("x", "y"):
            for h in HOSTS:
                for app in ("a", "b"):
                    n += 1
                    body = {"name": f"{net}-{ns}-{h}-{app}", "network": net, "host": h, "namespace": ns,
                            "labels": {"app": app, "net": net},
                            "owner": {"type": "cni", "container_id": f"c{n:04d}", "ifname": "eth0",
                                      "netns": f"/run/netns/gold{n}"},
                            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}]}
                    if groups and app == "b":
                        body["security_groups"] = groups[: 1 + n % 2]
                        body["port_security"] = True
                    call("POST", "/api/v1/endpoints", body)
    if scenario == "rich":
        vm = call("POST", "/api/v1/endpoints", {
            "name": "vm1", "network": "red", "host": "h1", "namespace": "x", "port_security": True,
            "security_groups": groups[:1], "owner": {"type": "vm", "device_id": "vm-1"},
            "allowed_address_pairs": [{"ip_address": "10.1.200.0/28"}, {"ip_address": "10.1.201.9",
                                                                        "mac_address": "02:11:22:33:44:55"}]})
        call("POST", "/api/v1/endpoints", {"name": "nested1", "network": "red", "host": "h1", "namespace": "x",
                                           "parent": vm["id"], "owner": {"type": "nested"}, "labels": {"app": "n"}})
        call("POST", "/api/v1/endpoints", {"name": "off", "network": "red", "host": "h2", "namespace": "y",
                                           "admin_state_up": False, "owner": {"type": "vm", "device_id": "vm-2"}})
        call("POST", "/api/v1/endpoints", {"name": "dock", "network": "blue", "host": "h3", "namespace": "y",
                                           "owner": {"type": "docker", "docker_endpoint_id": "d" * 64}})
        for name, ns, spec in (
            ("deny-in", "y", {"podSelector": {}, "policyTypes": ["Ingress"]}),
            ("web", "x", {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress", "Egress"],
                          "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}},
                                                {"namespaceSelector": {"matchLabels": {"team": "b"}}},
                                                {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.2.0/24"]}},
                                                {"ipBlock": {"cidr": "fd44::/64", "except": ["fd44::/120"]}}],
                                       "ports": [{"port": "http"}, {"port": 53, "protocol": "UDP"},
                                                 {"port": 1000, "endPort": 2000}]}],
                          "egress": [{"to": [{"podSelector": {}}]},
                                     {"ports": [{"port": 53, "protocol": "UDP"}]}]}),
            ("exprs", "y", {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]},
                                                                 {"key": "net", "operator": "Exists"}]},
                            "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
        ):
            call("PUT", f"/api/v1/namespaces/{ns}/networkpolicies/{name}",
                 {"name": name, "namespace": ns, "spec": spec})
        for name, ns, body in (
            ("web", "x", {"network": "red", "selector": {"app": "a"}, "ports": [{"port": 80, "target_port": "http"},
                                                                                {"port": 53, "protocol": "UDP",
                                                                                 "target_port": 53}]}),
            ("sticky", "x", {"network": "red", "selector": {"app": "b"}, "session_affinity": "ClientIP",
                             "affinity_timeout": 600, "ports": [{"port": 81, "target_port": 8080}]}),
            ("np", "y", {"network": "blue", "selector": {"app": "a"}, "type": "NodePort",
                         "external_traffic_policy": "Local", "ports": [{"port": 82, "target_port": 8080,
                                                                        "node_port": 30082}]}),
            ("hl", "x", {"network": "red", "selector": {"app": "b"}, "headless": True, "ports": [{"port": 80}]}),
            ("dual", "x", {"network": "dual", "selector": {"app": "a"}, "ip_families": ["IPv4", "IPv6"],
                           "ports": [{"port": 80, "target_port": 8080}]}),
            ("sticky6", "y", {"network": "dual", "selector": {"app": "b"}, "ip_families": ["IPv6", "IPv4"],
                              "session_affinity": "ClientIP", "affinity_timeout": 300,
                              "ports": [{"port": 81, "target_port": 8080}]}),
            ("pub", "y", {"network": "red", "host": "h2", "type": "NodePort",
                          "selector": {"app": "b"}, "ports": [{"port": 8081, "target_port": 8080, "node_port": 8081}]}),
            ("manual", "x", {"network": "auto", "backends": [{"ip": "10.3.9.9"}],
                             "ports": [{"port": 90}]}),
        ):
            call("PUT", f"/api/v1/namespaces/{ns}/services/{name}", {"name": name, "namespace": ns, **body})


def replica_text(scenario: str) -> str:
    """The scenario's replica as the agent stores it (Replica.encoded), made through the API."""
    from tests.fuzz.harness import InProcessServer
    from tether.calc.replica import Replica

    srv = InProcessServer(tempfile.mkdtemp(prefix="tether-golden-"))
    try:
        _cluster(srv, scenario)
        rep = Replica()
        rep.load_snapshot(srv.request("GET", "/api/v1/snapshot").json())
        return rep.encoded()
    finally:
        srv.close()


def outputs(text: str, planners: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every host's whole plan, and the DNS records, for one stored replica. `planners`: one per
    host, kept by the caller to plan again from their memos (None: cold)."""
    from tether.calc import dns_records
    from tether.calc.host import HostContext
    from tether.calc.planner import Planner
    from tether.calc.replica import Replica

    rep = Replica()
    rep.load_snapshot(json.loads(text))
    planners = {} if planners is None else planners
    out: dict[str, Any] = {}
    for h in HOSTS:
        out[h] = canonical(planners.setdefault(h, Planner()).plan(rep, HostContext(h, "eth0", 1500)))
    rec = dns_records.build(rep.endpoints, rep.services, rep.networks.values(),
                            memos=planners.setdefault("dns", Planner()).memos)
    # memo: a cache of answers; generation: how many updates made the records
    # rrs in the stored shape (owner -> type -> its RRs): one tuple per owner in memory since session 21
    fields = {k: v for k, v in vars(rec).items() if k not in ("memo", "generation")}
    fields["rrs"] = {owner: {t: [rr for rr in rrs if dns_records.rr_type(rr) == t]
                             for t in dict.fromkeys(dns_records.rr_type(rr) for rr in rrs)}
                     for owner, rrs in rec.rrs.items()}
    out["dns"] = canonical(fields)
    return out


def main() -> None:
    import sys

    plans_only = "--plans" in sys.argv[1:]
    os.makedirs(FIXTURES, exist_ok=True)
    for s in SCENARIOS:
        if plans_only:
            with open(os.path.join(FIXTURES, f"{s}.replica.json")) as f:
                text = f.read()
        else:
            text = replica_text(s)
            with open(os.path.join(FIXTURES, f"{s}.replica.json"), "w") as f:
                f.write(json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n")
        with open(os.path.join(FIXTURES, f"{s}.plans.json"), "w") as f:
            f.write(json.dumps(outputs(text), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
