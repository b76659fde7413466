"""Property tests of IPAM logic over a real (SQLite) store, driven through `Objects`."""

from __future__ import annotations

import asyncio
import ipaddress
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.model import Endpoint, Host, Network, Subnet
from tether.server.ipam import Ipam
from tether.server.objects import ApiError, Objects
from tether.store.sqlite import SqliteStore

ops = st.lists(st.tuples(st.sampled_from(["add", "add", "add", "del"]), st.integers(0, 3), st.integers(0, 10_000)),
               min_size=1, max_size=120)


async def run_ops(sequence, prefix_len: int, block_size: int):
    with tempfile.TemporaryDirectory() as d:
        store = SqliteStore(f"{d}/t.db")
        o = Objects(store, Ipam(store), service_cidr="10.96.0.0/16", vtep_cidr="169.254.64.0/18")
        cidr = f"10.7.0.0/{prefix_len}"
        await o.put_network(Network(name="n", subnets=[Subnet(cidr=cidr, gateway="10.7.0.1")],
                                    block_size=block_size), True)
        for h in range(4):
            await o.register_host(Host(name=f"h{h}", underlay_ip=f"198.18.0.{h + 1}"))
        live: dict[str, Endpoint] = {}
        capacity = ipaddress.ip_network(cidr).num_addresses - 3  # network, broadcast, gateway
        for i, (op, host, pick) in enumerate(sequence):
            if op == "add":
                try:
                    ep, _ = await o.create_endpoint(Endpoint(name=f"e{i}", network="n", host=f"h{host}"))
                    live[ep.id] = ep
                except ApiError as e:
                    assert len(live) == capacity, f"refused with free space: {e.detail}"
                    assert "is full" in e.detail
            elif live:
                victim = sorted(live)[pick % len(live)]
                await o.delete_endpoint(victim)
                del live[victim]
            ips = [ip for ep in live.values() for ip in ep.ips]
            assert len(ips) == len(set(ips))
        blocks = await o.ipam.blocks_all()
        in_blocks = {ip: h for _, b in blocks.values() for ip, h in b.allocations.items()}
        assert set(in_blocks) == {ip for ep in live.values() for ip in ep.ips}
        for ep in live.values():
            for ip in ep.ips:
                a = ipaddress.ip_address(ip)
                assert a in ipaddress.ip_network(cidr)
                assert ip not in ("10.7.0.0", "10.7.0.1", str(ipaddress.ip_network(cidr).broadcast_address))
                assert in_blocks[ip] == ep.handle
        await store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.sampled_from([26, 27, 28]), st.sampled_from([28, 29, 30]))
def test_addresses_are_unique_inside_the_network_and_match_the_blocks(sequence, prefix_len, block_size):
    asyncio.run(run_ops(sequence, prefix_len, max(block_size, prefix_len)))


async def test_host_prefers_own_blocks_then_claims_then_borrows(tmp_path):
    store = SqliteStore(f"{tmp_path}/t.db")
    o = Objects(store, Ipam(store), service_cidr="10.96.0.0/16", vtep_cidr="169.254.64.0/18")
    await o.put_network(Network(name="n", subnets=[Subnet(cidr="10.8.0.0/27")], block_size=28), True)
    for h in ("a", "b"):
        await o.register_host(Host(name=h, underlay_ip="198.18.0.9"))
    a1, _ = await o.create_endpoint(Endpoint(name="a1", network="n", host="a"))
    b1, _ = await o.create_endpoint(Endpoint(name="b1", network="n", host="b"))
    assert ipaddress.ip_address(a1.ips[0]) in ipaddress.ip_network("10.8.0.0/28")
    assert ipaddress.ip_address(b1.ips[0]) in ipaddress.ip_network("10.8.0.16/28")  # b claimed the other block
    made = [a1]
    for i in range(15):  # fill a's block (15 usable: .0 is the network address) and then borrow from b's
        ep, _ = await o.create_endpoint(Endpoint(name=f"a{i + 2}", network="n", host="a"))
        made.append(ep)
    borrowed = [ep for ep in made if ipaddress.ip_address(ep.ips[0]) in ipaddress.ip_network("10.8.0.16/28")]
    assert len(borrowed) == 1
    # static address, and its release by handle is idempotent
    s, _ = await o.create_endpoint(Endpoint(name="s", network="n", host="b", ips=["10.8.0.30"], handle="cid/eth0"))
    assert s.ips == ["10.8.0.30"]
    again, created = await o.create_endpoint(Endpoint(name="s", network="n", host="b", handle="cid/eth0"))
    assert not created and again.id == s.id
    assert await o.delete_endpoint(s.id) is not None
    assert await o.delete_endpoint(s.id) is None
    await store.close()


def test_a_dual_stack_network_gives_one_address_of_each_family() -> None:
    async def go() -> None:
        with tempfile.TemporaryDirectory() as d:
            store = SqliteStore(f"{d}/t.db")
            o = Objects(store, Ipam(store), service_cidr="10.96.0.0/16", vtep_cidr="169.254.64.0/18")
            await o.put_network(Network(name="ds", subnets=[Subnet(cidr="10.71.0.0/16"),
                                                            Subnet(cidr="fd00:71::/64")]), True)
            await o.register_host(Host(name="h0", underlay_ip="198.18.0.1"))
            for i in range(3):  # the second and third find the host's blocks of both families
                ep, _ = await o.create_endpoint(Endpoint(name=f"e{i}", network="ds", host="h0"))
                assert sorted(ipaddress.ip_address(ip).version for ip in ep.ips) == [4, 6]
    asyncio.run(go())
