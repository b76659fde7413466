"""8 processes acting as 8 hosts create endpoints through the API, on each engine: 2,000 in the test
suite (TETHER_STORM_ENDPOINTS for more; `python -m bench.ipam --endpoints 20000` for the full size)."""

from __future__ import annotations

import ipaddress
import os
from collections import Counter

import pytest
from bench.ipam import create_storm, delete_storm, prepare

TOTAL = int(os.environ.get("TETHER_STORM_ENDPOINTS", "2000"))
CIDR = "10.64.0.0/14"


@pytest.mark.slow
def test_8_hosts_create_thousands_of_endpoints_without_duplicates_then_return_network_to_empty(server):
    hosts = [f"h{i}" for i in range(8)]
    prepare(server.url, server.token, "storm", CIDR, hosts)
    made, secs = create_storm(server.url, server.token, "storm", hosts, TOTAL)
    assert len(made) == TOTAL
    ips = [ip for _, ip, _ in made]
    assert len(set(ips)) == TOTAL, "duplicate addresses"
    net = ipaddress.ip_network(CIDR)
    assert all(ipaddress.ip_address(ip) in net for ip in ips)
    c = server.client()
    blocks = c.list_raw("Block", network="storm")
    owner_of = {ip: host for _, ip, host in made}
    allocated = Counter()
    for b in blocks:
        assert b["host"] in hosts
        for ip in b["allocations"]:
            allocated[ip] += 1
            assert ipaddress.ip_address(ip) in ipaddress.ip_network(b["cidr"])
            assert owner_of[ip] == b["host"], "a host allocated outside its own blocks while free blocks remained"
    assert set(allocated) == set(ips) and max(allocated.values()) == 1
    eps = c.list_raw("Endpoint", network="storm")
    assert len(eps) == TOTAL

    delete_storm(server.url, server.token, [m[0] for m in made], 8)
    assert c.list_raw("Endpoint", network="storm") == []
    assert all(not b["allocations"] for b in c.list_raw("Block", network="storm"))
    c.delete("Network", "storm")
    assert c.list_raw("Block", network="storm") == []
