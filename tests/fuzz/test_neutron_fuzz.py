"""Fuzzing the Neutron routes (/v2.0) with generated bodies: their OpenAPI entries carry no request
schema (the routes read the JSON themselves, as Neutron does), so schemathesis alone sends them
nothing. Each example is one request on networks, subnets, ports, security groups or rules, routers
(their interfaces too) or floating IPs, with
each attribute either a plausible value (an existing object's id, a CIDR, an address, a MAC) or
junk of any JSON type. Checks as for /api/v1: no 5xx, and a refused request changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import baseline
from tests.fuzz.checks import SENT, checked
from tests.fuzz.harness import InProcessServer, examples

EXAMPLES = 500

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70000), st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12), st.sampled_from(["", "eth0", "../..", "a" * 300, "x\n", "\x00", "tcp; drop"]),
    st.lists(st.one_of(st.integers(0, 9), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=6), st.integers()), max_size=3),
)
CIDRS = st.sampled_from(["10.9.0.0/24", "10.9.1.0/24", "10.9.2.1/24", "fd00:9::/64", "10.1.0.0/24", "0.0.0.0/0",
                         "198.18.0.0/24", "169.254.0.0/16", "10.9.3.0/33", "bogus", "10.9.4.0/31", "10.9.5.0/32"])
IPS = st.sampled_from(["10.1.0.9", "10.1.0.10", "10.9.0.5", "fd00:9::5", "10.1.0.0", "10.1.255.255", "bogus",
                       "10.1.0.300", "::", "10.1.0.0/24"])
FRESH_CIDRS = st.one_of(CIDRS, st.builds("10.{}.{}.0/24".format, st.integers(10, 250), st.integers(0, 255)))
MACS = st.sampled_from(["fa:16:3e:00:00:01", "FA:16:3E:00:00:02", "not-a-mac", "ff:ff:ff:ff:ff:ff",
                        "01:00:5e:00:00:01", "fa16.3e00.0003"])
NAMES = st.one_of(st.sampled_from(["vm1", "web", "db-1", "Bad_Name", "", "a" * 70]),
                  st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True))


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the plausible value, one time in ten junk of any type (more, and a body with several
    fields is nearly always refused for one of them, so the fuzzer never reaches the writes)."""
    return st.integers(0, 9).flatmap(lambda i: JUNK if i == 0 else strategy)


@dataclass(frozen=True)
class Ref:
    """The i-th existing object of a collection, resolved when the request is sent: what exists
    changes as the fuzzer writes, and Hypothesis needs the same draws to make the same example."""

    collection: str
    index: int


def known(collection: str) -> st.SearchStrategy[Ref]:
    return st.builds(Ref, st.just(collection), st.integers(0, 15))


def resolve(value: Any, ids: dict[str, list[str]]) -> Any:
    if isinstance(value, Ref):
        pool = ids[value.collection]
        return pool[value.index % len(pool)] if pool else "none"
    if isinstance(value, dict):
        return {k: resolve(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, ids) for v in value]
    return value


def _bodies() -> dict[str, st.SearchStrategy[dict[str, Any]]]:
    pool = st.fixed_dictionaries({"start": IPS, "end": IPS})
    fixed_ip = st.fixed_dictionaries({}, optional={"subnet_id": maybe(known("subnets")), "ip_address": maybe(IPS)})
    pair = st.fixed_dictionaries({"ip_address": maybe(st.one_of(IPS, CIDRS))}, optional={"mac_address": maybe(MACS)})
    profile = st.fixed_dictionaries({}, optional={
        "netns": maybe(st.sampled_from(["/proc/1/ns/net", "/run/netns/vm1", "/var/run/netns/../../x", "vm1"])),
        "parent_if": maybe(st.sampled_from(["tap0", "eth0", "a" * 20]))})
    return {
        "network": st.fixed_dictionaries({}, optional={
            "name": maybe(NAMES), "mtu": maybe(st.integers(500, 9500)), "router:external": maybe(st.booleans()),
            "admin_state_up": maybe(st.booleans()), "shared": maybe(st.booleans()),
            "description": maybe(st.text(max_size=10)), "project_id": maybe(st.text(max_size=8)),
            "dns_domain": maybe(st.sampled_from(["example.org.", "x\n", ""])), "tags": JUNK}),
        # the fields a create cannot do without are always there (junk now and then), so creates get through
        "subnet": st.fixed_dictionaries({"network_id": maybe(known("networks")), "cidr": maybe(FRESH_CIDRS)}, optional={
            "ip_version": maybe(st.sampled_from([4, 6])),
            "gateway_ip": maybe(st.one_of(IPS, st.none())),
            "allocation_pools": maybe(st.lists(maybe(pool), max_size=2)),
            "name": maybe(NAMES), "enable_dhcp": maybe(st.booleans()),
            "dns_nameservers": maybe(st.lists(IPS, max_size=2)), "host_routes": maybe(st.just([]))}),
        "port": st.fixed_dictionaries({"network_id": maybe(known("networks"))}, optional={
            "name": maybe(NAMES),
            "fixed_ips": maybe(st.lists(maybe(fixed_ip), max_size=2)), "mac_address": maybe(MACS),
            "allowed_address_pairs": maybe(st.lists(maybe(pair), max_size=2)),
            "security_groups": maybe(st.lists(maybe(known("security-groups")), max_size=2)),
            "binding:host_id": maybe(st.sampled_from(["h1", "ghost", ""])), "binding:profile": maybe(profile),
            "device_owner": maybe(st.sampled_from(["compute:nova", "network:dhcp", ""])),
            "device_id": maybe(st.text(max_size=10)), "admin_state_up": maybe(st.booleans()),
            "port_security_enabled": maybe(st.booleans())}),
        "security_group": st.fixed_dictionaries({}, optional={
            "name": maybe(NAMES), "description": maybe(st.text(max_size=20)), "stateful": maybe(st.booleans()),
            "project_id": maybe(st.text(max_size=8))}),
        "security_group_rule": st.fixed_dictionaries({
            "security_group_id": maybe(known("security-groups")),
            "direction": maybe(st.sampled_from(["ingress", "egress", "sideways"]))}, optional={
            "ethertype": maybe(st.sampled_from(["IPv4", "IPv6", "IPv5"])),
            "protocol": maybe(st.sampled_from(["tcp", "udp", "icmp", "6", "17", "256", "tcp; drop", None])),
            "port_range_min": maybe(st.integers(-1, 70000)), "port_range_max": maybe(st.integers(-1, 70000)),
            "remote_ip_prefix": maybe(CIDRS), "remote_group_id": maybe(known("security-groups")),
            "description": maybe(st.text(max_size=10))}),
        "router": st.fixed_dictionaries({}, optional={
            "name": maybe(NAMES), "description": maybe(st.text(max_size=10)), "admin_state_up": maybe(st.booleans()),
            "ha": maybe(st.booleans()), "distributed": maybe(st.booleans()), "routes": maybe(st.just([])),
            "external_gateway_info": maybe(st.fixed_dictionaries({"network_id": maybe(known("networks"))}, optional={
                "enable_snat": maybe(st.booleans()), "external_fixed_ips": maybe(st.just([]))}))}),
        "floatingip": st.fixed_dictionaries({"floating_network_id": maybe(known("networks"))}, optional={
            "port_id": maybe(known("ports")), "fixed_ip_address": maybe(IPS), "floating_ip_address": maybe(IPS),
            "description": maybe(st.text(max_size=10)), "dns_name": maybe(NAMES)}),
        # the body of PUT /routers/{id}/add_router_interface and remove_router_interface
        "interface": st.fixed_dictionaries({}, optional={"subnet_id": maybe(known("subnets")),
                                                         "port_id": maybe(known("ports"))}),
    }


