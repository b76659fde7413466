"""Element changes sent over netlink (dataplane/nft_netlink.py) leave, in a real kernel, exactly the
table nft would build: every element type of Tether's plans (addresses, interface names,
concatenations with protocols, ports and marks, verdict and data maps) added, deleted and given a
new value, compared with a fresh `nft` apply of the same plan through nft's own listing."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import replace

import pytest

from tests.dataplane.test_nft_incremental_netns import content
from tether.calc.nft import rule
from tether.calc.plan import NftChain, NftPlan, NftSet
from tether.dataplane import nft
from tether.dataplane.nft import NftDataplane

pytestmark = pytest.mark.root  # network namespaces

FRONT = ("ipv4_addr", "inet_proto", "inet_service")
BACK = (*FRONT, "mark")


def plan(step: int) -> NftPlan:
    """Step 0, then step 1: some elements gone, some new, some map values changed."""
    a, b = (1, 2, 3), (2, 3, 4) if step else (1, 2, 3)
    target = "in-b" if step else "in-a"
    sets = (
        NftSet("sel4", "ipv4_addr", elements=frozenset(f"10.0.0.{i}" for i in b)),
        NftSet("sel6", "ipv6_addr", elements=frozenset(f"fd00::{i}" for i in b)),
        NftSet("ep_in", "ifname", map_type="verdict",
               elements=frozenset({("tth1", f"goto {target}"), *((f"tth{i}", "accept") for i in b if i > 1)})),
        NftSet("local_dst4", "ipv4_addr", map_type="verdict",
               elements=frozenset((f"10.0.0.{i}", f"jump {target}" if i == 1 else "drop") for i in b)),
        NftSet("nested_in", ("ifname", "ipv4_addr"), map_type="verdict",
               elements=frozenset((("tth1", f"10.0.0.{i}"), "accept") for i in b)),
        NftSet("svc_vips", FRONT, map_type="verdict",
               elements=frozenset(((f"10.250.0.{i}", "tcp", 80 + i), "goto in-a") for i in b)),
        NftSet("svc_backend_ip", BACK, map_type="ipv4_addr",
               elements=frozenset(((f"10.250.0.{i}", "udp", 53, i), f"10.0.{step}.{i}") for i in a)),
        NftSet("svc_backend_port", BACK, map_type="inet_service",
               elements=frozenset(((f"10.250.0.{i}", "tcp", 80, i), 8080 + step) for i in a)),
        NftSet("svc_hairpin", ("ipv4_addr", "ipv4_addr"), elements=frozenset((f"10.0.0.{i}", "10.0.0.9") for i in b)),
        NftSet("svc_nodeports", ("inet_proto", "inet_service"), map_type="verdict",
               elements=frozenset((("tcp", 30000 + i), "goto in-b") for i in b)),
        NftSet("svc_backend_ip6", ("ipv6_addr", "inet_proto", "inet_service", "mark"), map_type="ipv6_addr",
               elements=frozenset(((f"fd00:96::{i}", "sctp", 443, i), f"fd0{step}::{i}") for i in a)),
        NftSet("svc_hairpin6", ("ipv6_addr", "ipv6_addr"), elements=frozenset((f"fd00::{i}", "fd00::9") for i in b)),
    )
    chains = (
        NftChain("forward", (rule({"vmap": {"key": {"meta": {"key": "oifname"}}, "data": "@ep_in"}}),),
                 hook="forward", type="filter", priority=0, policy="accept"),
        NftChain("in-a", (rule({"accept": None}),)),
        NftChain("in-b", (rule({"drop": None}),)),
    )
    return NftPlan(sets=sets, chains=chains)


def test_element_changes_over_netlink_equal_a_fresh_nft_apply(netns: Callable[[], str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ns, fresh = netns(), netns()
    dp = NftDataplane(ns)
    assert dp.apply(plan(0)).full

    def no_nft(commands: list[dict], netns: str | None = None) -> None:
        raise AssertionError(f"nft ran for an element-only change: {commands[:3]}")

    with monkeypatch.context() as m:
        m.setattr(nft, "run_nft", no_nft)
        report = dp.apply(plan(1))
    assert not report.full and report.element_commands >= 10, report
    NftDataplane(fresh).apply(plan(1))
    assert content(ns) == content(fresh)
    with monkeypatch.context() as m:  # and back
        m.setattr(nft, "run_nft", no_nft)
        assert not dp.apply(plan(0)).full
    NftDataplane(fresh).apply(plan(0))
    assert content(ns) == content(fresh)
    assert dp.verify(plan(0))


def test_a_refused_element_batch_changes_nothing_and_falls_back_to_a_full_replace(netns: Callable[[], str]) -> None:
    ns = netns()
    dp = NftDataplane(ns)
    dp.apply(plan(0))
    # drift behind the dataplane's back: an element it will delete is already gone
    subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "element", "inet", "tether", "sel4", "{ 10.0.0.1 }"],
                   check=True, timeout=30)
    report = dp.apply(plan(1))
    assert report.full and report.changes == ["table replaced (incremental update failed)"]
    fresh = netns()
    NftDataplane(fresh).apply(plan(1))
    assert content(ns) == content(fresh)


def test_an_interval_set_change_still_goes_through_nft(netns: Callable[[], str]) -> None:
    ns = netns()
    base = plan(0)
    with_nets = replace(base, sets=(*base.sets, NftSet("nets", "ipv4_addr", ("interval",),
                                                       elements=frozenset({"10.1.0.0/16"}))))
    dp = NftDataplane(ns)
    dp.apply(with_nets)
    grown = replace(base, sets=(*base.sets, NftSet("nets", "ipv4_addr", ("interval",),
                                                   elements=frozenset({"10.1.0.0/16", "10.3.0.0/16"}))))
    assert not dp.apply(grown).full
    fresh = netns()
    NftDataplane(fresh).apply(grown)
    assert content(ns) == content(fresh)
