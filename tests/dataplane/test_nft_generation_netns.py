"""The periodic verify against the real kernel, in throwaway namespaces: after Tether's own writes
it reads the ruleset generation and lists nothing; an element deleted or added by hand with `nft`
is found by the next verify and put right by the apply after it; another table written by someone
else makes the verify list the table, and it still finds Tether's intact."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable

import pytest

from tests.dataplane.test_nft_incremental_netns import content
from tests.dataplane.test_nft_netlink_netns import plan
from tether.dataplane import nft
from tether.dataplane.nft import NftDataplane
from tether.dataplane.nft_netlink import ElementSocket

pytestmark = pytest.mark.root  # network namespaces


def nft_in(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", *args], check=True, timeout=30, capture_output=True)


def generation(ns: str) -> int:
    with contextlib.closing(ElementSocket(ns)) as sock:
        return sock.generation()


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Every `nft list table` the dataplane runs (the real one), by namespace."""
    seen: list[str | None] = []
    real = nft.list_table

    def spy(netns: str | None = None) -> list[dict] | None:
        seen.append(netns)
        return real(netns)

    monkeypatch.setattr(nft, "list_table", spy)
    return seen


def test_the_generation_counts_every_commit_in_the_namespace_and_nothing_else(netns: Callable[[], str]) -> None:
    ns = netns()
    g0 = generation(ns)
    nft_in(ns, "add", "table", "inet", "someone_else")
    assert generation(ns) == g0 + 1
    nft_in(ns, "list", "ruleset")  # reading commits nothing
    nft_in(ns, "add", "table", "inet", "someone_else")  # nor does a batch that changes nothing
    assert generation(ns) == g0 + 1


def test_after_its_own_writes_verify_lists_nothing(netns: Callable[[], str], listings: list[str | None]) -> None:
    ns = netns()
    dp = NftDataplane(ns)
    assert dp.apply(plan(0)).full
    g = generation(ns)
    assert dp.verify(plan(0)) and dp.last_verify == "generation"
    assert not dp.apply(plan(1)).full  # element changes over netlink: one commit
    assert generation(ns) == g + 1
    assert dp.verify(plan(1)) and dp.last_verify == "generation"
    assert dp.apply(plan(1)).changed == 0 and generation(ns) == g + 1  # nothing written, nothing committed
    assert dp.verify(plan(1)) and dp.last_verify == "generation"
    assert listings == [ns]  # the first apply's look for a table to adopt, and no more


@pytest.mark.parametrize("edit", [("delete", "10.0.0.1"), ("add", "10.0.0.99")], ids=["deleted", "added"])
def test_an_element_changed_behind_tethers_back_is_found_and_put_right(
        netns: Callable[[], str], listings: list[str | None], edit: tuple[str, str]) -> None:
    ns, fresh = netns(), netns()
    dp = NftDataplane(ns)
    dp.apply(plan(0))
    verb, element = edit
    nft_in(ns, verb, "element", "inet", "tether", "sel4", "{", element, "}")
    listings.clear()
    assert not dp.verify(plan(0)) and dp.last_verify == "listing" and listings == [ns]
    report = dp.apply(plan(0))
    assert report.changes == [f"sel4: {'+1 -0' if verb == 'delete' else '+0 -1'}"], report
    NftDataplane(fresh).apply(plan(0))
    assert content(ns) == content(fresh)
    listings.clear()
    assert dp.verify(plan(0)) and dp.last_verify == "generation" and listings == []


def test_another_table_makes_verify_list_and_find_tethers_intact(netns: Callable[[], str],
                                                                 listings: list[str | None]) -> None:
    ns = netns()
    dp = NftDataplane(ns)
    dp.apply(plan(0))
    nft_in(ns, "add", "table", "inet", "someone_else")
    listings.clear()
    assert dp.verify(plan(0)) and dp.last_verify == "listing" and listings == [ns]
    assert dp.verify(plan(0)) and dp.last_verify == "generation" and listings == [ns]
    assert dp.apply(plan(0)).changed == 0
    nft_in(ns, "list", "table", "inet", "someone_else")  # left alone


def test_a_batch_refused_after_a_change_by_hand_is_replaced_whole_and_then_trusted(
        netns: Callable[[], str], listings: list[str | None]) -> None:
    ns, fresh = netns(), netns()
    dp = NftDataplane(ns)
    dp.apply(plan(0))
    nft_in(ns, "delete", "element", "inet", "tether", "sel4", "{", "10.0.0.1", "}")
    report = dp.apply(plan(1))  # deletes 10.0.0.1 too: the kernel refuses the batch
    assert report.full and "incremental update failed" in report.changes[0], report
    NftDataplane(fresh).apply(plan(1))
    assert content(ns) == content(fresh)
    listings.clear()
    assert dp.verify(plan(1)) and dp.last_verify == "generation" and listings == []