BODIES = _bodies()
TALLY: dict[str, int] = {}  # "<verb> <collection> <status>" -> requests, printed at the end: what the fuzzer reached
COLLECTIONS = {"networks": "network", "subnets": "subnet", "ports": "port", "security-groups": "security_group",
               "security-group-rules": "security_group_rule", "routers": "router", "floatingips": "floatingip"}


def current_ids(srv: InProcessServer) -> dict[str, list[str]]:
    out = {}
    for collection in COLLECTIONS:
        r = srv.request("GET", f"/v2.0/{collection}")
        items = r.json().get(collection.replace("-", "_"), []) if r.status_code == 200 else []
        out[collection] = sorted(i["id"] for i in items if isinstance(i, dict) and "id" in i)
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[InProcessServer]:
    s = InProcessServer(str(tmp_path_factory.mktemp("fuzz-neutron")))
    try:
        yield s
    finally:
        print(f"\nNeutron fuzz: {SENT['requests']} generated requests in this process; all responses by status "
              f"{dict(sorted(s.statuses.items()))}; by verb, collection and status {dict(sorted(TALLY.items()))}")
        s.close()


def test_neutron_requests_with_generated_bodies_get_no_5xx_and_refusals_change_nothing(srv) -> None:
    state: dict[str, Any] = {"revision": -1}

    @settings(max_examples=examples(EXAMPLES), derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        if srv.state()[0] != state["revision"]:
            baseline.ensure(srv)
            state["ids"] = current_ids(srv)
            state["revision"] = srv.state()[0]
        ids = state["ids"]
        collection = data.draw(st.sampled_from(sorted(COLLECTIONS)), label="collection")
        resource = COLLECTIONS[collection]
        verb = data.draw(st.sampled_from(["POST", "POST", "POST", "PUT", "PUT", "DELETE", "GET", "LIST"]), label="verb")
        target = resolve(data.draw(st.one_of(known(collection), st.text(max_size=8)), label="id"), ids)
        url = f"/v2.0/{collection}" if verb in ("POST", "LIST") else f"/v2.0/{collection}/{quote(target, safe='')}"
        method = "GET" if verb == "LIST" else verb
        kw: dict[str, Any] = {}
        body: Any = None
        if collection == "routers" and method == "PUT" and data.draw(st.booleans(), label="interface"):
            url += "/" + data.draw(st.sampled_from(["add_router_interface", "remove_router_interface"]), label="op")
            body = kw["json"] = resolve(data.draw(BODIES["interface"], label="body"), ids)
        elif method in ("POST", "PUT"):
            inner = resolve(data.draw(BODIES[resource], label="body"), ids)
            body = data.draw(st.sampled_from([{resource: inner}] * 8 + [inner, [inner], {resource: [inner]}]),
                             label="wrapper")
            if data.draw(st.integers(0, 19), label="raw") == 0:
                kw["content"] = data.draw(st.sampled_from([b"{", b"", b"\xff\xfe", b"null", b'{"network": 1}']))
                body = kw["content"].decode("latin-1")
            else:
                kw["json"] = body
        elif method == "GET" and verb == "LIST":
            kw["params"] = data.draw(st.dictionaries(st.sampled_from(["id", "name", "fixed_ips", "fields",
                                                                      "network_id", "device_id", "tags"]),
                                                     st.text(max_size=10), max_size=2), label="query")
        r = checked(srv, method, url, body, lambda: srv.request(method, url, **kw))
        key = f"{verb} {collection} {r.status_code}"
        TALLY[key] = TALLY.get(key, 0) + 1

    fuzz()
