"""The periodic verify without a kernel: it lists the table only when the ruleset generation says
something other than our own last write was committed (tether.dataplane.nft's module docstring);
the namespace test (test_nft_generation_netns.py) proves the same against the real kernel."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dataplane.test_nft_incremental import FakeKernel, base_plan, with_set
from tether.calc.plan import NftPlan, NftSet
from tether.dataplane import nft
from tether.dataplane.nft import NftDataplane


def listed(plan: NftPlan, drop: tuple[str, str] | None = None) -> list[dict]:
    """`plan` as `nft -j list table` shows it (without element `drop`: (set, element))."""
    out: list[dict] = [{"chain": {"name": nft.structure_hash(plan)}}]
    for s in plan.sets:
        elems = [e for e in s.elements if drop is None or (s.name, e) != drop]
        out.append({"map" if s.map_type else "set": {"name": s.name, "elem": nft.rendered(s, elems)}})
    out += [{"chain": {"name": c.name}} for c in plan.chains]
    out += [{"rule": {"chain": c.name}} for c in plan.chains for _ in c.rules]
    return out


class Kernel(FakeKernel):
    """A FakeKernel that also lists a table (`table`) and counts the listings."""

    def __init__(self) -> None:
        super().__init__()
        self.table: list[dict] | None = None
        self.listings = 0
        self.readable = True

    def list_table(self, netns: str | None = None) -> list[dict] | None:
        self.listings += 1
        return self.table

    def generation(self, sock: object) -> int | None:
        return self.gen if self.readable else None


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernel]:
    k = Kernel()
    monkeypatch.setattr(nft, "run_nft", k.run)
    monkeypatch.setattr(nft, "run_elements", k.run_elements)
    monkeypatch.setattr(nft, "list_table", k.list_table)
    monkeypatch.setattr(nft, "read_generation", k.generation)
    yield k


def applied(kernel: Kernel, plan: NftPlan) -> NftDataplane:
    dp = NftDataplane("nowhere")
    assert dp.apply(plan).full
    kernel.table = listed(plan)
    kernel.listings = 0
    return dp


def member(plan: NftPlan, ip: str) -> NftPlan:
    return with_set(plan, NftSet("sel-1", "ipv4_addr", elements=frozenset({"10.0.0.1", ip})))


def test_after_writes_that_were_the_only_commits_verify_lists_nothing(kernel: Kernel) -> None:
    plan = base_plan()
    dp = applied(kernel, plan)
    assert dp.verify(plan) and dp.last_verify == "generation" and kernel.listings == 0
    bigger = member(plan, "10.0.0.7")
    assert not dp.apply(bigger).full and kernel.gen == 102  # an element batch: one more commit
    assert dp.verify(bigger) and dp.last_verify == "generation" and kernel.listings == 0
    assert dp.apply(bigger).changed == 0  # nothing to write: the generation stays ours
    assert dp.verify(bigger) and kernel.listings == 0


def test_another_commit_makes_verify_list_and_a_matching_listing_makes_the_generation_ours(kernel: Kernel) -> None:
    plan = base_plan()
    dp = applied(kernel, plan)
    kernel.gen += 1  # someone wrote another table (or ours)
    assert dp.verify(plan) and dp.last_verify == "listing" and kernel.listings == 1
    assert dp.verify(plan) and dp.last_verify == "generation" and kernel.listings == 1


def test_an_element_deleted_behind_our_back_is_found_and_put_back_and_then_trusted(kernel: Kernel) -> None:
    plan = base_plan()
    dp = applied(kernel, plan)
    kernel.table, kernel.gen = listed(plan, drop=("sel-1", "10.0.0.1")), kernel.gen + 1
    assert not dp.verify(plan) and kernel.listings == 1
    # the next apply adopts the listed table (same structure) and adds the element back
    report = dp.apply(plan)
    assert not report.full and report.changes == ["sel-1: +1 -0"], report
    kernel.table = listed(plan)
    assert dp.verify(plan) and dp.last_verify == "generation" and kernel.listings == 2


@pytest.mark.parametrize("commits", [0, 2], ids=["committed-nothing", "raced-another-commit"])
def test_a_write_that_was_not_exactly_one_commit_is_not_trusted(kernel: Kernel, commits: int) -> None:
    plan = base_plan()
    dp = applied(kernel, plan)
    kernel.commits = commits
    bigger = member(plan, "10.0.0.7")
    dp.apply(bigger)
    kernel.table = listed(bigger)
    assert dp.verify(bigger) and dp.last_verify == "listing" and kernel.listings == 1


def test_a_write_made_while_the_kernel_was_unknown_is_not_trusted(kernel: Kernel) -> None:
    """An incremental write assumes the table is what we remember: after a commit we did not see,
    its one commit does not prove the table whole (a deleted element would stay deleted)."""
    plan = base_plan()
    dp = applied(kernel, plan)
    kernel.gen += 1
    bigger = member(plan, "10.0.0.7")
    assert not dp.apply(bigger).full
    kernel.table = listed(bigger)
    assert dp.verify(bigger) and dp.last_verify == "listing"


def test_a_failed_batch_is_followed_by_a_full_replace_that_is_trusted(kernel: Kernel) -> None:
    plan = base_plan()
    dp = applied(kernel, plan)
    kernel.fail = 1
    bigger = member(plan, "10.0.0.7")
    assert dp.apply(bigger).full
    assert dp.verify(bigger) and dp.last_verify == "generation" and kernel.listings == 0


def test_forgetting_makes_the_next_verify_list(kernel: Kernel) -> None:
    plan = base_plan()
    dp = applied(kernel, plan)
    dp.forget()
    assert dp.verify(plan) and dp.last_verify == "listing" and kernel.listings == 1


def test_verify_lists_now_and_then_whatever_the_generation(kernel: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = base_plan()
    dp = applied(kernel, plan)
    monkeypatch.setattr(nft, "FULL_VERIFY_EVERY", 0.0)
    assert dp.verify(plan) and dp.last_verify == "listing" and kernel.listings == 1


def test_without_a_readable_generation_every_verify_lists(kernel: Kernel) -> None:
    kernel.readable = False
    plan = base_plan()
    dp = applied(kernel, plan)
    assert dp.verify(plan) and dp.verify(plan) and kernel.listings == 2
