"""Poisoned objects in the store, written around the API's validation, with real packets (issue 22):
pods on every host still reach each other, a new pod still starts and is reachable, the hosts' own
interfaces and everything in their nft ruleset outside Tether's table are unchanged, and the
poisoned objects show why they were quarantined (`tether status`, `tether endpoint show`).

The objects go straight into the lab's SQLite file (the server's watch picks up writes from other
processes by polling it), so nothing of the server's validation stands in the way.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.fixtures.lab import unique
from tether.lab.cluster import Lab, nsx, wait_for
from tether.model import Network, Subnet
from tether.store.sqlite import SqliteStore

pytestmark = pytest.mark.lab


def write_raw(lab: Lab, items: dict[str, object], delete: tuple[str, ...] = ()) -> None:
    """Put raw JSON values under their keys in the lab's store (and delete keys), bypassing the server."""
    async def put() -> None:
        store = SqliteStore(os.path.join(lab.dir, "server", "tether.db"))
        try:
            for key, value in items.items():
                await store.put(key, value if isinstance(value, bytes) else json.dumps(value).encode())
            for key in delete:
                await store.delete(key)
        finally:
            await store.close()

    asyncio.run(put())


def host_view(ns: str) -> tuple[str, str, str]:
    """What a host owns apart from Tether: its links (not Tether's `tth*`), its eth0 sysctls and its
    nft ruleset outside `inet tether`."""
    links = nsx(ns, "ip", "-d", "link", "show").stdout
    blocks, keep = [], False
    for line in links.splitlines():
        if not line.startswith(" "):
            name = line.split(":", 2)[1].strip().split("@")[0]
            keep = not name.startswith("tth")
        if keep:
            blocks.append(line)
    sysctls = " ".join(nsx(ns, "cat", f"/proc/sys/net/ipv4/conf/eth0/{k}").stdout.strip()
                       for k in ("proxy_arp", "rp_filter", "forwarding"))
    ruleset = json.loads(nsx(ns, "nft", "-j", "list", "ruleset").stdout)["nftables"]
    foreign = [item for item in ruleset if "metainfo" not in item
               and not (next(iter(item.values())).get("table", next(iter(item.values())).get("name")) == "tether"
                        and next(iter(item.values())).get("family") == "inet")]
    return "\n".join(blocks), sysctls, json.dumps(foreign, sort_keys=True)


def endpoint(ep_id: str, name: str, network: str, host: str, ip: str, **fields) -> dict:
    return {"id": ep_id, "name": name, "network": network, "host": host, "ips": [ip], "namespace": "default",
            "owner": {"type": "api"}, "labels": {}, "created_at": "2026-01-01T00:00:00Z", **fields}


