"""Issue 22: nothing an API client sends can name a host's device, poison an agent's plan or break the
cluster's addressing. Every refusal says what to do and leaves the store exactly as it was."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.fixtures.server import ServerProc, start_server

NET = {"name": "red", "subnets": [{"cidr": "10.61.0.0/16"}]}
H1 = {"name": "h1", "underlay_ip": "198.18.0.1", "underlay_cidr": "198.18.0.0/24"}


def state(http: httpx.Client) -> list[str]:
    snap = http.get("/api/v1/snapshot").json()
    return sorted(json.dumps(o, sort_keys=True) for o in snap["objects"])


@pytest.fixture
def srv(tmp_path) -> Iterator[ServerProc]:
    s = start_server("sqlite://" + str(tmp_path / "tether.db"), str(tmp_path / "server"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def http(srv) -> httpx.Client:
    h = srv.http()
    assert h.put("/api/v1/hosts/h1", json=H1).status_code == 201
    assert h.post("/api/v1/networks", json=NET).status_code == 201
    assert h.post("/api/v1/securitygroups", json={"id": "sg1", "name": "web"}).status_code == 201
    r = h.post("/api/v1/endpoints", json={"name": "a", "network": "red", "host": "h1"})
    assert r.status_code == 201, r.text
    return h


def refused(http: httpx.Client, method: str, path: str, body, status: int, *words: str) -> dict:
    before = state(http)
    r = http.request(method, path, json=body)
    assert r.status_code == status, r.text
    text = json.dumps(r.json()).lower()
    for w in words:
        assert w.lower() in text, r.text
    assert state(http) == before, "a refused request changed the store"
    return r.json()


def ep(**kw) -> dict:
    return {"name": f"e-{uuid.uuid4().hex[:8]}", "network": "red", "host": "h1", **kw}


# --- the server owns the names the kernel sees --------------------------------------------------------

def test_endpoint_naming_a_host_device_is_refused(http):
    refused(http, "POST", "/api/v1/endpoints", ep(interface="eth0"), 400, "server assigns", "interface")


def test_fifty_character_interface_is_refused(http):
    refused(http, "POST", "/api/v1/endpoints", ep(interface="x" * 50), 422, "interface", "15")


def test_cni_and_docker_endpoints_get_the_interface_the_agent_derives(http):
    from tether.calc.names import docker_ifname, host_ifname

    r = http.post("/api/v1/endpoints", json=ep(owner={"type": "cni", "container_id": "c1", "ifname": "eth0"}))
    assert r.status_code == 201 and r.json()["interface"] == host_ifname("c1", "eth0")
    ep_id = str(uuid.uuid4())
    r = http.post("/api/v1/endpoints", json=ep(id=ep_id, owner={"type": "docker"},
                                               interface=host_ifname(ep_id, "docker")))
    assert r.status_code == 201 and r.json()["interface"] == docker_ifname(ep_id)
    r = http.post("/api/v1/endpoints", json=ep())
    assert r.status_code == 201 and r.json()["interface"] is None  # api-owned: no device of its own


def test_interface_owner_and_host_cannot_be_patched(http, srv):
    r = http.post("/api/v1/endpoints", json=ep(owner={"type": "cni", "container_id": "c2", "ifname": "eth0"}))
    ep_id = r.json()["id"]
    http.put("/api/v1/hosts/h2", json={"name": "h2", "underlay_ip": "198.18.0.2", "underlay_cidr": "198.18.0.0/24"})
    refused(http, "PATCH", f"/api/v1/endpoints/{ep_id}", {"interface": "eth0"}, 400, "server assigns")
    refused(http, "PATCH", f"/api/v1/endpoints/{ep_id}", {"host": "h2"}, 409, "cannot move")
    refused(http, "PATCH", f"/api/v1/endpoints/{ep_id}",
            {"owner": {"type": "cni", "container_id": "other", "ifname": "eth0"}}, 409, "container_id")
    refused(http, "PATCH", f"/api/v1/endpoints/{ep_id}", {"owner": {"type": "vm"}}, 409, "owner.type")
    # what may change still does
    assert http.patch(f"/api/v1/endpoints/{ep_id}", json={"labels": {"a": "b"}}).status_code == 200


def test_api_netns_outside_the_runtime_directories_is_refused(http):
    for netns in ("/proc/1/ns/net", "/var/run/netns/../../proc/1/ns/net", "/run/netns/a/b", "/etc/passwd"):
        refused(http, "POST", "/api/v1/endpoints", ep(owner={"type": "vm", "netns": netns}), 422, "netns")
    r = http.post("/api/v1/endpoints", json=ep(owner={"type": "vm", "netns": "/run/netns/vm1"}))
    assert r.status_code == 201, r.text


def test_neutron_port_with_proc_netns_is_refused(http):
    net_id = http.get("/api/v1/networks/red").json()["id"]
    body = {"port": {"network_id": net_id, "binding:host_id": "h1", "binding:profile": {"netns": "/proc/1/ns/net"}}}
    refused(http, "POST", "/v2.0/ports", body, 400, "netns")
    body["port"]["binding:profile"]["netns"] = "/var/run/netns/vm-a"
    r = http.post("/v2.0/ports", json=body)
    assert r.status_code == 201, r.text
    port = r.json()["port"]
    assert http.get(f"/api/v1/endpoints/{port['id']}").json()["interface"] == "tap" + port["id"][:11]
    refused(http, "PUT", f"/v2.0/ports/{port['id']}", {"port": {"binding:profile": {"netns": "/proc/1/ns/net"}}},
            400, "netns")


# --- what would make every agent's plan raise -----------------------------------------------------------

def test_garbage_address_pair_is_refused(http):
    refused(http, "POST", "/api/v1/endpoints", ep(allowed_address_pairs=[{"ip_address": "garbage"}]), 422,
            "ip_address")
    refused(http, "POST", "/api/v1/endpoints",
            ep(allowed_address_pairs=[{"ip_address": "10.61.9.9", "mac_address": "nope"}]), 422, "mac_address")
    ep_id = http.get("/api/v1/endpoints", params={"name": "a"}).json()[0]["id"]
    refused(http, "PATCH", f"/api/v1/endpoints/{ep_id}", {"allowed_address_pairs": [{"ip_address": "garbage"}]},
            422, "ip_address")


def test_injected_protocol_is_refused(http):
    rule = {"direction": "ingress", "protocol": "tcp; drop"}
    refused(http, "POST", "/api/v1/securitygroups", {"name": "s", "rules": [rule]}, 422, "protocol")
    refused(http, "POST", "/api/v1/securitygroups/sg1/rules", rule, 422, "protocol")


def test_port_range_min_above_max_is_refused(http):
    rule = {"direction": "ingress", "protocol": "tcp", "port_range_min": 90, "port_range_max": 80}
    refused(http, "POST", "/api/v1/securitygroups/sg1/rules", rule, 422, "port_range_min")
    refused(http, "POST", "/api/v1/securitygroups/sg1/rules",
            {"direction": "ingress", "protocol": "icmp", "port_range_min": 300}, 422, "ICMP")
    refused(http, "POST", "/api/v1/securitygroups/sg1/rules", {"direction": "ingress", "port_range_min": 80}, 422,
            "protocol")


def test_bogus_remote_ip_prefix_is_refused(http):
    refused(http, "POST", "/api/v1/securitygroups/sg1/rules", {"direction": "ingress", "remote_ip_prefix": "bogus"},
            422, "remote_ip_prefix")
    refused(http, "POST", "/api/v1/securitygroups/sg1/rules",
            {"direction": "ingress", "ethertype": "IPv6", "remote_ip_prefix": "10.0.0.0/8"}, 422, "ethertype")


def test_security_group_ids_with_paths_are_refused(http):
    refused(http, "POST", "/api/v1/securitygroups", {"id": "a/../b", "name": "s"}, 422, "id")
    refused(http, "POST", "/api/v1/endpoints", ep(security_groups=["sg1/.."]), 422, "security group id")
    refused(http, "POST", "/api/v1/securitygroups/sg1/rules", {"direction": "ingress", "remote_group_id": "../x"},
            422, "remote_group_id")


def test_vtep_ip_that_is_not_an_address_is_refused(http):
    refused(http, "PUT", "/api/v1/hosts/h1", {**H1, "vtep_ip": "not-an-ip"}, 422, "vtep_ip")
    refused(http, "PUT", "/api/v1/hosts/h1", {**H1, "vtep_mac": "01:00:5e:00:00:01"}, 422, "multicast")
    refused(http, "PUT", "/api/v1/hosts/h1", {**H1, "underlay_cidr": "10.0.0.0/24"}, 422, "does not contain")


@pytest.mark.parametrize("name", ["s" * 5000, 'a"b', "a\nb", "*", "caf\u00e9", "UPPER"])
def test_service_names_that_are_not_dns_labels_are_refused(http, name):
    assert http.put("/api/v1/namespaces/x", json={"name": "x"}).status_code in (200, 201)
    from urllib.parse import quote

    path = "/api/v1/namespaces/x/services/" + quote(name, safe="")
    refused(http, "PUT", path, {"name": name, "namespace": "x"}, 422, "name")


def test_service_ports_and_backends_are_checked(http):
    assert http.put("/api/v1/namespaces/x", json={"name": "x"}).status_code in (200, 201)
    base = {"name": "s", "namespace": "x"}
    for body, word in (({"ports": [{"port": 80, "target_port": 99999}]}, "target_port"),
                       ({"ports": [{"port": 80, "target_port": "not a name!"}]}, "target_port"),
                       ({"ports": [{"port": 80, "name": "a b"}]}, "port name"),
                       ({"backends": [{"ip": "nope"}]}, "backend ip"),
                       ({"cluster_ip": "x"}, "cluster_ip")):
        refused(http, "PUT", "/api/v1/namespaces/x/services/s", {**base, **body}, 422, word)
    r = http.put("/api/v1/namespaces/x/services/s", json={**base, "ports": [{"port": 80, "target_port": "8080"}]})
    assert r.status_code == 201 and r.json()["ports"][0]["target_port"] == 8080


def test_not_a_mac_is_refused(http):
    refused(http, "POST", "/api/v1/endpoints", ep(mac="not-a-mac"), 422, "mac")


@pytest.mark.parametrize("domain", ["bad\x00domain", "bad\ndomain", "a..b", "x" * 300])
def test_dns_domain_that_is_not_a_dns_name_is_refused(http, domain):
    refused(http, "POST", "/api/v1/networks", {"name": "blue", "subnets": [{"cidr": "10.62.0.0/16"}],
                                               "dns_domain": domain}, 422, "dns_domain")


def test_duplicate_static_ips_are_refused(http):
    refused(http, "POST", "/api/v1/endpoints", ep(ips=["10.61.0.9", "10.61.0.9"]), 422, "twice")


def test_lists_and_strings_have_caps(http):
    refused(http, "POST", "/api/v1/endpoints", ep(ips=[f"10.61.1.{i}" for i in range(1, 40)]), 422, "at most")
    refused(http, "POST", "/api/v1/securitygroups", {"name": "s", "description": "d" * 300}, 422, "at most 255")
    refused(http, "POST", "/api/v1/endpoints", ep(owner={"type": "cni", "container_id": "c" * 300, "ifname": "eth0"}),
            422, "container_id")
    refused(http, "POST", "/api/v1/endpoints", ep(owner={"type": "cni", "container_id": "c", "ifname": "a/b"}),
            422, "ifname")


def test_vni_other_than_the_shared_one_is_refused(http):
    refused(http, "POST", "/api/v1/networks", {"name": "blue", "subnets": [{"cidr": "10.62.0.0/16"}], "vni": 7},
            422, "vni")
    refused(http, "POST", "/v2.0/networks", {"network": {"name": "blue", "provider:segmentation_id": 7}}, 400,
            "segmentation_id")


# --- VTEP addresses -----------------------------------------------------------------------------------

def test_second_host_asking_for_the_first_hosts_vtep_is_refused(http):
    first = http.get("/api/v1/hosts/h1").json()["vtep_ip"]
    refused(http, "PUT", "/api/v1/hosts/h2", {"name": "h2", "underlay_ip": "198.18.0.2", "vtep_ip": first}, 400,
            "server assigns")
    refused(http, "PUT", "/api/v1/hosts/h1", {**H1, "vtep_ip": "169.254.64.99"}, 400, "server assigns")
    r = http.put("/api/v1/hosts/h1", json={**H1, "vtep_ip": first})  # its own address: fine
    assert r.status_code == 200 and r.json()["vtep_ip"] == first


def test_deleted_host_frees_its_vtep_and_the_next_host_gets_a_free_one(srv):
    h = srv.http()
    a = h.put("/api/v1/hosts/a", json={"name": "a", "underlay_ip": "198.18.0.1"}).json()["vtep_ip"]
    b = h.put("/api/v1/hosts/b", json={"name": "b", "underlay_ip": "198.18.0.2"}).json()["vtep_ip"]
    assert h.delete("/api/v1/hosts/a").status_code == 204
    r = h.put("/api/v1/hosts/c", json={"name": "c", "underlay_ip": "198.18.0.3"})
    assert r.status_code == 201, r.text  # the old code: 409 after 50 retries on the stale index key
    assert r.json()["vtep_ip"] == a and a != b


def test_concurrent_registrations_get_distinct_vteps(srv):
    def register(i: int) -> str:
        with srv.http() as h:
            r = h.put(f"/api/v1/hosts/n{i}", json={"name": f"n{i}", "underlay_ip": f"198.18.1.{i + 1}"})
            assert r.status_code == 201, r.text
            return r.json()["vtep_ip"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(register, range(16)))
    assert len(set(got)) == 16
    assert sorted(h["vtep_ip"] for h in srv.http().get("/api/v1/hosts").json()) == sorted(got)



def test_150_hosts_registering_at_once_all_succeed(srv):
    """A lab or a cluster starting all its agents at once: registrations on one server take turns
    (before: one winner per CAS round, and 22 of 150 answered 409 "busy" after 50 retries)."""
    def register(i: int) -> int:
        with srv.http() as h:
            return h.put(f"/api/v1/hosts/m{i}", json={"name": f"m{i}",
                                                      "underlay_ip": f"198.18.{i // 200}.{i % 200 + 1}"}).status_code

    with ThreadPoolExecutor(48) as pool:
        codes = list(pool.map(register, range(150)))
    assert codes.count(201) == 150, sorted(set(codes))
    assert len({h["vtep_ip"] for h in srv.http().get("/api/v1/hosts").json()}) == 150

# --- refuse what cannot work --------------------------------------------------------------------------

@pytest.mark.parametrize("cidr,status,word", [
    ("198.18.0.0/16", 409, "underlay"),  # contains h1's underlay subnet
    ("169.254.10.0/24", 400, "link-local"),
    ("fe80::/64", 400, "link-local"),
    ("127.0.0.0/24", 400, "loopback"),
    ("224.1.0.0/16", 400, "multicast"),
    ("10.96.0.0/24", 400, "service range"),
    ("10.61.5.0/24", 409, "overlaps 'red'"),
])
def test_subnet_colliding_with_what_the_kernel_routes_is_refused(http, cidr, status, word):
    refused(http, "POST", "/api/v1/networks", {"name": "blue", "subnets": [{"cidr": cidr}]}, status, word)
    if "red" not in word:  # adding a range of its own is refused as a self-overlap
        refused(http, "PUT", "/api/v1/networks/red", {**NET, "subnets": [*NET["subnets"], {"cidr": cidr}]}, status,
                word)


def test_neutron_subnet_on_the_underlay_is_refused(http):
    net = http.post("/v2.0/networks", json={"network": {"name": "blue"}}).json()["network"]
    refused(http, "POST", "/v2.0/subnets", {"subnet": {"network_id": net["id"], "cidr": "198.18.0.0/25",
                                                       "ip_version": 4}}, 409, "underlay")


def test_host_whose_underlay_overlaps_a_network_is_refused(http):
    refused(http, "PUT", "/api/v1/hosts/h2", {"name": "h2", "underlay_ip": "10.61.0.7"}, 409, "red")
    wide = {"name": "h2", "underlay_ip": "10.60.0.7", "underlay_cidr": "10.60.0.0/15"}
    refused(http, "PUT", "/api/v1/hosts/h2", wide, 409, "red")


def test_direct_across_underlay_subnets_is_refused(http):
    assert http.put("/api/v1/hosts/h2", json={"name": "h2", "underlay_ip": "198.19.0.1",
                                              "underlay_cidr": "198.19.0.0/24"}).status_code == 201
    body = {"name": "blue", "subnets": [{"cidr": "10.62.0.0/16"}], "encap": "direct"}
    refused(http, "POST", "/api/v1/networks", body, 409, "auto")
    refused(http, "PUT", "/api/v1/networks/red", {**NET, "encap": "direct"}, 409, "auto")
    assert http.post("/api/v1/networks", json={**body, "encap": "auto"}).status_code == 201


def test_host_in_another_subnet_than_a_direct_network_is_refused(http):
    body = {"name": "blue", "subnets": [{"cidr": "10.62.0.0/16"}], "encap": "direct"}
    assert http.post("/api/v1/networks", json=body).status_code == 201
    refused(http, "PUT", "/api/v1/hosts/h2", {"name": "h2", "underlay_ip": "198.19.0.1",
                                             "underlay_cidr": "198.19.0.0/24"}, 409, "blue")
    r = http.put("/api/v1/hosts/h2", json={"name": "h2", "underlay_ip": "198.18.0.2", "underlay_cidr": "198.18.0.0/24"})
    assert r.status_code == 201, r.text


def test_endpoint_on_a_network_without_subnet_is_refused_but_a_neutron_port_is_not(http):
    net = http.post("/v2.0/networks", json={"network": {"name": "bare"}}).json()["network"]
    refused(http, "POST", "/api/v1/endpoints", ep(network="bare"), 400, "add a subnet")
    r = http.post("/v2.0/ports", json={"port": {"network_id": net["id"]}})
    assert r.status_code == 201 and r.json()["port"]["fixed_ips"] == []


async def test_a_cas_retry_keeps_the_vtep_uniqueness_check(store):
    """Another server takes the same free address between this one's read and its commit: the retry
    must pick another address, not commit the first one without the index check."""
    from tether.model import Host
    from tether.server.ipam import Ipam
    from tether.server.objects import Objects, vtep_key

    o = Objects(store, Ipam(store), service_cidr="10.96.0.0/16", vtep_cidr="169.254.64.0/18")
    other_server = Objects(store, Ipam(store), service_cidr="10.96.0.0/16", vtep_cidr="169.254.64.0/18")
    real_txn = store.txn
    raced = False

    async def racing_txn(compares, ops):
        nonlocal raced
        if not raced and any(getattr(op, "key", "").startswith(vtep_key("")) for op in ops):
            raced = True
            store.txn = real_txn
            await other_server.register_host(Host(name="other", underlay_ip="198.18.0.9"))
            store.txn = racing_txn
        return await real_txn(compares, ops)

    store.txn = racing_txn
    try:
        mine, _ = await o.register_host(Host(name="mine", underlay_ip="198.18.0.8"))
    finally:
        store.txn = real_txn
    other = await o.get(Host, "other")
    assert raced and mine.vtep_ip != other.vtep_ip
    for h in (mine, other):
        assert (await store.get(vtep_key(h.vtep_ip))).value.decode() == h.name


async def test_deleting_a_host_removes_its_vtep_index_key(store):
    from tether.model import Host
    from tether.server.ipam import Ipam
    from tether.server.objects import Objects, vtep_key

    o = Objects(store, Ipam(store), service_cidr="10.96.0.0/16", vtep_cidr="169.254.64.0/18")
    a, _ = await o.register_host(Host(name="a", underlay_ip="198.18.0.1"))
    await o.delete_host("a")
    assert await store.get(vtep_key(a.vtep_ip)) is None
    c, _ = await o.register_host(Host(name="c", underlay_ip="198.18.0.3"))
    assert c.vtep_ip == a.vtep_ip and (await store.get(vtep_key(c.vtep_ip))).value.decode() == "c"


async def test_an_object_stored_under_looser_rules_is_passed_on_not_fatal(store):
    """An older version stored a rule today's validators refuse: listing skips it, the snapshot carries it
    as stored (for the agents to quarantine), and nothing answers 500."""
    from tether.model import SecurityGroup, key_of
    from tether.server.ipam import Ipam
    from tether.server.objects import Objects

    o = Objects(store, Ipam(store), service_cidr="10.96.0.0/16", vtep_cidr="169.254.64.0/18")
    bad = {"id": "old", "name": "old", "rules": [{"id": "r", "direction": "ingress", "protocol": "tcp; drop"}]}
    await store.put(key_of("SecurityGroup", "old"), json.dumps(bad).encode())
    await o.create(SecurityGroup(id="good", name="good"))
    assert [g.id for g in await o.list(SecurityGroup)] == ["good"]
    _, items = await o.snapshot()
    old = next(i for i in items if i.kind == "SecurityGroup" and i.model_dump()["id"] == "old")
    assert old.model_dump()["rules"][0]["protocol"] == "tcp; drop"


def test_one_endpoint_per_host_device(http):
    """A second endpoint with a pod's container id and ifname would route through, and later delete, its veth."""
    owner = {"type": "cni", "container_id": "victim", "ifname": "eth0"}
    first = http.post("/api/v1/endpoints", json=ep(owner=owner))
    assert first.status_code == 201
    refused(http, "POST", "/api/v1/endpoints", ep(owner=owner), 409, "already belongs")
    assert http.delete(f"/api/v1/endpoints/{first.json()['id']}").status_code == 204
    assert http.post("/api/v1/endpoints", json=ep(owner=owner)).status_code == 201  # freed with its endpoint


