"""The agent's in-process echo (`agent/icmp.py`) between throwaway namespaces, as path health uses it
(`agent/peers.py`): a peer answers with a round trip, many echoes share one socket, a lost one is None
within its timeout, Don't Fragment holds (a larger packet is refused at send, or by a router on the way
instead of being fragmented) so `carried_mtu` finds a smaller path, and an echo bound to a device
goes through that device whatever the routes say."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable

import pytest

from tether.agent.icmp import Pinger
from tether.agent.peers import carried_mtu

pytestmark = pytest.mark.root  # network namespaces

ADDRS = {4: ("192.0.2.1/24", "192.0.2.2/24"), 6: ("fd00:29::1/64", "fd00:29::2/64")}
PEER = {4: "192.0.2.2", 6: "fd00:29::2"}
TARGET = "203.0.113.9"  # on the far namespace's loopback, reached over either of two links


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, timeout=30)


def veth(a: str, b: str, name_a: str, name_b: str, addr_a: list[str], addr_b: list[str], mtu: int = 1500) -> None:
    """A veth pair made straight in its two namespaces (nothing in this one), addressed and up."""
    ip(a, "link", "add", name_a, "mtu", str(mtu), "type", "veth", "peer", "name", name_b, "netns", b, "mtu", str(mtu))
    for ns, name, addrs in ((a, name_a, addr_a), (b, name_b, addr_b)):
        for addr in addrs:
            ip(ns, "addr", "add", addr, "dev", name, *(["nodad"] if ":" in addr else []))
        ip(ns, "link", "set", name, "up")
        ip(ns, "link", "set", "lo", "up")


def two_hosts(netns: Callable[[], str], mtu: int = 1500) -> tuple[str, str]:
    a, b = netns(), netns()
    veth(a, b, "eth0", "eth0", [ADDRS[4][0], ADDRS[6][0]], [ADDRS[4][1], ADDRS[6][1]], mtu)
    return a, b


async def ready(pinger: Pinger, ip: str) -> None:
    """Until `ip` answers once: IPv6 on a veth just set up loses its first neighbour solicitation
    for ~0.5 s (the `ping` binary's first echo too), which is not what these tests are about."""
    for _ in range(50):
        if await pinger.ping(ip, 100, timeout=0.1) is not None:
            return
    raise AssertionError(f"{ip} never answered: the test's namespaces are wrong")


@pytest.mark.parametrize("version", [4, 6])
async def test_a_peer_answers_many_echoes_in_flight_on_one_socket_each_with_its_round_trip(
        netns: Callable[[], str], version: int) -> None:
    a, _b = two_hosts(netns)
    pinger = Pinger(a)
    try:
        await ready(pinger, PEER[version])
        rtts = await asyncio.gather(*(pinger.ping(PEER[version], 1000 + i) for i in range(24)))
    finally:
        pinger.close()
    assert all(r is not None and 0 <= r < 1000 for r in rtts), rtts


async def test_a_lost_echo_is_none_within_its_timeout_while_the_others_are_answered(
        netns: Callable[[], str]) -> None:
    a, _b = two_hosts(netns)
    pinger = Pinger(a)
    start = time.monotonic()
    try:
        lost, answered = await asyncio.gather(pinger.ping("192.0.2.99", 100, timeout=0.5),  # nobody's
                                              pinger.ping(PEER[4], 100, timeout=0.5))
    finally:
        pinger.close()
    assert lost is None and answered is not None
    assert time.monotonic() - start < 0.9


@pytest.mark.parametrize("version", [4, 6])
async def test_a_packet_larger_than_the_link_is_refused_and_carried_mtu_finds_the_link(
        netns: Callable[[], str], version: int) -> None:
    a, _b = two_hosts(netns, mtu=1400)
    pinger = Pinger(a)
    try:
        await ready(pinger, PEER[version])
        assert await pinger.ping(PEER[version], 1400) is not None
        start = time.monotonic()
        assert await pinger.ping(PEER[version], 1500) is None  # EMSGSIZE: not fragmented
        assert time.monotonic() - start < 0.5, "refused at send, not lost"
        found = await carried_mtu(pinger, PEER[version], 1500)
    finally:
        pinger.close()
    assert found is not None and 1392 <= found <= 1400, found


async def test_dont_fragment_is_on_the_wire_a_router_with_a_smaller_link_refuses_it(
        netns: Callable[[], str]) -> None:
    """a -(1500)- r -(1400)- b: without DF the router would fragment the 1500-byte echo and b answer."""
    a, r, b = netns(), netns(), netns()
    veth(a, r, "eth0", "left", ["192.0.2.1/24"], ["192.0.2.254/24"])
    veth(r, b, "right", "eth0", ["198.51.100.254/24"], ["198.51.100.2/24"], mtu=1400)
    subprocess.run(["ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True, timeout=30)
    ip(a, "route", "add", "198.51.100.0/24", "via", "192.0.2.254")
    ip(b, "route", "add", "default", "via", "198.51.100.254")
    pinger = Pinger(a)
    try:
        assert await pinger.ping("198.51.100.2", 1400) is not None
        assert await pinger.ping("198.51.100.2", 1500) is None
        found = await carried_mtu(pinger, "198.51.100.2", 1500)
    finally:
        pinger.close()
    assert found is not None and 1392 <= found <= 1400, found


def two_links(netns: Callable[[], str]) -> tuple[str, str]:
    """a reaches TARGET (b's loopback) by its routes through d1, and through d2 at a higher metric;
    b drops echo requests that come in through d1's far end."""
    a, b = netns(), netns()
    veth(a, b, "d1", "e1", ["192.0.2.1/24"], ["192.0.2.2/24"])
    link_d2(a, b)
    ip(b, "addr", "add", f"{TARGET}/32", "dev", "lo")
    ip(a, "route", "add", TARGET, "via", "192.0.2.2", "dev", "d1")
    subprocess.run(["ip", "netns", "exec", b, "nft", "-f", "-"], check=True, text=True, timeout=30,
                   input='table inet t {\n chain c {\n type filter hook input priority 0;\n'
                         ' iifname "e1" icmp type echo-request drop\n }\n}\n')
    return a, b


def link_d2(a: str, b: str) -> None:
    veth(a, b, "d2", "e2", ["198.51.100.1/24"], ["198.51.100.2/24"])
    ip(a, "route", "add", TARGET, "via", "198.51.100.2", "dev", "d2", "metric", "200")


async def test_an_echo_bound_to_a_device_goes_through_that_device(netns: Callable[[], str]) -> None:
    a, _b = two_links(netns)
    pinger = Pinger(a)
    try:
        by_route, via_d1, via_d2 = await asyncio.gather(pinger.ping(TARGET, 1000, timeout=0.5),
                                                        pinger.ping(TARGET, 1000, "d1", timeout=0.5),
                                                        pinger.ping(TARGET, 1000, "d2", timeout=0.5))
    finally:
        pinger.close()
    assert by_route is None and via_d1 is None, "the routes' path (through d1) is dropped at b"
    assert via_d2 is not None, "only the path bound to d2 answers"


async def test_a_missing_device_is_none_and_one_made_again_is_used_again(netns: Callable[[], str]) -> None:
    a, b = two_links(netns)
    pinger = Pinger(a)
    try:
        assert await pinger.ping(TARGET, 100, "nosuch0", timeout=0.5) is None
        assert await pinger.ping(TARGET, 100, "d2", timeout=0.5) is not None
        ip(a, "link", "del", "d2")
        assert await pinger.ping(TARGET, 100, "d2", timeout=0.5) is None
        link_d2(a, b)  # a new device of the same name (a new index): the old bound socket would not reach it
        assert await pinger.ping(TARGET, 100, "d2", timeout=0.5) is not None
    finally:
        pinger.close()