def test_poisoned_objects_are_quarantined_and_the_cluster_keeps_working(lab: Lab) -> None:
    net = unique("pz")
    lab.client().create_network(Network(name=net, subnets=[Subnet(cidr="10.52.0.0/16")], encap="vxlan"))
    pods = {h: lab.run_pod(h, unique("a"), net) for h in ("h1", "h2", "h3")}
    for h, p in pods.items():
        for other in pods.values():
            if other is not p:
                assert lab.reaches(f"{h}/{p.name}", other.ip), f"{h} -> {other.host} before the poison"
    # someone else's things in each host namespace, which must stay as they are
    for h in ("h1", "h2", "h3"):
        ns = lab.host(h).ns
        nsx(ns, "ip", "link", "add", "zzown0", "mtu", "1400", "type", "veth", "peer", "name", "zzown1")
        nsx(ns, "nft", "add", "table", "inet", "zz_guard")
        nsx(ns, "nft", "add", "chain", "inet", "zz_guard", "input",
            "{ type filter hook input priority 10 ; policy accept ; }")
        nsx(ns, "nft", "add", "rule", "inet", "zz_guard", "input", "udp", "dport", "9", "counter")
    before = {h: host_view(lab.host(h).ns) for h in ("h1", "h2", "h3")}

    ids = {k: str(uuid.uuid4()) for k in ("eth0", "pairs", "mac", "vm", "sg", "long")}
    P = "/tether/v1/"
    poison: dict[str, object] = {
        # the host's own underlay device as an endpoint's interface: MTU, sysctls, ingress chain, removal
        f"{P}endpoints/{ids['eth0']}": endpoint(ids["eth0"], "zeth0", net, "h1", "10.52.250.1", interface="eth0"),
        f"{P}endpoints/{ids['pairs']}": endpoint(ids["pairs"], "zpairs", net, "h2", "10.52.250.2",
                                                 interface="tthzzpairs",
                                                 allowed_address_pairs=[{"ip_address": "garbage"}]),
        f"{P}endpoints/{ids['mac']}": endpoint(ids["mac"], "zmac", net, "h3", "10.52.250.3", interface="tthzzmac",
                                               mac="not-a-mac"),
        f"{P}endpoints/{ids['vm']}": endpoint(ids["vm"], "zvm", net, "h1", "10.52.250.4",
                                              interface=f"tap{ids['vm'][:11]}",
                                              owner={"type": "vm", "netns": "/proc/1/ns/net"}),
        f"{P}securitygroups/{ids['sg']}": {"id": ids["sg"], "name": "zsg", "rules": [
            {"id": "r1", "direction": "ingress", "protocol": "tcp; drop"}]},
        # a peer host whose VXLAN address is not one, with a block so every host would route to it
        f"{P}hosts/h9": {"name": "h9", "underlay_ip": "198.18.0.99", "vtep_ip": "not-an-ip"},
        f"{P}blocks/{net}:10.52.240.0_26": {"name": f"{net}:10.52.240.0_26", "network": net,
                                            "cidr": "10.52.240.0/26", "host": "h9"},
        f"{P}services/default/{'x' * 5000}": {"name": "x" * 5000, "namespace": "default", "cluster_ip": "10.96.0.77",
                                              "ports": [{"port": 80}]},
        f"{P}services/default/a\"b\nc": {"name": 'a"b\nc', "namespace": "default", "ports": [{"port": 81}]},
        # one the model refuses outright: every agent's replica must survive it
        f"{P}namespaces/zz-undecodable": {"name": "zz-undecodable", "labels": "not a dict"},
    }
    write_raw(lab, poison)

    def reported() -> dict[str, set[tuple[str, str]]]:
        hosts = lab.client().list_raw("Host")
        return {h["name"]: {(p["kind"], p["name"]) for p in (h.get("status") or {}).get("problems", [])}
                for h in hosts}

    expect_everywhere = {("SecurityGroup", ids["sg"]), ("Host", "h9"), ("Service", f"default/{'x' * 5000}"[:256]),
                         ("Service", 'default/a"b\nc'), ("Namespace", "zz-undecodable")}
    expect = {"h1": expect_everywhere | {("Endpoint", ids["eth0"]), ("Endpoint", ids["vm"])},
              "h2": expect_everywhere | {("Endpoint", ids["pairs"])},
              "h3": expect_everywhere | {("Endpoint", ids["mac"])}}
    wait_for(lambda: all(expect[h] <= reported().get(h, set()) for h in expect), 30,
             "every agent to report its quarantined objects")

    # the cluster keeps working: old pods reach each other, a new pod starts and is reachable
    for h, p in pods.items():
        for other in pods.values():
            if other is not p:
                assert lab.reaches(f"{h}/{p.name}", other.ip), f"{h} -> {other.host} after the poison"
    new = lab.run_pod("h1", unique("n"), net)
    assert lab.reaches(f"h1/{new.name}", pods["h2"].ip) and lab.reaches(f"h3/{pods['h3'].name}", new.ip)
    assert lab.reaches(f"h1/{new.name}", pods["h1"].ip)
    table = nsx(lab.host("h1").ns, "nft", "list", "table", "inet", "tether").stdout
    assert 'device "eth0"' not in table and '"eth0"' not in table
    assert "tap" + ids["vm"][:8] not in nsx(lab.host("h1").ns, "ip", "link").stdout

    # the poisoned endpoint on eth0 is deleted (the agents' incremental pass runs): eth0 stays
    write_raw(lab, {}, delete=(f"{P}endpoints/{ids['eth0']}",))
    wait_for(lambda: ("Endpoint", ids["eth0"]) not in reported().get("h1", set()), 30, "h1 to forget the endpoint")
    assert lab.reaches(f"h1/{new.name}", pods["h3"].ip)
    after = {h: host_view(lab.host(h).ns) for h in ("h1", "h2", "h3")}
    for h in after:
        assert after[h][0] == before[h][0], f"{h}'s own links changed"
        assert after[h][1] == before[h][1], f"{h}'s eth0 sysctls changed"
        assert after[h][2] == before[h][2], f"{h}'s nft ruleset outside Tether's table changed"

    # the reasons are shown: tether status, and the endpoint's own page
    cli = [sys.executable, "-m", "tether.cli.main"]
    auth = ["--server", lab.server_url, "--token", lab.token]
    wide = {**os.environ, "COLUMNS": "1000"}
    status = subprocess.run([*cli, "status", *auth], capture_output=True, text=True, timeout=60, check=True,
                            env=wide).stdout
    assert "quarantined" in status and "tcp; drop" in status and "not-an-ip" in status
    shown = json.loads(subprocess.run([*cli, "endpoint", "show", ids["pairs"], *auth, "-o", "json"],
                                      capture_output=True, text=True, timeout=60, check=True).stdout)
    assert "h2" in {q["host"] for q in shown["quarantined"]}  # its own host (the others leave it out too)
    assert all("garbage" in q["reason"] for q in shown["quarantined"])


def test_a_failed_route_is_logged_and_shown_in_tether_status(lab: Lab) -> None:
    """`direct` between hosts on different underlay subnets (h1 198.18.0.0/24, h3 198.18.1.0/24),
    written around the server's checks: h1's route to h3's block fails with "Network is
    unreachable", which h1 reports in its status (and logs at WARNING) instead of only at INFO."""
    net = unique("pd")
    raw = Network(name=net, subnets=[Subnet(cidr="10.53.0.0/16")], encap="direct").model_dump(mode="json")
    write_raw(lab, {f"/tether/v1/networks/{net}": raw})
    wait_for(lambda: net in {n["name"] for n in lab.client().list_raw("Network")}, 10, "the network")
    far = lab.run_pod("h3", unique("d"), net)
    block = next(b["cidr"] for b in lab.client().list_raw("Block", network=net) if b["host"] == "h3")

    def failed() -> list[dict]:
        h1 = next(h for h in lab.client().list_raw("Host") if h["name"] == "h1")
        return [p for p in h1["status"]["failed_ops"] if block in p["name"]]

    wait_for(lambda: failed(), 30, "h1 to report its failed route")
    assert "unreachable" in failed()[0]["reason"].lower()
    cli = [sys.executable, "-m", "tether.cli.main", "status", "--server", lab.server_url, "--token", lab.token]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "COLUMNS": "1000"}).stdout
    assert "failed" in out and block in out and "unreachable" in out.lower()
    log = open(os.path.join(lab.agent_dir("h1"), "agent.log")).read()
    assert any("WARNING kernel operation failed: route " + block in line for line in log.splitlines())
    lab.rm_pod(f"h3/{far.name}")
    write_raw(lab, {}, delete=(f"/tether/v1/networks/{net}",))