def test_neutron_binding_moves_the_device_name_with_the_port(http):
    net_id = http.get("/api/v1/networks/red").json()["id"]
    port = http.post("/v2.0/ports", json={"port": {"network_id": net_id}}).json()["port"]
    assert http.get(f"/api/v1/endpoints/{port['id']}").json()["interface"] is None
    r = http.put(f"/v2.0/ports/{port['id']}", json={"port": {"binding:host_id": "h1"}})
    assert r.status_code == 200, r.text
    assert http.get(f"/api/v1/endpoints/{port['id']}").json()["interface"] == "tap" + port["id"][:11]


def test_a_host_with_an_ipv6_underlay_joins_but_not_beside_ipv4_hosts_on_a_direct_network(http) -> None:
    """Hosts with only IPv6 underlay addresses are accepted (VXLAN and direct routes over IPv6);
    a `direct` network cannot route between an IPv4 and an IPv6 underlay host, so that pair is refused."""
    r = http.put("/api/v1/hosts/h6", json={"name": "h6", "underlay_ip": "fd00:18::2", "underlay_cidr": "fd00:18::/64"})
    assert r.status_code == 201, r.text
    assert http.get("/api/v1/hosts/h6").json()["underlay_ip"] == "fd00:18::2"
    body = {"name": "blue", "subnets": [{"cidr": "10.62.0.0/16"}], "encap": "direct"}
    refused(http, "POST", "/api/v1/networks", body, 409, "underlay families")
    assert http.delete("/api/v1/hosts/h6").status_code in (200, 204)
    assert http.post("/api/v1/networks", json=body).status_code == 201
    refused(http, "PUT", "/api/v1/hosts/h6", {"name": "h6", "underlay_ip": "fd00:18::2"}, 409, "another family")
