"""200 pods created and deleted through the real CNI plugin leave nothing behind: no veth, route,
neighbour, FDB entry, nft element, address, block or store object."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.fixtures.lab import make_lab, unique
from tether.lab.cluster import Lab, lab_namespaces, wait_for
from tether.lab.inspect import kernel_state, leftovers
from tether.model import Network, Subnet

pytestmark = [pytest.mark.lab, pytest.mark.slow]
PODS = 200


@pytest.fixture
def gc_lab() -> Iterator[Lab]:
    lab = make_lab(server_args=["--empty-block-grace", "1", "--gc-interval", "1"])
    try:
        yield lab
    finally:
        lab.down()


def test_200_pods_created_and_deleted_leak_nothing(gc_lab: Lab) -> None:
    lab = gc_lab
    c = lab.client()
    net = unique("n")
    c.create_network(Network(name=net, subnets=[Subnet(cidr="10.45.0.0/16")], encap="auto", block_size=27))
    time.sleep(0.5)
    hosts = [h.name for h in lab.state.hosts]
    before = {h: kernel_state(lab.host(h).ns, handles=False) for h in hosts}

    pods = [lab.run_pod(hosts[i % len(hosts)], f"p{i}", net) for i in range(PODS)]
    assert len({p.ip for p in pods}) == PODS
    assert len(c.list_raw("Endpoint", network=net)) == PODS
    # spot-check the datapath is really there: first and last pods reach each other across hosts
    assert lab.reaches(f"{pods[0].host}/{pods[0].name}", pods[-2].ip)
    assert sum(len(leftovers(lab.host(h).ns)["veths"]) for h in hosts) == PODS

    for p in pods:
        lab.rm_pod(f"{p.host}/{p.name}")

    assert c.list_raw("Endpoint", network=net) == []
    # empty blocks go back to the pool after the (shortened) grace; agents then drop the block routes
    wait_for(lambda: c.list_raw("Block", network=net) == [], 30, "empty blocks to return to the pool")
    def state(h: str) -> dict:
        return kernel_state(lab.host(h).ns, handles=False)

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(state(h) == before[h] for h in hosts):
        time.sleep(0.5)
    for h in hosts:  # every host's kernel state is back to what it was before the pods
        assert state(h) == before[h], h
    for h in hosts:
        assert leftovers(lab.host(h).ns) == {"veths": [], "pod_routes": [], "nft_elements": [], "nft_chains": []}
    assert [ns for ns in lab_namespaces(lab.name) if ns.count("-") > 1] == []
